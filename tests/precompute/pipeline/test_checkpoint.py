"""The bounded-disk harvest's checkpoints: exact round trips, and a checkpoint is used only when it is
complete and was saved under the same key."""

from __future__ import annotations

import numpy as np

from precompute.pipeline.checkpoint import (
    activations_from_state,
    activations_state,
    has_checkpoints,
    load_state,
    resume_or_run,
    save_state,
)


def test_activation_arrays_round_trip_exactly(tmp_path) -> None:
    rng = np.random.default_rng(0)
    acts = {
        (c, f): rng.random(int(rng.integers(1, 9))).astype(np.float32) for c, f in [(3, 1), (0, 7), (3, 0)]
    }
    for case in (acts, {}):
        save_state(tmp_path / "a", activations_state(case), "k")
        back = activations_from_state(load_state(tmp_path / "a", "k") or {})
        assert back.keys() == case.keys()
        assert all(np.array_equal(back[k], case[k]) and back[k].dtype == np.float32 for k in case)


def test_a_state_is_used_only_when_complete_and_under_its_key(tmp_path) -> None:
    state = {"x": np.arange(4, dtype=np.int16), "names": ["a", "b"], "n": 3}
    save_state(tmp_path / "s", state, "key-1")
    loaded = load_state(tmp_path / "s", "key-1")
    assert loaded is not None and loaded["names"] == ["a", "b"] and loaded["n"] == 3
    assert loaded["x"].dtype == np.int16 and np.array_equal(loaded["x"], state["x"])
    assert load_state(tmp_path / "s", "key-2") is None
    (tmp_path / "s.json").unlink()  # killed between the arrays and the values: not complete
    assert load_state(tmp_path / "s", "key-1") is None and not has_checkpoints(tmp_path)


def test_resume_or_run_computes_once(tmp_path) -> None:
    calls = []

    def compute() -> dict:
        calls.append(1)
        return {"v": np.ones(2)}

    first = resume_or_run(tmp_path, "r", "k", compute, dict, dict)
    second = resume_or_run(tmp_path, "r", "k", compute, dict, dict)
    assert len(calls) == 1 and np.array_equal(first["v"], second["v"])
    resume_or_run(None, "r", "k", compute, dict, dict)  # no work folder: no checkpoint
    assert len(calls) == 2
