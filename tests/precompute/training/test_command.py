"""`featuregeom train-sae` end to end on a tiny model (`precompute.training.command`)."""

from __future__ import annotations

import json

import torch

from precompute.cli import main as cli_main


def main(argv: list[str]) -> int:
    return cli_main(["train-sae", *argv])


def test_end_to_end_on_a_tiny_model(tiny_setup, tmp_path, capsys):
    from precompute.sae.registry import load_sae

    out, work = tmp_path / "sae", tmp_path / "work"
    argv = [
        "--model",
        str(tiny_setup / "model"),
        "--hook",
        "blocks.1.hook_resid_post",
        "--corpus",
        f"{tiny_setup / 'corpus.txt'}:general",
        "--d-sae",
        "64",
        "--k",
        "4",
        "--steps",
        "30",
        "--batch-size",
        "128",
        "--lr",
        "3e-3",
        "--context-size",
        "32",
        "--heldout-fraction",
        "0.15",
        "--eval-ce-tokens",
        "300",
        "--checkpoint-every",
        "10",
        "--buffer-tokens",
        "1000",  # more rows than this: the disk store is read block by block
        "--out",
        str(out),
        "--work-dir",
        str(work),
        "--no-progress",
    ]
    assert main(argv) == 0
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 4 and cfg["d_in"] == 32 and cfg["d_sae"] == 64
    meta = cfg["metadata"]
    assert meta["hook_name"] == "blocks.1.hook_resid_post"
    assert meta["norm_scaling_factor_folded"] > 0
    for key in (
        "explained_variance",
        "explained_variance_no_outliers",
        "l0",
        "dead_fraction",
        "ce_clean",
        "ce_spliced",
        "ce_zero_ablated",
        "ce_recovered",
    ):
        assert key in meta["eval"], key
    assert 0 < meta["eval"]["l0"] <= 4
    report = json.loads((out / "training_report.json").read_text())
    assert report["curve"] and report["corpus"][0]["sha256"] and report["training"]["steps"] == 30
    assert report["corpus"][0]["heldout_tokens"] > 0
    assert (out / "sparsity.safetensors").is_file()
    sae = load_sae(str(out))
    assert sae.d_sae == 64 and sae.k == 4 and sae.hook_name == "blocks.1.hook_resid_post"
    assert not (work / "train_activations.npy").exists()  # the store is dropped after success
    # A second run refuses to overwrite; --overwrite replaces.
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0
    # --eval-only re-scores the written SAE without training and records the new figures.
    before = (out / "sae_weights.safetensors").read_bytes()
    assert main(argv + ["--eval-only", "--eval-ce-tokens", "0"]) == 0
    assert (out / "sae_weights.safetensors").read_bytes() == before
    meta = json.loads((out / "cfg.json").read_text())["metadata"]
    assert "ce_clean" not in meta["eval"] and meta["eval"]["explained_variance_no_outliers"] <= 1
    assert len(json.loads((out / "training_report.json").read_text())["evaluations"]) == 1


def test_rerunning_an_interrupted_command_resumes(tiny_setup, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from precompute.training import command

    def argv(name: str) -> list[str]:
        return [
            "--model",
            str(tiny_setup / "model"),
            "--hook",
            "blocks.0.hook_resid_post",
            "--corpus",
            f"{tiny_setup / 'corpus.txt'}:general",
            "--d-sae",
            "48",
            "--k",
            "3",
            "--steps",
            "25",
            "--batch-size",
            "96",
            "--lr",
            "3e-3",
            "--context-size",
            "32",
            "--eval-ce-tokens",
            "100",
            "--checkpoint-every",
            "5",
            "--out",
            str(tmp_path / name / "sae"),
            "--work-dir",
            str(tmp_path / name / "work"),
            "--no-progress",
        ]

    assert main(argv("straight")) == 0
    real_fit = command.fit

    def crash_after_12_steps(*args, **kwargs):
        real_fit(*args, **{**kwargs, "stop_at": 12})
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "fit", crash_after_12_steps)
    assert main(argv("interrupted")) == 130  # Ctrl-C: one line, exit 130, no traceback
    assert not (tmp_path / "interrupted" / "sae").exists()
    monkeypatch.setattr(command, "fit", real_fit)
    assert main(argv("interrupted")) == 0  # the same command again: resumes at step 12
    report = json.loads((tmp_path / "interrupted" / "sae" / "training_report.json").read_text())
    assert report["timing"]["resumed_from_step"] == 12
    a = load_file(str(tmp_path / "straight" / "sae" / "sae_weights.safetensors"))
    b = load_file(str(tmp_path / "interrupted" / "sae" / "sae_weights.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), name
