"""The step registry: one ordered list of steps, used by the command line and the orchestration."""

from __future__ import annotations

import importlib

import pytest

from precompute.cli import main as cli_main
from precompute.errors import FeatureGeomError
from precompute.pipeline import commands
from precompute.pipeline.config import RunConfig
from precompute.pipeline.run import run_step
from precompute.pipeline.steps import STEPS


def test_steps_run_in_the_order_harvest_geometry_scores_overlaps_closeness_stability_labels():
    assert list(STEPS) == ["harvest", "geometry", "scores", "overlaps", "closeness", "stability", "labels"]
    assert commands.STEPS == tuple(STEPS)
    assert [name for name, step in STEPS.items() if step.name != name] == []


def test_every_step_module_has_a_run_function():
    for step in STEPS.values():
        assert callable(importlib.import_module(step.module).run), step.name


def test_only_geometry_may_start_a_cache_and_only_harvest_reads_the_corpus():
    assert [s.name for s in STEPS.values() if s.starts_cache] == ["geometry"]
    assert [s.name for s in STEPS.values() if "corpus" in s.needs] == ["harvest"]


def test_an_unknown_step_is_one_clear_error(capsys):
    assert cli_main(["precompute", "--steps", "nope"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert (
        "unknown step(s) ['nope']; steps are harvest, geometry, scores, overlaps, closeness, stability, labels"
        in lines[0]
    )


def test_run_step_refuses_an_unknown_step(tmp_path):
    with pytest.raises(
        FeatureGeomError,
        match="unknown step 'nope'; steps are harvest, geometry, scores, overlaps, closeness",
    ):
        run_step("nope", RunConfig(out=str(tmp_path / "cache")))
