"""Property-based: whatever the config values and numeric options, the CLI ends in success or one
clear error (exit 2) — never a traceback, never an internal error, never a half-written cache."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from precompute.cache import verify_cache
from precompute.cli import main as cli_main

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

OPTIONS = (
    "neighbors",
    "umap_neighbors",
    "umap_min_dist",
    "null_fpr",
    "seed",
    "knn_backend",
    "device",
    "progress",
    "batch_size",
    "top_k_examples",
    "harm_threshold",
    "n_task",
    "sae_format",
    "max_tokens",
)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


scalars = st.one_of(
    st.integers(-5, 100),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.sampled_from(["", "abc", "cpu", "cuda", "auto", "torch", "faiss", "0", "-1", "1e9"]),
)
values = st.one_of(
    scalars, st.lists(scalars, max_size=3), st.dictionaries(st.sampled_from(["a", "b"]), scalars, max_size=2)
)


def check_outcome(rc: int, err: str, out: Path) -> None:
    assert rc in (0, 2), (rc, err)
    assert "Traceback" not in err and "internal error" not in err, err
    if rc == 0:
        verify_cache(out)  # a complete cache whose every file matches its checksum
    else:
        assert err.count("featuregeom: error:") == 1, err
        assert not out.exists(), "a failed first run must leave no cache behind"
    leftovers = [p.name for p in out.parent.iterdir() if p.name not in (out.name, "run.toml")]
    assert not leftovers, leftovers


@SETTINGS
@given(config=st.dictionaries(st.sampled_from(OPTIONS), values, max_size=4))
def test_any_config_values_give_success_or_one_clear_error(tiny_sae_dir, capsys, config):
    tmp = Path(tempfile.mkdtemp())
    try:
        (tmp / "run.toml").write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in config.items()))
        out = tmp / "cache"
        rc = cli_main(
            [
                "geometry",
                "--config",
                str(tmp / "run.toml"),
                "--sae",
                str(tiny_sae_dir),
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        check_outcome(rc, capsys.readouterr().err, out)
    finally:
        shutil.rmtree(tmp)


@SETTINGS
@given(
    neighbors=st.integers(-3, 80),
    umap_neighbors=st.integers(-3, 40),
    null_fpr=st.floats(-0.5, 1.5, allow_nan=False),
    seed=st.integers(-2, 2**33),
)
def test_any_numeric_flags_give_success_or_one_clear_error(
    tiny_sae_dir, capsys, neighbors, umap_neighbors, null_fpr, seed
):
    tmp = Path(tempfile.mkdtemp())
    try:
        out = tmp / "cache"
        # `--flag=VALUE`: argparse would read a bare "-1e-05" as an option name
        rc = cli_main(
            [
                "geometry",
                "--sae",
                str(tiny_sae_dir),
                "--out",
                str(out),
                f"--neighbors={neighbors}",
                f"--umap-neighbors={umap_neighbors}",
                f"--null-fpr={null_fpr!r}",
                f"--seed={seed}",
                "--no-progress",
            ]
        )
        check_outcome(rc, capsys.readouterr().err, out)
    finally:
        shutil.rmtree(tmp)
