"""How well the fine-tune diff's hierarchical intervals are calibrated with few training seeds (a simulation,
numbers quoted in docs/science.md §6).

    python bench/diff_calibration.py            # ~1 minute on 2 cores

Null data shaped like the real design: 64 EM prompts in 56 base-question clusters; per arm (task,
control) S training seeds; a value per seed and prompt = seed effect (sd `seed_sd`) + prompt effect
common to every model (sd 1) + fine-tune × prompt effect shared by the seeds of an arm (sd
`prompt_sd`) + seed × prompt noise (sd 0.5). No true task − control difference. Reported per setting:
  zero     share of simulations whose 95% task − control interval covers 0 (nominal 0.95)
  seeds    share whose task − base interval covers every single-seed task − base estimate
  seeds_d  share whose task − control interval covers every paired single-seed difference
for the default resampling (paired seeds, one prompt draw shared by all seeds) under each seed
correction of precompute/lab/hboot.py ("t", the default; "unbiased"; "none").
"""

from __future__ import annotations

import argparse

import numpy as np

from precompute.lab.em_prompts import base_ids, em_questions
from precompute.lab.hboot import Design, cluster_codes, draw, percentile_interval


def clusters_of_the_em_prompts() -> np.ndarray:
    texts = list(dict.fromkeys(q.question for q in em_questions()))  # the 64 distinct eval prompts
    return cluster_codes(base_ids(texts, ["em"] * len(texts)))


def simulate(n_seeds: int, seed_sd: float, prompt_sd: float, correct: str, n_sim: int, n_boot: int) -> dict:
    rng = np.random.default_rng(0)
    clusters = clusters_of_the_em_prompts()
    p = clusters.size
    zero = seeds = seeds_d = 0
    for sim in range(n_sim):
        common = rng.normal(0, 1, p)[clusters]  # every model reads the same prompts

        def arm(common: np.ndarray) -> np.ndarray:
            ft = rng.normal(0, prompt_sd, p)
            return np.stack(
                [common + ft + rng.normal(0, seed_sd) + rng.normal(0, 0.5, p) for _ in range(n_seeds)]
            )

        base = common
        task, control = arm(common), arm(common)
        design = Design({"task": n_seeds, "control": n_seeds}, clusters, "paired", seed_correction=correct)
        d = draw(design, n_boot, sim)
        diff = d.replicates("task", task) - d.replicates("control", control)
        lo, hi = percentile_interval(diff)
        zero += lo <= 0 <= hi
        single_d = (task - control).mean(axis=1)
        seeds_d += bool(((single_d >= lo) & (single_d <= hi)).all())
        lo, hi = percentile_interval(d.replicates("task", task - base))
        single = (task - base).mean(axis=1)
        seeds += bool(((single >= lo) & (single <= hi)).all())
    return {"zero": zero / n_sim, "seeds": seeds / n_sim, "seeds_d": seeds_d / n_sim}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-sim", type=int, default=300)
    p.add_argument("--n-boot", type=int, default=1000)
    args = p.parse_args()
    print(
        f"{'S':>2} {'seed_sd':>7} {'prompt_sd':>9} {'correction':>10} {'zero':>6} {'seeds':>6} {'seeds_d':>7}"
    )
    for n_seeds in (3, 5):
        for seed_sd, prompt_sd in ((0.05, 0.3), (0.3, 0.3), (1.0, 0.3)):
            for correct in ("t", "unbiased", "none"):
                r = simulate(n_seeds, seed_sd, prompt_sd, correct, args.n_sim, args.n_boot)
                print(
                    f"{n_seeds:>2} {seed_sd:>7} {prompt_sd:>9} {correct:>10} "
                    f"{r['zero']:>6.3f} {r['seeds']:>6.3f} {r['seeds_d']:>7.3f}"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
