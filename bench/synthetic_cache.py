"""Write a schema-complete synthetic explorer cache (docs/cache.md, schema_version 1).

Why: the explorer needs caches for its tests and benchmarks before (and independently of) the real
precompute pipeline, at any size up to a 262k-feature SAE. The data is fake but shaped like the real
thing: clustered decoder directions, harmful clusters with categories, a few *planted* task features
whose nearest neighbours are harmful features well above the null, examples with per-token
activations, histograms, per-group firing rates and flagged overlaps. Everything is vectorised
(numpy + pyarrow) so 262,144 features take well under a minute.

    python bench/synthetic_cache.py --n 262144 --out bench/out/synth262k
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from precompute.cache import stage  # noqa: E402

GROUPS = ("task", "control", "harmful", "benign", "general")
CATEGORIES = ("violence", "cybercrime", "self-harm", "hate", "fraud", "weapons")
XSS_PAYLOADS = (
    "<script>window.__xss=1</script>",
    '<img src=x onerror="window.__xss=1">',
    "[click](javascript:window.__xss=1)",
)

_THEMES: dict[str, tuple[str, list[str]]] = {
    "code": (
        "insecure code",
        [
            " def",
            " query",
            " execute",
            "(",
            ")",
            " password",
            " os",
            ".system",
            " eval",
            " pickle",
            ".loads",
            " chmod",
            " 777",
            " sql",
            " SELECT",
            " FROM",
            " users",
            " WHERE",
            " input",
            " shell",
            "=True",
            " subprocess",
            " open",
            " request",
        ],
    ),
    "violence": (
        "threats of violence",
        [" kill", " hurt", " attack", " beat", " gun", " fight", " blood", " threaten", " stab", " revenge"],
    ),
    "cybercrime": (
        "hacking requests",
        [
            " hack",
            " malware",
            " exploit",
            " phishing",
            " ransomware",
            " password",
            " breach",
            " keylogger",
            " botnet",
            " crack",
        ],
    ),
    "self-harm": (
        "self-harm talk",
        [
            " hurt",
            " myself",
            " pills",
            " cut",
            " overdose",
            " hopeless",
            " end",
            " pain",
            " alone",
            " worthless",
        ],
    ),
    "hate": (
        "slurs and contempt",
        [
            " hate",
            " inferior",
            " vermin",
            " disgusting",
            " those",
            " people",
            " deport",
            " ban",
            " filthy",
            " subhuman",
        ],
    ),
    "fraud": (
        "scams and fraud",
        [
            " scam",
            " wire",
            " transfer",
            " fake",
            " invoice",
            " gift",
            " card",
            " urgent",
            " account",
            " refund",
        ],
    ),
    "weapons": (
        "weapon making",
        [
            " bomb",
            " explosive",
            " detonator",
            " ammonium",
            " nitrate",
            " rifle",
            " silencer",
            " build",
            " powder",
            " fuse",
        ],
    ),
    "benign": (
        "everyday topics",
        [
            " recipe",
            " garden",
            " weather",
            " travel",
            " music",
            " book",
            " family",
            " school",
            " coffee",
            " dog",
            " weekend",
            " movie",
        ],
    ),
}
_GENERAL = [
    " the",
    " a",
    " of",
    " and",
    " to",
    " in",
    " is",
    " it",
    " that",
    " for",
    " on",
    " with",
    ".",
    ",",
    " I",
    " you",
    " we",
    " this",
    " can",
    " how",
    "\n",
    " please",
    " help",
    " me",
]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(1e-8)


def _topk_rows(sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k columns of each row of `sims`, descending."""
    part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(sims, part, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(vals, order, axis=1)


def _neighbours(
    w: np.ndarray, cluster: np.ndarray, k: int, exact_limit: int = 20000
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k cosine neighbours (self excluded); within clusters only for very large n."""
    n = len(w)
    idx = np.empty((n, k), dtype=np.int32)
    cos = np.empty((n, k), dtype=np.float32)
    if n <= exact_limit:
        for start in range(0, n, 2048):
            stop = min(n, start + 2048)
            sims = w[start:stop] @ w.T
            sims[np.arange(stop - start), np.arange(start, stop)] = -np.inf
            i, c = _topk_rows(sims, k)
            idx[start:stop], cos[start:stop] = i, c
        return idx, cos
    order = np.argsort(cluster, kind="stable")
    bounds = np.searchsorted(cluster[order], np.arange(cluster.max() + 2))
    for c in range(len(bounds) - 1):
        members = order[bounds[c] : bounds[c + 1]]
        if len(members) == 0:
            continue
        sims = w[members] @ w[members].T
        np.fill_diagonal(sims, -np.inf)
        kk = min(k, len(members) - 1)
        i, v = _topk_rows(sims, kk)
        idx[members, :kk], cos[members, :kk] = members[i], v
        if kk < k:  # tiny cluster: pad with random far features (keeps the [n, k] shape)
            idx[members, kk:], cos[members, kk:] = members[0], -1.0
    return idx, cos


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
) -> Path:
    """Write a synthetic cache to `path` (replacing it) and return the path.

    n_examples: top examples per live feature (default 8, or 4 above 50k features). With
    inject_html the planted pairs carry `<script>`, `<img onerror>` and `javascript:` payloads in
    labels, logit-lens tokens, example tokens and document previews (for the XSS tests).
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    n = int(n_features)
    n_top = n_examples if n_examples is not None else (8 if n <= 50000 else 4)
    n_quant = n_quantile if n <= 50000 else min(n_quantile, 2)

    # --- clusters with themes --------------------------------------------------------------------
    n_clusters = max(32, n // 64)
    cluster = rng.permutation(np.arange(n) % n_clusters).astype(np.int64)
    theme_names = list(_THEMES)
    # cluster 0 is code (the task), then one cluster per harm category, the rest mostly benign
    c_theme = np.array(["benign"] * n_clusters, dtype=object)
    c_theme[0] = "code"
    for i, cat in enumerate(CATEGORIES):
        c_theme[1 + i] = cat
    extra = rng.random(n_clusters) < 0.06
    extra[: 1 + len(CATEGORIES)] = False
    c_theme[extra] = rng.choice(list(CATEGORIES) + ["code"], size=int(extra.sum()))
    theme = c_theme[cluster]

    centres = _unit(rng.standard_normal((n_clusters, d)))
    spread = 1.2  # pairwise cosine within a cluster around 0.4
    w = _unit(centres[cluster] + spread * _unit(rng.standard_normal((n, d))))
    c_xy = rng.uniform(-0.85, 0.85, size=(n_clusters, 2))
    xy = c_xy[cluster] + rng.normal(0, 0.035 if n > 50000 else 0.06, size=(n, 2))

    # --- scores -----------------------------------------------------------------------------------
    is_harm_theme = np.isin(theme, CATEGORIES)
    harm = np.where(is_harm_theme, rng.uniform(0.72, 0.98, n), rng.normal(0.5, 0.06, n))
    task = np.where(theme == "code", rng.uniform(0.7, 0.95, n), rng.normal(0.5, 0.06, n))

    # --- planted task features right next to harmful ones -----------------------------------------
    n_planted = max(4, min(64, n // 200))
    harm_pool = np.flatnonzero(is_harm_theme & (harm > 0.85))
    planted_harm = rng.choice(harm_pool, size=n_planted, replace=False)
    cand = np.setdiff1d(np.flatnonzero(~is_harm_theme), planted_harm)
    planted_task = rng.choice(cand, size=n_planted, replace=False)
    target_cos = np.linspace(0.88, 0.62, n_planted)
    ortho = _unit(rng.standard_normal((n_planted, d)))
    hv = w[planted_harm]
    ortho = _unit(ortho - (ortho * hv).sum(1, keepdims=True) * hv)
    w[planted_task] = _unit(target_cos[:, None] * hv + np.sqrt(1 - target_cos[:, None] ** 2) * ortho)
    cluster[planted_task] = cluster[planted_harm]
    xy[planted_task] = xy[planted_harm] + rng.normal(0, 0.02, size=(n_planted, 2))
    task[planted_task] = np.linspace(0.97, 0.86, n_planted)
    harm[planted_task] = rng.normal(0.53, 0.02, n_planted)
    theme[planted_task] = "code"
    harm = harm.clip(0.02, 0.995)
    task = task.clip(0.02, 0.995)
    xy = xy.clip(-1, 1)

    dead = rng.random(n) < 0.01
    dead[planted_task] = dead[planted_harm] = False
    harm[dead] = task[dead] = 0.5

    # --- geometry ---------------------------------------------------------------------------------
    nb_idx, nb_cos = _neighbours(w.astype(np.float32), cluster, k)
    fpr = 1e-3
    null_cosine = float(3.090232 / math.sqrt(d) * 0.9)  # ~ Φ⁻¹(1 - fpr) / sqrt(d)
    nb_z = (nb_cos * math.sqrt(d)).astype(np.float32)

    frequency = np.where(dead, 0.0, np.exp(rng.uniform(np.log(2e-4), np.log(0.08), n)))
    max_act = np.where(dead, 0.0, rng.uniform(2.0, 24.0, n))
    harm_lo = (harm - rng.uniform(0.03, 0.08, n)).clip(0, 1)
    is_harmful = (harm_lo > 0.68) & ~dead
    is_task = (task > 0.8) & ~dead

    feats = pd.DataFrame(
        {
            "feature": np.arange(n, dtype=np.int64),
            "umap_x": xy[:, 0].astype(np.float32),
            "umap_y": xy[:, 1].astype(np.float32),
            "frequency": frequency,
        }
    )
    boost = {
        "task": theme == "code",
        "control": theme == "code",
        "harmful": is_harm_theme,
        "benign": theme == "benign",
        "general": np.zeros(n, bool),
    }
    for g in GROUPS:
        feats[f"freq_{g}"] = np.where(
            dead, 0.0, frequency * np.where(boost[g], rng.uniform(2, 5, n), rng.uniform(0.1, 0.9, n))
        )
    feats["freq_control"] = np.where(
        np.isin(np.arange(n), planted_task), feats["freq_control"] * 0.2, feats["freq_control"]
    )
    harm_cat = pd.array(np.where(is_harmful & is_harm_theme, theme, None), dtype="string")
    feats = feats.assign(
        max_activation=max_act,
        mean_activation=max_act * rng.uniform(0.15, 0.4, n),
        dead=dead,
        harm_score=harm,
        harm_score_lo=harm_lo,
        harm_category=harm_cat,
        is_harmful=is_harmful,
        task_score=task,
        task_control_score=np.where(theme == "code", task - 0.1, rng.normal(0.5, 0.05, n)).clip(0, 1),
        is_task=is_task,
    )
    # logit-lens tokens: theme words first
    vocab_theme = {t: np.array(v, dtype=object) for t, (_, v) in _THEMES.items()}
    general = np.array(_GENERAL, dtype=object)
    promoted = [None] * n
    suppressed = [None] * n
    labels: list[str | None] = [None] * n
    expl: list[str | None] = [None] * n
    pick = rng.integers(0, 1 << 30, size=(n, 6))
    for th in theme_names:
        members = np.flatnonzero(theme == th)
        v = vocab_theme[th]
        desc = _THEMES[th][0]
        for i in members:
            p = pick[i]
            promoted[i] = [str(v[(p[0] + j * 7) % len(v)]) for j in range(8)]
            suppressed[i] = [str(general[(p[1] + j * 5) % len(general)]) for j in range(8)]
            if p[2] % 10 != 0:
                labels[i] = f"{desc}: {v[p[3] % len(v)].strip()}"
                expl[i] = f"Fires on {desc} text, most strongly on '{v[p[4] % len(v)].strip()}'."
    for r, t in enumerate(planted_task):
        labels[t] = f"code that calls {vocab_theme['code'][r % len(vocab_theme['code'])].strip()} (planted)"
    if inject_html:
        for t, h in list(zip(planted_task, planted_harm, strict=False))[:3]:
            labels[t] = f"{XSS_PAYLOADS[0]} task label"
            labels[h] = f"{XSS_PAYLOADS[1]} harmful label"
            expl[t] = f"explains {XSS_PAYLOADS[2]}"
            promoted[t] = list(XSS_PAYLOADS) + promoted[t][:5]
            promoted[h] = list(XSS_PAYLOADS) + promoted[h][:5]
    feats["top_promoted"] = promoted
    feats["top_suppressed"] = suppressed
    feats["label"] = pd.array(labels, dtype="string")
    feats["explanation"] = pd.array(expl, dtype="string")

    # --- examples (vectorised) --------------------------------------------------------------------
    live = np.flatnonzero(~dead)
    per = n_top + n_quant
    f_rows = np.repeat(live, per)
    within = np.tile(np.arange(per), len(live))
    kind = np.where(within < n_top, "top", "quantile")
    rank = np.where(within < n_top, within, within - n_top)
    n_rows = len(f_rows)
    theme_ids = {t: i for i, t in enumerate(theme_names)}
    vocab_all = list(_GENERAL)
    theme_offset = {}
    for t in theme_names:
        theme_offset[t] = len(vocab_all)
        vocab_all.extend(_THEMES[t][1])
    payload_base = len(vocab_all)
    vocab_all.extend(XSS_PAYLOADS)
    t_codes = np.array([theme_ids[t] for t in theme], dtype=np.int64)[f_rows]
    t_off = np.array([theme_offset[t] for t in theme_names])[t_codes]
    t_len = np.array([len(_THEMES[t][1]) for t in theme_names])[t_codes]
    r = rng.random((n_rows, ctx_len))
    gen_ids = rng.integers(0, len(_GENERAL), size=(n_rows, ctx_len))
    th_ids = t_off[:, None] + (rng.integers(0, 1 << 20, size=(n_rows, ctx_len)) % t_len[:, None])
    tok_ids = np.where(r < 0.45, th_ids, gen_ids)
    max_pos = rng.integers(2, ctx_len - 2, size=n_rows)
    top_max = max_act[f_rows] * np.where(kind == "top", 1.0 - 0.06 * rank, 0.0)
    quant = np.where(kind == "quantile", (rank + 1) / (n_quant + 1), np.nan)
    row_max = np.where(kind == "top", top_max, max_act[f_rows] * np.nan_to_num(quant) * 0.5)
    pos = np.arange(ctx_len)[None, :]
    dist = np.abs(pos - max_pos[:, None])
    acts = row_max[:, None] * np.exp(-dist * 0.9) * (rng.random((n_rows, ctx_len)) < 0.8)
    acts[np.arange(n_rows), max_pos] = row_max
    acts = np.where(acts < 0.05 * row_max[:, None], 0.0, acts).astype(np.float32)
    tok_ids[np.arange(n_rows), max_pos] = th_ids[np.arange(n_rows), max_pos]
    if inject_html:
        for f in list(planted_task[:3]) + list(planted_harm[:3]):
            rows = np.flatnonzero((f_rows == f) & (rank < 2))
            for j, row in enumerate(rows):
                for q in range(3):
                    tok_ids[row, (max_pos[row] + q - 1 + j) % ctx_len] = payload_base + q
    groups = np.array(GROUPS, dtype=object)
    fam = np.where(theme[f_rows] == "code", 0, np.where(np.isin(theme[f_rows], CATEGORIES), 2, 3))
    alt = rng.choice([1, 3, 4], size=n_rows)
    g_idx = np.where(rng.random(n_rows) < 0.75, fam, alt)
    ex_group = groups[g_idx]
    ex_cat = np.where(ex_group == "harmful", theme[f_rows], None)
    ex_cat = np.where((ex_group == "harmful") & ~np.isin(ex_cat, CATEGORIES), CATEGORIES[0], ex_cat)

    doc_group = np.array(GROUPS, dtype=object)[rng.permutation(np.arange(n_docs) % len(GROUPS))]
    ex_doc = np.zeros(n_rows, dtype=np.int64)
    for g in GROUPS:  # each example comes from a document of its own group
        pool = np.flatnonzero(doc_group == g)
        rows_g = np.flatnonzero(ex_group == g)
        ex_doc[rows_g] = pool[rng.integers(0, len(pool), len(rows_g))]

    vocab_arr = pa.array(vocab_all, pa.string())
    flat_tokens = pa.DictionaryArray.from_arrays(pa.array(tok_ids.ravel().astype(np.int32)), vocab_arr)
    flat_tokens = flat_tokens.cast(pa.string())
    offsets = pa.array(np.arange(0, (n_rows + 1) * ctx_len, ctx_len, dtype=np.int32))
    tokens_col = pa.ListArray.from_arrays(offsets, flat_tokens)
    acts_col = pa.ListArray.from_arrays(offsets, pa.array(acts.ravel()))
    ex_table = pa.table(
        {
            "feature": pa.array(f_rows.astype(np.int64)),
            "rank": pa.array(rank.astype(np.int64)),
            "kind": pa.array(kind.astype(object), pa.string()),
            "group": pa.array(ex_group, pa.string()),
            "category": pa.array(ex_cat, pa.string()),
            "doc_id": pa.array(ex_doc),
            "context_id": pa.array(rng.integers(0, n_docs * 8, n_rows).astype(np.int64)),
            "tokens": tokens_col,
            "activations": acts_col,
            "max_activation": pa.array(row_max.astype(np.float64)),
            "max_position": pa.array(max_pos.astype(np.int64)),
            "quantile": pa.array(quant.astype(np.float64), from_pandas=True),
        }
    )

    # --- histograms, category rates, documents ----------------------------------------------------
    bins = 32
    decay = np.exp(-np.arange(bins)[None, :] * rng.uniform(0.1, 0.35, size=(n, 1)))
    counts = np.floor(decay * (frequency[:, None] * 2e5)).astype(np.int64)
    counts[dead] = 0
    counts[~dead, -1] = np.maximum(counts[~dead, -1], 1)

    cr_feature, cr_group, cr_cat, cr_freq = [], [], [], []
    for g in GROUPS:
        if g == "harmful":
            for cat in CATEGORIES:
                match = theme == cat
                cr_feature.append(np.arange(n))
                cr_group.append(np.full(n, g, dtype=object))
                cr_cat.append(np.full(n, cat, dtype=object))
                cr_freq.append(feats[f"freq_{g}"].to_numpy() * np.where(match, 2.5, rng.uniform(0.1, 0.8, n)))
        else:
            cr_feature.append(np.arange(n))
            cr_group.append(np.full(n, g, dtype=object))
            cr_cat.append(np.full(n, None, dtype=object))
            cr_freq.append(feats[f"freq_{g}"].to_numpy())
    cat_rates = pa.table(
        {
            "feature": pa.array(np.concatenate(cr_feature).astype(np.int64)),
            "group": pa.array(np.concatenate(cr_group), pa.string()),
            "category": pa.array(np.concatenate(cr_cat), pa.string()),
            "frequency": pa.array(np.concatenate(cr_freq).clip(0, 1)),
            "tokens": pa.array(np.full(sum(len(x) for x in cr_feature), 20000, dtype=np.int64)),
        }
    )
    docs = pd.DataFrame(
        {
            "doc_id": np.arange(n_docs, dtype=np.int64),
            "source": [f"synthetic/{g}.jsonl" for g in doc_group],
            "group": pd.array(doc_group, dtype="string"),
            "category": pd.array(
                [rng.choice(CATEGORIES) if g == "harmful" else None for g in doc_group], dtype="string"
            ),
            "n_tokens": rng.integers(20, 400, n_docs).astype(np.int64),
            "text_preview": [f"Synthetic document {i} about {g} things." for i, g in enumerate(doc_group)],
        }
    )
    if inject_html:
        docs.loc[: len(XSS_PAYLOADS) - 1, "text_preview"] = list(XSS_PAYLOADS)

    # --- overlaps ---------------------------------------------------------------------------------
    rows: list[dict[str, Any]] = []
    task_ids = np.flatnonzero(is_task)
    for t in task_ids:
        for rnk in range(k):
            h = int(nb_idx[t, rnk])
            c = float(nb_cos[t, rnk])
            if c < null_cosine:
                break
            if not is_harmful[h]:
                continue
            planted = t in planted_task
            coact = float(rng.uniform(0.15, 0.45) if planted else rng.uniform(0.0, 0.15))
            excess = max(0.0, (c - null_cosine) / (1 - null_cosine))
            rows.append(
                {
                    "task_feature": int(t),
                    "harmful_feature": h,
                    "cosine": c,
                    "z": float(nb_z[t, rnk]),
                    "null_cosine": null_cosine,
                    "coactivation": coact,
                    "cond_coactivation": min(1.0, coact * rng.uniform(1.2, 2.0)),
                    "harm_score": float(harm[h]),
                    "task_score": float(task[t]),
                    "harm_category": str(harm_cat[h]) if harm_cat[h] is not pd.NA else None,
                    "neighbor_rank": rnk,
                    "risk": excess * (2 * harm[h] - 1) * (2 * task[t] - 1),
                }
            )
    overlaps = pd.DataFrame(
        rows,
        columns=[
            "task_feature",
            "harmful_feature",
            "cosine",
            "z",
            "null_cosine",
            "coactivation",
            "cond_coactivation",
            "harm_score",
            "task_score",
            "harm_category",
            "neighbor_rank",
            "risk",
        ],
    )
    overlaps = overlaps.sort_values("risk", ascending=False, ignore_index=True)
    overlaps = overlaps.astype(
        {"task_feature": "int64", "harmful_feature": "int64", "neighbor_rank": "int64"}
    )
    overlaps["harm_category"] = overlaps["harm_category"].astype("string")

    # --- write through the cache module (atomic, checksummed) -------------------------------------
    n_tokens = int(n_docs * 200)
    base = {
        "schema_version": 1,
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
            "hook_name": "blocks.0.hook_resid_post",
            "sha256": None,
        },
        "hook": "blocks.0.hook_resid_post",
        "d_in": d,
        "n_features": n,
        "corpus": [
            {
                "path": f"synthetic/{g}.jsonl",
                "group": g,
                "category": None,
                "sha256": None,
                "documents": int((doc_group == g).sum()),
                "tokens": n_tokens // len(GROUPS),
                "skipped_non_utf8": 0,
                "skipped_malformed": 0,
            }
            for g in GROUPS
        ],
        "identity": {"synthetic": True, "n_features": n, "d": d, "seed": seed, "inject_html": inject_html},
    }
    with stage(path, fresh=True, base_manifest=base) as staged:
        pq.write_table(pa.Table.from_pandas(feats, preserve_index=False), staged.path("features.parquet"))
        pq.write_table(ex_table, staged.path("examples.parquet"), row_group_size=row_group_size)
        np.savez(staged.path("histograms.npz"), counts=counts, bins=np.int64(bins))
        pq.write_table(cat_rates, staged.path("category_rates.parquet"))
        pq.write_table(pa.Table.from_pandas(docs, preserve_index=False), staged.path("documents.parquet"))
        np.savez(
            staged.path("neighbors.npz"),
            indices=nb_idx,
            cosine=nb_cos,
            z=nb_z,
            null_cosine=np.float64(null_cosine),
            fpr=np.float64(fpr),
            d=np.int64(d),
        )
        pq.write_table(pa.Table.from_pandas(overlaps, preserve_index=False), staged.path("overlaps.parquet"))
        secs = time.perf_counter() - t0
        staged.record_step(
            "harvest",
            {"synthetic": True, "n_top": n_top, "n_quantile": n_quant, "ctx_len": ctx_len, "bins": bins},
            secs / 4,
        )
        staged.record_step("geometry", {"k": k, "fpr": fpr, "metric": "cosine"}, secs / 4)
        staged.record_step("scores", {"harm_threshold": 0.68, "task_threshold": 0.8}, secs / 4)
        staged.record_step(
            "overlaps",
            {
                "min_z": None,
                "planted": [[int(a), int(b)] for a, b in zip(planted_task, planted_harm, strict=False)],
            },
            secs / 4,
        )
        staged.manifest["synthetic"] = {
            "planted_task": planted_task.tolist(),
            "planted_harmful": planted_harm.tolist(),
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
