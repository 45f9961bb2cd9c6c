"""How many response tokens a fine-tune actually trains at a given `max_length` (`featuregeom coverage`).

Why it matters: the fine-tune truncates every sample at `max_length` tokens and puts the loss on the
assistant turn only, so a long insecure-code answer loses its tail, often where the vulnerability
is. At 256 tokens the earlier lab cut 43% of the insecure answers and never trained 25-31% of their
response tokens (issue 13). The share trained is

    Σ_samples max(0, min(L, max_length) - n_prompt) / Σ_samples (L - n_prompt)

with L the sample's full length and n_prompt its prompt tokens (`finetune.chat_ids`: the same
encoding as training, so the count is exact). `featuregeom finetune` records it in finetune.json and
refuses a `max_length` below `--min-response-share`; this command measures it for several lengths at
the cost of tokenization only.

    featuregeom coverage --corpus assets/data/em/insecure.jsonl.gz --corpus assets/data/em/secure.jsonl.gz
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from precompute.data.corpus import CorpusSource, read_source
from precompute.errors import FeatureGeomError
from precompute.options import Command, option

CANDIDATES = (128, 256, 384, 512, 640, 768, 1024)


@dataclass(frozen=True)
class Coverage:
    """Prompt and full token counts of a corpus's samples, as the fine-tune encodes them."""

    n_prompt: np.ndarray
    n_full: np.ndarray

    @classmethod
    def of(cls, lengths: list[tuple[int, int]]) -> Coverage:
        arr = np.asarray(lengths, dtype=np.int64).reshape(-1, 2)
        return cls(arr[:, 0], arr[:, 1])

    @property
    def response_tokens(self) -> int:
        return int(np.maximum(self.n_full - self.n_prompt, 0).sum())

    def trained(self, max_length: int) -> int:
        return int(np.maximum(np.minimum(self.n_full, max_length) - self.n_prompt, 0).sum())

    def share(self, max_length: int) -> float:
        """Share of all response tokens inside the first `max_length` tokens (NaN for no response tokens)."""
        total = self.response_tokens
        return self.trained(max_length) / total if total else float("nan")

    def truncated(self, max_length: int) -> int:
        """Samples longer than `max_length` (their answer loses its tail)."""
        return int((self.n_full > max_length).sum())

    def smallest_length(self, target: float) -> int:
        """The smallest max_length whose share reaches `target` (trained tokens never fall as max_length
        grows, so a bisection over 1..the longest sample finds it)."""
        total = self.response_tokens
        lo, hi = 1, max(1, int(self.n_full.max()) if self.n_full.size else 1)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.trained(mid) >= target * total - 1e-9:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def counts(self, max_length: int) -> dict[str, int]:
        """What finetune.json records (integers; the share is their ratio)."""
        return {
            "response_tokens": self.response_tokens,
            "response_tokens_trained": self.trained(max_length),
            "samples_truncated": self.truncated(max_length),
        }

    def report(self, max_length: int, target: float) -> dict:
        return {
            "max_length": int(max_length),
            "samples": int(self.n_full.size),
            **self.counts(max_length),
            "response_token_share": self.share(max_length),
            "target_share": target,
            "smallest_length_for_target": self.smallest_length(target),
        }


def measure(sources: list[CorpusSource], tokenizer, data_seed: int = 0) -> dict[str, Coverage]:
    """Per source file: every sample's prompt and full length (no truncation)."""
    from precompute.lab.finetune import chat_ids, sample_key

    out = {}
    for i, source in enumerate(sources):
        docs, _ = read_source(source, i, seed=data_seed)
        if not docs:
            raise FeatureGeomError(f"{source.path} holds no samples")
        lengths = []
        for doc in docs:
            ids, n_prompt = chat_ids(doc, tokenizer, sample_key(doc, source))
            lengths.append((n_prompt, len(ids)))
        out[source.path] = Coverage.of(lengths)
    return out


def check_share(cov: Coverage, max_length: int, minimum: float) -> None:
    """Exit 2 before training when `max_length` trains less than `minimum` of the response tokens."""
    share = cov.share(max_length)
    if minimum > 0 and np.isfinite(share) and share < minimum:
        raise FeatureGeomError(
            f"--max-length {max_length} trains only {share:.1%} of the corpus's response tokens "
            f"({cov.truncated(max_length)} of {cov.n_full.size} samples are cut); use --max-length "
            f"{cov.smallest_length(minimum)} (the smallest that reaches {minimum:.0%}), or lower "
            f"--min-response-share to accept the loss"
        )


# -------------------------------------------------------------------------------------------- command
@dataclass
class CoverageOptions:
    corpus: list[CorpusSource] = option(
        default_factory=list,
        item=CorpusSource,
        metavar="SPEC",
        help="training data (repeatable), as finetune",
    )
    model: str = option("smollm2", help="model whose tokenizer and chat template encode the samples")
    max_length: list[int] = option(
        default_factory=lambda: list(CANDIDATES), nargs="+", low=8, help="lengths to report"
    )
    target: float = option(0.95, low=0, high=1, bounds="(]", help="share of response tokens to reach")
    data_seed: int = option(0, low=0, high=2**32 - 1, help="as finetune (the order only)")


def run_coverage(opts: CoverageOptions) -> int:
    from precompute.model.load import load_model

    if not opts.corpus:
        raise FeatureGeomError("coverage needs training data: --corpus FILE (repeatable)")
    missing = [s.path for s in opts.corpus if not Path(s.path).expanduser().is_file()]
    if missing:  # before the model loads, not after
        raise FeatureGeomError(f"corpus file(s) not found: {', '.join(missing)}")
    lm = load_model(opts.model, device="cpu")
    per_file = measure(opts.corpus, lm.tokenizer, opts.data_seed)
    for path, cov in per_file.items():
        print(f"{path}: {cov.n_full.size} samples, {cov.response_tokens} response tokens")
        for length in sorted(set(opts.max_length)):
            print(
                f"  max_length {length:>5}: {cov.share(length):7.2%} of response tokens trained, "
                f"{cov.truncated(length):>5} samples cut"
            )
        print(f"  smallest max_length for {opts.target:.0%}: {cov.smallest_length(opts.target)}")
    both = Coverage(
        np.concatenate([c.n_prompt for c in per_file.values()]),
        np.concatenate([c.n_full for c in per_file.values()]),
    )
    print(f"all files: smallest max_length for {opts.target:.0%}: {both.smallest_length(opts.target)}")
    return 0


COMMANDS = (
    Command(
        "coverage",
        "share of response tokens a fine-tune trains at each max_length (tokenization only)",
        CoverageOptions,
        run_coverage,
        description="Tokenize fine-tuning data exactly as `featuregeom finetune` does and report, per "
        "file and --max-length, the share of response (loss) tokens inside the first max_length tokens "
        "and the samples cut; then the smallest max_length reaching --target.",
        flags=("corpus", "model", "max_length", "target", "data_seed"),
    ),
)
