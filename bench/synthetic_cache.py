"""Write a schema-complete synthetic explorer cache (docs/cache.md, precompute/schema/).

Why: the explorer needs caches for its tests and benchmarks before (and independently of) the real
precompute pipeline, at any size up to a 262k-feature SAE. The data is fake but shaped like the real
thing: clustered decoder directions, harmful clusters with categories, a few *planted* task features
whose nearest neighbours are harmful features well above the null, examples with per-token
activations, histograms, per-group firing rates and flagged overlaps. Every file carries exactly the
columns and types of `precompute.schema` (tests/precompute/test_schema.py compares it with a cache
built by the pipeline) and is written through `precompute.cache.stage`, like the pipeline's. Everything
is vectorised (numpy + pyarrow) so 262,144 features take well under a minute.

    python bench/synthetic_cache.py --n 262144 --out bench/out/synth262k
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.synthetic_vocab import CATEGORIES, GENERAL, GROUPS, THEMES, XSS_PAYLOADS  # noqa: E402
from bench.synthetic_world import World, make_world, neighbours  # noqa: E402
from precompute import schema  # noqa: E402
from precompute.cache import stage  # noqa: E402

TOKENS_PER_DOC = 200  # the corpus size the manifest claims: this many tokens per document


def _feature_table(rng: np.random.Generator, wd: World, n_tokens: int, inject_html: bool) -> pd.DataFrame:
    """features.parquet: every column of the schema, logit-lens tokens and labels included."""
    n, dead, harm, task, theme = wd.n, wd.dead, wd.harm, wd.task, wd.theme
    frequency = np.where(dead, 0.0, np.exp(rng.uniform(np.log(2e-4), np.log(0.08), n)))
    max_act = np.where(dead, 0.0, rng.uniform(2.0, 24.0, n))
    harm_lo = (harm - rng.uniform(0.03, 0.08, n)).clip(0, 1)
    is_harmful = (harm_lo > 0.68) & ~dead
    feats = pd.DataFrame(
        {
            "feature": np.arange(n, dtype=np.int64),
            "umap_x": wd.xy[:, 0].astype(np.float32),
            "umap_y": wd.xy[:, 1].astype(np.float32),
            "frequency": frequency,
            "fires": np.round(frequency * n_tokens).astype(np.int64),
        }
    )
    boost = {
        "task": theme == "code",
        "control": theme == "code",
        "harmful": wd.is_harm_theme,
        "benign": theme == "benign",
        "general": np.zeros(n, bool),
    }
    for g in GROUPS:
        feats[f"freq_{g}"] = np.where(
            dead, 0.0, frequency * np.where(boost[g], rng.uniform(2, 5, n), rng.uniform(0.1, 0.9, n))
        )
    feats["freq_control"] = np.where(
        np.isin(np.arange(n), wd.planted_task), feats["freq_control"] * 0.2, feats["freq_control"]
    )
    mean_activation = max_act * rng.uniform(0.15, 0.4, n)
    task_vs_benign = np.where(theme == "code", task + 0.03, rng.normal(0.5, 0.05, n)).clip(0, 1)
    feats = feats.assign(
        max_activation=max_act,
        mean_activation=mean_activation,
        dead=dead,
        harm_score=harm,
        harm_score_lo=harm_lo,
        harm_score_all=(0.5 + 0.9 * (harm - 0.5)).clip(0, 1),
        harm_score_all_lo=(0.5 + 0.9 * (harm_lo - 0.5)).clip(0, 1),
        harm_category=pd.array(np.where(is_harmful & wd.is_harm_theme, theme, None), dtype="string"),
        harm_category_source=pd.array(np.where(is_harmful & wd.is_harm_theme, theme, None), dtype="string"),
        # held-out check: deterministic (no draw, so every other synthetic value stays as it was)
        harm_heldout_auroc=(0.5 + 0.8 * (harm - 0.5)).clip(0, 1),
        harm_heldout_lo=(0.5 + 0.8 * (harm_lo - 0.5) - 0.04).clip(0, 1),
        harm_heldout_set=pd.array(np.where(is_harmful & wd.is_harm_theme, theme, "all"), dtype="string"),
        is_harmful=is_harmful,
        task_score=task,
        task_score_lo=(task - 0.05).clip(0, 1),
        task_score_hi=(task + 0.05).clip(0, 1),
        is_task=(task > 0.8) & ~dead,
        is_control=(1 - task >= 0.7) & (task + 0.05 < 0.5) & ~dead,
        task_vs_benign=task_vs_benign,
        task_vs_benign_lo=(task_vs_benign - 0.05).clip(0, 1),
    )
    promoted, suppressed, labels, expl = _logit_lens_and_labels(rng, wd, inject_html)
    feats["top_promoted"] = promoted
    feats["top_suppressed"] = suppressed
    # logits falling away from the first token (promoted) and rising towards zero (suppressed)
    feats["top_promoted_values"] = [
        None if p is None else np.float32(2.5) - np.arange(len(p), dtype=np.float32) * 0.2 for p in promoted
    ]
    feats["top_suppressed_values"] = [
        None if p is None else np.float32(-2.2) + np.arange(len(p), dtype=np.float32) * 0.15
        for p in suppressed
    ]
    feats["label"] = pd.array(labels, dtype="string")
    feats["explanation"] = pd.array(expl, dtype="string")
    feats["label_source"] = pd.array([None if x is None else "neuronpedia" for x in labels], dtype="string")
    return feats


def _logit_lens_and_labels(
    rng: np.random.Generator, wd: World, inject_html: bool
) -> tuple[list[Any], list[Any], list[str | None], list[str | None]]:
    """Logit-lens tokens (theme words first), labels and explanations (a tenth of features unlabelled)."""
    n = wd.n
    vocab_theme = {t: np.array(v, dtype=object) for t, (_, v) in THEMES.items()}
    general = np.array(GENERAL, dtype=object)
    promoted: list[Any] = [None] * n
    suppressed: list[Any] = [None] * n
    labels: list[str | None] = [None] * n
    expl: list[str | None] = [None] * n
    pick = rng.integers(0, 1 << 30, size=(n, 6))
    for th in THEMES:
        v = vocab_theme[th]
        desc = THEMES[th][0]
        for i in np.flatnonzero(wd.theme == th):
            p = pick[i]
            promoted[i] = [str(v[(p[0] + j * 7) % len(v)]) for j in range(8)]
            suppressed[i] = [str(general[(p[1] + j * 5) % len(general)]) for j in range(8)]
            if p[2] % 10 != 0:
                labels[i] = f"{desc}: {v[p[3] % len(v)].strip()}"
                expl[i] = f"Fires on {desc} text, most strongly on '{v[p[4] % len(v)].strip()}'."
    code = vocab_theme["code"]
    for r, t in enumerate(wd.planted_task):
        labels[t] = f"code that calls {code[r % len(code)].strip()} (planted)"
    if inject_html:
        for t, h in list(zip(wd.planted_task, wd.planted_harm, strict=False))[:3]:
            labels[t] = f"{XSS_PAYLOADS[0]} task label"
            labels[h] = f"{XSS_PAYLOADS[1]} harmful label"
            expl[t] = f"explains {XSS_PAYLOADS[2]}"
            promoted[t] = list(XSS_PAYLOADS) + promoted[t][:5]
            promoted[h] = list(XSS_PAYLOADS) + promoted[h][:5]
    return promoted, suppressed, labels, expl


@dataclass
class ExampleText:
    """The example rows: whose, which kind and rank, and each context's token ids and activations."""

    feature: np.ndarray  # [rows]
    kind: np.ndarray
    rank: np.ndarray
    quantile: np.ndarray  # NaN for top examples
    max_activation: np.ndarray
    max_position: np.ndarray
    token_ids: np.ndarray  # [rows, ctx]: indexes `vocab`
    activations: np.ndarray  # float32 [rows, ctx]
    vocab: list[str]


def _example_text(
    rng: np.random.Generator, wd: World, max_act: np.ndarray, n_top: int, n_quant: int, ctx_len: int
) -> ExampleText:
    """Top examples and quantile samples of every live feature: theme words around a peak activation."""
    theme_names = list(THEMES)
    live = np.flatnonzero(~wd.dead)
    per = n_top + n_quant
    f_rows = np.repeat(live, per)
    within = np.tile(np.arange(per), len(live))
    kind = np.where(within < n_top, "top", "quantile")
    rank = np.where(within < n_top, within, within - n_top)
    n_rows = len(f_rows)
    vocab = list(GENERAL)
    theme_offset = {}
    for t in theme_names:
        theme_offset[t] = len(vocab)
        vocab.extend(THEMES[t][1])
    vocab.extend(XSS_PAYLOADS)
    t_codes = np.array([theme_names.index(t) for t in wd.theme], dtype=np.int64)[f_rows]
    t_off = np.array([theme_offset[t] for t in theme_names])[t_codes]
    t_len = np.array([len(THEMES[t][1]) for t in theme_names])[t_codes]
    r = rng.random((n_rows, ctx_len))
    gen_ids = rng.integers(0, len(GENERAL), size=(n_rows, ctx_len))
    th_ids = t_off[:, None] + (rng.integers(0, 1 << 20, size=(n_rows, ctx_len)) % t_len[:, None])
    tok_ids = np.where(r < 0.45, th_ids, gen_ids)
    max_pos = rng.integers(2, ctx_len - 2, size=n_rows)
    top_max = max_act[f_rows] * np.where(kind == "top", 1.0 - 0.06 * rank, 0.0)
    quant = np.where(kind == "quantile", (rank + 1) / (n_quant + 1), np.nan)
    row_max = np.where(kind == "top", top_max, max_act[f_rows] * np.nan_to_num(quant) * 0.5)
    dist = np.abs(np.arange(ctx_len)[None, :] - max_pos[:, None])
    acts = row_max[:, None] * np.exp(-dist * 0.9) * (rng.random((n_rows, ctx_len)) < 0.8)
    acts[np.arange(n_rows), max_pos] = row_max
    acts = np.where(acts < 0.05 * row_max[:, None], 0.0, acts).astype(np.float32)
    tok_ids[np.arange(n_rows), max_pos] = th_ids[np.arange(n_rows), max_pos]
    return ExampleText(f_rows, kind, rank, quant, row_max, max_pos, tok_ids, acts, vocab)


def _plant_payloads(ex: ExampleText, wd: World) -> None:
    """Put the XSS payloads into the first two top examples of three planted pairs, around the peak."""
    payload_base = len(ex.vocab) - len(XSS_PAYLOADS)
    ctx_len = ex.token_ids.shape[1]
    for f in list(wd.planted_task[:3]) + list(wd.planted_harm[:3]):
        for j, row in enumerate(np.flatnonzero((ex.feature == f) & (ex.rank < 2))):
            for q in range(3):
                ex.token_ids[row, (ex.max_position[row] + q - 1 + j) % ctx_len] = payload_base + q


def _example_sources(
    rng: np.random.Generator, wd: World, ex: ExampleText, n_docs: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(group, category, doc_id) of each example, and the group of each document: an example comes
    mostly from its feature's own kind of text, always from a document of its group."""
    feature_theme = wd.theme[ex.feature]
    fam = np.where(feature_theme == "code", 0, np.where(np.isin(feature_theme, CATEGORIES), 2, 3))
    alt = rng.choice([1, 3, 4], size=len(ex.feature))
    g_idx = np.where(rng.random(len(ex.feature)) < 0.75, fam, alt)
    ex_group = np.array(GROUPS, dtype=object)[g_idx]
    ex_cat = np.where(ex_group == "harmful", feature_theme, None)
    ex_cat = np.where((ex_group == "harmful") & ~np.isin(ex_cat, CATEGORIES), CATEGORIES[0], ex_cat)
    doc_group = np.array(GROUPS, dtype=object)[rng.permutation(np.arange(n_docs) % len(GROUPS))]
    ex_doc = np.zeros(len(ex.feature), dtype=np.int64)
    for g in GROUPS:
        pool = np.flatnonzero(doc_group == g)
        rows_g = np.flatnonzero(ex_group == g)
        ex_doc[rows_g] = pool[rng.integers(0, len(pool), len(rows_g))]
    return ex_group, ex_cat, ex_doc, doc_group


def _examples_table(
    rng: np.random.Generator, ex: ExampleText, sources: tuple[np.ndarray, ...], n_docs: int
) -> pa.Table:
    ex_group, ex_cat, ex_doc, _ = sources
    n_rows, ctx_len = ex.token_ids.shape
    vocab = pa.array(ex.vocab, pa.string())
    flat_tokens = pa.DictionaryArray.from_arrays(pa.array(ex.token_ids.ravel().astype(np.int32)), vocab)
    offsets = pa.array(np.arange(0, (n_rows + 1) * ctx_len, ctx_len, dtype=np.int32))
    table = pa.table(
        {
            "feature": pa.array(ex.feature.astype(np.int64)),
            "rank": pa.array(ex.rank.astype(np.int64)),
            "kind": pa.array(ex.kind.astype(object), pa.string()),
            "group": pa.array(ex_group, pa.string()),
            "category": pa.array(ex_cat, pa.string()),
            "doc_id": pa.array(ex_doc),
            "context_id": pa.array(rng.integers(0, n_docs * 8, n_rows).astype(np.int64)),
            "tokens": pa.ListArray.from_arrays(offsets, flat_tokens.cast(pa.string())),
            "activations": pa.ListArray.from_arrays(offsets, pa.array(ex.activations.ravel())),
            "max_activation": pa.array(ex.max_activation.astype(np.float64)),
            "max_position": pa.array(ex.max_position.astype(np.int64)),
            "quantile": pa.array(ex.quantile.astype(np.float64), from_pandas=True),
        }
    )
    return _with_group_top(table)


def _with_group_top(table: pa.Table, k: int = 5, k_category: int = 3) -> pa.Table:
    """Add `group_top` rows as the harvest writes them: each feature's top examples re-ranked within
    their group (at most k per group), `category_top` rows the same within their (group, category), and
    `group_quantile` rows; sorted by feature like the rest."""
    top = table.filter(pc.equal(table.column("kind"), "top"))
    with_category = top.filter(pc.is_valid(top.column("category")))
    both = pa.concat_tables(
        [
            table,
            _subset_top(top, ("group",), "group_top", k),
            _subset_top(with_category, ("group", "category"), "category_top", k_category),
            _group_quantile_rows(table),
        ]
    )
    order = np.argsort(both.column("feature").to_numpy(), kind="stable")
    return both.take(pa.array(order))


def _subset_top(top: pa.Table, keys: tuple[str, ...], kind: str, k: int) -> pa.Table:
    """`top` rows re-ranked within each (feature, *keys) subset, at most k each, as rows of `kind`."""
    cols = ("feature", *keys, "max_activation")
    meta = pd.DataFrame({c: top.column(c).to_numpy(zero_copy_only=False) for c in cols})
    meta["row"] = np.arange(len(meta))
    meta = meta.sort_values(list(cols), ascending=[True] * (len(cols) - 1) + [False], kind="stable")
    meta["grank"] = meta.groupby(["feature", *keys]).cumcount()
    meta = meta[meta["grank"] < k]
    extra = top.take(pa.array(meta["row"].to_numpy()))
    extra = extra.set_column(extra.schema.get_field_index("kind"), "kind", pa.array([kind] * len(meta)))
    return extra.set_column(
        extra.schema.get_field_index("rank"), "rank", pa.array(meta["grank"].to_numpy().astype(np.int64))
    )


def _group_quantile_rows(table: pa.Table) -> pa.Table:
    """`group_quantile` rows as the harvest writes them: each feature's quantile samples re-ranked within
    their group (in interval order, strongest first)."""
    q = table.filter(pc.equal(table.column("kind"), "quantile"))
    meta = pd.DataFrame(
        {c: q.column(c).to_numpy(zero_copy_only=False) for c in ("feature", "group", "quantile")}
    )
    meta["row"] = np.arange(len(meta))
    meta = meta.sort_values(["feature", "group", "quantile"], kind="stable")
    meta["grank"] = meta.groupby(["feature", "group"]).cumcount()
    extra = q.take(pa.array(meta["row"].to_numpy()))
    extra = extra.set_column(
        extra.schema.get_field_index("kind"), "kind", pa.array(["group_quantile"] * len(meta))
    )
    return extra.set_column(
        extra.schema.get_field_index("rank"), "rank", pa.array(meta["grank"].to_numpy().astype(np.int64))
    )


def _histograms(rng: np.random.Generator, feats: pd.DataFrame, bins: int) -> dict[str, np.ndarray]:
    """histograms.npz: counts decaying from 0 to each feature's max activation, split at random between
    the groups (the split sums to the counts, as the harvest's does)."""
    n, dead = len(feats), feats["dead"].to_numpy()
    decay = np.exp(-np.arange(bins)[None, :] * rng.uniform(0.1, 0.35, size=(n, 1)))
    counts = np.floor(decay * (feats["frequency"].to_numpy()[:, None] * 2e5)).astype(np.int64)
    counts[dead] = 0
    counts[~dead, -1] = np.maximum(counts[~dead, -1], 1)
    share = rng.dirichlet(np.ones(len(GROUPS)), size=n)  # [n, groups]
    by_group = np.floor(counts[:, None, :] * share[:, :, None]).astype(np.int64)
    by_group[:, 0, :] += counts - by_group.sum(axis=1)
    return {
        "counts": counts,
        "bins": np.int64(bins),
        "max_activation": feats["max_activation"].to_numpy().astype(np.float32),
        "counts_group": by_group.astype(np.int32),
        "groups": np.array(sorted(GROUPS), dtype=str),
    }


def _category_rates(rng: np.random.Generator, feats: pd.DataFrame, theme: np.ndarray) -> pa.Table:
    """category_rates.parquet: per group, and per harm category within the harmful group."""
    n = len(feats)
    cr_feature, cr_group, cr_cat, cr_freq = [], [], [], []
    for g in GROUPS:
        cats: tuple[str | None, ...] = CATEGORIES if g == "harmful" else (None,)
        for cat in cats:
            scale = np.where(theme == cat, 2.5, rng.uniform(0.1, 0.8, n)) if cat else 1.0
            cr_feature.append(np.arange(n))
            cr_group.append(np.full(n, g, dtype=object))
            cr_cat.append(np.full(n, cat, dtype=object))
            cr_freq.append(feats[f"freq_{g}"].to_numpy() * scale)
    return pa.table(
        {
            "feature": pa.array(np.concatenate(cr_feature).astype(np.int64)),
            "group": pa.array(np.concatenate(cr_group), pa.string()),
            "category": pa.array(np.concatenate(cr_cat), pa.string()),
            "frequency": pa.array(np.concatenate(cr_freq).clip(0, 1)),
            "tokens": pa.array(np.full(sum(len(x) for x in cr_feature), 20000, dtype=np.int64)),
        }
    )


def _documents(rng: np.random.Generator, doc_group: np.ndarray, inject_html: bool) -> pd.DataFrame:
    """documents.parquet: one source file per group (the manifest's corpus list, in GROUPS order)."""
    n_docs = len(doc_group)
    source = np.array([GROUPS.index(g) for g in doc_group], dtype=np.int64)
    record_index = np.zeros(n_docs, dtype=np.int64)
    for s in range(len(GROUPS)):
        mine = np.flatnonzero(source == s)
        record_index[mine] = np.arange(len(mine))
    docs = pd.DataFrame(
        {
            "doc_id": np.arange(n_docs, dtype=np.int64),
            "source": source,
            "source_path": [f"synthetic/{g}.jsonl" for g in doc_group],
            "group": pd.array(doc_group, dtype="string"),
            "category": pd.array(
                [rng.choice(CATEGORIES) if g == "harmful" else None for g in doc_group], dtype="string"
            ),
            "validation": np.zeros(n_docs, bool),
            "record_index": record_index,
            "n_tokens": rng.integers(20, 400, n_docs).astype(np.int64),
            "text_preview": [f"Synthetic document {i} about {g} things." for i, g in enumerate(doc_group)],
        }
    )
    docs.insert(5, "category_source", docs["category"])
    if inject_html:
        docs.loc[: len(XSS_PAYLOADS) - 1, "text_preview"] = list(XSS_PAYLOADS)
    # a synthetic document's whole content is its preview
    docs["doc_sha256"] = [hashlib.sha256(t.encode()).hexdigest() for t in docs["text_preview"]]
    # the whole document: its preview, then more text (payloads and all, with inject_html)
    docs["text"] = pd.array(
        [f"{t}\n\nIt goes on: {t} The end of document {i}." for i, t in enumerate(docs["text_preview"])],
        dtype="string",
    )
    return docs


def _overlaps(
    rng: np.random.Generator,
    wd: World,
    feats: pd.DataFrame,
    nb_idx: np.ndarray,
    nb_cos: np.ndarray,
    nb_z: np.ndarray,
    null_cosine: float,
) -> pd.DataFrame:
    """overlaps.parquet: each task feature's harmful neighbours above the null, by risk."""
    harm, task = wd.harm, wd.task
    nearest = np.sort(nb_cos[:, 0].astype(np.float64))  # every feature's nearest-neighbour cosine
    is_harmful = feats["is_harmful"].to_numpy()
    harm_cat = feats["harm_category"]
    rows: list[dict[str, Any]] = []
    for t in np.flatnonzero(feats["is_task"].to_numpy()):
        for rnk in range(nb_idx.shape[1]):
            h, c = int(nb_idx[t, rnk]), float(nb_cos[t, rnk])
            if c < null_cosine:
                break
            if not is_harmful[h]:
                continue
            coact = float(rng.uniform(0.15, 0.45) if t in wd.planted_task else rng.uniform(0.0, 0.15))
            excess = max(0.0, (c - null_cosine) / (1 - null_cosine))
            rows.append(
                {
                    "task_feature": int(t),
                    "harmful_feature": h,
                    "cosine": c,
                    "cosine_percentile": 100.0 * np.searchsorted(nearest, c, side="right") / len(nearest),
                    "cosine_excess": c - null_cosine,
                    "z_isotropic": float(nb_z[t, rnk]),
                    "null_cosine": null_cosine,
                    "coactivation": coact,
                    "cond_coactivation": min(1.0, coact * rng.uniform(1.2, 2.0)),
                    "harm_score": float(harm[h]),
                    "task_score": float(task[t]),
                    "harm_category": None if pd.isna(harm_cat.iat[h]) else str(harm_cat.iat[h]),
                    "neighbor_rank": rnk,
                    "risk": excess * (2 * harm[h] - 1) * (2 * task[t] - 1),
                }
            )
    columns = [c.name for c in schema.TABLES[schema.OVERLAPS].columns]
    overlaps = pd.DataFrame(rows, columns=columns).sort_values("risk", ascending=False, ignore_index=True)
    spec = schema.TABLES[schema.OVERLAPS].columns
    floats = {c.name: "float64" for c in spec if c.dtype == schema.FLOAT64}  # typed even with no rows
    overlaps = overlaps.astype(
        {"task_feature": "int64", "harmful_feature": "int64", "neighbor_rank": "int64", **floats}
    )
    overlaps["harm_category"] = overlaps["harm_category"].astype("string")
    return overlaps


def _closeness(wd: World, feats: pd.DataFrame, null_cosine: float, seed: int) -> dict[str, Any]:
    """closeness.json, computed by the closeness step's own code on the synthetic decoder (the ranked
    comparison from the synthetic task_score). Until the
    features table has `is_control`, control-specific features are stood in for by a low
    task-vs-control score (recorded in the file's `set_definitions`)."""
    from precompute.pipeline.closeness import ClosenessParams, closeness_report

    sets = feats[["feature", "frequency", "is_harmful", "is_task", "task_score"]].copy()
    if "is_control" in feats.columns:
        sets["is_control"] = feats["is_control"]
    else:
        sets["is_control"] = (feats["task_control_score"] <= 0.4) & ~feats["is_task"] & ~feats["dead"]
    params = ClosenessParams(n_permutations=1000, n_bootstrap=2000, seed=seed)
    report = closeness_report(wd.w, sets, null_cosine, params)
    if "is_control" not in feats.columns:
        report["set_definitions"]["non_inducing"] = "stand-in: task_control_score <= 0.4, not is_task"
    return report


def _base_manifest(n: int, d: int, seed: int, inject_html: bool, doc_group: np.ndarray) -> dict[str, Any]:
    hook = "blocks.0.hook_resid_post"
    return {
        "schema_version": schema.SCHEMA_VERSION,
        "model": {
            "spec": "synthetic",
            "kind": "synthetic",
            "path": None,
            "sha256": None,
            "architecture": "synthetic",
            "d_model": d,
            "n_layers": 1,
        },
        "sae": {
            "format": "synthetic",
            "source": "bench/synthetic_cache.py",
            "architecture": "topk",
            "d_in": d,
            "d_sae": n,
            "k": 32,
            "hook_name": hook,
            "sha256": None,
        },
        "hook": hook,
        "d_in": d,
        "n_features": n,
        "corpus": [
            {
                "path": f"synthetic/{g}.jsonl",
                "group": g,
                "category": None,
                "sha256": None,
                "documents": int((doc_group == g).sum()),
                "tokens": len(doc_group) * TOKENS_PER_DOC // len(GROUPS),
                "skipped_non_utf8": 0,
                "skipped_malformed": 0,
            }
            for g in GROUPS
        ],
        "identity": {"synthetic": True, "n_features": n, "d": d, "seed": seed, "inject_html": inject_html},
    }


def _parquet(df: pd.DataFrame | pa.Table, path: Path, **kw: Any) -> None:
    table = df if isinstance(df, pa.Table) else pa.Table.from_pandas(df, preserve_index=False)
    pq.write_table(table, path, **kw)


def write_synthetic_cache(
    path: str | Path,
    n_features: int = 2000,
    d: int = 64,
    n_examples: int | None = None,
    seed: int = 0,
    inject_html: bool = False,
    k: int = 32,
    ctx_len: int = 24,
    n_quantile: int = 3,
    n_docs: int = 400,
    row_group_size: int = 4096,
    task_features: bool = True,
) -> Path:
    """Write a synthetic cache to `path` (replacing it) and return the path.

    n_examples: top examples per live feature (default 8, or 4 above 50k features). With
    inject_html the planted pairs carry `<script>`, `<img onerror>` and `javascript:` payloads in
    labels, logit-lens tokens, example tokens and document previews (for the XSS tests). Without
    task_features every task score is pulled towards 0.5 (0.5 + 0.15 · (score − 0.5)), so no feature
    passes the task or control test: no overlaps, closeness not testable (a negative result, as a cache
    whose task and control text do not differ).
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    n = int(n_features)
    n_top = n_examples if n_examples is not None else (8 if n <= 50000 else 4)
    n_quant = n_quantile if n <= 50000 else min(n_quantile, 2)

    wd = make_world(rng, n, d)
    if not task_features:
        wd.task = 0.5 + 0.15 * (wd.task - 0.5)
    nb_idx, nb_cos = neighbours(wd.w.astype(np.float32), wd.cluster, k)
    fpr = 1e-3
    # stand-in nulls, not computed: the flagging one (the covariance null, as on a real decoder, whose
    # anisotropy puts it above the isotropic one) and an isotropic one below it
    null_cosine = float(3.090232 / math.sqrt(d) * 0.9)  # ~ Φ⁻¹(1 - fpr) / sqrt(d)
    null_isotropic = 0.8 * null_cosine
    nb_z = (nb_cos * math.sqrt(d)).astype(np.float32)
    feats = _feature_table(rng, wd, n_docs * TOKENS_PER_DOC, inject_html)
    ex = _example_text(rng, wd, feats["max_activation"].to_numpy(), n_top, n_quant, ctx_len)
    if inject_html:
        _plant_payloads(ex, wd)
    sources = _example_sources(rng, wd, ex, n_docs)
    examples = _examples_table(rng, ex, sources, n_docs)
    bins = 32
    histograms = _histograms(rng, feats, bins)
    cat_rates = _category_rates(rng, feats, wd.theme)
    doc_group = sources[3]
    docs = _documents(rng, doc_group, inject_html)
    overlaps = _overlaps(rng, wd, feats, nb_idx, nb_cos, nb_z, null_cosine)
    closeness = _closeness(wd, feats, null_cosine, seed)

    base = _base_manifest(n, d, seed, inject_html, doc_group)
    with stage(path, fresh=True, base_manifest=base) as staged:
        _parquet(feats, staged.path(schema.FEATURES))
        _parquet(examples, staged.path(schema.EXAMPLES), row_group_size=row_group_size)
        np.savez(staged.path(schema.HISTOGRAMS), **histograms)
        _parquet(cat_rates, staged.path(schema.CATEGORY_RATES))
        _parquet(docs, staged.path(schema.DOCUMENTS))
        np.savez(
            staged.path(schema.NEIGHBORS),
            indices=nb_idx,
            cosine=nb_cos,
            z_isotropic=nb_z,
            null_cosine=np.float64(null_cosine),
            null_kind=np.array("covariance"),
            null_isotropic=np.float64(null_isotropic),
            null_covariance=np.float64(null_cosine),
            null_samples=np.int64(10_000),
            nn_cosine_quantiles=np.quantile(nb_cos[:, 0].astype(np.float64), np.arange(1, 100) / 100),
            fpr=np.float64(fpr),
            d=np.int64(d),
        )
        _parquet(overlaps, staged.path(schema.OVERLAPS))
        staged.path(schema.CLOSENESS).write_text(json.dumps(closeness, indent=2, allow_nan=False))
        secs = time.perf_counter() - t0
        planted = [[int(a), int(b)] for a, b in zip(wd.planted_task, wd.planted_harm, strict=False)]
        steps = {
            "harvest": {
                "synthetic": True,
                "n_top": n_top,
                "n_quantile": n_quant,
                "ctx_len": ctx_len,
                "bins": bins,
            },
            "geometry": {
                "k": k,
                "fpr": fpr,
                "metric": "cosine",
                "null_cosine": null_cosine,
                "null_kind": "covariance",
            },
            "scores": {"harm_threshold": 0.68, "task_threshold": 0.8},
            "overlaps": {"min_z": None, "planted": planted},
            "closeness": {
                "n_permutations": 1000,
                "n_bootstrap": 2000,
                "seed": seed,
                "null_cosine": null_cosine,
                "ranked_n": 100,
            },
        }
        for step, params in steps.items():
            staged.record_step(step, params, secs / len(steps))
        staged.manifest["synthetic"] = {
            "planted_task": wd.planted_task.tolist(),
            "planted_harmful": wd.planted_harm.tolist(),
        }
        staged.commit()
    return Path(path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="number of features")
    ap.add_argument("--d", type=int, default=64, help="decoder dimension")
    ap.add_argument("--examples", type=int, default=None, help="top examples per feature")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--inject-html", action="store_true", help="plant XSS payloads in the text")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = write_synthetic_cache(
        args.out,
        n_features=args.n,
        d=args.d,
        n_examples=args.examples,
        seed=args.seed,
        inject_html=args.inject_html,
    )
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({args.n} features, {size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
