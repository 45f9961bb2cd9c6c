"""Bounded-disk caches against the two-phase run: the same command with `--shard-storage disk` and
`--shard-storage recompute`, side by side, on the demo config with every source's token budget scaled.

    python bench/bench_bounded.py [--scale 0.25] [--steps harvest,scores] [--out bench/out/bounded.json]

Each run is a fresh `featuregeom precompute` process (OMP_NUM_THREADS as given, default 1, so that the
two runs get the same share of a shared machine) under `/usr/bin/time -v` (peak RSS). While it runs,
the whole output folder (the cache, its staging folder and the harvest's work folder) is measured
every 0.2 s: *peak disk* is the largest total seen. Reported: wall and CPU seconds, peak disk, peak
RSS, the model passes recorded in the manifest, and whether the two caches hold the same files (every
file but params/ and the shards, by sha256).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from precompute.cache import read_manifest  # noqa: E402


def folder_bytes(folder: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:  # a staging file renamed while we walk
                pass
    return total


def toml_value(value: Any) -> str:
    """A TOML literal for the scalars, lists and inline tables a config holds."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)  # strings, numbers and booleans are written alike in JSON and TOML


def scaled_config(scale: float, out: Path) -> Path:
    """The demo config with every source's max_tokens times `scale` (paths made absolute)."""
    data = tomllib.loads((ROOT / "configs/demo.toml").read_text())
    lines = []
    for key, value in data.items():
        if key in ("corpus", "out"):
            continue
        if key in ("sae", "sae_replicate") and isinstance(value, str):
            value = str(ROOT / value)
        lines.append(f"{key} = {toml_value(value)}")
    for src in data["corpus"]:
        lines.append("\n[[corpus]]")
        for key, value in src.items():
            if key == "path":
                value = str(ROOT / value)
            if key == "max_tokens":
                value = max(1, int(value * scale))
            lines.append(f"{key} = {toml_value(value)}")
    path = out / "bench.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_one(config: Path, out: Path, storage: str, steps: str, threads: int) -> dict[str, Any]:
    parent = out / storage
    parent.mkdir(parents=True, exist_ok=True)
    cache = parent / "cache"
    argv = [
        "/usr/bin/time",
        "-v",
        sys.executable,
        "-m",
        "precompute",
        "precompute",
        "--config",
        str(config),
        "--out",
        str(cache),
        "--steps",
        steps,
        "--shard-storage",
        storage,
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HOME": str(parent / "home")}
    peak = [0]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], folder_bytes(parent) - folder_bytes(parent / "home"))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    watcher.start()
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    done.set()
    watcher.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{storage} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    stats = proc.stderr
    cpu = sum(float(m) for m in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", stats))
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", stats).group(1))  # type: ignore[union-attr]
    manifest = read_manifest(cache)
    harvest = json.loads((cache / "params" / "harvest.json").read_text())
    return {
        "storage": storage,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "load_at_start": round(load, 2),
        "peak_disk_bytes": peak[0],
        "final_cache_bytes": folder_bytes(cache),
        "peak_rss_mib": round(rss_kib / 1024),
        "model_passes": manifest["timings"].get("recompute_model_passes", 1.0),
        "tokens": harvest["timings"]["total_tokens"],
        "files": {
            k: v for k, v in manifest["files"].items() if not k.startswith(("params/", "harvest/shard-"))
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--scale", type=float, default=0.25, help="multiply every demo source's max_tokens by this"
    )
    p.add_argument(
        "--steps", default="harvest,scores", help="the precompute steps to run (those reading shards)"
    )
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    p.add_argument("--work", default=str(ROOT / "bench/out/bounded"), help="folder for the two runs")
    p.add_argument("--out", default=str(ROOT / "bench/out/bounded.json"), help="where to write the results")
    args = p.parse_args()
    work = Path(args.work)
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"{work} is not empty: give another --work (nothing is deleted for you)")
    work.mkdir(parents=True, exist_ok=True)
    config = scaled_config(args.scale, work)
    runs = [run_one(config, work, storage, args.steps, args.threads) for storage in ("disk", "recompute")]
    same = runs[0]["files"] == runs[1]["files"]
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "scale": args.scale,
        "steps": args.steps,
        "threads": args.threads,
        "same_files": same,
        "files_compared": len(runs[0]["files"]),
        "runs": [{k: v for k, v in r.items() if k != "files"} for r in runs],
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    for r in result["runs"]:
        print(
            f"{r['storage']:9s} tokens {r['tokens']:,}  wall {r['wall_s']:7.1f} s  cpu {r['cpu_s']:7.1f} s  "
            f"peak disk {r['peak_disk_bytes'] / 2**20:8.1f} MiB  cache {r['final_cache_bytes'] / 2**20:7.1f} MiB  "
            f"RSS {r['peak_rss_mib']:,} MiB  passes {r['model_passes']}"
        )
    print(f"same files: {same} ({result['files_compared']} compared)")


if __name__ == "__main__":
    main()
