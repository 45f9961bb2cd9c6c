"""The command line as a whole: one registry, one entry point, every command configurable by file."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from precompute.cli import build_parser, commands, main

ROOT = Path(__file__).resolve().parents[1]


def _subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices


def test_every_command_takes_a_config_file_and_is_registered_once():
    subs = _subparsers()
    names = [c.name for c in commands()]
    assert len(names) == len(set(names))
    assert set(names) == set(subs)  # nothing registered outside the registry
    for name, sub in subs.items():
        assert any(a.dest == "config" for a in sub._actions), f"{name} has no --config"


def test_every_precompute_option_is_a_flag_of_precompute():
    """The README names options as flags (`--shard-values`); one missing from the command line could only
    be set in a TOML file."""
    import dataclasses

    from precompute.pipeline.commands import PrecomputeOptions

    sub = _subparsers()["precompute"]
    dests = {a.dest for a in sub._actions}
    fields = {f.name for f in dataclasses.fields(PrecomputeOptions)}
    assert fields - dests == set()
    assert {"shard_values", "shard_compression", "shard_storage"} <= dests


def test_no_default_is_written_twice_in_a_help_line():
    for name, sub in _subparsers().items():
        for action in sub._actions:
            assert (action.help or "").count("(default") <= 1, (name, action.dest, action.help)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_no_module_imports_the_cli_and_the_engine_never_imports_the_explorer():
    offenders = []
    for path in sorted((ROOT / "precompute").rglob("*.py")) + sorted((ROOT / "explorer").rglob("*.py")):
        if path.name == "__main__.py" and path.parent.name == "precompute":
            continue
        names = _imports(path)
        if "precompute.cli" in names or any(n.startswith("precompute.cli.") for n in names):
            offenders.append(f"{path.relative_to(ROOT)} imports precompute.cli")
        if path.is_relative_to(ROOT / "precompute") and any(n.split(".")[0] == "explorer" for n in names):
            offenders.append(f"{path.relative_to(ROOT)} imports explorer")
    assert offenders == []


def test_python_dash_m_precompute_is_the_featuregeom_command():
    run = subprocess.run(
        [sys.executable, "-m", "precompute", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert run.returncode == 0
    for command in commands():
        assert command.name in run.stdout
    bare = subprocess.run([sys.executable, "-m", "precompute"], capture_output=True, text=True, cwd=ROOT)
    assert bare.returncode == 2


def test_demo_exits_zero_when_its_cache_is_ready(tiny_model_dir, tiny_sae_dir, tiny_corpus, tmp_path, capsys):
    """`make demo` chains `demo` and the server: `demo` must exit 0 after building and when the cache is
    already valid (it once returned the cache's path, which the error handler turned into exit 1)."""
    config = tmp_path / "demo.toml"
    corpus = "\n".join(
        f'[[corpus]]\npath = "{tiny_corpus[g]}"\ngroup = "{g}"\n'
        for g in ("task", "control", "harmful", "benign")
    )
    config.write_text(
        f'model = "{tiny_model_dir}"\nsae = "{tiny_sae_dir}"\nhook = "blocks.1.hook_resid_post"\n'
        f'out = "{tmp_path / "cache"}"\ncontext_size = 24\nbatch_size = 4\nneighbors = 8\n'
        f"top_k_examples = 5\numap_neighbors = 5\noutlier_norm_factor = 0\nprogress = false\n{corpus}"
    )
    assert main(["demo", "--config", str(config)]) == 0  # builds
    assert main(["demo", "--config", str(config)]) == 0  # already valid
    assert "is ready" in capsys.readouterr().out

    # a cache from an earlier version: its checksums verify, but neighbors.npz lacks today's arrays
    import json

    import numpy as np

    from precompute.provenance import sha256_of

    cache = tmp_path / "cache"
    with np.load(cache / "neighbors.npz") as z:
        old = {k: z[k] for k in z.files if k not in ("null_kind", "null_covariance")}
    np.savez(cache / "neighbors.npz", **old)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["files"]["neighbors.npz"] = sha256_of(cache / "neighbors.npz")
    (cache / "manifest.json").write_text(json.dumps(manifest))
    assert main(["demo", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "rebuilding" in out and "null_kind" in out and "is ready" not in out
    assert main(["demo", "--config", str(config)]) == 0  # the rebuilt cache is today's
    assert "is ready" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["precompute", "--steps", "harvest,nope"], ["info", "/nonexistent/cache"]])
def test_user_errors_exit_2_with_one_line(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("featuregeom: error:")
