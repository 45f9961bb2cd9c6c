"""A fine-tune killed between checkpoints resumes and ends with the adapter an uninterrupted run makes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from precompute.errors import FeatureGeomError
from precompute.lab.finetune import ADAPTER_DIR, finetune
from precompute.lab.finetune_checkpoint import TrainingStopped, checkpoint_path
from tests.precompute.lab.test_finetune import _cfg


def _adapter(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / ADAPTER_DIR / "adapter_model.safetensors"))


def test_a_stopped_run_resumes_to_the_uninterrupted_adapter(tiny_model_dir, tiny_corpus, tmp_path) -> None:
    whole = finetune(
        _cfg(tiny_model_dir, tiny_corpus["task"], tmp_path / "whole", steps=6, checkpoint_every=2)
    )
    out = tmp_path / "resumed"
    cfg = _cfg(tiny_model_dir, tiny_corpus["task"], out, steps=6, checkpoint_every=2)
    with pytest.raises(TrainingStopped):
        finetune(cfg, stop_after=3)  # checkpointed at 2 and at 3 (the stop), then "killed"
    assert checkpoint_path(out).is_file() and not out.exists()
    resumed = finetune(cfg)
    want, got = _adapter(whole), _adapter(resumed)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    a, b = (json.loads((p / "finetune.json").read_text()) for p in (whole, resumed))
    assert b["resumed_from_step"] == 3 and a["resumed_from_step"] is None
    assert a["heldout_loss_before"] == b["heldout_loss_before"]
    assert a["heldout_loss_after"] == b["heldout_loss_after"]
    assert (whole / "train_log.csv").read_text() == (resumed / "train_log.csv").read_text()
    assert not checkpoint_path(out).exists()  # the finished output replaced it


def test_a_checkpoint_of_other_settings_is_refused_and_overwrite_discards_it(
    tiny_model_dir, tiny_corpus, tmp_path
) -> None:
    out = tmp_path / "run"
    with pytest.raises(TrainingStopped):
        finetune(_cfg(tiny_model_dir, tiny_corpus["task"], out, steps=6, checkpoint_every=2), stop_after=2)
    other = _cfg(tiny_model_dir, tiny_corpus["task"], out, steps=6, checkpoint_every=2, lr=5e-4)
    with pytest.raises(FeatureGeomError, match="other settings or data; pass --overwrite"):
        finetune(other)
    with pytest.raises(FeatureGeomError, match="other settings or data"):  # other data, same options
        finetune(_cfg(tiny_model_dir, tiny_corpus["control"], out, steps=6, checkpoint_every=2))
    info = json.loads(
        (
            finetune(
                _cfg(
                    tiny_model_dir,
                    tiny_corpus["task"],
                    out,
                    steps=6,
                    checkpoint_every=2,
                    lr=5e-4,
                    overwrite=True,
                )
            )
            / "finetune.json"
        ).read_text()
    )
    assert info["resumed_from_step"] is None


def test_an_unreadable_checkpoint_is_a_clear_error(tiny_model_dir, tiny_corpus, tmp_path) -> None:
    out = tmp_path / "run"
    checkpoint_path(out).write_bytes(b"not a checkpoint")
    with pytest.raises(FeatureGeomError, match="not a readable checkpoint"):
        finetune(_cfg(tiny_model_dir, tiny_corpus["task"], out, steps=2))
