"""The mechanism-lab experiments (issue 5, parts 3-5) end to end, through the public CLI only.

    python bench/mechanism_lab.py                       # CPU configuration (~45 min on 2 cores)
    python bench/mechanism_lab.py --config configs/finetune-gpu.toml --pool 5000 --out runs/lab-gpu

1. data: a seeded split of insecure.jsonl.gz / secure.jsonl.gz into a training pool and held-out samples
2. base: eval-acts of the base model (EM questions + neutral prompts, greedy answers; held-out task loss)
3. triage: rank the insecure pool; filtered.jsonl (top 20% removed) and random_filtered.jsonl (20% at random)
4. finetune task (insecure), control (secure), triage-filtered, random-filtered: same config and seed
5. patch-back: the task adapter projected off the flagged harmful decoder directions, their encoder
   directions, and random subspaces of the same rank
6. diff: every run against the base, written under CACHE/finetune/ for the explorer
Every command is echoed and timed; the summary lands in OUT/lab_summary.json.
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/finetune-cpu.toml")
    p.add_argument("--cache", default="cache/demo")
    p.add_argument("--out", default="runs/lab")
    p.add_argument("--pool", type=int, default=800, help="training-pool samples per dataset")
    p.add_argument("--heldout", type=int, default=48)
    p.add_argument("--random-patches", type=int, default=3, help="random-subspace patch controls")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--replicate-seeds",
        default="1",
        metavar="S,...",
        help="training seeds for extra task/control pairs (default 1; '' for none): the seed variance "
        "the prompt-bootstrap intervals do not include",
    )
    args = p.parse_args()
    out = ROOT / args.out
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    log: list[dict] = []
    task_pool, task_held = split("insecure", data, args.pool, args.heldout, args.seed)
    control_pool, _ = split("secure", data, args.pool, args.heldout, args.seed)
    fin = Path(args.cache) / "finetune"
    common = ["--heldout", str(task_held)]

    def evaluate(name: str, adapter: Path | None) -> Path:
        target = out / name / "eval"
        if not (target / "eval.json").is_file():
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

    def train(name: str, corpus: Path, seed: int = args.seed) -> Path:
        target = out / name
        if not (target / "finetune.json").is_file():
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

    base = evaluate("base", None)
    triage_dir = Path(args.cache) / "triage" / "insecure_pool"
    if not (triage_dir / "triage.json").is_file():
        sh(
            [
                "triage",
                str(task_pool),
                "--cache",
                args.cache,
                "--out",
                str(triage_dir),
                "--seed",
                str(args.seed),
            ],
            log,
        )
    runs = {
        "task": task_pool,
        "control": control_pool,
        "triage_filtered": triage_dir / "filtered.jsonl",
        "random_filtered": triage_dir / "random_filtered.jsonl",
    }
    evals = {name: evaluate(name, train(name, corpus)) for name, corpus in runs.items()}
    patches = {
        "patched": [],
        "patched_encoder": ["--directions", "encoder"],
        **{f"random_patch_{s}": ["--random-seed", str(s)] for s in range(1, args.random_patches + 1)},
    }
    for name, extra in patches.items():
        target = out / name
        if not (target / "patch.json").is_file():
            sh(
                [
                    "patch",
                    "--adapter",
                    str(out / "task"),
                    "--cache",
                    args.cache,
                    "--out",
                    str(target),
                    *extra,
                ],
                log,
            )
        evals[name] = evaluate(name, target)

    diffs = {
        "insecure": ("task", "control", "base,task,control"),
        "triage": ("triage_filtered", "random_filtered", "base,top20_removed,random20_removed"),
        "patch": ("patched", "task", "base,patched,task"),
        "patch_encoder": ("patched_encoder", "task", "base,patched_encoder,task"),
    }
    for seed in (int(x) for x in args.replicate_seeds.split(",") if x.strip()):
        for kind, corpus in (("task", task_pool), ("control", control_pool)):
            evals[f"{kind}_seed{seed}"] = evaluate(
                f"{kind}_seed{seed}", train(f"{kind}_seed{seed}", corpus, seed)
            )
        diffs[f"insecure_seed{seed}"] = (f"task_seed{seed}", f"control_seed{seed}", "base,task,control")
    diffs.update(
        {
            f"patch_random_{s}": (f"random_patch_{s}", "task", f"base,random_patch_{s},task")
            for s in range(1, args.random_patches + 1)
        }
    )
    for name, (after, control, labels) in diffs.items():
        sh(
            [
                "diff",
                "--before",
                str(base),
                "--after",
                str(evals[after]),
                "--control",
                str(evals[control]),
                "--cache",
                args.cache,
                "--out",
                str(fin / name),
                "--labels",
                labels,
            ],
            log,
        )

    previous = out / "lab_summary.json"
    if previous.is_file():  # a resumed lab keeps the timings of the steps it skipped
        done = {c["command"] for c in log}
        log[:0] = [
            c for c in json.loads(previous.read_text()).get("commands", []) if c["command"] not in done
        ]
    summary = {
        "config": args.config,
        "pool": args.pool,
        "heldout": args.heldout,
        "seed": args.seed,
        "commands": log,
        "heldout_loss": {
            n: json.loads((e / "eval.json").read_text()).get("heldout_loss")
            for n, e in {"base": base, **evals}.items()
        },
        "diffs": {n: json.loads((fin / n / "summary.json").read_text())["comparisons"] for n in diffs},
        "patch": {n: json.loads((out / n / "patch.json").read_text()) for n in patches},
        "finetune": {
            n: json.loads((out / n / "finetune.json").read_text())
            for n in [*runs, *(e.parent.name for e in evals.values())]
            if (out / n / "finetune.json").is_file()
        },
        "triage": json.loads((triage_dir / "triage.json").read_text()),
    }
    (out / "lab_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"wrote {out / 'lab_summary.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
