"""One whole planted-ground-truth run: dictionary -> activations -> TopK SAE -> matching ->
geometry/co-activation report, with the bars it must meet."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from precompute.lab.synth.config import SynthConfig
from precompute.lab.synth.dictionary import (
    ROLES,
    SynthData,
    SynthDictionary,
    default_k,
    expected_l0,
    generate_activations,
    make_dictionary,
)
from precompute.lab.synth.evaluate import evaluate_geometry
from precompute.lab.synth.fit import fit_sae
from precompute.lab.synth.jsonable import json_float, jsonable
from precompute.lab.synth.matching import MatchResult, match_dictionary, sae_fires
from precompute.sae.base import SAE


@dataclass
class SynthRun:
    config: SynthConfig
    dictionary: SynthDictionary
    data: SynthData
    sae: SAE
    match: MatchResult
    report: dict[str, Any]


def _true_l0(cfg: SynthConfig, dic: SynthDictionary) -> float:
    """The expected number of firing features per sample; sets k to match it when k is not given."""
    if cfg.n_active is not None:
        l0 = float(cfg.n_active)
        if cfg.k is None:
            cfg.k = int(cfg.n_active)
    else:
        l0 = expected_l0(dic, cfg.firing_prob, cfg.cofire_prob, cfg.partner_solo)
        if cfg.k is None:
            cfg.k = default_k(l0)
    return l0


def _recovery(match: MatchResult, dic: SynthDictionary, dead: np.ndarray) -> dict[str, Any]:
    alive = ~dead
    by_role = {
        role: json_float(np.abs(match.matched_cos[dic.ids(role)]).mean())
        for role in ROLES
        if len(dic.ids(role))
    }
    return {
        "mcc": match.mcc,
        "mmcs": match.mmcs,
        "mcc_by_role": by_role,
        "min_matched_cos": json_float(np.abs(match.matched_cos).min()),
        "true_features_below_0.9": int((np.abs(match.matched_cos) < 0.9).sum()),
        "alive_latents": int(alive.sum()),
        "dead_latents": int((~alive).sum()),
    }


def _bars(match: MatchResult, geo: dict[str, Any]) -> dict[str, bool]:
    """What a run must show (docs/science.md section 4): recovery, order, false-positive rate, co-activation."""
    return {
        "mcc_ge_0.9": bool(match.mcc >= 0.9),
        "mmcs_ge_0.9": bool(match.mmcs >= 0.9),
        "planted_in_rho_order": bool(geo["order_accuracy"] == 1.0),
        "false_positive_rate_le_fpr": bool(geo["false_positives"]["ok"]),
        "coactivation_separates_true": bool(geo["coactivation"].get("true_separated", False)),
        "coactivation_separates_learned": bool(geo["coactivation"].get("feature_separated", False)),
    }


def run_synth(config: SynthConfig, progress: bool = False) -> SynthRun:
    """Dictionary -> activations -> TopK SAE -> matching -> geometry/co-activation report."""
    cfg = config.resolved()
    t0 = time.perf_counter()
    dic = make_dictionary(cfg.d, cfg.n_task, cfg.cosines, cfg.partners, cfg.decoys, seed=cfg.seed)
    l0 = _true_l0(cfg, dic)
    data = generate_activations(
        dic,
        cfg.samples,
        cfg.firing_prob,
        cfg.cofire_prob,
        cfg.partner_solo,
        cfg.magnitude,
        cfg.magnitude_range,
        cfg.noise,
        seed=cfg.seed,
        n_active=cfg.n_active,
    )
    t_gen = time.perf_counter() - t0
    assert cfg.d_sae is not None and cfg.k is not None  # resolved() and _true_l0 set them
    sae, train_stats = fit_sae(
        data.x,
        int(cfg.d_sae),
        int(cfg.k),
        cfg.steps,
        cfg.batch_size,
        cfg.lr,
        seed=cfg.seed,
        init=cfg.init,
        progress=progress,
    )
    t1 = time.perf_counter()
    learned = sae.unit_directions().double().numpy()
    true_fires = data.fires()
    learned_fires = sae_fires(sae, data.x)
    dead = np.asarray(learned_fires.getnnz(axis=0)).ravel() == 0
    match = match_dictionary(dic.directions, learned, exclude=dead)
    geo = evaluate_geometry(dic, learned, match, true_fires, learned_fires, fpr=cfg.fpr, k=cfg.neighbors)
    t_eval = time.perf_counter() - t1
    bars = _bars(match, geo)
    report = {
        "config": jsonable(cfg.to_dict()),
        "dictionary": {
            "n_features": dic.n,
            "d": dic.d,
            "counts": dic.roles["role"].value_counts().to_dict(),
            "blocks_orthogonal": dic.blocks_orthogonal,
            "expected_l0": l0,
        },
        "data": data.params,
        "training": {k: v for k, v in train_stats.items() if k != "curve"},
        "training_curve": train_stats["curve"],
        "recovery": _recovery(match, dic, dead),
        "geometry": geo,
        "bars": bars,
        "all_bars_met": all(bars.values()),
        "notes": {
            "coactivation_separates_matched_latents": bool(geo["coactivation"].get("latent_separated", False))
        },
        "timings_s": {
            "generate": t_gen,
            "train": train_stats["train_seconds"],
            "evaluate": t_eval,
            "total": time.perf_counter() - t0,
        },
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    return SynthRun(cfg, dic, data, sae, match, report)
