"""Score a learned decoder against the planted truth with the pipeline's own geometry code
(`geometry.knn_cosine`, `null_isotropic`, `cosine_z`): neighbour order, recovered cosines, false flags
above the null, and co-activation against geometry."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import sparse

from precompute.lab.synth.dictionary import SynthDictionary
from precompute.lab.synth.jsonable import json_float as _f
from precompute.lab.synth.matching import (
    MatchResult,
    _auroc,
    _unit64,
    feature_fires,
    jaccard_pairs,
    match_dictionary,
)
from precompute.pipeline import geometry

# An unmatched live latent with cosine >= this to both a task feature and its co-firing partner
# is reported as a "composite" (the SAE turned their co-occurrence into a direction).
COMPOSITE_COS = 0.3
UNMATCHED_ROLES = ("duplicate", "extra", "composite")


@dataclass
class _Learned:
    """The learned decoder's geometry and its relation to the truth, shared by every task's entry."""

    dictionary: SynthDictionary
    match: MatchResult
    nb_idx: np.ndarray  # kNN lists [n, k] of the learned latents
    nb_cos: np.ndarray
    G: np.ndarray  # learned cosines [n, n]
    Ct: np.ndarray  # true x learned cosines
    null: float
    d: int
    fires_count: np.ndarray | None  # firings per learned latent, when known

    def __post_init__(self) -> None:
        r = self.dictionary.roles
        self.role_of = r["role"].to_numpy()
        self.task_of = r["task"].to_numpy()
        self.rho_of = r["target_cosine"].to_numpy()

    def is_composite(self, j: int, t: int) -> bool:
        """An unmatched latent pointing between t and one of its co-firing partners."""
        return any(
            self.Ct[t, j] >= COMPOSITE_COS and self.Ct[int(p), j] >= COMPOSITE_COS
            for p in self.dictionary.partners_of(t)
        )

    def role(self, j: int, t: int) -> dict[str, Any]:
        """What learned latent j is relative to task feature t (see `evaluate_geometry`)."""
        match = self.match
        tj = int(match.learned_to_true[j])
        if tj < 0:
            bt = int(match.learned_best_true[j])
            role = "composite" if self.is_composite(j, t) else "duplicate" if bt == t else "extra"
            out = {"true": bt, "role": role, "rho": None, "match_cos": _f(match.learned_best_cos[j])}
        else:
            role = str(self.role_of[tj])
            if (role in ("planted", "partner") and self.task_of[tj] != t) or role == "task":
                role = "other"
            out = {
                "true": tj,
                "role": role,
                "rho": _f(self.rho_of[tj]) if role == "planted" else None,
                "match_cos": _f(match.matched_cos[tj]),
            }
        if self.fires_count is not None:
            out["dead"] = bool(self.fires_count[j] == 0)
        return out

    def neighbours(self, lt: int, t: int) -> list[dict[str, Any]]:
        """L(t)'s kNN list, each entry mapped back to its role relative to t."""
        return [
            {
                "learned": int(j),
                "cosine": _f(c),
                "z": _f(geometry.cosine_z(float(c), self.d)),
                "above_null": bool(c > self.null),
                **self.role(int(j), t),
            }
            for j, c in zip(self.nb_idx[lt], self.nb_cos[lt], strict=True)
        ]


@dataclass
class _Tally:
    """Rows and counts gathered over the task features, summarised once all are seen."""

    rec_rows: list[dict[str, Any]]
    fp_rows: list[dict[str, Any]]
    fp_tasks: int = 0
    pair_ok: int = 0
    pair_total: int = 0


def _recovered(
    geo: _Learned, t: int, lt: int, tally: _Tally
) -> tuple[list[int | None], list[dict[str, Any]]]:
    """Rank in L(t)'s list and learned cosine of each planted neighbour of t, in descending rho."""
    asg, match = geo.match.assignment, geo.match
    pos_of = {int(j): i for i, j in enumerate(geo.nb_idx[lt])}
    ranks: list[int | None] = []
    recovered = []
    for _, h in geo.dictionary.planted_of(t).iterrows():
        lh = int(asg[int(h["feature"])])
        rank = pos_of.get(lh) if lh >= 0 else None
        cos = float(geo.G[lt, lh]) if lh >= 0 else float("nan")
        ranks.append(rank)
        recovered.append(
            {
                "planted": int(h["feature"]),
                "rho": float(h["target_cosine"]),
                "learned": lh,
                "cosine": _f(cos),
                "rank": rank,
                "above_null": bool(cos > geo.null),
                "planted_match_cos": _f(match.matched_cos[int(h["feature"])]),
            }
        )
        tally.rec_rows.append(
            {
                "task": t,
                "rho": float(h["target_cosine"]),
                "cosine": cos,
                "above_null": bool(cos > geo.null),
                "merged": bool(match.best_learned[int(h["feature"])] == match.best_learned[t]),
            }
        )
    return ranks, recovered


def _count_ordered_pairs(ranks: list[int | None], tally: _Tally) -> None:
    for i in range(len(ranks)):
        for j in range(i + 1, len(ranks)):
            ri, rj = ranks[i], ranks[j]
            tally.pair_total += 1
            tally.pair_ok += ri is not None and rj is not None and ri < rj


def _false_flags(geo: _Learned, t: int, lt: int, tally: _Tally) -> list[dict[str, Any]]:
    """Every partner of t and every decoy whose matched latent is above the null next to L(t)."""
    fps = []
    partners = [(int(p), "partner") for p in geo.dictionary.partners_of(t)]
    decoys = [(int(q), "decoy") for q in geo.dictionary.ids("decoy")]
    for j, kind in partners + decoys:
        lj = int(geo.match.assignment[j])
        if lj < 0:
            continue
        cos = float(geo.G[lt, lj])
        tally.fp_rows.append(
            {"task": t, "feature": j, "kind": kind, "cosine": cos, "flagged": bool(cos > geo.null)}
        )
        if cos > geo.null:
            fps.append({"feature": j, "kind": kind, "learned": lj, "cosine": _f(cos)})
    tally.fp_tasks += bool(fps)
    return fps


def _task_entry(geo: _Learned, t: int, tally: _Tally) -> dict[str, Any]:
    """One task feature's part of the report (see `evaluate_geometry`)."""
    match = geo.match
    lt = int(match.assignment[t])
    entry: dict[str, Any] = {"task": t, "learned": lt, "match_cos": _f(match.matched_cos[t])}
    if lt < 0:
        entry["order_ok"] = False
        return entry
    entry["neighbours"] = geo.neighbours(lt, t)
    ranks, recovered = _recovered(geo, t, lt, tally)
    found = [x for x in ranks if x is not None]
    # a merge: the task feature and a planted neighbour have the same closest latent
    merged = [
        int(h)
        for h in geo.dictionary.planted_of(t)["feature"]
        if match.best_learned[int(h)] == match.best_learned[t]
    ]
    entry["merged_with"] = merged
    for row in recovered:
        row["merged"] = row["planted"] in merged
    entry["planted_rank"] = ranks
    entry["order_ok"] = len(found) == len(ranks) and all(
        a < b for a, b in zip(found, found[1:], strict=False)
    )
    _count_ordered_pairs(ranks, tally)
    entry["planted_top"] = sorted(found) == list(range(len(ranks)))
    entry["recovered"] = recovered
    entry["false_flags"] = _false_flags(geo, t, lt, tally)
    # unmatched latents above the null (duplicates of t are not a geometric claim about t)
    entry["flagged_unmatched"] = [
        e for e in entry["neighbours"] if e["above_null"] and e["role"] in UNMATCHED_ROLES
    ]
    alive = geo.fires_count > 0 if geo.fires_count is not None else np.ones(len(geo.G), bool)
    entry["composites"] = [
        int(j) for j in np.flatnonzero(alive) if match.learned_to_true[j] < 0 and geo.is_composite(int(j), t)
    ]
    return entry


def _recovered_by_rho(rec: pd.DataFrame, null: float) -> list[dict[str, Any]]:
    by_rho = []
    for rho in rec["rho"].unique():  # in order of appearance
        g = rec[rec["rho"] == rho]
        by_rho.append(
            {
                "rho": float(rho),
                "n": len(g),
                "mean_cosine": _f(g["cosine"].mean()),
                "std_cosine": _f(g["cosine"].std(ddof=0)),
                "mean_abs_error": _f((g["cosine"] - rho).abs().mean()),
                "above_null_fraction": _f(g["above_null"].mean()),
                "merged_with_task": int(g["merged"].sum()),
                "rho_above_null": bool(rho > null),
            }
        )
    return by_rho


def _false_positive_summary(
    fp: pd.DataFrame, fp_tasks: int, n_tasks: int, p_pair: float, fpr: float
) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for kind in ("partner", "decoy"):
        g = fp[fp["kind"] == kind]
        summary[kind] = {
            "pairs": len(g),
            "flagged": int(g["flagged"].sum()),
            "max_cosine": _f(g["cosine"].max()) if len(g) else None,
            "mean_abs_cosine": _f(g["cosine"].abs().mean()) if len(g) else None,
        }
    n_pairs, n_flag = len(fp), int(fp["flagged"].sum())
    summary.update(
        {
            "pairs": n_pairs,
            "flagged": n_flag,
            "pair_rate": _f(n_flag / n_pairs) if n_pairs else None,
            "expected_pair_rate": p_pair,
            "expected_flagged": p_pair * n_pairs,
            "tasks_with_false_flag": fp_tasks,
            "task_rate": _f(fp_tasks / n_tasks) if n_tasks else None,
            "fpr": fpr,
            "ok": bool(n_tasks and fp_tasks / n_tasks <= fpr),
        }
    )
    return summary


def evaluate_geometry(
    dictionary: SynthDictionary,
    learned_dirs: np.ndarray | torch.Tensor,
    match: MatchResult | None = None,
    true_fires: sparse.spmatrix | None = None,
    learned_fires: sparse.spmatrix | None = None,
    fpr: float = 0.01,
    k: int = 32,
    device: str = "cpu",
) -> dict[str, Any]:
    """Run the pipeline's geometry on the learned decoder and score it against the planted truth.

    For each task feature t (through its matched learned latent L(t)):

    * ``neighbours``: L(t)'s kNN list (`geometry.knn_cosine`, self excluded, descending cosine)
      with each entry mapped back to a true role relative to t: ``planted`` (with its rho),
      ``partner``, ``decoy``, ``other`` (another task's block), ``composite`` (an unmatched latent
      at cos >= COMPOSITE_COS to both t and one of its co-firing partners), ``duplicate`` (an
      unmatched latent whose closest true feature is t itself) or ``extra`` (another unmatched
      latent), plus ``dead`` when ``learned_fires`` is given;
    * ``planted_rank``: the positions of the planted neighbours in that list (None when beyond k),
      ``order_ok``: found and listed in descending rho; ``recovered``: cos(L(t), L(h_k)) vs rho;
    * ``flagged_*``: learned cosines above ``null_isotropic(d_sae, d, fpr)``. The pipeline flags against
      the larger of that and the decoder-covariance null; the planted dictionary is isotropic (random
      decoys) and has too few rows (n ~ 2d) to estimate a covariance from, so the isotropic null is
      the one that applies here.

    False positives are counted over ALL (task, partner) and (task, decoy) pairs from the cosine
    of their matched latents, not only within the first k. The null is set so that a task
    feature's list contains a false flag with probability ``fpr`` (family-wise); per pair the
    rate is p = 1 - (1 - fpr)^(1/(n-1)).

    Co-activation: token-level Jaccard of (task, partner) and (task, planted) pairs, from the true
    codes (``true_fires``, columns = true features) and from the SAE's latents (``learned_fires``,
    columns = learned latents), when given.
    """
    match = match or match_dictionary(dictionary.directions, learned_dirs)
    L = _unit64(learned_dirs)
    n, d = L.shape
    k = min(k, n - 1)
    nb_idx, nb_cos = geometry.knn_cosine(L.astype(np.float32), k=k, device=device, progress=False)
    null = geometry.null_isotropic(n, d, fpr=fpr)
    p_pair = -math.expm1(math.log1p(-fpr) / (n - 1))
    fires_count = (
        np.asarray(sparse.csc_matrix(learned_fires).getnnz(axis=0)).ravel()
        if learned_fires is not None
        else None
    )
    geo = _Learned(
        dictionary, match, nb_idx, nb_cos, L @ L.T, _unit64(dictionary.directions) @ L.T, null, d, fires_count
    )
    tally = _Tally([], [])
    tasks = dictionary.ids("task")
    per_task = [_task_entry(geo, int(t), tally) for t in tasks]
    rec = pd.DataFrame(tally.rec_rows, columns=["task", "rho", "cosine", "above_null", "merged"])
    fp = pd.DataFrame(tally.fp_rows, columns=["task", "feature", "kind", "cosine", "flagged"])
    result: dict[str, Any] = {
        "null_cosine": null,
        "fpr": fpr,
        "n_latents": n,
        "d": d,
        "k": k,
        "order_accuracy": _f(np.mean([e["order_ok"] for e in per_task])) if per_task else None,
        "pairwise_order_accuracy": _f(tally.pair_ok / tally.pair_total) if tally.pair_total else None,
        "planted_top_fraction": _f(np.mean([e.get("planted_top", False) for e in per_task]))
        if per_task
        else None,
        "recovered_by_rho": _recovered_by_rho(rec, null),
        "recovered_mean_abs_error": _f((rec["cosine"] - rec["rho"]).abs().mean()) if len(rec) else None,
        "false_positives": _false_positive_summary(fp, tally.fp_tasks, len(tasks), p_pair, fpr),
        "flagged_unmatched_latents": int(sum(len(e.get("flagged_unmatched", [])) for e in per_task)),
        "flagged_composites": int(
            sum(sum(x["role"] == "composite" for x in e.get("flagged_unmatched", [])) for e in per_task)
        ),
        "tasks_with_composite": int(sum(bool(e.get("composites")) for e in per_task)),
        "tasks": per_task,
    }
    result["coactivation"] = coactivation_summary(dictionary, match, true_fires, learned_fires, geo.G, null)
    return result


def _pair_jaccards(
    true_fires: sparse.spmatrix | None,
    learned_fires: sparse.spmatrix | None,
    feat_fires: sparse.spmatrix | None,
    pairs: np.ndarray,
    learned_pairs: np.ndarray,
) -> dict[str, np.ndarray]:
    """Jaccard of each pair from the true codes, the matched latents and the merged features (when known)."""
    vals: dict[str, np.ndarray] = {}
    if true_fires is not None:
        vals["true"] = jaccard_pairs(true_fires, pairs)
    if learned_fires is not None and feat_fires is not None and len(learned_pairs):
        vals["latent"] = jaccard_pairs(learned_fires, learned_pairs)
        vals["feature"] = jaccard_pairs(feat_fires, pairs)
    return vals


def coactivation_summary(
    dictionary: SynthDictionary,
    match: MatchResult,
    true_fires: sparse.spmatrix | None,
    learned_fires: sparse.spmatrix | None,
    G: np.ndarray,
    null: float,
) -> dict[str, Any]:
    """Jaccard of (task, partner) vs (task, planted) pairs: from the true codes ("true"), from the
    matched latents as the pipeline would measure them ("latent"), and per true feature with
    duplicate latents merged (`feature_fires`, "feature")."""
    r = dictionary.roles
    part = r[r["role"] == "partner"]
    plant = r[r["role"] == "planted"]
    pairs = {
        "partner": np.stack([part["task"], part["feature"]], 1).astype(np.int64).reshape(-1, 2),
        "planted": np.stack([plant["task"], plant["feature"]], 1).astype(np.int64).reshape(-1, 2),
    }
    feat_fires = feature_fires(learned_fires, match, dictionary.n) if learned_fires is not None else None
    out: dict[str, Any] = {}
    raw: dict[str, dict[str, np.ndarray]] = {}
    for kind, pr in pairs.items():
        lp = match.assignment[pr]
        ok = (lp >= 0).all(axis=1)
        cos = G[lp[ok, 0], lp[ok, 1]]
        entry: dict[str, Any] = {
            "pairs": len(pr),
            "mean_learned_cosine": _f(cos.mean()) if ok.any() else None,
            "above_null_fraction": _f((cos > null).mean()) if ok.any() else None,
        }
        vals = _pair_jaccards(true_fires, learned_fires, feat_fires, pr, lp[ok])
        for src, j in vals.items():
            if len(j):
                entry[f"{src}_jaccard_mean"] = _f(j.mean())
                entry[f"{src}_jaccard_min"] = _f(j.min())
                entry[f"{src}_jaccard_max"] = _f(j.max())
        if kind == "planted" and "latent" in vals:
            rho = plant["target_cosine"].to_numpy()[ok]
            entry["latent_jaccard_by_rho"] = {
                str(float(v)): _f(vals["latent"][rho == v].mean()) for v in np.unique(rho)[::-1]
            }
        out[kind] = entry
        raw[kind] = vals
    for src in ("true", "latent", "feature"):
        a, b = raw["partner"].get(src), raw["planted"].get(src)
        if a is not None and b is not None and len(a) and len(b):
            out[f"{src}_separation_auroc"] = _f(_auroc(a, b))
            out[f"{src}_separated"] = bool(a.min() > b.max())
    return out
