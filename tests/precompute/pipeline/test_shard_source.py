"""Bounded-disk caches (`shard_storage = "recompute"`): no activation shard is ever written, and every
file the cache holds equals the two-phase (disk) run's, because each step that reads a shard gets
the same arrays computed again from the model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from precompute.cache import read_manifest, verify_cache
from precompute.cli import main as cli_main
from precompute.errors import CacheError, ConfigError
from precompute.explain.detection import firing_contexts
from precompute.pipeline import shards as shards_module
from precompute.pipeline.overlaps import coactivation
from precompute.pipeline.run import run_precompute
from precompute.pipeline.shard_source import stored_shard_refs
from precompute.pipeline.shards import list_shards, load_arrays
from tests.precompute.pipeline.test_distributed import _args
from tests.precompute.pipeline.test_run import make_cfg


def _files(cache: Path) -> dict[str, str]:
    """The cache's files and their hashes, less the run's own record (params/) and the shards."""
    return {
        k: v
        for k, v in read_manifest(cache)["files"].items()
        if not k.startswith("params/") and not k.startswith("harvest/shard-")
    }


@pytest.fixture(scope="module")
def pair(tiny_model_dir, tiny_sae_dir, tiny_corpus, tmp_path_factory) -> tuple[Path, Path]:
    """The same run twice: shards on disk, and shards recomputed (writing a shard would fail it)."""
    root = tmp_path_factory.mktemp("bounded")
    disk, bounded = root / "disk", root / "bounded"
    kw = dict(batches_per_shard=2)
    run_precompute(make_cfg(tiny_model_dir, tiny_sae_dir, tiny_corpus, disk, **kw))
    save = shards_module._save_shard

    def refuse(*args, **kwargs):
        raise AssertionError("a bounded-disk run wrote an activation shard")

    shards_module._save_shard = refuse
    try:
        cfg = make_cfg(tiny_model_dir, tiny_sae_dir, tiny_corpus, bounded, shard_storage="recompute", **kw)
        run_precompute(cfg)
    finally:
        shards_module._save_shard = save
    return disk, bounded


def test_recomputed_cache_equals_the_disk_cache_file_for_file(pair) -> None:
    disk, bounded = pair
    verify_cache(bounded)
    assert list_shards(disk / "harvest") and not list_shards(bounded / "harvest")
    assert not bounded.with_name("bounded.work").exists()
    assert _files(bounded) == _files(disk)
    manifest = read_manifest(bounded)
    assert manifest["params"]["harvest"]["shard_storage"] == "recompute"
    assert (
        manifest["params"]["harvest"]["fingerprint"]
        == read_manifest(disk)["params"]["harvest"]["fingerprint"]
    )
    # aggregate (2), then the examples and the scores' window maxima in one pass (the rows of the first
    # pass choose the windows), and co-activation when a pair is flagged
    flagged = len(pd.read_parquet(disk / "overlaps.parquet"))
    assert manifest["timings"]["recompute_model_passes"] == 3.0 + (flagged > 0)
    assert manifest["timings"]["recompute_mismatched_shards"] == 0  # every pass gave the same bytes


def test_co_activation_of_recomputed_shards_equals_the_files(pair) -> None:
    disk, bounded = pair
    rng = np.random.default_rng(0)
    pairs = rng.integers(0, 64, size=(40, 2))
    again = coactivation(stored_shard_refs(bounded), pairs, 64)
    written = coactivation(list_shards(disk / "harvest"), pairs, 64)
    assert written["both"].sum() > 0
    for key, value in written.items():
        np.testing.assert_array_equal(again[key], value)


def test_a_step_alone_on_a_bounded_cache_recomputes_from_the_recorded_corpus(pair, tmp_path) -> None:
    disk, bounded = pair
    copies = {}
    for name, cache in (("disk", disk), ("bounded", bounded)):
        copies[name] = tmp_path / name
        shutil.copytree(cache, copies[name])
        assert (
            cli_main(["scores", "--out", str(copies[name]), "--harm-threshold", "0.6", "--no-progress"]) == 0
        )
        assert cli_main(["overlaps", "--out", str(copies[name]), "--n-task", "20", "--no-progress"]) == 0
    for table in ("features.parquet", "overlaps.parquet"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(copies["bounded"] / table), pd.read_parquet(copies["disk"] / table)
        )
    # overlaps read shards only if it flagged a pair
    flagged = len(pd.read_parquet(copies["disk"] / "overlaps.parquet"))
    assert read_manifest(copies["bounded"])["timings"]["recompute_model_passes"] == float(flagged > 0)


def test_scores_alone_on_a_bounded_cache_runs_the_model_twice(pair, tmp_path) -> None:
    """The token rows, then the window maxima: a step alone has no rows kept from an earlier pass."""
    copies = [tmp_path / "disk", tmp_path / "bounded"]
    for cache, copy in zip(pair, copies, strict=True):
        shutil.copytree(cache, copy)
        assert cli_main(["scores", "--out", str(copy), "--no-progress"]) == 0
    assert read_manifest(copies[1])["timings"]["recompute_model_passes"] == 2.0
    assert _files(copies[1]) == _files(copies[0])


def test_recomputed_shards_equal_the_written_ones(pair) -> None:
    disk, bounded = pair
    refs = stored_shard_refs(bounded)
    files = list_shards(disk / "harvest")
    assert [r.name for r in refs] == [f.name for f in files]  # type: ignore[union-attr]
    for ref, path in zip(refs, files, strict=True):
        again, written = load_arrays(ref), load_arrays(path)
        assert again.keys() == written.keys()
        assert all(np.array_equal(again[k], written[k]) for k in written), path.name
    chosen = list(range(0, 64, 7))
    assert firing_contexts(refs, chosen, 64) == firing_contexts(files, chosen, 64)


def test_sixteen_bit_values_are_rounded_as_a_disk_shard_rounds_them(
    tiny_model_dir, tiny_sae_dir, tiny_corpus, tmp_path
) -> None:
    caches = {}
    for storage in ("disk", "recompute"):
        caches[storage] = tmp_path / storage
        cfg = make_cfg(
            tiny_model_dir,
            tiny_sae_dir,
            tiny_corpus,
            caches[storage],
            shard_storage=storage,
            shard_values="float16",
            batches_per_shard=3,
        )
        run_precompute(cfg, ("harvest",))
    assert _files(caches["recompute"]) == _files(caches["disk"])
    # the values went through float16 (a float32 run's maxima are not all representable in it)
    top = pd.read_parquet(caches["recompute"] / "features.parquet")["max_activation"].to_numpy()
    top = top[top > 0]
    assert len(top) and np.array_equal(top.astype(np.float16).astype(np.float64), top)


def test_another_corpus_cannot_stand_in_for_the_recorded_one(pair, tiny_corpus, tmp_path) -> None:
    _, bounded = pair
    copy = tmp_path / "copy"
    shutil.copytree(bounded, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    recorded = manifest["config"]["corpus"]
    assert any(c["group"] == "benign" for c in recorded)
    # the recorded corpus file changed after the harvest: the batches differ, so nothing is recomputed
    moved = tmp_path / tiny_corpus["benign"].name
    shutil.copyfile(tiny_corpus["benign"], moved)
    lines = moved.read_text().splitlines()
    moved.write_text("\n".join(lines[: len(lines) // 2]) + "\n")
    for c in recorded:
        if c["group"] == "benign":
            c["path"] = str(moved)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="do not make the batches it was harvested from"):
        stored_shard_refs(copy)


def test_torchrun_and_recompute_are_refused_together(
    tiny_model_dir, tiny_sae_dir, tiny_corpus, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = make_cfg(tiny_model_dir, tiny_sae_dir, tiny_corpus, tmp_path / "c", shard_storage="recompute")
    with pytest.raises(ConfigError, match="runs in one process"):
        run_precompute(cfg)
    assert not (tmp_path / "c").exists()


def test_a_harvest_rerun_in_the_other_storage_leaves_no_stale_shard(
    tiny_model_dir, tiny_sae_dir, tiny_corpus, tmp_path
) -> None:
    """shard_storage is not part of a cache's identity, so the harvest can rerun on the same cache in the
    other mode: the earlier run's shard files must not stay beside a cache that says it keeps none."""
    out = tmp_path / "c"

    def harvest(storage: str) -> None:
        cfg = make_cfg(tiny_model_dir, tiny_sae_dir, tiny_corpus, out, shard_storage=storage)
        run_precompute(cfg, ("harvest",))
        verify_cache(out)

    harvest("disk")
    written = list_shards(out / "harvest")
    assert written
    harvest("recompute")
    assert not list_shards(out / "harvest") and not out.with_name("c.work").exists()
    assert read_manifest(out)["params"]["harvest"]["shard_storage"] == "recompute"
    harvest("disk")
    assert [p.name for p in list_shards(out / "harvest")] == [p.name for p in written]


def test_the_command_line_builds_a_bounded_cache_its_steps_rerun_on(
    tiny_model_dir, tiny_sae_dir, tiny_corpus, tmp_path, capsys
) -> None:
    """Through `featuregeom precompute --shard-storage recompute --steps ...`: the manifest records the
    command's own options (`steps` among them), and `scores` alone still finds the harvest's."""
    out = tmp_path / "cache"
    argv = _args(tiny_model_dir, tiny_sae_dir, tiny_corpus, out) + ["--shard-storage", "recompute"]
    assert cli_main([*argv, "--steps", "harvest,scores"]) == 0
    assert read_manifest(out)["config"]["steps"] == "harvest,scores"
    before = pd.read_parquet(out / "features.parquet")
    assert cli_main(["scores", "--out", str(out), "--no-progress"]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(out / "features.parquet"), before)
    assert not list_shards(out / "harvest")


def test_a_killed_bounded_run_resumes_from_its_checkpoints(
    pair, tiny_model_dir, tiny_sae_dir, tiny_corpus, tmp_path, monkeypatch, capsys
) -> None:
    """Killed after the aggregation's two passes: the rerun takes them from the work folder's checkpoint
    (the aggregation cannot run again here) and writes the cache the uninterrupted run wrote."""
    from precompute.pipeline import harvest

    _, bounded = pair
    out = tmp_path / "bounded"
    cfg = make_cfg(
        tiny_model_dir, tiny_sae_dir, tiny_corpus, out, shard_storage="recompute", batches_per_shard=2
    )

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(harvest, "_examples_and_windows", killed)
        with pytest.raises(KeyboardInterrupt):
            run_precompute(cfg)
    work = tmp_path / "bounded.work"
    assert not out.exists() and sorted(p.name for p in work.iterdir()) == [
        "aggregate.json",
        "aggregate.npz",
        "run.json",
    ]
    assert "kept the checkpoints of the finished model passes" in capsys.readouterr().out

    def must_not_run(*args, **kwargs):
        raise AssertionError("the aggregation ran again")

    with monkeypatch.context() as m:
        m.setattr(harvest, "aggregate", must_not_run)
        run_precompute(cfg)
    assert "aggregate from its checkpoint" in capsys.readouterr().out
    assert _files(out) == _files(bounded) and not work.exists()
    # the token rows that choose the windows, then the examples with the window maxima
    flagged = len(pd.read_parquet(out / "overlaps.parquet"))
    assert read_manifest(out)["timings"]["recompute_model_passes"] == 2.0 + (flagged > 0)


def test_a_checkpoint_of_other_options_is_not_used(
    tiny_model_dir, tiny_sae_dir, tiny_corpus, tmp_path, monkeypatch, capsys
) -> None:
    from precompute.pipeline import harvest

    out = tmp_path / "c"

    def cfg(top_k: int):
        return make_cfg(
            tiny_model_dir, tiny_sae_dir, tiny_corpus, out, shard_storage="recompute", top_k_examples=top_k
        )

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(harvest, "_examples_and_windows", killed)
        with pytest.raises(KeyboardInterrupt):
            run_precompute(cfg(5), ("harvest",))
    capsys.readouterr()
    run_precompute(cfg(3), ("harvest",))  # the aggregate keeps another number of top examples
    assert "from its checkpoint" not in capsys.readouterr().out
    examples = pd.read_parquet(out / "examples.parquet")
    assert examples[examples["kind"] == "top"]["rank"].max() == 2


def test_explain_on_a_bounded_cache_equals_explain_on_the_disk_cache(pair, tiny_model_dir, tmp_path) -> None:
    """`explain` finds where features never fire from the shards: recomputed, they give the same picks."""
    copies = [tmp_path / "disk", tmp_path / "bounded"]
    for cache, copy in zip(pair, copies, strict=True):
        shutil.copytree(cache, copy)
        argv = ["explain", "--out", str(copy), "--explainer", str(tiny_model_dir), "--features", "1,2,5"]
        assert (
            cli_main([*argv, "--n-shown", "3", "--n-scored", "3", "--max-new-tokens", "4", "--no-progress"])
            == 0
        )
    explained = [pd.read_parquet(c / "features.parquet") for c in copies]
    assert explained[0]["auto_explanation_scored"].notna().any()
    pd.testing.assert_frame_equal(explained[1], explained[0])


def test_a_pass_that_computes_other_bytes_is_reported(
    tiny_model_dir, tiny_sae_dir, tiny_corpus, tmp_path, capsys
) -> None:
    """Nondeterministic kernels (e.g. GPU atomics) would make a later pass differ from the first: the
    run must say so, not silently mix two harvests. Here every second computation moves one value."""
    from precompute.pipeline.context import RunContext
    from precompute.pipeline.shard_source import RecomputedShards, shard_computer

    cfg = make_cfg(tiny_model_dir, tiny_sae_dir, tiny_corpus, tmp_path / "c", batches_per_shard=2)
    computer = shard_computer(RunContext(cfg, tmp_path / "c"))
    calls: dict[int, int] = {}
    exact = computer.compute

    def drifting(index: int, *args, **kwargs):
        arrays = exact(index, *args, **kwargs)
        calls[index] = calls.get(index, 0) + 1
        if calls[index] % 2 == 0 and len(arrays["value"]):
            arrays["value"][0] = np.nextafter(arrays["value"][0], np.float32(np.inf))
        return arrays

    computer.compute = drifting  # type: ignore[method-assign]
    source = RecomputedShards(computer, "float32")
    for _ in range(2):
        for ref in source.refs():
            load_arrays(ref)
    assert source.mismatched == set(range(computer.n_shards)) and computer.n_shards >= 3
    assert source.summary()["mismatched_shards"] == computer.n_shards
    assert capsys.readouterr().out.count("computed again differs from its first computation") == 1
    honest = RecomputedShards(shard_computer(RunContext(cfg, tmp_path / "c")), "float32")
    for _ in range(2):
        for ref in honest.refs():
            load_arrays(ref)
    assert honest.mismatched == set()
