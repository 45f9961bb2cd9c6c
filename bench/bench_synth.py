"""Benchmark the planted-ground-truth check (precompute.lab.synth) at a larger size.

Runs, each seeded and written with `precompute.lab.synth.report.write_outputs` (report JSON, plot HTML,
true dictionary, SAE in SAELens format) under ``--out/<run>``, plus one summary ``--out/bench_synth.json``:

* ``main``: d=256, 32 task features with planted neighbours at the default cosines, 32 co-firing
  orthogonal partners, 64 decoys (288 true features), d_sae = 2x, fixed L0 = 4 = k;
* ``default``: the CLI defaults (d=64, 8 tasks x 4 planted, 8 partners, 12 decoys, fixed L0 = 3 = k);
* ``limit``: the brief's cosines 0.9 0.7 0.5 0.3 at d=64 (the CLI default otherwise), to measure
  how often the TopK SAE merges a task feature with its closest planted neighbour.

Usage (opt-in, not part of the tests; a few minutes on 2 cores):

    nice -n 10 python bench/bench_synth.py --out bench/out/synth
    nice -n 10 python bench/bench_synth.py --runs main --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from precompute.lab.synth.config import SynthConfig  # noqa: E402
from precompute.lab.synth.jsonable import jsonable  # noqa: E402
from precompute.lab.synth.report import summary_lines, write_outputs  # noqa: E402
from precompute.lab.synth.run import run_synth  # noqa: E402

RUNS = {
    "main": dict(d=256, n_task=32, decoys=64, samples=200_000, n_active=4, steps=4000, batch_size=1024),
    "default": dict(),  # `featuregeom synth` as it ships: d=64, 60 true features
    "limit": dict(cosines=[0.9, 0.7, 0.5, 0.3]),
}


def summarise(report: dict) -> dict:
    geo, co, fp = (
        report["geometry"],
        report["geometry"]["coactivation"],
        report["geometry"]["false_positives"],
    )
    return {
        "mcc": report["recovery"]["mcc"],
        "mmcs": report["recovery"]["mmcs"],
        "mcc_by_role": report["recovery"]["mcc_by_role"],
        "true_features_below_0.9": report["recovery"]["true_features_below_0.9"],
        "order_accuracy": geo["order_accuracy"],
        "pairwise_order_accuracy": geo["pairwise_order_accuracy"],
        "recovered_by_rho": [
            {
                k: r[k]
                for k in (
                    "rho",
                    "mean_cosine",
                    "std_cosine",
                    "mean_abs_error",
                    "above_null_fraction",
                    "merged_with_task",
                    "n",
                )
            }
            for r in geo["recovered_by_rho"]
        ],
        "null_cosine": geo["null_cosine"],
        "fpr": geo["fpr"],
        "false_positive_pairs": fp["pairs"],
        "false_positive_flagged": fp["flagged"],
        "false_positive_pair_rate": fp["pair_rate"],
        "expected_pair_rate": fp["expected_pair_rate"],
        "tasks_with_false_flag": fp["tasks_with_false_flag"],
        "task_false_flag_rate": fp["task_rate"],
        "partner_learned_cosine": co["partner"]["mean_learned_cosine"],
        "partner_jaccard_true": co["partner"].get("true_jaccard_mean"),
        "partner_jaccard_feature": co["partner"].get("feature_jaccard_mean"),
        "partner_jaccard_feature_min": co["partner"].get("feature_jaccard_min"),
        "partner_jaccard_latent": co["partner"].get("latent_jaccard_mean"),
        "planted_jaccard_true": co["planted"].get("true_jaccard_mean"),
        "planted_jaccard_feature": co["planted"].get("feature_jaccard_mean"),
        "planted_jaccard_feature_max": co["planted"].get("feature_jaccard_max"),
        "planted_jaccard_latent": co["planted"].get("latent_jaccard_mean"),
        "planted_jaccard_latent_by_rho": co["planted"].get("latent_jaccard_by_rho"),
        "coactivation_separation_auroc_feature": co.get("feature_separation_auroc"),
        "coactivation_separation_auroc_latent": co.get("latent_separation_auroc"),
        "notes": report["notes"],
        "flagged_unmatched_latents": geo["flagged_unmatched_latents"],
        "flagged_composites": geo["flagged_composites"],
        "tasks_with_composite": geo["tasks_with_composite"],
        "fvu": report["training"]["fvu"],
        "bars": report["bars"],
        "timings_s": report["timings_s"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", choices=sorted(RUNS), default=["main", "default", "limit"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "synth"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    results = []
    for name in args.runs:
        for seed in args.seeds:
            cfg = SynthConfig(**RUNS[name], seed=seed)
            t0 = time.perf_counter()
            run = run_synth(cfg, progress=False)
            wall = time.perf_counter() - t0
            tag = name if len(args.seeds) == 1 else f"{name}-seed{seed}"
            files = write_outputs(run, out / tag)
            summary = {
                "run": tag,
                "config": jsonable(run.config.to_dict()),
                "wall_s": wall,
                "dictionary": run.report["dictionary"],
                "files": files,
                **summarise(run.report),
            }
            results.append(summary)
            print(f"== {tag} ({wall:.1f} s)")
            for line in summary_lines(run.report):
                print("  " + line)
            sys.stdout.flush()
    payload = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "environment": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": __import__("os").cpu_count(),
        },
        "results": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_synth.json").write_text(json.dumps(payload, indent=1))
    print(f"wrote {out / 'bench_synth.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
