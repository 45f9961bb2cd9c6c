"""`featuregeom steer`: help, a run on the tiny model that writes its table, and a clear error."""

from __future__ import annotations

import pytest

from precompute.cli import main
from precompute.lab.steering_results import load_steering


def test_cli_help_and_run(tiny_model_dir, tiny_sae_dir, tiny_corpus, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["steer", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--task-feature" in out and "--alphas" in out and "--harmful-feature" in out
    target = tmp_path / "steer.json"
    rc = main(
        [
            "steer",
            "--model",
            str(tiny_model_dir),
            "--sae",
            str(tiny_sae_dir),
            "--task-feature",
            "0",
            "--harmful-feature",
            "1",
            "--prompts",
            str(tiny_corpus["benign"]),
            "--n-prompts",
            "4",
            "--alphas",
            "0.05,0.5",
            "--device",
            "cpu",
            "--out",
            str(target),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "harmful feature 1" in out and "active" in out and target.is_file()
    assert set(load_steering(target)["alpha"]) == {0.05, 0.5}
    assert (
        main(
            [
                "steer",
                "--model",
                str(tiny_model_dir),
                "--sae",
                str(tiny_sae_dir),
                "--task-feature",
                "999",
                "--device",
                "cpu",
                "--prompts",
                str(tiny_corpus["benign"]),
            ]
        )
        == 2
    )
    assert "out of range" in capsys.readouterr().err


def test_steer_without_a_task_feature_says_so(capsys):
    assert main(["steer", "--alphas", "0.1"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "featuregeom: error: `featuregeom steer` needs --task-feature (on the command line or in --config)"
    ]
