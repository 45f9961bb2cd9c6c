"""train-sae under torchrun: two gloo processes on CPU take the same steps as one process with the
whole batch (float-order differences only), and the SAE they write loads and scores as well."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from precompute.training.store import ShuffledBatches

ROOT = Path(__file__).resolve().parents[3]


def test_parts_of_a_batch_are_the_batch() -> None:
    data = torch.arange(200, dtype=torch.float32)[:, None].repeat(1, 3)
    batches = ShuffledBatches(data, 40, seed=1)
    for step in (0, 7):
        whole = batches.batch(step)
        parts = torch.cat([batches.batch(step, (r, 4)) for r in range(4)])
        assert torch.equal(parts, whole)


def _argv(setup: Path, out: Path, work: Path) -> list[str]:
    return [
        "train-sae", "--model", str(setup / "model"), "--hook", "blocks.1.hook_resid_post",
        "--corpus", f"{setup / 'corpus.txt'}:general", "--d-sae", "64", "--k", "4", "--steps", "40",
        "--batch-size", "128", "--lr", "3e-3", "--context-size", "32", "--heldout-fraction", "0.15",
        "--eval-ce-tokens", "300", "--checkpoint-every", "20", "--out", str(out), "--work-dir", str(work),
        "--no-progress", "--aux-coef", "0.03125", "--dead-after-tokens", "2000",
    ]  # fmt: skip


@pytest.mark.slow
def test_two_processes_train_the_same_sae(tiny_setup: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {
        "one": [sys.executable, "-m", "precompute"],
        "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "precompute"],
    }  # fmt: skip
    for name, launch in runs.items():
        argv = [*launch, *_argv(tiny_setup, tmp_path / name, tmp_path / f"{name}.work")]
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    from safetensors.torch import load_file

    from precompute.sae.registry import load_sae

    one, two = (load_file(tmp_path / n / "sae_weights.safetensors") for n in ("one", "two"))
    for key in one:  # 40 Adam steps from the same init: only the order of float sums differs
        torch.testing.assert_close(two[key], one[key], rtol=1e-3, atol=1e-4)
    reports = [json.loads((tmp_path / n / "training_report.json").read_text()) for n in ("one", "two")]
    ev = [r["eval"]["explained_variance"] for r in reports]
    assert abs(ev[0] - ev[1]) < 1e-3, ev
    curves = [[p["fvu"] for p in r["curve"]] for r in reports]
    assert curves[0] == pytest.approx(curves[1], rel=1e-3, abs=1e-4)  # the logged loss is the whole batch's
    assert load_sae(str(tmp_path / "two")).d_sae == 64
