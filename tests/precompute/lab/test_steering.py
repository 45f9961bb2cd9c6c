"""Steering check on the tiny random Llama + tiny SAEs: the hook adds exactly α·d̂, α = 0 changes
nothing, a ReLU SAE with every feature active follows the first-order prediction exactly, a TopK SAE
nearly so for small α."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from explorer.figures.steering import steering_figure
from precompute.errors import FeatureGeomError
from precompute.lab.steering import steer_hook, steering_check
from precompute.lab.steering_results import (
    FEATURE_COLUMNS,
    SUBSETS,
    fit_slope,
    load_steering,
    save_steering,
    summarize,
)
from precompute.model.hooks import HookPoint, HookReader, resolve_hook
from precompute.model.load import load_model
from tests.tiny import make_sae

HOOK = "blocks.1.hook_resid_post"
PROMPTS = [f"How do I bake a cake for {i} friends? Use flour and sugar." for i in range(5)] + [
    "Write a handler that reads a file.",
    "The quick brown fox jumps over the lazy dog.",
]


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


def _batch(lm, texts):
    enc = lm.tokenizer(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def _direction(seed=3, d=32):
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- hook
@pytest.mark.parametrize("hook_name", [HOOK, "blocks.1.hook_resid_pre", "model.layers.0"])
def test_steer_hook_adds_exactly_alpha_unit_direction_at_chosen_positions(tiny_lm, hook_name):
    hook = resolve_hook(tiny_lm.model, hook_name)
    reader = HookReader(tiny_lm.model, hook)
    ids, attention = _batch(tiny_lm, PROMPTS[:3])
    base = reader(ids, attention)
    direction = _direction()
    unit = direction / direction.norm()
    positions = torch.zeros(ids.shape, dtype=torch.bool)
    positions[:, 1::2] = True
    alpha = 0.37
    with steer_hook(tiny_lm.model, hook, direction, alpha, positions=positions):
        steered = reader(ids, attention)
    torch.testing.assert_close(steered[positions], base[positions] + alpha * unit, rtol=0, atol=1e-6)
    assert torch.equal(steered[~positions], base[~positions])  # untouched positions: bit-for-bit
    with steer_hook(tiny_lm.model, hook, direction, alpha):  # every position
        everywhere = reader(ids, attention)
    torch.testing.assert_close(everywhere - base, (alpha * unit).expand_as(base), rtol=0, atol=1e-6)
    assert torch.equal(reader(ids, attention), base)  # the hook is removed on exit


def test_steer_hook_handles_tuple_outputs_and_checks_shapes():
    class Block(torch.nn.Module):
        def forward(self, x):
            return x * 2.0, "extra"

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, x):
            return self.block(x)

    net, x = Net(), torch.randn(2, 3, 4)
    with steer_hook(net, HookPoint("block", "block"), torch.tensor([0.0, 3.0, 0.0, 4.0]), 5.0):
        out, extra = net(x)
    assert extra == "extra"
    torch.testing.assert_close(out, x * 2.0 + torch.tensor([0.0, 3.0, 0.0, 4.0]))
    with pytest.raises(FeatureGeomError), steer_hook(net, HookPoint("block", "block"), torch.zeros(4), 1.0):
        pass
    with steer_hook(net, HookPoint("block", "block"), torch.ones(4), 1.0, positions=torch.ones(2, 2)):
        with pytest.raises(FeatureGeomError):
            net(x)


# ------------------------------------------------------------------------------------------ check
def test_alpha_zero_gives_exactly_zero_change(tiny_lm):
    sae = make_sae(32, 64, k=4)
    df = steering_check(tiny_lm, HOOK, sae, task_feature=5, alphas=[0.0, 0.5], prompts=PROMPTS, batch_size=3)
    assert list(df.columns) == list(FEATURE_COLUMNS) and len(df) == 2 * 64
    zero = df[df["alpha"] == 0.0]
    assert (
        (zero["observed"] == 0).all() and (zero["observed_pre"] == 0).all() and (zero["predicted"] == 0).all()
    )
    assert (zero["switched_frac"] == 0).all()
    assert (df[df["alpha"] == 0.5]["observed"] != 0).any()
    meta = df.attrs["meta"]
    assert meta["n_tokens"] > 0 and max(meta["hook_max_error"]) <= 1e-6
    assert max(meta["untouched_max_change"]) == 0.0
    assert df.loc[df["is_task"], "feature"].unique().tolist() == [5]


def test_relu_sae_with_every_feature_active_matches_the_prediction_exactly(tiny_lm):
    sae = make_sae(32, 64, architecture="standard", seed=1)
    sae.b_enc = torch.full((64,), 1.0)  # far above |W_enc·h| and the shift: every feature stays active
    df = steering_check(tiny_lm, HOOK, sae, task_feature=7, alphas=[0.1, 0.5, 1.0], prompts=PROMPTS)
    assert (
        (df["active_frac"] == 1).all()
        and (df["switched_frac"] == 0).all()
        and (df["observed_switch"] == 0).all()
    )
    np.testing.assert_allclose(df["predicted_gated"], df["predicted"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(df["observed"], df["predicted"], rtol=1e-3, atol=1e-6)
    summary = summarize(df)
    assert set(summary["subset"]) == set(SUBSETS)
    for subset in SUBSETS:
        part = summary[summary["subset"] == subset]
        np.testing.assert_allclose(part["slope"], 1.0, atol=1e-5)
        np.testing.assert_allclose(part["r2"], 1.0, atol=1e-5)
    # the task feature reads its own direction: I_tt = w_t·d̂_t
    task = df[df["is_task"]].iloc[0]
    assert task["interference"] == pytest.approx(float(sae.W_enc[:, 7] @ sae.unit_directions()[7]), rel=1e-5)


def test_input_normalisation_scales_the_prediction(tiny_lm):
    sae = make_sae(32, 64, architecture="standard", seed=1)
    sae.b_enc = torch.full((64,), 1.0)
    sae.normalize_activations, sae.norm_scaling_factor = "expected_average_only_in", 3.0
    df = steering_check(tiny_lm, HOOK, sae, task_feature=7, alphas=[0.2], prompts=PROMPTS)
    np.testing.assert_allclose(
        df["predicted"], 0.2 * df.attrs["meta"]["alpha_scale"] * 3.0 * df["interference"], rtol=1e-6
    )
    slope, r2, _ = fit_slope(df["observed"], df["predicted"])
    assert slope == pytest.approx(1.0, abs=1e-5) and r2 == pytest.approx(1.0, abs=1e-5)


def test_topk_sae_follows_the_prediction_on_active_features_for_small_alpha(tiny_lm):
    sae = make_sae(32, 64, k=4, seed=2)
    df = steering_check(
        tiny_lm, HOOK, sae, task_feature=3, alphas=[1e-4, 0.1], prompts=PROMPTS, alpha_unit="norm"
    )
    summary = summarize(df).set_index(["alpha", "subset"])
    small = summary.loc[(1e-4, "active")]
    assert df[df["alpha"] == 1e-4]["switched_frac"].sum() == 0  # below every top-k gap: no set changes
    assert small["slope"] == pytest.approx(1.0, abs=1e-3) and small["r2"] > 0.999
    assert summary.loc[(0.1, "pre-activation"), "r2"] == pytest.approx(1.0, abs=1e-5)
    # a larger shift changes TopK sets; each entry/exit jumps by about the k-th pre-activation, which is
    # not small, so those few tokens dominate the mean change and the first-order fit breaks
    large = df[df["alpha"] == 0.1]
    assert large["switched_frac"].sum() > 0 and df.attrs["meta"]["switch_share"][1] > 0.5
    assert summary.loc[(0.1, "active"), "r2"] < 0.9
    assert df.attrs["meta"]["architecture"] == "topk"


def test_feature_subset_and_errors(tiny_lm):
    sae = make_sae(32, 64, k=4)
    df = steering_check(
        tiny_lm, HOOK, sae, task_feature=1, alphas=[0.1], prompts=PROMPTS, features=[1, 9, 20]
    )
    assert df["feature"].tolist() == [1, 9, 20]
    with pytest.raises(FeatureGeomError, match="out of range"):
        steering_check(tiny_lm, HOOK, sae, task_feature=64, alphas=[0.1], prompts=PROMPTS)
    with pytest.raises(FeatureGeomError, match="alpha unit"):
        steering_check(tiny_lm, HOOK, sae, task_feature=0, alphas=[0.1], prompts=PROMPTS, alpha_unit="bogus")


# ---------------------------------------------------------------------------------- files, figure
def test_save_load_and_figure(tiny_lm, tmp_path):
    sae = make_sae(32, 64, k=4)
    df = steering_check(tiny_lm, HOOK, sae, task_feature=2, alphas=[0.1, 0.5], prompts=PROMPTS)
    for name in ("s.json", "s.parquet"):
        back = load_steering(save_steering(df, tmp_path / name))
        pd.testing.assert_frame_equal(
            back.reset_index(drop=True), df.reset_index(drop=True), check_dtype=False
        )
        assert back.attrs["meta"]["task_feature"] == 2 and len(back.attrs["summary"]) == 2 * len(SUBSETS)
    fig = steering_figure(df, task_feature=2, harmful_feature=11)
    names = [t.name for t in fig.data]
    assert any(n.startswith("α=0.1") for n in names) and "harmful feature 11" in names
    assert "task feature 2" in names and "y = x" in names
    without = steering_figure(df, task_feature=2, harmful_feature=11, show_task=False)
    assert "task feature 2" not in [t.name for t in without.data]
    assert all(2 not in set(t.customdata[:, 0]) for t in without.data if t.name.startswith("α="))
    empty = steering_figure(df.iloc[0:0], task_feature=2)
    assert [t.name for t in empty.data] == ["y = x"]
