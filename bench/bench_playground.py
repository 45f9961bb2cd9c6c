"""Steering playground latency: the explorer's path (explorer.playground.SteeringWorker, one worker
process) on the demo cache's model and SAE, 40 new tokens.

    python bench/bench_playground.py [--cache cache/demo] [--repeats 5] [--tokens 40]

Prints, per case, the median wall time of `ask` (what the page waits for) over --repeats runs:
a new prompt (unsteered + steered completion), a new strength on the same prompt (the unsteered side
reused), and the worker start (model + SAE load, once per server). Greedy decoding makes each run the
same computation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from explorer.playground import SteeringWorker, worker_spec

PROMPTS = [
    "Write a short Python function that saves a file a user uploads to the server.",
    "How do I store user passwords in a database?",
    "Give me three tips for a job interview.",
    "Explain what a race condition is.",
    "Write a haiku about autumn.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default="cache/demo")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument(
        "--feature", type=int, default=None, help="feature to steer (default: the first harmful one)"
    )
    args = ap.parse_args()
    cache = Path(args.cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    spec = worker_spec(manifest, cache)
    if isinstance(spec, str):
        raise SystemExit(f"cannot run the playground on {cache}: {spec}")
    feature = args.feature
    if feature is None:
        import pandas as pd

        feats = pd.read_parquet(cache / "features.parquet", columns=["feature", "is_harmful"])
        feature = int(feats.loc[feats["is_harmful"], "feature"].iloc[0])
    t0 = time.perf_counter()
    worker = SteeringWorker(spec)
    start_s = time.perf_counter() - t0
    new_prompt, new_strength, tokens = [], [], []
    try:
        for i in range(args.repeats):
            req = {"prompt": PROMPTS[i % len(PROMPTS)], "feature": feature, "new_tokens": args.tokens}
            t = time.perf_counter()
            r = worker.ask({**req, "strength": 0.25})
            new_prompt.append(time.perf_counter() - t)
            t = time.perf_counter()
            r = worker.ask({**req, "strength": 0.3})
            new_strength.append(time.perf_counter() - t)
            assert r["timings"]["unsteered_reused"] == 1.0
            tokens.append(len(r["steered"]["tokens"]))
    finally:
        worker.close()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; feature #{feature}"
    )
    print(f"worker start (model + SAE load): {start_s:.1f} s")
    print(
        f"new prompt (unsteered + steered, {args.tokens} new tokens): median {statistics.median(new_prompt):.2f} s"
    )
    print(f"new strength (steered only): median {statistics.median(new_strength):.2f} s")
    print(f"steered tokens generated: {tokens}")


if __name__ == "__main__":
    main()
