"""histograms.npz in the explorer: read whole (np.load, the baseline) vs memory-mapped (map_npz).

    python bench/bench_histograms.py                  # 262,144-feature synthetic cache, 5 runs each
    python bench/bench_histograms.py --sizes 16384 262144 --runs 3

Each measurement runs in a fresh child process (cold page cache is not forced: both sides read the
same file, alternately), which opens the archive as the explorer does at cache load, then draws one
feature's per-group histogram row, and reports wall seconds and the child's peak RSS increase. The
result goes to bench/README.md, section "## Histograms (mapped)".
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_explorer import machine, synthetic, write_readme  # noqa: E402
from precompute import schema  # noqa: E402

_CHILD = r"""
import json, resource, sys, time
import numpy as np
from explorer.data.npz_map import map_npz
path, how, feature = sys.argv[1], sys.argv[2], int(sys.argv[3])
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
if how == "np.load":
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
else:
    arrays = map_npz(path)
opened = time.perf_counter() - t
row = np.asarray(arrays["counts_group"][feature]).astype(np.int64).sum() + int(arrays["counts"][feature].sum())
total = time.perf_counter() - t
rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
print(json.dumps({"open_s": opened, "first_row_s": total, "rss_mib": rss, "check": int(row)}))
"""


def measure(path: Path, how: str, feature: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), how, str(feature)],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    return json.loads(out.stdout)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[262144], help="synthetic cache sizes (features)")
    ap.add_argument("--runs", type=int, default=5, help="child processes per side")
    ap.add_argument("--no-readme", action="store_true", help="print only, do not update bench/README.md")
    args = ap.parse_args(argv)
    rows = []
    for n in args.sizes:
        path = synthetic(n) / schema.HISTOGRAMS
        runs: dict[str, list[dict[str, float]]] = {"np.load": [], "map_npz": []}
        for r in range(args.runs):
            for how in runs:  # alternate the sides so drift on a shared machine hits both
                runs[how].append(measure(path, how, feature=(r * 7919) % n))
        checks = {m["check"] for side in runs.values() for m in side[:1]}
        assert len(checks) == 1, "both sides must read the same row"
        med = {
            how: {k: statistics.median(m[k] for m in ms) for k in ("first_row_s", "rss_mib")}
            for how, ms in runs.items()
        }
        rows.append((n, path.stat().st_size / 2**20, med))
        print(n, json.dumps(med))
    m = machine()
    lines = [
        "## Histograms (mapped)",
        "",
        f"`python bench/bench_histograms.py --sizes {' '.join(map(str, args.sizes))} --runs {args.runs}`; "
        f"{time.strftime('%Y-%m-%d')}, {m['cpu']}, {m['cores']} cores (a fine-tuning job shared them); medians of {args.runs} fresh processes per side, alternated.",
        "Open histograms.npz as the explorer does at cache load, then read one feature's per-group row.",
        "",
        "| features | file MiB | np.load s | map_npz s | ratio | np.load RSS MiB | map_npz RSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, mib, med in rows:
        a, b = med["np.load"], med["map_npz"]
        lines.append(
            f"| {n:,} | {mib:.0f} | {a['first_row_s']:.3f} | {b['first_row_s']:.4f} | "
            f"{a['first_row_s'] / max(b['first_row_s'], 1e-9):.0f}x | {a['rss_mib']:.0f} | {b['rss_mib']:.0f} |"
        )
    section = "\n".join(lines) + "\n"
    print(section)
    if not args.no_readme:
        write_readme(section, "## Histograms (mapped)")


if __name__ == "__main__":
    main()
