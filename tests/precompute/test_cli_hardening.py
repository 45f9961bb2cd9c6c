"""Hostile input to the CLI: one clear line, exit status 2, no traceback, nothing lost.

Each test is one item of the hardening list: a user's folder survives --overwrite, a step never
mixes two SAEs in one cache, two runs on one --out, out-of-range numbers and mistyped TOML, tiny
SAEs, unwritable --out, Ctrl-C during a step, and a killed run's staging left behind."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from precompute.cache import read_manifest, verify_cache
from precompute.cli import main as cli_main
from tests.precompute.pipeline.test_run import HOOK, built_cache, corpus_specs  # noqa: F401 - fixture
from tests.readonly import read_only_directory

GEOMETRY = ["--neighbors", "8", "--umap-neighbors", "5", "--no-progress"]


def precompute_args(model: Path, sae: Path, corpus: dict[str, Path], out: Path) -> list[str]:
    args = [
        "precompute",
        "--model",
        str(model),
        "--sae",
        str(sae),
        "--hook",
        HOOK,
        "--out",
        str(out),
        "--context-size",
        "24",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--top-k-examples",
        "5",
        *GEOMETRY,
    ]
    for spec in corpus_specs(corpus):
        args += ["--corpus", spec]
    return args


def one_clear_line(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err
    line = [ln for ln in err.splitlines() if ln.startswith(("featuregeom: error:", "train-sae: error:"))]
    assert len(line) == 1, err
    for fragment in fragments:
        assert fragment in line[0], line[0]
    return line[0]


def test_overwrite_never_deletes_a_user_folder(tiny_model_dir, tiny_sae_dir, tiny_corpus, tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "thesis.tex").write_text("three years of work")
    (work / "data").mkdir()
    (work / "data" / "results.csv").write_text("1,2,3")
    rc = cli_main(precompute_args(tiny_model_dir, tiny_sae_dir, tiny_corpus, work) + ["--overwrite"])
    assert rc == 2
    one_clear_line(capsys, "not a featuregeom cache", "even with --overwrite")
    assert (work / "thesis.tex").read_text() == "three years of work"
    assert (work / "data" / "results.csv").read_text() == "1,2,3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_a_step_never_mixes_two_saes(tiny_sae_dir, tmp_path, capsys):
    from tests.tiny import make_sae, save_sae

    other = save_sae(make_sae(32, 64, k=4, seed=9), tmp_path / "other-sae")  # same width, other weights
    out = tmp_path / "geo"
    assert cli_main(["geometry", "--sae", str(tiny_sae_dir), "--out", str(out), *GEOMETRY]) == 0
    before = read_manifest(out)
    with np.load(out / "neighbors.npz") as z:
        indices_before = z["indices"].copy()
    assert cli_main(["geometry", "--sae", str(other), "--out", str(out), *GEOMETRY]) == 2
    one_clear_line(capsys, "is not the SAE the cache at", "never mixes two")
    assert verify_cache(out)["files"] == before["files"]
    with np.load(out / "neighbors.npz") as z:
        assert (z["indices"] == indices_before).all()
    # the same SAE again is fine (a rerun with other geometry options)
    assert (
        cli_main(
            [
                "geometry",
                "--sae",
                str(tiny_sae_dir),
                "--out",
                str(out),
                "--neighbors",
                "6",
                "--umap-neighbors",
                "5",
                "--no-progress",
            ]
        )
        == 0
    )


def test_scores_with_another_model_is_refused(built_cache, tiny_sae_dir, tmp_path, capsys):  # noqa: F811
    from tests.tiny import make_tiny_model

    out, _ = built_cache
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    other_model = make_tiny_model(tmp_path / "other-model", seed=3)
    assert (
        cli_main(
            [
                "scores",
                "--out",
                str(copy),
                "--model",
                str(other_model),
                "--sae",
                str(tiny_sae_dir),
                "--hook",
                HOOK,
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 2
    )
    one_clear_line(capsys, "is not the model the cache at")
    assert verify_cache(copy)["files"] == read_manifest(out)["files"]


def test_geometry_starts_a_cache_in_an_existing_empty_directory(tiny_sae_dir, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert cli_main(["geometry", "--sae", str(tiny_sae_dir), "--out", str(out), *GEOMETRY]) == 0
    assert verify_cache(out)["steps"] == ["geometry"]


def test_a_second_run_on_the_same_out_is_refused(tiny_model_dir, tiny_sae_dir, tiny_corpus, tmp_path, capsys):
    out = tmp_path / "cache"
    ready = tmp_path / "holding"
    # another process holds the output (as a long precompute would) until we let go
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time, pathlib\n"
                "from precompute.cache import output_lock\n"
                "with output_lock(sys.argv[1]):\n"
                "    pathlib.Path(sys.argv[2]).write_text('1')\n"
                "    time.sleep(60)\n"
            ),
            str(out),
            str(ready),
        ]
    )
    try:
        deadline = time.time() + 60
        while not ready.exists() and time.time() < deadline:
            time.sleep(0.05)
        assert ready.exists()
        assert cli_main(precompute_args(tiny_model_dir, tiny_sae_dir, tiny_corpus, out)) == 2
        one_clear_line(capsys, "another featuregeom run is writing", "wait for it to finish")
        assert cli_main(["geometry", "--sae", str(tiny_sae_dir), "--out", str(out), *GEOMETRY]) == 2
        assert not out.exists() and not out.with_name("cache.work").exists()
    finally:
        holder.kill()
        holder.wait()
    assert cli_main(["geometry", "--sae", str(tiny_sae_dir), "--out", str(out), *GEOMETRY]) == 0


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--batch-size", "0"], "--batch-size must be in [1, inf), got 0"),
        (["--batch-size", "-1"], "--batch-size must be in [1, inf), got -1"),
        (["--top-k-examples", "-1"], "--top-k-examples must be in [1, inf)"),
        (["--quantile-bins", "0"], "--quantile-bins must be in [1, inf)"),
        (["--neighbors", "0"], "--neighbors must be in [1, inf)"),
        (["--null-fpr", "1.5"], "--null-fpr must be in (0, 1), got 1.5"),
        (["--null-fpr", "0"], "--null-fpr must be in (0, 1)"),
        (["--umap-neighbors", "1"], "--umap-neighbors must be in [2, inf)"),
        (["--n-task", "-1"], "--n-task must be in [0, inf)"),
        (["--harm-threshold", "2"], "--harm-threshold must be in [0, 1], got 2.0"),
        (["--task-threshold", "-0.1"], "--task-threshold must be in [0, 1]"),
        (["--max-tokens", "0"], "--max-tokens must be in (0, inf)"),
        (["--context-size", "1"], "--context-size must be in [2, inf)"),
        (["--seed", "-3"], "--seed must be in [0, 4.29497e+09]"),
        (["--null-fpr", "nan"], "must be a finite number"),
        (["--neighbors", "64"], "--neighbors 64 must be below the SAE's 64 features"),
        (["--neighbors", "1"], "needs at least 2 neighbours"),
    ],
)
def test_out_of_range_numbers_are_refused_before_any_work(
    tiny_model_dir, tiny_sae_dir, tiny_corpus, tmp_path, capsys, flags, fragment
):
    out = tmp_path / "out"
    args = precompute_args(tiny_model_dir, tiny_sae_dir, tiny_corpus, out) + flags
    assert cli_main(args) == 2
    one_clear_line(capsys, fragment)
    assert not out.exists() and not out.with_name("out.work").exists()


@pytest.mark.parametrize(
    "toml, fragment",
    [
        ('neighbors = "abc"\n', "option 'neighbors' in"),
        ("seed = [1, 2]\n", "option 'seed' in"),
        ("sae = 5\n", "option 'sae' in"),
        ('progress = "no"\n', "option 'progress' in"),
        ("batch_size = 2.5\n", "must be an integer"),
        ("batch_size = true\n", "must be an integer"),
        ("null_fpr = 0\n", "--null-fpr must be in (0, 1)"),
        ('[[corpus]]\ngroup = "task"\n', "has no 'path'"),
        ("corpus = 3\n", "must be a list of [[corpus]] tables"),
        ('[[corpus]]\npath = "a.jsonl"\nmax_docs = "ten"\n', "option 'corpus.max_docs'"),
        ("neighbours = 3\n", "unknown option(s)"),
        ("neighbors = \n", "is not valid TOML"),
    ],
)
def test_mistyped_config_is_one_clear_error(tiny_sae_dir, tmp_path, capsys, toml, fragment):
    config = tmp_path / "run.toml"
    config.write_text(toml)
    assert (
        cli_main(
            ["geometry", "--config", str(config), "--sae", str(tiny_sae_dir), "--out", str(tmp_path / "o")]
        )
        == 2
    )
    one_clear_line(capsys, fragment)
    assert not (tmp_path / "o").exists()


def test_non_utf8_config(tiny_sae_dir, tmp_path, capsys):
    config = tmp_path / "latin1.toml"
    config.write_bytes('out = "caf\xe9"\n'.encode("latin-1"))
    assert cli_main(["geometry", "--config", str(config), "--sae", str(tiny_sae_dir)]) == 2
    one_clear_line(capsys, "is not UTF-8 text")


@pytest.mark.parametrize(
    "d_in, d_sae, fragment",
    [
        (32, 1, "the SAE has 1 feature(s)"),
        (32, 3, "the SAE has 3 feature(s)"),
        (1, 16, "needs d_in >= 2"),
    ],
)
def test_tiny_saes_get_a_clear_error(tmp_path, capsys, d_in, d_sae, fragment):
    from tests.tiny import make_sae, save_sae

    sae = save_sae(make_sae(d_in, d_sae, k=1), tmp_path / "tiny")
    assert (
        cli_main(
            [
                "geometry",
                "--sae",
                str(sae),
                "--out",
                str(tmp_path / "o"),
                "--neighbors",
                "2",
                "--umap-neighbors",
                "2",
                "--no-progress",
            ]
        )
        == 2
    )
    one_clear_line(capsys, fragment)


def test_a_four_feature_sae_gets_a_sensible_result(tmp_path):
    from tests.tiny import make_sae, save_sae

    sae = save_sae(make_sae(8, 4, k=1), tmp_path / "tiny")
    assert (
        cli_main(
            [
                "geometry",
                "--sae",
                str(sae),
                "--out",
                str(tmp_path / "o"),
                "--neighbors",
                "3",
                "--umap-neighbors",
                "3",
                "--no-progress",
            ]
        )
        == 0
    )
    with np.load(tmp_path / "o" / "neighbors.npz") as z:
        assert z["indices"].shape == (4, 3)


@pytest.mark.parametrize("where", ["under-a-file", "proc", "sys", "read-only"])
def test_unwritable_out_is_refused_before_any_work(tiny_sae_dir, tmp_path, capsys, where):
    with contextlib.ExitStack() as stack:
        if where == "under-a-file":
            (tmp_path / "afile").write_text("x")
            out = tmp_path / "afile" / "cache"
        elif where == "proc":
            out = Path("/proc/featuregeom-cache")
        elif where == "sys":
            out = Path("/sys/featuregeom-cache")
        else:
            out = stack.enter_context(read_only_directory(tmp_path / "ro")) / "cache"
        assert cli_main(["geometry", "--sae", str(tiny_sae_dir), "--out", str(out), *GEOMETRY]) == 2
        one_clear_line(capsys, "cannot write --out")


def test_disk_full_is_one_line_and_keeps_the_old_cache(tiny_sae_dir, tmp_path, capsys, monkeypatch):
    import errno

    from precompute import cache

    out = tmp_path / "geo"
    assert cli_main(["geometry", "--sae", str(tiny_sae_dir), "--out", str(out), *GEOMETRY]) == 0
    before = read_manifest(out)["files"]
    real = cache.StagedCache.commit

    def full_disk(self):
        (self.dir / "filler").write_bytes(b"x")
        raise OSError(errno.ENOSPC, "No space left on device", str(self.dir / "features.parquet"))

    monkeypatch.setattr(cache.StagedCache, "commit", full_disk)
    assert (
        cli_main(
            [
                "geometry",
                "--sae",
                str(tiny_sae_dir),
                "--out",
                str(out),
                "--neighbors",
                "6",
                "--umap-neighbors",
                "5",
                "--no-progress",
            ]
        )
        == 2
    )
    one_clear_line(capsys, "the disk is full", "The previous cache, if any, is intact")
    monkeypatch.setattr(cache.StagedCache, "commit", real)
    assert verify_cache(out)["files"] == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["geo"]


def test_ctrl_c_during_a_step_keeps_the_old_cache(tiny_sae_dir, tmp_path, capsys, monkeypatch):
    from precompute.pipeline import geometry

    out = tmp_path / "geo"
    assert cli_main(["geometry", "--sae", str(tiny_sae_dir), "--out", str(out), *GEOMETRY]) == 0
    before = read_manifest(out)["files"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(geometry, "umap_layout", interrupted)
    assert (
        cli_main(
            [
                "geometry",
                "--sae",
                str(tiny_sae_dir),
                "--out",
                str(out),
                "--neighbors",
                "6",
                "--umap-neighbors",
                "5",
                "--no-progress",
            ]
        )
        == 130
    )
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert verify_cache(out)["files"] == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["geo"]  # no staging left


def test_staging_of_a_killed_geometry_run_is_cleaned_on_the_next_run(tiny_sae_dir, tmp_path):
    out = tmp_path / "geo"
    args = ["geometry", "--sae", str(tiny_sae_dir), "--out", str(out), *GEOMETRY]
    code = (
        "import sys, time\nfrom precompute.pipeline import geometry\nfrom precompute.cli import main\n"
        "def hang(*a, **k):\n    print('staged', flush=True); time.sleep(120)\n"
        "geometry.umap_layout = hang\nsys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "staged"
    staging = [p for p in tmp_path.iterdir() if p.name.startswith(".geo.tmp-")]
    assert len(staging) == 1
    proc.kill()  # SIGKILL: no finally runs
    proc.wait()
    assert staging[0].exists()
    assert cli_main(args) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["geo"]


def test_failed_run_keeps_only_resumable_work(
    tiny_model_dir, tiny_sae_dir, tiny_corpus, tmp_path, capsys, monkeypatch
):
    """A failure after the harvest wrote shards keeps them and says how to resume; one before leaves nothing."""
    from precompute.errors import FeatureGeomError
    from precompute.pipeline import geometry

    out = tmp_path / "cache"

    def broken_geometry(*args, **kwargs):
        raise FeatureGeomError("geometry failed on purpose")

    monkeypatch.setattr(geometry, "run", broken_geometry)
    assert cli_main(precompute_args(tiny_model_dir, tiny_sae_dir, tiny_corpus, out)) == 2
    captured = capsys.readouterr()
    work = tmp_path / "cache.work"
    assert list(work.glob("shard-*.npz")) and not out.exists()
    assert f"rerun the same command to resume, or delete {work} to start clean" in captured.out
    monkeypatch.undo()
    assert cli_main(precompute_args(tiny_model_dir, tiny_sae_dir, tiny_corpus, out)) == 0
    assert "resuming from" in capsys.readouterr().out
    assert not work.exists()
    from precompute.pipeline.steps import STEPS

    # every step, in the registry's order (tests/precompute/pipeline/test_steps.py spells it out)
    assert json.loads((out / "manifest.json").read_text())["steps"] == list(STEPS)


def test_device_cuda_without_cuda(tiny_model_dir, tiny_sae_dir, tiny_corpus, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args = precompute_args(tiny_model_dir, tiny_sae_dir, tiny_corpus, tmp_path / "o")
    args[args.index("--device") + 1] = "cuda"
    assert cli_main(args) == 2
    one_clear_line(capsys, "--device cuda was asked for but torch sees no CUDA device")


def test_geometry_on_cuda_without_cuda_is_one_clear_error(tiny_sae_dir, tmp_path, capsys):
    """The kNN's device goes through the same check as the model's (it once raised a bare ValueError: exit 1)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "geo"
    argv = ["geometry", "--sae", str(tiny_sae_dir), "--out", str(out), "--device", "cuda", *GEOMETRY]
    assert cli_main(argv) == 2
    one_clear_line(capsys, "--device cuda was asked for but torch sees no CUDA device", "use --device cpu")
    assert not out.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["train-sae", "--model", "MISSING", "--corpus", "CORPUS:task", "--out", "OUT", "--overwrite"],
        ["finetune", "--model", "MISSING", "--corpus", "CORPUS:task", "--out", "OUT", "--overwrite"],
        ["eval-acts", "--model", "MISSING", "--out", "OUT"],
        ["patch", "--adapter", "MISSING", "--cache", "MISSING", "--out", "OUT"],
        ["diff", "--before", "MISSING", "--after", "MISSING", "--cache", "MISSING", "--out", "OUT"],
        ["triage", "CORPUS", "--cache", "MISSING", "--model", "MISSING", "--out", "OUT"],
    ],
)
def test_lab_commands_refuse_a_user_folder_before_any_work(tiny_corpus, tmp_path, capsys, argv):
    """The model, cache and inputs are all missing: the refusal naming the folder proves it comes first."""
    out = tmp_path / "work"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    names = {"MISSING": str(tmp_path / "missing"), "CORPUS": str(tiny_corpus["task"]), "OUT": str(out)}
    argv = [
        names.get(a.split(":")[0], a.split(":")[0]) + (":" + a.split(":")[1] if ":" in a else "")
        for a in argv
    ]
    assert cli_main(argv) == 2
    one_clear_line(capsys, f"--out {out} is a non-empty directory that is not a", "never replaces")
    assert (
        sorted(p.name for p in out.iterdir()) == ["notes.txt"]
        and (out / "notes.txt").read_text() == "precious"
    )
