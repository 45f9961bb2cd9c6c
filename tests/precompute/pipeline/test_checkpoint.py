"""The bounded-disk harvest's checkpoint: an exact round trip, and a checkpoint is used only when it is
complete and was saved under the same key."""

from __future__ import annotations

import numpy as np

from precompute.pipeline.checkpoint import (
    aggregate_from_state,
    aggregate_state,
    has_checkpoints,
    load_state,
    resume_or_run,
    save_state,
)


def test_an_aggregation_state_round_trips_exactly(tmp_path) -> None:
    """The shapes `aggregate` returns: arrays of several dtypes, group names, (group, category) tuples
    and a token count."""
    rng = np.random.default_rng(0)
    agg = {
        "groups": ["benign", "harmful", "task"],
        "categories": [("benign", ""), ("harmful", "cyber"), ("task", "insecure_code")],
        "ctop_categories": [("harmful", "cyber")],
        "total_tokens": np.int64(1234),
        "fires": rng.integers(0, 9, 16).astype(np.int64),
        "act_max": rng.random(16).astype(np.float32),
        "top_ctx": rng.integers(-1, 50, (16, 5)).astype(np.int32),
        "hist_group": rng.integers(0, 3, (16, 3, 4)).astype(np.int32),
    }
    save_state(tmp_path / "aggregate", aggregate_state(agg), "k")
    back = aggregate_from_state(load_state(tmp_path / "aggregate", "k") or {})
    assert back.keys() == agg.keys()
    for key, value in agg.items():
        if isinstance(value, np.ndarray):
            assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key
        else:
            assert back[key] == value and type(back[key]) is type(value if key != "total_tokens" else 1), key


def test_a_state_is_used_only_when_complete_and_under_its_key(tmp_path) -> None:
    state = {"x": np.arange(4, dtype=np.int16), "names": ["a", "b"], "n": 3}
    save_state(tmp_path / "s", state, "key-1")
    loaded = load_state(tmp_path / "s", "key-1")
    assert loaded is not None and loaded["names"] == ["a", "b"] and loaded["n"] == 3
    assert loaded["x"].dtype == np.int16 and np.array_equal(loaded["x"], state["x"])
    assert load_state(tmp_path / "s", "key-2") is None
    (tmp_path / "s.npz").write_bytes(b"not an npz")  # damaged on disk: ignored, so the passes run again
    assert load_state(tmp_path / "s", "key-1") is None
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
