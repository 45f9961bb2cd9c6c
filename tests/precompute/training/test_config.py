"""Options of `train-sae` (`precompute.training.config`): TOML, flags, ranges and their messages."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from precompute.errors import FeatureGeomError
from precompute.training.config import TrainSAEConfig

ROOT = Path(__file__).resolve().parents[3]


def test_config_file_and_flags(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        'd_sae = 128\nk = 8\nout = "x"\n[[corpus]]\npath = "a.txt"\ngroup = "benign"\nmax_tokens = 5\n'
    )
    cfg = TrainSAEConfig.load(path, {"k": 16, "corpus": None})
    assert (cfg.d_sae, cfg.k, cfg.corpus[0].group, cfg.corpus[0].max_tokens) == (128, 16, "benign", 5)
    cfg = TrainSAEConfig.load(path, {"corpus": ["b.txt:task:cat"]})
    assert [(c.path, c.group, c.category) for c in cfg.corpus] == [("b.txt", "task", "cat")]
    path.write_text("dsae = 3\n")
    with pytest.raises(FeatureGeomError, match="unknown option"):
        TrainSAEConfig.load(path, {})
    with pytest.raises(FeatureGeomError, match="needs a corpus"):
        TrainSAEConfig.load(None, {"out": "x"})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"heldout_fraction": 1.0}, "--heldout-fraction must be in (0, 1), got 1.0"),
        ({"batch_size": 1}, "--batch-size must be in [2, inf), got 1"),
        ({"steps": 0}, "--steps must be in [1, inf), got 0"),
        ({"decay_fraction": 1.5}, "--decay-fraction must be in [0, 1], got 1.5"),
        ({"aux_k": -1}, "--aux-k must be in [0, inf), got -1"),
        ({"store_dtype": "int8"}, "--store-dtype must be one of float16, float32, got 'int8'"),
        ({"init_b_dec": "median"}, "--init-b-dec must be one of geometric_median, mean, zeros"),
        ({"seed": -1}, "--seed must be in [0, 4.29497e+09], got -1"),
        ({"k": 0}, "need d_sae >= 1 and 0 < k <= d_sae; got d_sae=4096, k=0"),
        ({"d_sae": 8, "k": 16}, "need d_sae >= 1 and 0 < k <= d_sae; got d_sae=8, k=16"),
        ({"epochs": 0.0}, "--epochs must be positive (or give --steps)"),
        ({"overwrite": True, "resume": True}, "--overwrite discards the checkpoint that --resume asks for"),
        ({"eval_only": True, "resume": True}, "--eval-only re-scores an existing --out"),
    ],
)
def test_each_bad_value_is_one_clear_message(overrides, message):
    with pytest.raises(FeatureGeomError) as info:
        TrainSAEConfig.load(None, {"out": "x", "corpus": ["a.txt"], **overrides})
    assert message in str(info.value)


def test_the_committed_config_loads_with_its_keys_unchanged():
    cfg = TrainSAEConfig.load(ROOT / "configs" / "train-sae.toml", {"out": "x"})
    assert (cfg.d_sae, cfg.k, cfg.steps, cfg.lr, cfg.warmup_steps) == (4096, 32, 1200, 8e-4, 50)
    assert cfg.dead_after_tokens == 250_000 and cfg.eval_ce_tokens == 10_000 and len(cfg.corpus) > 10
    assert cfg.to_dict()["corpus"][0]["path"] == "assets/data/em/insecure.jsonl.gz"


def test_help_shows_each_option_and_its_default_once(capsys):
    from precompute.cli import main

    with pytest.raises(SystemExit):
        main(["train-sae", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in (("--d-sae", "4096"), ("--aux-coef", "0.03125"), ("--packing", "split")):
        assert f"{flag} " in text and f"(default {default})" in text
    assert "number of latents (default 4096)" in text and "per optimiser step (default 4096)" in text
    # one default per option: appended from the field, or spelled out where the field's is None
    shown = [
        f.name
        for f in dataclasses.fields(TrainSAEConfig)
        if f.default not in (dataclasses.MISSING, None) and not isinstance(f.default, bool)
    ]
    spelled = ("work_dir", "max_tokens", "lr", "warmup_steps", "eval_tokens", "keep_work", "data_seed")
    assert text.count("(default") == len(shown) + len(spelled)
    for flag in ("--work-dir", "--max-tokens", "--no-progress", "--eval-only", "--keep-work", "--resume"):
        assert f" {flag} " in text
