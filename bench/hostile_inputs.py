"""Hostile inputs against the `featuregeom` CLI, counted: `python bench/hostile_inputs.py`.

Each case builds its own workspace (a tiny random model, a 64-feature SAE, a small corpus and, where
the case needs it, a finished cache or a user's folder), runs one command in-process, and checks the
three promises of the CLI: exit status 0 or 2 (130 for Ctrl-C), no traceback or "internal error" on
stderr, and nothing lost — every file that existed before a failed run is byte-identical after it, and
a failed first run leaves no output behind. Writes bench/out/hostile_inputs.md and prints the tally
"N hostile inputs tried / N clear errors / 0 tracebacks / 0 with data lost"."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HOOK = "blocks.1.hook_resid_post"


@dataclass
class Case:
    name: str
    argv: Callable[[dict[str, Path]], list[str]]  # from the workspace's paths
    setup: Callable[[dict[str, Path]], None] | None = None
    expect_success: bool = False  # an edge case that must work
    may_succeed: bool = False  # malformed records skipped and counted is a right answer too


def snapshot(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def base_args(w: dict[str, Path], out: Path | None = None) -> list[str]:
    args = [
        "precompute",
        "--model",
        str(w["model"]),
        "--sae",
        str(w["sae"]),
        "--hook",
        HOOK,
        "--out",
        str(out or w["out"]),
        "--context-size",
        "24",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--neighbors",
        "8",
        "--umap-neighbors",
        "5",
        "--top-k-examples",
        "5",
        "--no-progress",
    ]
    for key, spec in (
        ("task", "task"),
        ("control", "control"),
        ("harmful", "harmful:@category"),
        ("benign", "benign"),
    ):
        args += ["--corpus", f"{w[key]}:{spec}"]
    return args


def with_corpus(w: dict[str, Path], name: str, group: str = "benign") -> list[str]:
    return base_args(w) + ["--corpus", f"{w['ws'] / name}:{group}"]


def write(name: str, data: bytes | str) -> Callable[[dict[str, Path]], None]:
    def setup(w: dict[str, Path]) -> None:
        path = w["ws"] / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())

    return setup


def config(toml: str) -> Callable[[dict[str, Path]], list[str]]:
    def argv(w: dict[str, Path]) -> list[str]:
        (w["ws"] / "run.toml").write_text(toml)
        return [
            "geometry",
            "--config",
            str(w["ws"] / "run.toml"),
            "--sae",
            str(w["sae"]),
            "--out",
            str(w["out"]),
        ]

    return argv


def copy_cache(w: dict[str, Path]) -> None:
    shutil.copytree(w["cache"], w["out"])


def edit_manifest(change: Callable[[dict], object]) -> Callable[[dict[str, Path]], None]:
    def setup(w: dict[str, Path]) -> None:
        copy_cache(w)
        manifest = json.loads((w["out"] / "manifest.json").read_text())
        (w["out"] / "manifest.json").write_text(json.dumps(change(manifest)))

    return setup


def flip_and_unlist(w: dict[str, Path]) -> None:
    copy_cache(w)
    manifest = json.loads((w["out"] / "manifest.json").read_text())
    manifest["files"] = {}
    (w["out"] / "manifest.json").write_text(json.dumps(manifest))
    with open(w["out"] / "features.parquet", "r+b") as f:
        f.seek(100)
        f.write(b"\x00")


def user_folder(w: dict[str, Path]) -> None:
    w["out"].mkdir()
    (w["out"] / "thesis.tex").write_text("three years of work")


def other_sae(w: dict[str, Path]) -> None:
    from tests.tiny import make_sae, save_sae

    copy_cache(w)
    save_sae(make_sae(32, 64, k=4, seed=11), w["ws"] / "other-sae")


def tiny_sae(d_in: int, d_sae: int) -> Callable[[dict[str, Path]], None]:
    def setup(w: dict[str, Path]) -> None:
        from tests.tiny import make_sae, save_sae

        save_sae(make_sae(d_in, d_sae, k=1), w["ws"] / "tiny-sae")

    return setup


def numeric(flag: str, value: str) -> Case:
    return Case(f"precompute {flag}={value}", lambda w: base_args(w) + [f"{flag}={value}"])


CASES: list[Case] = [
    *(
        numeric(f, v)
        for f, v in [
            ("--batch-size", "0"),
            ("--batch-size", "-1"),
            ("--top-k-examples", "-1"),
            ("--top-k-examples", "0"),
            ("--quantile-bins", "0"),
            ("--neighbors", "0"),
            ("--neighbors", "1"),
            ("--neighbors", "64"),
            ("--neighbors", "10000"),
            ("--null-fpr", "1.5"),
            ("--null-fpr", "0"),
            ("--null-fpr", "1"),
            ("--null-fpr", "nan"),
            ("--null-fpr", "-inf"),
            ("--umap-neighbors", "1"),
            ("--umap-neighbors", "-5"),
            ("--n-task", "-1"),
            ("--harm-threshold", "2"),
            ("--task-threshold", "-0.5"),
            ("--max-tokens", "0"),
            ("--max-tokens", "-100"),
            ("--context-size", "0"),
            ("--context-size", "1"),
            ("--seed", "-1"),
            ("--seed", "99999999999"),
            ("--batch-size", "abc"),
            ("--packing", "zip"),
            ("--dtype", "int8"),
            ("--device", "tpu"),
            ("--knn-backend", "annoy"),
        ]
    ),
    *(
        Case(f"config: {t.strip()[:40]}", config(t))
        for t in [
            'neighbors = "abc"\n',
            "seed = [1, 2]\n",
            "sae = 5\n",
            'progress = "no"\n',
            "batch_size = 2.5\n",
            "batch_size = true\n",
            "null_fpr = 0\n",
            '[[corpus]]\ngroup = "task"\n',
            "corpus = 3\n",
            '[[corpus]]\npath = "a.jsonl"\nmax_docs = "ten"\n',
            "neighbours = 3\n",
            "neighbors = \n",
            "[corpus]\npath = 1\n",
            'out = ["a"]\n',
            "umap_min_dist = -1\n",
            '[[corpus]]\npath = "a"\ngroup = "evil"\n',
            "hist_bins = 0\n",
            "per_bin = 0\n",
            "outlier_norm_factor = -1\n",
            "batches_per_shard = 0\n",
        ]
    ),
    Case(
        "config: not UTF-8",
        lambda w: ["geometry", "--config", str(w["ws"] / "l1.toml"), "--sae", str(w["sae"])],
        write("l1.toml", 'out = "caf\xe9"\n'.encode("latin-1")),
    ),
    Case("config: missing file", lambda w: ["geometry", "--config", str(w["ws"] / "none.toml")]),
    Case("config: a directory", lambda w: ["geometry", "--config", str(w["ws"])]),
    Case(
        "SAE with 1 feature",
        lambda w: [
            "geometry",
            "--sae",
            str(w["ws"] / "tiny-sae"),
            "--out",
            str(w["out"]),
            "--neighbors",
            "2",
        ],
        tiny_sae(32, 1),
    ),
    Case(
        "SAE with 3 features",
        lambda w: [
            "geometry",
            "--sae",
            str(w["ws"] / "tiny-sae"),
            "--out",
            str(w["out"]),
            "--neighbors",
            "2",
        ],
        tiny_sae(32, 3),
    ),
    Case(
        "SAE with d_in 1",
        lambda w: [
            "geometry",
            "--sae",
            str(w["ws"] / "tiny-sae"),
            "--out",
            str(w["out"]),
            "--neighbors",
            "2",
        ],
        tiny_sae(1, 16),
    ),
    Case(
        "SAE with 4 features (works)",
        lambda w: [
            "geometry",
            "--sae",
            str(w["ws"] / "tiny-sae"),
            "--out",
            str(w["out"]),
            "--neighbors",
            "3",
            "--umap-neighbors",
            "3",
            "--no-progress",
        ],
        tiny_sae(8, 4),
        expect_success=True,
    ),
    Case("--out under a file", lambda w: base_args(w, w["ws"] / "afile" / "cache"), write("afile", "x")),
    Case("--out under /proc", lambda w: base_args(w, Path("/proc/featuregeom-cache"))),
    Case("--out under /sys", lambda w: base_args(w, Path("/sys/featuregeom-cache"))),
    Case("--out is a file", lambda w: base_args(w, w["ws"] / "afile"), write("afile", "x")),
    Case("--overwrite on a user's folder", lambda w: base_args(w) + ["--overwrite"], user_folder),
    Case("precompute on a user's folder", lambda w: base_args(w), user_folder),
    Case(
        "geometry on a user's folder",
        lambda w: ["geometry", "--sae", str(w["sae"]), "--out", str(w["out"])],
        user_folder,
    ),
    Case(
        "geometry with another SAE on a cache",
        lambda w: ["geometry", "--sae", str(w["ws"] / "other-sae"), "--out", str(w["out"]), "--no-progress"],
        other_sae,
    ),
    Case(
        "precompute with another SAE on a cache",
        lambda w: [*base_args(w)[:4], str(w["ws"] / "other-sae"), *base_args(w)[5:]],
        other_sae,
    ),
    Case(
        "geometry on an empty directory (works)",
        lambda w: [
            "geometry",
            "--sae",
            str(w["sae"]),
            "--out",
            str(w["out"]),
            "--neighbors",
            "8",
            "--umap-neighbors",
            "5",
            "--no-progress",
        ],
        lambda w: w["out"].mkdir(),
        expect_success=True,
    ),
    Case("scores on a missing cache", lambda w: ["scores", "--out", str(w["out"])]),
    Case(
        "overlaps on a geometry-only cache",
        lambda w: ["overlaps", "--out", str(w["ws"] / "geo")],
        lambda w: shutil.copytree(w["geo"], w["ws"] / "geo"),
    ),
    Case("info: files {} and a flipped byte", lambda w: ["info", str(w["out"])], flip_and_unlist),
    Case("info: manifest is a list", lambda w: ["info", str(w["out"])], edit_manifest(lambda m: [m])),
    Case("info: manifest is a number", lambda w: ["info", str(w["out"])], edit_manifest(lambda m: 7)),
    Case(
        "info: files is a list",
        lambda w: ["info", str(w["out"])],
        edit_manifest(lambda m: {**m, "files": []}),
    ),
    Case(
        "info: files values not strings",
        lambda w: ["info", str(w["out"])],
        edit_manifest(lambda m: {**m, "files": {k: 1 for k in m["files"]}}),
    ),
    Case(
        "info: schema 99",
        lambda w: ["info", str(w["out"])],
        edit_manifest(lambda m: {**m, "schema_version": 99}),
    ),
    Case(
        "info: manifest not JSON",
        lambda w: ["info", str(w["out"])],
        lambda w: (copy_cache(w), (w["out"] / "manifest.json").write_text("{oops")),
    ),
    Case("info: missing directory", lambda w: ["info", str(w["ws"] / "none")]),
    Case("--device cuda without CUDA", lambda w: [a if a != "cpu" else "cuda" for a in base_args(w)]),
    Case("--sae missing", lambda w: [*base_args(w)[:4], str(w["ws"] / "nope"), *base_args(w)[5:]]),
    Case(
        "--sae random bytes",
        lambda w: [*base_args(w)[:4], str(w["ws"] / "x.safetensors"), *base_args(w)[5:]],
        write("x.safetensors", os.urandom(300)),
    ),
    Case("--sae-format bogus", lambda w: base_args(w) + ["--sae-format", "bogus"]),
    Case("--hook misspelt", lambda w: [a if a != HOOK else "blocks.1.hook_resid_pst" for a in base_args(w)]),
    Case(
        "--hook past the last layer",
        lambda w: [a if a != HOOK else "blocks.9.hook_resid_post" for a in base_args(w)],
    ),
    Case("--model missing", lambda w: [*base_args(w)[:2], str(w["ws"] / "no-model"), *base_args(w)[3:]]),
    Case(
        "--model broken GGUF",
        lambda w: [*base_args(w)[:2], str(w["ws"] / "b.gguf"), *base_args(w)[3:]],
        write("b.gguf", b"GGUF" + b"\0" * 64),
    ),
    Case("--steps bogus", lambda w: base_args(w) + ["--steps", "harvest,dance"]),
    Case("no corpus", lambda w: base_args(w)[: base_args(w).index("--corpus")]),
    Case("corpus group misspelt", lambda w: base_args(w) + ["--corpus", f"{w['benign']}:benignn"]),
    Case("corpus: missing file", lambda w: with_corpus(w, "nope.jsonl")),
    Case("corpus: a directory", lambda w: with_corpus(w, "adir"), lambda w: (w["ws"] / "adir").mkdir()),
    Case("corpus: empty file", lambda w: with_corpus(w, "empty.jsonl"), write("empty.jsonl", "")),
    Case("corpus: JSON top level is a number", lambda w: with_corpus(w, "n.json"), write("n.json", "42")),
    Case(
        "corpus: JSON top level is a string", lambda w: with_corpus(w, "s.json"), write("s.json", '"hello"')
    ),
    Case(
        "corpus: YAML top level is a string",
        lambda w: with_corpus(w, "s.yaml"),
        write("s.yaml", "just text\n"),
    ),
    Case("corpus: YAML not YAML", lambda w: with_corpus(w, "b.yaml"), write("b.yaml", "a: [1, 2\n  b: }\n")),
    Case(
        "corpus: corrupt deflate",
        lambda w: with_corpus(w, "c.jsonl.gz"),
        write("c.jsonl.gz", gzip.compress(b'{"text": "hello"}\n' * 50)[:20] + b"\xff" * 40),
    ),
    Case(
        "corpus: truncated gzip",
        lambda w: with_corpus(w, "t.jsonl.gz"),
        write("t.jsonl.gz", gzip.compress(b'{"text": "hello there"}\n' * 200)[:-30]),
    ),
    Case(
        "corpus: gzip that is not gzip", lambda w: with_corpus(w, "n.jsonl.gz"), write("n.jsonl.gz", "plain")
    ),
    Case(
        "corpus: CSV field over 128 KiB",
        lambda w: with_corpus(w, "big.csv"),
        write("big.csv", 'text\n"' + "a " * 100_000 + '"\nshort one\n'),
        may_succeed=True,
    ),
    Case(
        "corpus: CSV without the @column",
        lambda w: base_args(w) + ["--corpus", f"{w['ws'] / 'h.csv'}:harmful:@cat"],
        write("h.csv", "prompt\nhello\n"),
        may_succeed=True,
    ),
    Case(
        "corpus: messages missing role",
        lambda w: with_corpus(w, "m.jsonl"),
        write("m.jsonl", '{"messages": [{"content": "hi"}]}\n{"text": "fine"}\n'),
        may_succeed=True,
    ),
    Case(
        "corpus: messages with a bare string",
        lambda w: with_corpus(w, "m2.jsonl"),
        write("m2.jsonl", '{"messages": ["hi", {"role": "user", "content": "x"}]}\n{"text": "fine"}\n'),
        may_succeed=True,
    ),
    Case(
        "corpus: messages content not a string",
        lambda w: with_corpus(w, "m3.jsonl"),
        write("m3.jsonl", '{"messages": [{"role": "user", "content": [1, 2]}]}\n{"text": "fine"}\n'),
        may_succeed=True,
    ),
    Case(
        "corpus: messages is a string",
        lambda w: with_corpus(w, "m4.jsonl"),
        write("m4.jsonl", '{"messages": "hi"}\n{"text": "fine"}\n'),
        may_succeed=True,
    ),
    Case(
        "corpus: JSONL line is an array",
        lambda w: with_corpus(w, "a.jsonl"),
        write("a.jsonl", '[1, 2]\n{"text": "x"}\n'),
        may_succeed=True,
    ),
    Case(
        "corpus: binary garbage .jsonl",
        lambda w: with_corpus(w, "g.jsonl"),
        write("g.jsonl", os.urandom(4000)),
    ),
    Case(
        "corpus: .parquet that is not parquet",
        lambda w: with_corpus(w, "p.parquet"),
        write("p.parquet", "nope"),
    ),
    Case(
        "corpus: every record malformed", lambda w: with_corpus(w, "bad.jsonl"), write("bad.jsonl", "{\n{\n")
    ),
    Case(
        "lab: diff --n-boot 0",
        lambda w: ["diff", "--before", "a", "--after", "b", "--cache", "c", "--out", "d", "--n-boot", "0"],
    ),
    Case(
        "lab: diff on missing evals",
        lambda w: [
            "diff",
            "--before",
            str(w["ws"] / "a"),
            "--after",
            str(w["ws"] / "b"),
            "--cache",
            str(w["cache"]),
            "--out",
            str(w["ws"] / "d"),
        ],
    ),
    Case(
        "lab: steer --task-feature 999",
        lambda w: [
            "steer",
            "--model",
            str(w["model"]),
            "--sae",
            str(w["sae"]),
            "--task-feature",
            "999",
            "--device",
            "cpu",
            "--prompts",
            str(w["benign"]),
        ],
    ),
    Case("lab: steer --batch-size 0", lambda w: ["steer", "--task-feature", "1", "--batch-size", "0"]),
    Case("lab: synth --steps 0", lambda w: ["synth", "--steps", "0"]),
    Case("lab: synth --cosines 2", lambda w: ["synth", "--cosines", "2"]),
    Case(
        "lab: diff --out a user's folder",
        lambda w: [
            "diff",
            "--before",
            str(w["ws"] / "a"),
            "--after",
            str(w["ws"] / "b"),
            "--cache",
            str(w["cache"]),
            "--out",
            str(w["out"]),
        ],
        user_folder,
    ),
    Case(
        "lab: finetune --steps 0",
        lambda w: [
            "finetune",
            "--model",
            str(w["model"]),
            "--corpus",
            f"{w['task']}:task",
            "--out",
            str(w["out"]),
            "--steps",
            "0",
        ],
    ),
    Case(
        "lab: finetune --lr -1",
        lambda w: [
            "finetune",
            "--model",
            str(w["model"]),
            "--corpus",
            f"{w['task']}:task",
            "--out",
            str(w["out"]),
            "--lr=-1",
        ],
    ),
    Case(
        "lab: triage on records without messages",
        lambda w: [
            "triage",
            str(w["ws"] / "nomsg.jsonl"),
            "--cache",
            str(w["cache"]),
            "--model",
            str(w["model"]),
            "--out",
            str(w["out"]),
            "--device",
            "cpu",
        ],
        write(
            "nomsg.jsonl",
            '{"text": "a"}\n{"messages": "x"}\n{"messages": [{"role": "user", "content": "q"}]}\n',
        ),
    ),
    Case(
        "train-sae --k 0",
        lambda w: [
            "train-sae",
            "--model",
            str(w["model"]),
            "--corpus",
            f"{w['task']}:task",
            "--out",
            str(w["out"]),
            "--k",
            "0",
        ],
    ),
    Case(
        "train-sae --heldout-fraction 1",
        lambda w: [
            "train-sae",
            "--model",
            str(w["model"]),
            "--corpus",
            f"{w['task']}:task",
            "--out",
            str(w["out"]),
            "--heldout-fraction",
            "1",
        ],
    ),
    Case(
        "train-sae --out a user's folder",
        lambda w: [
            "train-sae",
            "--model",
            str(w["model"]),
            "--corpus",
            f"{w['task']}:task",
            "--out",
            str(w["out"]),
            "--overwrite",
        ],
        user_folder,
    ),
]


def run_case(case: Case, shared: dict[str, Path]) -> dict:
    from precompute.cli import main as cli_main

    ws = Path(tempfile.mkdtemp(prefix="hostile-"))
    w = {**shared, "ws": ws, "out": ws / "out"}
    try:
        if case.setup:
            case.setup(w)
        argv = case.argv(w)
        before, existed = snapshot(ws), w["out"].exists()
        err, out = io.StringIO(), io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                rc = cli_main(argv)
            except SystemExit as exc:  # argparse's own usage errors
                rc = exc.code if isinstance(exc.code, int) else 2
            except BaseException as exc:  # noqa: BLE001 - what escapes is exactly what we count
                import traceback

                traceback.print_exc()
                rc = f"raised {type(exc).__name__}"
        text = err.getvalue()
        after = snapshot(ws)
        lost = []
        if rc != 0:
            lost = [k for k, v in before.items() if after.get(k) != v]
            if not existed and w["out"].exists() and any(w["out"].iterdir()):
                lost.append("left a half output")
        traceback_seen = "Traceback" in text or "internal error" in text
        clear = rc == 2 and not traceback_seen and text.strip() != ""
        ok = rc == 0 and (case.expect_success or case.may_succeed) and not traceback_seen
        said = [ln for ln in (text + out.getvalue()).splitlines() if "error:" in ln or "skipped" in ln]
        return {
            "case": case.name,
            "rc": rc,
            "traceback": traceback_seen,
            "clear": clear or (ok and case.may_succeed),
            "ok": ok and case.expect_success,
            "lost": lost,
            "message": (said or [""])[-1][:160],
            "seconds": time.perf_counter() - start,
        }
    finally:
        shutil.rmtree(ws, ignore_errors=True)


def build_shared(root: Path) -> dict[str, Path]:
    from precompute.pipeline.config import RunConfig
    from precompute.pipeline.run import run_precompute
    from tests.tiny import make_sae, make_tiny_model, save_sae, write_corpus

    shared = {"model": make_tiny_model(root / "model"), "sae": save_sae(make_sae(32, 64, k=4), root / "sae")}
    shared.update(write_corpus(root / "corpus"))
    w = {**shared, "ws": root}
    cfg_args = base_args(w, root / "cache")
    overrides = {
        "model": str(shared["model"]),
        "sae": str(shared["sae"]),
        "hook": HOOK,
        "out": str(root / "cache"),
        "corpus": [cfg_args[i + 1] for i, a in enumerate(cfg_args) if a == "--corpus"],
        "context_size": 24,
        "batch_size": 4,
        "device": "cpu",
        "neighbors": 8,
        "umap_neighbors": 5,
        "top_k_examples": 5,
        "progress": False,
    }
    with contextlib.redirect_stdout(io.StringIO()):
        run_precompute(RunConfig.load(None, overrides))
        from precompute.cli import main as cli_main

        cli_main(
            [
                "geometry",
                "--sae",
                str(shared["sae"]),
                "--out",
                str(root / "geo"),
                "--neighbors",
                "8",
                "--umap-neighbors",
                "5",
                "--no-progress",
            ]
        )
    shared["cache"], shared["geo"] = root / "cache", root / "geo"
    return shared


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="hostile-shared-"))
    try:
        shared = build_shared(root)
        results = []
        for case in CASES:
            r = run_case(case, shared)
            results.append(r)
            status = (
                "ok"
                if r["ok"] or (r["clear"] and r["rc"] == 0)
                else "clear"
                if r["clear"]
                else "TRACEBACK"
                if r["traceback"]
                else f"rc={r['rc']}"
            )
            print(f"{status:9s} {'LOST ' if r['lost'] else ''}{r['case']}: {r['message']}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    hostile = [r for r in results if not any(c.name == r["case"] and c.expect_success for c in CASES)]
    n_clear = sum(r["clear"] for r in hostile)
    n_tb = sum(r["traceback"] for r in results)
    n_lost = sum(bool(r["lost"]) for r in results)
    n_ok = sum(r["ok"] for r in results)
    summary = (
        f"{len(hostile)} hostile inputs tried / {n_clear} clear errors (or records skipped and counted) / {n_tb} tracebacks / "
        f"{n_lost} with data lost (+ {n_ok} of {len(results) - len(hostile)} edge cases that must succeed did)"
    )
    lines = [
        "# Hostile inputs",
        "",
        f"`python bench/hostile_inputs.py`, {time.strftime('%Y-%m-%d')}: **{summary}**",
        "",
        "| case | exit | outcome | message |",
        "|---|---|---|---|",
    ]
    for r in results:
        outcome = (
            "success"
            if r["ok"]
            else "skipped and counted"
            if r["clear"] and r["rc"] == 0
            else "clear error"
            if r["clear"]
            else "TRACEBACK"
            if r["traceback"]
            else "?"
        )
        if r["lost"]:
            outcome += f"; LOST {r['lost'][:3]}"
        lines.append(f"| {r['case']} | {r['rc']} | {outcome} | {r['message'].replace('|', '/')} |")
    out_dir = ROOT / "bench" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "hostile_inputs.md").write_text("\n".join(lines) + "\n")
    print(summary)
    return (
        0
        if n_clear == len(hostile) and n_tb == 0 and n_lost == 0 and n_ok == len(results) - len(hostile)
        else 1
    )


if __name__ == "__main__":
    sys.exit(main())
