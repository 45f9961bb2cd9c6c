"""Where the harvest's peak memory goes, phase by phase, and whether it grows with the corpus.

    python bench/bench_rss_phases.py                               # 100k, 300k, 1M tokens; glibc default
    python bench/bench_rss_phases.py --tokens 100000 300000 --mmap-threshold 0 1048576

Each (tokens, ``--mmap-threshold``) pair runs in its own fresh process (peak RSS is per process): the
harvest step exactly as ``bench/bench_harvest.py --rss`` runs it (its ``rss_child``: packaged
SmolLM2-135M-Instruct, default TopK SAE, hook at block 1, batches of 32, the insecure/secure code corpus),
at ``--threads`` threads. A thread samples the process's resident memory (``/proc/self/statm``) every
``--interval`` seconds and charges it to the phase running at that moment; the phases are the harvest's
own functions (the shard loop, the contexts and documents tables, the aggregation, the example selection,
the example activations and the examples table), wrapped in the child, not changed. Time outside them
(loading the model, planning the corpus, copying the shards) is ``other``.

``--mmap-threshold N`` (bytes; 0 = glibc's default) sets ``MALLOC_MMAP_THRESHOLD_`` for the child. A
fixed threshold turns off glibc's dynamic one, which otherwise rises after the first large free, so that
later large buffers (the forward pass's activations) come from the heap and fragment it. Recorded with
each run: user and system CPU seconds, wall seconds and the whole process's ``ru_maxrss``. Results go to
``--out`` as JSON and a Markdown table to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from precompute.pipeline.heap import resident_mib

ROOT = Path(__file__).resolve().parents[1]
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# the harvest's functions, in the order the step calls them (precompute.pipeline.harvest)
PHASES = (
    "write_shards",
    "write_contexts",
    "write_documents",
    "aggregate",
    "select_examples",
    "context_feature_activations",
    "write_examples",
)
OTHER = "other"


class PhasePeaks:
    """The highest resident memory sampled while each phase ran. `wrap` replaces a module's function
    with one that marks its phase; `sample` charges one reading to the phase running now."""

    def __init__(self, read: Callable[[], float] = resident_mib) -> None:
        self.read = read
        self.current = OTHER
        self.peaks: dict[str, float] = {}
        self._lock = threading.Lock()

    def sample(self) -> None:
        value = self.read()
        with self._lock:
            self.peaks[self.current] = max(self.peaks.get(self.current, 0.0), value)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        with self._lock:
            outer, self.current = self.current, name
        self.sample()  # a phase shorter than one interval still gets a reading
        try:
            yield
        finally:
            self.sample()
            with self._lock:
                self.current = outer

    def wrap(self, module: Any, name: str) -> None:
        inner = getattr(module, name)

        def marked(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return inner(*args, **kwargs)

        setattr(module, name, marked)

    def run_sampler(self, interval: float) -> threading.Event:
        """Sample every `interval` seconds on a daemon thread until the returned event is set."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(interval):
                self.sample()

        threading.Thread(target=loop, daemon=True, name="rss-sampler").start()
        return stop


def child(tokens: int, interval: float) -> dict[str, Any]:
    """One harvest in this process, with its phases sampled."""
    import precompute.pipeline.harvest as harvest
    from bench.bench_harvest import DEFAULT_SAE, rss_child

    peaks = PhasePeaks()
    for name in PHASES:
        peaks.wrap(harvest, name)
    stop = peaks.run_sampler(interval)
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="fg-rss-phases-") as out,
        contextlib.redirect_stdout(io.StringIO()),
    ):
        rss_child(tokens, str(DEFAULT_SAE), out)
    wall = time.perf_counter() - t0
    peaks.sample()
    stop.set()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "tokens": tokens,
        "wall_s": wall,
        "user_s": usage.ru_utime - usage0.ru_utime,
        "sys_s": usage.ru_stime - usage0.ru_stime,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "phase_peak_mib": {k: peaks.peaks[k] for k in (*PHASES, OTHER) if k in peaks.peaks},
    }


def run_one(tokens: int, threshold: int, threads: int, interval: float) -> dict[str, Any]:
    env = {**os.environ, **{v: str(threads) for v in THREAD_VARS}, "PYTHONPATH": str(ROOT)}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(threshold)
    cmd = [
        sys.executable,
        __file__,
        "--child",
        str(tokens),
        "--threads",
        str(threads),
        "--interval",
        str(interval),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["mmap_threshold"] = threshold
    row["load_1min_end"] = os.getloadavg()[0]
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per run, the peak of each phase, the process's peak and the CPU split."""
    phases = [p for p in (*PHASES, OTHER) if any(p in r["phase_peak_mib"] for r in rows)]
    head = ["tokens", "MALLOC_MMAP_THRESHOLD_", *phases, "peak RSS", "user s", "sys s", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for r in rows:
        cells = [f"{r['tokens']:,}", f"{r['mmap_threshold']:,}" if r["mmap_threshold"] else "glibc default"]
        cells += [f"{r['phase_peak_mib'][p]:,.0f}" if p in r["phase_peak_mib"] else "-" for p in phases]
        cells += [
            f"{r['peak_rss_mib']:,.0f}",
            f"{r['user_s']:.1f}",
            f"{r['sys_s']:.1f}",
            f"{r['wall_s']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    p.add_argument("--mmap-threshold", type=int, nargs="+", default=[0], help="bytes; 0 = glibc's default")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--interval", type=float, default=0.05, help="seconds between two memory readings")
    p.add_argument("--out", default=str(ROOT / "bench/out/rss_phases.json"))
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.interval)))
        return
    rows = []
    for tokens in args.tokens:
        for threshold in args.mmap_threshold:
            rows.append(run_one(tokens, threshold, args.threads, args.interval))
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }
    out.write_text(json.dumps({"meta": meta, "runs": rows}, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
