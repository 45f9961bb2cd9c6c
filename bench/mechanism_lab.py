"""The mechanism-lab experiment end to end, through the public CLI only (`make lab`).

    python bench/mechanism_lab.py                                    # CPU configuration, 3 seeds per arm
    python bench/mechanism_lab.py --task-set ranked:100              # a cache without task features (exploratory)
    python bench/mechanism_lab.py --config configs/finetune-gpu.toml --pool 5000 --out runs/lab-gpu

1. data: a seeded split of insecure.jsonl.gz / secure.jsonl.gz into a training pool and held-out samples;
   `featuregeom coverage` records the share of response tokens the config's max_length trains
2. base: eval-acts of the base model (EM questions + neutral prompts, greedy answers, the log-prob
   readout, held-out task loss)
3. for every training seed: finetune task (insecure) and control (secure), same config and seed; eval-acts
4. patch-back, per task seed: the adapter projected off the top harmful features by predicted risk
   (or the flagged ones), their encoder directions, and as many random non-harmful SAE features'
   directions with the same firing frequencies (the control)
5. triage (optional, --triage): rank the insecure pool; per seed, fine-tune without the top 20% and
   without a random 20%
6. diff: every comparison over all seeds, written under CACHE/finetune/ for the explorer
Every command is echoed and timed; the summary lands in OUT/lab_summary.json. A rerun skips every
step whose output is complete, and a fine-tune resumes from its last checkpoint, so an interrupted
lab resumes. Order: every seed's task and control (the main comparison), then the patch-backs.
Wall time on 2 CPU cores at max_length 640: about 11 minutes per fine-tune on idle cores (35 on a
shared machine) and 6 per eval-acts, so the default (3 seeds, 2 arms, 3 patch-back runs per seed)
is 2.5-4 hours; on one GPU, minutes per run. On a CPU shared with other jobs, run it with
OMP_NUM_THREADS=1: two threads wait on the one whose core is taken (4x slower, bench/README.md).
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def sh(args: list[str], log: list[dict]) -> None:
    cmd = [PY, "-m", "precompute", *args]
    print("+ featuregeom " + " ".join(shlex.quote(a) for a in args), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    log.append({"command": "featuregeom " + " ".join(args), "seconds": round(time.perf_counter() - start, 1)})


def split(name: str, out: Path, pool: int, heldout: int, seed: int) -> tuple[Path, Path]:
    lines = gzip.open(ROOT / f"assets/data/em/{name}.jsonl.gz", "rt", encoding="utf-8").readlines()
    random.Random(seed).shuffle(lines)
    held, train = out / f"{name}_heldout.jsonl", out / f"{name}_pool.jsonl"
    held.write_text("".join(lines[:heldout]))
    train.write_text("".join(lines[heldout : heldout + pool]))
    return train, held


def diff_name(run: str) -> str:
    """The explorer's run names: patch, patch_encoder, patch_random_<r> (explorer/story/finetune.py)."""
    return {"patched": "patch", "patched_encoder": "patch_encoder"}.get(
        run, run.replace("random_patch_", "patch_random_")
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/finetune-cpu.toml")
    p.add_argument("--cache", default="cache/demo")
    p.add_argument("--out", default="runs/lab")
    p.add_argument("--pool", type=int, default=800, help="training-pool samples per dataset")
    p.add_argument("--heldout", type=int, default=48)
    p.add_argument("--data-seed", type=int, default=0, help="seed of the data split and triage")
    p.add_argument("--seeds", default="0,1,2", help="training seeds, one task and one control run each")
    p.add_argument(
        "--task-set", default="strict", help="as `featuregeom diff --task-set` (ranked:N: exploratory)"
    )
    p.add_argument(
        "--patch-harmful", default="risk", choices=("risk", "flagged"), help="patch-back's features"
    )
    p.add_argument("--patch-top", type=int, default=30, help="with --patch-harmful risk: how many")
    p.add_argument("--random-patches", type=int, default=1, help="SAE-direction patch controls per task seed")
    p.add_argument("--triage", action="store_true", help="also run triage and its filtered fine-tunes")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    out = ROOT / args.out
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    log: list[dict] = []
    task_pool, task_held = split("insecure", data, args.pool, args.heldout, args.data_seed)
    control_pool, _ = split("secure", data, args.pool, args.heldout, args.data_seed)
    fin = Path(args.cache) / "finetune"
    common = ["--heldout", str(task_held)]

    def done(path: Path, marker: str) -> bool:
        return (path / marker).is_file()

    def evaluate(name: str, adapter: Path | None) -> Path:
        target = out / name / "eval"
        if not done(target, "eval.json"):
            sh(
                [
                    "eval-acts",
                    "--out",
                    str(target),
                    *common,
                    *(["--adapter", str(adapter)] if adapter else []),
                ],
                log,
            )
        return target

    def train(name: str, corpus: Path, seed: int) -> Path:
        target = out / name
        if not done(target, "finetune.json"):
            sh(
                [
                    "finetune",
                    "--config",
                    args.config,
                    "--corpus",
                    str(corpus),
                    "--out",
                    str(target),
                    *common,
                    "--seed",
                    str(seed),
                ],
                log,
            )
        return target

    def patch(name: str, adapter: Path, extra: list[str]) -> Path:
        target = out / name
        if not done(target, "patch.json"):
            harmful = [
                "--harmful",
                args.patch_harmful,
                "--top",
                str(args.patch_top),
                "--task-set",
                args.task_set,
            ]
            sh(
                [
                    "patch",
                    "--adapter",
                    str(adapter),
                    "--cache",
                    args.cache,
                    "--out",
                    str(target),
                    *harmful,
                    *extra,
                ],
                log,
            )
        return target

    sh(["coverage", "--corpus", str(task_pool), "--corpus", str(control_pool)], log)
    base = evaluate("base", None)
    evals: dict[str, list[Path]] = {}
    patches: dict[str, list[str]] = {"patched": [], "patched_encoder": ["--directions", "encoder"]}
    patches |= {f"random_patch_{r}": ["--random-seed", str(r)] for r in range(1, args.random_patches + 1)}
    # Every seed's task and control first: they are the main comparison, so a lab stopped early
    # (or resumed) has it complete before any patch-back run starts.
    tasks: dict[int, Path] = {}
    for seed in seeds:
        tasks[seed] = train(f"task_s{seed}", task_pool, seed)
        evals.setdefault("task", []).append(evaluate(f"task_s{seed}", tasks[seed]))
        evals.setdefault("control", []).append(
            evaluate(f"control_s{seed}", train(f"control_s{seed}", control_pool, seed))
        )
    for seed in seeds:
        for name, extra in patches.items():
            evals.setdefault(name, []).append(
                evaluate(f"{name}_s{seed}", patch(f"{name}_s{seed}", tasks[seed], extra))
            )
    diffs = {"insecure": ("task", "control", "base,task,control")}
    diffs |= {diff_name(n): (n, "task", f"base,{n},task") for n in patches}  # patched seed s vs task seed s
    if args.triage:
        triage_dir = Path(args.cache) / "triage" / "insecure_pool"
        if not done(triage_dir, "triage.json"):
            sh(
                [
                    "triage",
                    str(task_pool),
                    "--cache",
                    args.cache,
                    "--out",
                    str(triage_dir),
                    "--seed",
                    str(args.data_seed),
                ],
                log,
            )
        for name, corpus in (
            ("triage_filtered", "filtered.jsonl"),
            ("random_filtered", "random_filtered.jsonl"),
        ):
            for seed in seeds:
                run = train(f"{name}_s{seed}", triage_dir / corpus, seed)
                evals.setdefault(name, []).append(evaluate(f"{name}_s{seed}", run))
        diffs["triage"] = ("triage_filtered", "random_filtered", "base,top20_removed,random20_removed")
    run_diffs(args, fin, base, evals, diffs, log)
    write_summary(args, out, fin, base, evals, diffs, log)
    return 0


def run_diffs(args, fin: Path, base: Path, evals: dict, diffs: dict, log: list[dict]) -> None:
    """`featuregeom diff` of every comparison over all its seeds, into CACHE/finetune/<name>."""
    for name, (after, control, labels) in diffs.items():
        sh(
            [
                "diff",
                "--before",
                str(base),
                "--after",
                *map(str, evals[after]),
                "--control",
                *map(str, evals[control]),
                "--cache",
                args.cache,
                "--out",
                str(fin / name),
                "--labels",
                labels,
                "--task-set",
                args.task_set,
            ],
            log,
        )


def write_summary(args, out: Path, fin: Path, base: Path, evals: dict, diffs: dict, log: list[dict]) -> None:
    previous = out / "lab_summary.json"
    if previous.is_file():  # a resumed lab keeps the timings of the steps it skipped
        done = {c["command"] for c in log}
        log[:0] = [
            c for c in json.loads(previous.read_text()).get("commands", []) if c["command"] not in done
        ]
    runs = {p.parent.name: p for paths in evals.values() for p in paths}
    summary = {
        "config": args.config,
        "pool": args.pool,
        "heldout": args.heldout,
        "seeds": args.seeds,
        "task_set": args.task_set,
        "commands": log,
        "heldout_loss": {
            n: json.loads((e / "eval.json").read_text()).get("heldout_loss")
            for n, e in {"base": base, **runs}.items()
        },
        "diffs": {n: json.loads((fin / n / "summary.json").read_text()) for n in diffs},
        "patch": {
            n: json.loads((out / n / "patch.json").read_text())
            for n in runs
            if (out / n / "patch.json").is_file()
        },
        "finetune": {
            n: json.loads((out / n / "finetune.json").read_text())
            for n in runs
            if (out / n / "finetune.json").is_file()
        },
    }
    (out / "lab_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"wrote {out / 'lab_summary.json'}")


if __name__ == "__main__":
    raise SystemExit(main())
