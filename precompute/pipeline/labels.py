"""The labels step: a short label for every feature that fires, from the cache alone.

A feature without an imported (Neuronpedia) label gets one built from the tokens at the activation
peak of its top examples (examples.parquet, kind "top"): the most frequent peak token, and up to two
more that peak at least twice, with the share of top examples whose peak they cover, then the first
logit-lens promoted tokens when the cache has `top_promoted`:

    "Asian" · "white" (6/10 peaks) → promotes: people, men

Tokens are counted stripped and case-folded and shown as first written at the highest-ranked peak;
tokens with no letter or digit (whitespace, punctuation) are ignored unless every peak is one.

Imported labels win: the scores step writes `label` (imported or missing) and `label_source`
("neuronpedia" where imported); this step keeps those rows and recomputes every other one, so it
reruns idempotently and a rescore with --neuronpedia followed by labels keeps the imports. Labels are
stored raw (corpus text is untrusted: the explorer escapes them where it shows them).
"""

from __future__ import annotations

import logging
import time
import unicodedata
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from precompute.cache import StagedCache
from precompute.errors import CacheError
from precompute.pipeline.context import RunContext
from precompute.pipeline.features import merge_feature_columns
from precompute.schema import EXAMPLES, FEATURES

log = logging.getLogger(__name__)

IMPORTED, COMPUTED = "neuronpedia", "peak_tokens"
N_PEAK_TOKENS = 3  # peak tokens shown at most
MIN_REPEAT = 2  # a second or third peak token is shown only when it peaks at least this often
N_PROMOTED = 3  # logit-lens tokens shown at most
MAX_TOKEN_CHARS = 24  # a longer token is cut with "…"
_VISIBLE = str.maketrans({" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"})


def _has_content(text: str) -> bool:
    """A letter or a digit somewhere: not pure whitespace or punctuation."""
    return any(unicodedata.category(ch)[0] in "LN" for ch in text)


def _shown(text: str) -> str:
    return text if len(text) <= MAX_TOKEN_CHARS else text[: MAX_TOKEN_CHARS - 1] + "…"


def peak_label(peaks: Sequence[str], promoted: Sequence[str] | None = None) -> str | None:
    """The label of one feature from its top examples' peak tokens (in rank order) and its logit-lens
    promoted tokens (module docstring); None without peaks."""
    if not peaks:
        return None
    written = [t.strip() for t in peaks]
    if not any(_has_content(t) for t in written):  # only whitespace/punctuation: show it visibly
        written = [t.strip() or t.translate(_VISIBLE) for t in peaks]
    else:
        written = [t if _has_content(t) else "" for t in written]
    first: dict[str, str] = {}  # key -> as written at its highest-ranked peak
    for t in written:
        if t:
            first.setdefault(t.casefold(), t)
    counts = Counter(t.casefold() for t in written if t)
    keys = sorted(first, key=lambda k: -counts[k])  # stable: a count tie keeps first-peak order
    shown = keys[:1] + [k for k in keys[1:N_PEAK_TOKENS] if counts[k] >= MIN_REPEAT]
    covered = sum(counts[k] for k in shown)
    text = " · ".join(f'"{_shown(first[k])}"' for k in shown) + f" ({covered}/{len(peaks)} peaks)"
    lens = [_shown(p.replace("␣", " ").strip()) for p in (() if promoted is None else promoted)]
    lens = [p for p in lens if _has_content(p)][:N_PROMOTED]
    return text + (" → promotes: " + ", ".join(lens) if lens else "")


def peak_tokens(examples: pd.DataFrame) -> dict[int, list[str]]:
    """feature -> the token at the peak of each of its top examples, in rank order."""
    top = examples[examples["kind"] == "top"].sort_values(["feature", "rank"], kind="stable")
    out: dict[int, list[str]] = {}
    for f, toks, pos in zip(top["feature"], top["tokens"], top["max_position"], strict=True):
        if 0 <= pos < len(toks):
            out.setdefault(int(f), []).append(str(toks[pos]))
    return out


def feature_labels(features: pd.DataFrame, examples: pd.DataFrame) -> pd.DataFrame:
    """DataFrame[feature, label, label_source]: imported labels kept, the rest computed (None for a
    feature that never fires)."""
    n = len(features)
    given = features["label"].tolist() if "label" in features else [None] * n
    label: list[str | None] = [x if isinstance(x, str) else None for x in given]
    imported = np.array([x is not None for x in label], bool)
    if "label_source" in features:  # a cache scored before this step has only imported labels
        imported &= features["label_source"].isin([IMPORTED]).to_numpy(bool)  # NA: not imported
    dead = features["dead"].fillna(False).to_numpy(bool) if "dead" in features else np.zeros(n, bool)
    promoted = features["top_promoted"].tolist() if "top_promoted" in features else [None] * n
    peaks = peak_tokens(examples)
    source: list[str | None] = [IMPORTED if keep else None for keep in imported]
    for i, f in enumerate(features["feature"].astype(int).tolist()):
        if not imported[i]:
            label[i] = None if dead[i] else peak_label(peaks.get(f, []), promoted[i])
            source[i] = COMPUTED if label[i] is not None else None
    return pd.DataFrame(
        {
            "feature": features["feature"].to_numpy(np.int64),
            "label": pd.Series(label, dtype=object),
            "label_source": pd.Series(source, dtype=object),
        }
    )


def run(ctx: RunContext, staged: StagedCache) -> None:
    start = time.perf_counter()
    for name, step in ((FEATURES, "harvest"), (EXAMPLES, "harvest")):
        if not (staged.dir / name).is_file():
            raise CacheError(f"{staged.target} has no {name}; run `featuregeom {step}` first")
    features = pd.read_parquet(staged.dir / FEATURES)
    examples = pq.read_table(
        staged.dir / EXAMPLES, columns=["feature", "rank", "kind", "tokens", "max_position"]
    ).to_pandas()
    table = feature_labels(features, examples)
    merge_feature_columns(staged, len(features), table)
    counts = table["label_source"].value_counts()
    extra = {
        "n_imported": int(counts.get(IMPORTED, 0)),
        "n_computed": int(counts.get(COMPUTED, 0)),
        "n_unlabelled": int(table["label"].isna().sum()),
    }
    log.info("labels: %(n_imported)d imported, %(n_computed)d from peak tokens, %(n_unlabelled)d none", extra)
    params = {"peak_tokens": N_PEAK_TOKENS, "min_repeat": MIN_REPEAT, "promoted_tokens": N_PROMOTED}
    staged.record_step("labels", params, time.perf_counter() - start, extra)
