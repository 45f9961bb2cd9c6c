"""Data-parallel harvest: two processes under torchrun (gloo, CPU, one thread each) write the same
shards and the same cache as one process; each rank owns every second shard and resumes on its own,
and aggregates half of the features; RANK/WORLD_SIZE are read strictly."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from precompute.errors import ConfigError
from precompute.pipeline.distributed import World, world_from_env
from precompute.pipeline.shards import list_shards, load_arrays
from precompute.sae.registry import load_sae
from tests.precompute.pipeline.test_run import HOOK, corpus_specs

ROOT = Path(__file__).resolve().parents[3]
TABLES = (
    "features.parquet",
    "examples.parquet",
    "overlaps.parquet",
    "documents.parquet",
    "category_rates.parquet",
)


def test_world_from_env() -> None:
    assert world_from_env({}) == World()
    world = world_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (world.rank, world.size, world.local_rank, world.main, world.parallel) == (3, 4, 1, False, True)
    assert [i for i in range(10) if world.owns(i)] == [3, 7]
    owners = [[r for r in range(3) if World(r, 3).owns(i)] for i in range(9)]
    assert all(len(o) == 1 for o in owners)  # every shard has exactly one owner
    for bad in ({"WORLD_SIZE": "2", "RANK": "2"}, {"WORLD_SIZE": "x"}, {"WORLD_SIZE": "0"}):
        with pytest.raises(ConfigError):
            world_from_env(bad)


def _args(model: Path, sae: Path, corpus: dict[str, Path], out: Path) -> list[str]:
    args = ["precompute", "--model", str(model), "--sae", str(sae), "--hook", HOOK, "--out", str(out)]
    args += ["--context-size", "24", "--batch-size", "2", "--batches-per-shard", "2", "--neighbors", "8"]
    args += ["--top-k-examples", "5", "--umap-neighbors", "5", "--outlier-norm-factor", "0", "--no-progress"]
    args += ["--device", "cpu"]
    return args + [f"--corpus={c}" for c in corpus_specs(corpus)]


def _run(argv: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HOME": str(tmp / "home"),
    }  # the output lock lives under HOME
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


@pytest.mark.slow
def test_two_processes_under_torchrun_equal_one(
    tiny_model_dir: Path, tiny_sae_dir: Path, tiny_corpus: dict[str, Path], tmp_path: Path
) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    _run(
        [sys.executable, "-m", "precompute", *_args(tiny_model_dir, tiny_sae_dir, tiny_corpus, one)], tmp_path
    )
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = _run(
        [*launch, "-m", "precompute", *_args(tiny_model_dir, tiny_sae_dir, tiny_corpus, two)], tmp_path
    )
    assert "rank 1/2:" in done.stdout and "rank 0/2:" in done.stdout
    shards_one, shards_two = list_shards(one / "harvest"), list_shards(two / "harvest")
    assert [p.name for p in shards_one] == [p.name for p in shards_two] and len(shards_one) >= 4
    for a, b in zip(shards_one, shards_two, strict=True):
        x, y = load_arrays(a), load_arrays(b)
        assert all(np.array_equal(x[k], y[k]) for k in x), a.name
    # each rank aggregated half of the features over every shard; joined, the tables are exactly one
    # process's (float sums included: a feature's entries are summed in the same order)
    ranks = json.loads((two / "params" / "harvest.json").read_text())["timings"]["ranks"]
    n = load_sae(str(tiny_sae_dir)).d_sae
    assert [r["aggregate_features"] for r in ranks] == [[0, n // 2], [n // 2, n]]
    assert all(r["aggregate_s"] > 0 for r in ranks)
    assert "aggregation: the torchrun ranks' feature ranges, joined" in done.stdout  # not aggregated again
    for table in TABLES:
        pd.testing.assert_frame_equal(
            pd.read_parquet(one / table), pd.read_parquet(two / table), check_exact=True
        )
    for archive in ("neighbors.npz", "histograms.npz"):
        with np.load(one / archive) as x, np.load(two / archive) as y:
            assert all(np.array_equal(x[k], y[k]) for k in x.files), archive
    assert not (tmp_path / "two.work").exists()  # the work directory goes once the cache is written


@pytest.mark.slow
def test_each_rank_resumes_its_own_shards(
    tiny_model_dir: Path, tiny_sae_dir: Path, tiny_corpus: dict[str, Path], tmp_path: Path
) -> None:
    """A killed parallel run left shards 0 and 1 behind: the rerun keeps them (same fingerprint) and
    writes only the missing ones, split between the ranks."""
    out = tmp_path / "cache"
    base = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "precompute",
    ]
    _run([*base, *_args(tiny_model_dir, tiny_sae_dir, tiny_corpus, out)], tmp_path)
    total = len(list_shards(out / "harvest"))
    work = tmp_path / "cache.work"
    work.mkdir()
    for shard in list_shards(out / "harvest")[:2]:
        (work / shard.name).write_bytes(shard.read_bytes())
    fingerprint = json.loads((out / "params" / "harvest.json").read_text())["params"]["fingerprint"]
    (work / "run.json").write_text(json.dumps({"fingerprint": fingerprint}))
    done = _run([*base, *_args(tiny_model_dir, tiny_sae_dir, tiny_corpus, out), "--overwrite"], tmp_path)
    # the two ranks print into one pipe: read the messages wherever a line break falls (one CI run found
    # only rank 1's by line), and show the output if one is missing
    written = {int(r): int(n) for r, n in re.findall(r"rank (\d+)/2: (\d+) shards written", done.stdout)}
    assert sum(written.values()) == total - 2 and set(written) == {0, 1}, done.stdout + done.stderr[-3000:]
    # rank 0 records what every rank did, as each printed it
    ranks = json.loads((out / "params" / "harvest.json").read_text())["timings"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert {r["rank"]: r["shard_encoding"]["shards_written"] for r in ranks} == written
    assert all(r["seconds"] > 0 for r in ranks)
