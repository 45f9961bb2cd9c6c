"""`featuregeom triage DATASET`: rank a fine-tuning dataset's samples by how much they drive harmful-neighbour features.

Score. Fine-tuning on a sample strengthens the features active on its trained (assistant) tokens;
when a task feature's decoder direction overlaps a harmful one, strengthening it moves the harmful
direction too. So every feature j gets a weight

    w_j = 1                                          for harmful features (they are driven directly)
    w_j = Σ_h max(0, cos(d_j, d_h) − c_null)         for task features (overlap with each harmful h
                                                      beyond the cache's null cosine)
    w_j = 0                                          otherwise

and each trained token t gets s_t = Σ_j a_j(x_t) · w_j, split into `direct` (harmful j) and
`via_overlap` (task j). A sample's score is the mean of s_t over its trained tokens ("push per
trained token"; `score_sum` is the total). Rankings, per-token scores for highlighting, the filtered
dataset (top `--remove-frac` removed) and a same-size random removal (the experiment's control) are
written to OUT, by default CACHE/triage/DATASET-STEM where the explorer finds them.

Only chat records whose `messages` list ends in an assistant turn are scored; every other record is
counted per reason (printed, and in triage.json under `skipped`) and kept in both filtered files.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from precompute.data.corpus import CorpusSource, Document, MalformedRecord, read_source, to_documents
from precompute.data.records import ReadStats, read_records
from precompute.errors import CorpusError, FeatureGeomError
from precompute.lab.harm_geometry import HarmGeometry, check_harm_cache, load_harm_geometry
from precompute.options import Command, option, require
from precompute.pipeline.config import DEVICES
from precompute.schema import TRIAGE_DIR, TRIAGE_META, TRIAGE_RANKED, TRIAGE_TOKENS

TRIAGE_SIDECAR, TRIAGE_WHAT = TRIAGE_META, "triage output"
TOKEN_ROWS = 200  # samples whose per-token scores are kept for the explorer (top and bottom halves)

# Why a record is not scored, in the order they are reported.
SKIP_NON_UTF8 = "not valid UTF-8"
SKIP_MALFORMED = "malformed (not a JSON object, or a bad messages list)"
SKIP_NO_TEXT = "no messages or text field"
SKIP_MESSAGES_STRING = "`messages` is a string, not a list of turns"
SKIP_NOT_CHAT = "no `messages` (plain text, not a chat sample)"
SKIP_NO_ASSISTANT = "no assistant turn at the end"
SKIP_TOO_LONG = "prompt alone fills --max-length"
SKIP_REASONS = (
    SKIP_NON_UTF8,
    SKIP_MALFORMED,
    SKIP_NO_TEXT,
    SKIP_MESSAGES_STRING,
    SKIP_NOT_CHAT,
    SKIP_NO_ASSISTANT,
    SKIP_TOO_LONG,
)


def feature_weights(cache: str | Path | HarmGeometry) -> tuple[np.ndarray, np.ndarray, dict]:
    """(w_direct, w_via) [F] from the cache's harmful/task sets, decoder directions and null cosine."""
    from precompute.excess import summed_excess_over_null

    geo = load_harm_geometry(cache)  # checks the cache first
    harmful = geo.harmful
    task = np.setdiff1d(geo.task, harmful)  # a feature that is both counts once, directly
    w_direct = np.zeros(geo.sae.d_sae, dtype=np.float32)
    w_direct[harmful] = 1.0
    w_via = np.zeros(geo.sae.d_sae, dtype=np.float32)
    if len(task) and len(harmful):
        w_via[task] = summed_excess_over_null(geo.cosines(task, harmful), geo.null_cosine).cpu().numpy()
    info = {
        "n_harmful": int(len(harmful)),
        "n_task": int(len(task)),
        "null_cosine": geo.null_cosine,
        "n_task_with_overlap": int((w_via > 0).sum()),
        "sae": geo.manifest["sae"]["source"],
        "hook": geo.manifest.get("hook"),
    }
    return w_direct, w_via, info


@torch.inference_mode()
def score_samples(
    lm,
    sae,
    hook_name: str,
    examples,
    w_direct: np.ndarray,
    w_via: np.ndarray,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[pd.DataFrame, list[np.ndarray], list[np.ndarray]]:
    """Per sample: mean/sum push over trained tokens; also per-token direct and via scores."""
    from tqdm.auto import tqdm

    from precompute.lab.finetune import collate
    from precompute.model.hooks import HookReader, resolve_hook

    reader = HookReader(lm.model, resolve_hook(lm.model, hook_name))
    wd = torch.as_tensor(w_direct, device=lm.device)
    wv = torch.as_tensor(w_via, device=lm.device)
    pad = int(lm.tokenizer.pad_token_id)
    rows, tok_direct, tok_via = [], [], []
    for start in tqdm(range(0, len(examples), batch_size), desc="triage", unit="batch", disable=not progress):
        batch = examples[start : start + batch_size]
        tensors = collate(batch, pad)
        h = reader(tensors["input_ids"].to(lm.device), tensors["attention_mask"].to(lm.device))
        for i, ex in enumerate(batch):
            n = len(ex.input_ids)
            acts = sae.encode(h[i, :n].to(sae.W_enc.dtype)).float()
            direct, via = (acts @ wd).cpu().numpy(), (acts @ wv).cpu().numpy()
            trained = np.array([lab != -100 for lab in ex.labels])
            tok_direct.append(direct)
            tok_via.append(via)
            total = direct[trained] + via[trained]
            top = (acts[torch.as_tensor(trained)] * (wd + wv)).sum(0)
            best = torch.topk(top, k=min(5, top.numel())).indices.cpu().tolist()
            rows.append(
                {
                    "key": ex.key,
                    "n_tokens": int(trained.sum()),
                    "score": float(total.mean()),
                    "score_sum": float(total.sum()),
                    "direct": float(direct[trained].mean()),
                    "via_overlap": float(via[trained].mean()),
                    "top_features": [int(b) for b in best if top[b] > 0],
                }
            )
    return pd.DataFrame(rows), tok_direct, tok_via


def _skip_reason(doc: Document, record: dict[str, Any]) -> str | None:
    """Why `doc` has no assistant tokens to score, or None: the score is the push per trained assistant token."""
    if doc.messages is None:
        return SKIP_MESSAGES_STRING if isinstance(record.get("messages"), str) else SKIP_NOT_CHAT
    if doc.messages[-1]["role"] != "assistant":
        return SKIP_NO_ASSISTANT
    return None


def _why_no_document(record: dict[str, Any], source: CorpusSource) -> str:
    """The reason read_source made no document of `record` (it counts, but does not say which record)."""
    try:
        items = to_documents(record, source)
    except MalformedRecord:
        return SKIP_MALFORMED
    return SKIP_NON_UTF8 if items else SKIP_NO_TEXT  # read_source drops documents whose text is not UTF-8


def _in_report_order(skipped: Counter) -> dict[str, int]:
    return {reason: skipped[reason] for reason in SKIP_REASONS if skipped[reason]}


def describe_skipped(counts: dict[str, int]) -> str:
    return "; ".join(f"{n} {reason}" for reason, n in counts.items()) or "nothing"


def _nothing_to_score(dataset: str, skipped: Counter) -> CorpusError:
    hint = "; raise --max-length" if skipped[SKIP_TOO_LONG] else ""
    return CorpusError(
        f"{dataset} has no samples to score (skipped {describe_skipped(_in_report_order(skipped))}); "
        f"triage scores chat records whose `messages` list ends in an assistant turn{hint}"
    )


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(_json_keys(r), ensure_ascii=False, default=str) + "\n")


def _json_keys(value: Any) -> Any:
    """`value` with every mapping key JSON can hold: YAML or Parquet may give dates as keys, which
    json.dumps rejects (its `default` applies to values only)."""
    if isinstance(value, dict):
        return {
            k if isinstance(k, str | int | float | bool) or k is None else str(k): _json_keys(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_json_keys(v) for v in value]
    return value


def _check_sizes(remove_frac: float, max_samples: int | None, max_length: int, batch_size: int) -> None:
    if not 0.0 < remove_frac < 1.0:
        raise FeatureGeomError("--remove-frac must be between 0 and 1")
    for flag, value, least in (
        ("--max-samples", max_samples, 1),
        ("--batch-size", batch_size, 1),
        ("--max-length", max_length, 2),
    ):
        if value is not None and value < least:
            raise FeatureGeomError(f"{flag} must be at least {least} (got {value})")


@dataclass
class _Dataset:
    """The records read (the first --max-samples), their documents, the chats that can be scored, and
    why every other record was skipped."""

    source: CorpusSource
    records: dict[int, dict[str, Any]]
    docs: list[Document]
    chats: list[Document]
    skipped: Counter


def _read_dataset(dataset: str, max_samples: int | None, seed: int) -> _Dataset:
    source = CorpusSource(path=dataset, group="task")
    docs, _ = read_source(source, 0, seed=seed)
    docs.sort(key=lambda d: d.index)  # file order: the ranking names records by their index
    # Every record as read (the first --max-samples): both filtered files keep those not removed, scored or not.
    line_stats = ReadStats()  # lines that are no record at all: not UTF-8, not a JSON object
    records = dict(enumerate(islice(read_records(Path(dataset), line_stats), max_samples)))
    docs = [d for d in docs if d.index in records]
    skipped = Counter(
        {SKIP_NON_UTF8: line_stats.skipped_non_utf8, SKIP_MALFORMED: line_stats.skipped_malformed}
    )
    with_documents = {d.index for d in docs}
    for index, record in records.items():
        if index not in with_documents:
            skipped[_why_no_document(record, source)] += 1
    chats = []
    for doc in docs:
        reason = _skip_reason(doc, records[doc.index])
        if reason is None:
            chats.append(doc)
        else:
            skipped[reason] += 1
    return _Dataset(source, records, docs, chats, skipped)


def _encode_chats(data: _Dataset, tokenizer: Any, max_length: int) -> tuple[list[Any], list[int]]:
    """The chats as training examples (as finetune encodes them) and their record indices."""
    from precompute.lab.finetune import encode_example, sample_key

    examples, indices = [], []
    for doc in data.chats:
        ex = encode_example(doc, tokenizer, max_length, sample_key(doc, data.source))
        if ex is None:
            data.skipped[SKIP_TOO_LONG] += 1
            continue
        examples.append(ex)
        indices.append(doc.index)
    return examples, indices


def _rank(ranked: pd.DataFrame, remove_frac: float, seed: int) -> tuple[pd.DataFrame, int, set, set]:
    """Sort by score, number the ranks and mark the top `remove_frac` and a same-size random draw."""
    ranked["row"] = np.arange(len(ranked))  # position in `examples`
    ranked = ranked.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
    ranked.insert(0, "rank", np.arange(1, len(ranked) + 1))
    n_remove = int(round(remove_frac * len(ranked)))
    removed = set(ranked["index"].iloc[:n_remove])
    rng = np.random.default_rng(seed)
    random_removed = set(rng.choice(ranked["index"].to_numpy(), size=n_remove, replace=False).tolist())
    ranked["removed"] = ranked["index"].isin(removed)
    ranked["random_removed"] = ranked["index"].isin(random_removed)
    return ranked, n_remove, removed, random_removed


def _token_rows(
    ranked: pd.DataFrame,
    examples: list[Any],
    tok_direct: list[np.ndarray],
    tok_via: list[np.ndarray],
    tokenizer: Any,
) -> list[dict[str, Any]]:
    """Per-token scores of the TOKEN_ROWS // 2 top and bottom samples, for the explorer's highlighting."""
    keep_rows = list(range(min(TOKEN_ROWS // 2, len(ranked)))) + list(
        range(max(0, len(ranked) - TOKEN_ROWS // 2), len(ranked))
    )
    token_rows = []
    for r in sorted(set(keep_rows)):
        row = ranked.iloc[r]
        ex = examples[int(row["row"])]
        token_rows.append(
            {
                "rank": int(row["rank"]),
                "key": row["key"],
                "tokens": [tokenizer.decode([t]) for t in ex.input_ids],
                "trained": [lab != -100 for lab in ex.labels],
                "direct": tok_direct[int(row["row"])].round(4).tolist(),
                "via_overlap": tok_via[int(row["row"])].round(4).tolist(),
            }
        )
    return token_rows


def triage(
    dataset: str,
    cache: str,
    out: str | None = None,
    model: str = "smollm2",
    adapter: str | None = None,
    remove_frac: float = 0.2,
    max_samples: int | None = None,
    max_length: int = 640,
    seed: int = 0,
    batch_size: int = 16,
    device: str = "auto",
    progress: bool = True,
) -> Path:
    from precompute.cache import check_replaceable_output, write_dir_atomic
    from precompute.model.load import load_model

    _check_sizes(remove_frac, max_samples, max_length, batch_size)
    start = time.perf_counter()
    out_dir = Path(out) if out else Path(cache) / TRIAGE_DIR / Path(dataset).name.split(".")[0]
    # Output, cache and dataset are checked before the model and SAE load, so bad input fails fast.
    check_replaceable_output(out_dir, TRIAGE_SIDECAR, TRIAGE_WHAT)
    check_harm_cache(cache)
    data = _read_dataset(dataset, max_samples, seed)
    if not data.chats:
        raise _nothing_to_score(dataset, data.skipped)
    lm = load_model(model, device=device, adapter=adapter)
    # one SAE load for the weights and the scoring, checked against the model it reads
    geo = load_harm_geometry(cache, d_model=lm.d_model, model_name=lm.name)
    w_direct, w_via, info = feature_weights(geo)
    sae = geo.sae.to(lm.device)
    tokenizer: Any = lm.tokenizer
    examples, indices = _encode_chats(data, tokenizer, max_length)
    if not examples:
        raise _nothing_to_score(dataset, data.skipped)
    skipped_counts = _in_report_order(data.skipped)
    scores, tok_direct, tok_via = score_samples(
        lm, sae, info["hook"], examples, w_direct, w_via, batch_size, progress
    )
    scores.insert(1, "index", indices)
    previews = {d.index: d.preview(400) for d in data.docs}
    scores["preview"] = scores["index"].map(previews)
    ranked, n_remove, removed, random_removed = _rank(scores, remove_frac, seed)
    token_rows = _token_rows(ranked, examples, tok_direct, tok_via, tokenizer)
    records = data.records

    def write(d: Path) -> None:
        ranked.drop(columns=["row"]).to_parquet(d / TRIAGE_RANKED, index=False)
        pd.DataFrame(token_rows).to_parquet(d / TRIAGE_TOKENS, index=False)
        _write_jsonl(d / "filtered.jsonl", [records[i] for i in sorted(records) if i not in removed])
        _write_jsonl(
            d / "random_filtered.jsonl", [records[i] for i in sorted(records) if i not in random_removed]
        )
        (d / "removed.txt").write_text("".join(f"{k}\n" for k in ranked.loc[ranked["removed"], "key"]))
        meta = {
            **info,
            "dataset": dataset,
            "model": lm.describe(),
            "n_records": len(records),
            "n_samples": len(ranked),
            "skipped": skipped_counts,
            "remove_frac": remove_frac,
            "n_removed": n_remove,
            "max_length": max_length,
            "seed": seed,
            "overlap_random_removed_top": len(removed & random_removed),
            "seconds": round(time.perf_counter() - start, 2),
        }
        (d / TRIAGE_SIDECAR).write_text(json.dumps(meta, indent=2, default=str))

    return write_dir_atomic(out_dir, write, marker=TRIAGE_SIDECAR, what=TRIAGE_WHAT)


# -------------------------------------------------------------------------------------------- command
@dataclass
class TriageOptions:
    dataset: str | None = option(
        None,
        positional=True,
        metavar="DATASET",
        help="fine-tuning samples (chat JSONL such as assets/data/em/insecure.jsonl.gz)",
    )
    cache: str | None = option(
        None, metavar="DIR", help="precompute cache whose harmful/task features define the score"
    )
    out: str | None = option(None, metavar="DIR", help="output directory (default CACHE/triage/DATASET-STEM)")
    model: str = option("smollm2", help="model that reads the samples")
    adapter: str | None = option(None, metavar="DIR", help="score with a fine-tuned model instead")
    # sizes are checked by triage() itself, so a call from Python gets the same messages
    remove_frac: float = option(0.2, help="share of top-scoring samples left out of filtered.jsonl")
    max_samples: int | None = option(None, help="score only the first N records")
    max_length: int = option(640, help="tokens per sample (as finetune)")
    batch_size: int = option(16, help="samples per forward pass")
    seed: int = option(0, low=0, high=2**32 - 1, help="seed of the random-removal control")
    device: str = option("auto", choices=DEVICES, help="where to run")
    progress: bool = option(True, help="hide the progress bar")


def run_triage(opts: TriageOptions) -> int:
    require(opts, "dataset", "cache", command="triage")
    out = triage(
        str(opts.dataset),
        str(opts.cache),
        opts.out,
        opts.model,
        opts.adapter,
        opts.remove_frac,
        opts.max_samples,
        opts.max_length,
        opts.seed,
        opts.batch_size,
        opts.device,
        opts.progress,
    )
    ranked = pd.read_parquet(out / TRIAGE_RANKED)
    skipped = json.loads((out / TRIAGE_SIDECAR).read_text()).get("skipped", {})
    print(
        f"wrote {out}: {len(ranked)} samples ranked; removed {int(ranked['removed'].sum())} into filtered.jsonl"
    )
    if skipped:
        print(f"not scored: {describe_skipped(skipped)} (records among them are kept in both filtered files)")
    for r in ranked.head(5).itertuples():
        print(
            f"  #{r.rank} {r.key} score {r.score:.4f} (direct {r.direct:.4f}, via overlap {r.via_overlap:.4f})"
        )
    return 0


COMMANDS = (
    Command(
        "triage",
        "rank a dataset's samples by how much they drive harmful-neighbour features",
        TriageOptions,
        run_triage,
        description="Rank a fine-tuning dataset's samples by how much they drive harmful-neighbour features. "
        "Each trained (assistant) token scores Σ_j a_j(x_t) · w_j with w_j = 1 for harmful features, "
        "w_j = Σ_h max(0, cos(d_j, d_h) − c_null) for task features (their overlap with each harmful h "
        "beyond the cache's null cosine) and 0 otherwise; a sample's score is the mean over its trained "
        "tokens. Rankings, per-token scores, the filtered dataset (top --remove-frac removed) and a "
        "same-size random removal (the control) are written to --out.",
    ),
)
