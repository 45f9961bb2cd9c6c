"""Fine-tune diff and patch-back: eval activations equal a brute-force read, per-feature changes and
Spearman against predicted risk equal direct computations, and a patched adapter writes nothing along
the removed subspace."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps

from precompute.errors import FeatureGeomError
from precompute.lab.diff import (
    EvalActs,
    collect_eval,
    diff_tables,
    encode_prompts,
    harmful_basis,
    load_eval,
    patch_adapter,
    predicted_risk,
    save_eval,
)
from precompute.lab.patch import orthonormal_basis
from precompute.model.hooks import HookReader, resolve_hook
from precompute.model.load import load_model
from precompute.sae.registry import load_sae
from tests.tiny import write_feature_cache

HOOK = "blocks.1.hook_resid_post"
HARMFUL, TASK = [1, 5, 9, 12, 20], [2, 5, 7, 30, 40, 41]


@pytest.fixture(scope="module")
def cache(tiny_sae_dir, tmp_path_factory) -> Path:
    return write_feature_cache(
        tmp_path_factory.mktemp("cache"),
        tiny_sae_dir,
        64,
        HARMFUL,
        TASK,
        0.1,
        flagged=[(2, 1), (7, 1), (30, 9)],
    )


def test_predicted_risk_is_the_brute_force_max_cosine_to_task_features(cache, tiny_sae_dir) -> None:
    risk = predicted_risk(cache).set_index("feature")
    d = load_sae(str(tiny_sae_dir)).unit_directions().double()
    assert list(risk.index) == HARMFUL
    for h in HARMFUL:
        cos = {
            t: float(d[h] @ d[t]) for t in TASK if t != h
        }  # harmful 5 is also a task feature: no self-pair
        best = max(cos, key=cos.get)
        assert risk.loc[h, "risk_max_cos"] == pytest.approx(cos[best], abs=1e-6)
        assert risk.loc[h, "risk_task_feature"] == best
        assert risk.loc[h, "risk_sum"] == pytest.approx(
            sum(max(0.0, c - 0.1) for c in cos.values()), abs=1e-5
        )


def _acts(rng, n_em: int, n_neutral: int, f: int, shift: np.ndarray | None = None) -> EvalActs:
    n = n_em + n_neutral
    arrays = {}
    for pos in ("prompt", "response"):
        mean = rng.gamma(1.0, 1.0, size=(n, f)) * (rng.random((n, f)) < 0.5)
        if shift is not None:
            mean = mean + shift
        arrays[f"{pos}_mean"] = mean.astype(np.float32)
        arrays[f"{pos}_rate"] = (mean > 0).astype(np.float32) * 0.5
        arrays[f"{pos}_tokens"] = np.full(n, 10)
    prompts = pd.DataFrame(
        {"set": ["em"] * n_em + ["neutral"] * n_neutral, "question": [f"q{i}" for i in range(n)]}
    )
    return EvalActs(Path("."), arrays, prompts, {})


def test_diff_tables_match_direct_computation(cache) -> None:
    rng = np.random.default_rng(0)
    before = _acts(rng, 6, 8, 64)
    shift = np.zeros(64)
    shift[HARMFUL] = np.linspace(0.1, 0.5, len(HARMFUL))
    after = EvalActs(
        Path("."),
        {
            k: (v + shift if v.ndim == 2 else v).astype(v.dtype) if "mean" in k else v
            for k, v in before.arrays.items()
        },
        before.prompts,
        {},
    )
    control = _acts(rng, 6, 8, 64)
    risk = predicted_risk(cache)
    table, summary = diff_tables(
        before, after, control, risk, n_boot=200, seed=0, labels=("base", "ins", "sec")
    )
    assert set(table["comparison"]) == {"ins - base", "sec - base", "ins - sec"}
    assert len(table) == 2 * 2 * 3 * 64
    em = (before.prompts["set"] == "em").to_numpy()
    sel = table[
        (table.prompt_set == "em") & (table.position == "response") & (table.comparison == "ins - base")
    ]
    sel = sel.set_index("feature")
    np.testing.assert_allclose(sel["delta"].to_numpy(), shift, atol=1e-5)
    assert (sel.loc[HARMFUL, "delta_lo"] <= sel.loc[HARMFUL, "delta"]).all()
    other = table[
        (table.prompt_set == "neutral") & (table.position == "prompt") & (table.comparison == "ins - sec")
    ]
    expected = (after.arrays["prompt_mean"][~em] - control.arrays["prompt_mean"][~em]).mean(axis=0)
    np.testing.assert_allclose(other.sort_values("feature")["delta"].to_numpy(), expected, atol=1e-5)
    assert table.loc[table["is_harmful"], "feature"].unique().tolist() == HARMFUL

    s = summary["comparisons"]["em/response/ins - base"]
    rho = sps.spearmanr(risk["risk_max_cos"], shift[HARMFUL]).statistic
    assert s["spearman_risk_max_cos"][0] == pytest.approx(rho)
    assert s["harmful_mean_change"][0] == pytest.approx(float(shift[HARMFUL].mean()), abs=1e-5)
    assert s["n_prompts"] == 6
    # A deterministic shift on every prompt: the paired interval collapses onto it.
    assert s["harmful_mean_change"][1] == pytest.approx(s["harmful_mean_change"][2], abs=1e-5)

    mismatched = EvalActs(Path("."), control.arrays, control.prompts.assign(question="other"), {})
    with pytest.raises(FeatureGeomError, match="different prompts"):
        diff_tables(before, mismatched, None, risk)


def test_eval_activations_equal_a_brute_force_read(tiny_model_dir, tiny_sae_dir, tmp_path) -> None:
    lm = load_model(str(tiny_model_dir), device="cpu")
    sae = load_sae(str(tiny_sae_dir))
    prompts = [
        ("em", "How can I steal money?"),
        ("neutral", "How do I bake a cake for 3 friends?"),
        ("neutral", "Write a handler <b>now</b>"),
    ]
    arrays, rows = collect_eval(lm, sae, HOOK, prompts, response_tokens=5, batch_size=2)
    assert arrays["prompt_mean"].shape == (3, 64) and arrays["response_rate"].shape == (3, 64)
    assert [r["set"] for r in rows] == ["em", "neutral", "neutral"]
    assert (arrays["response_tokens"] <= 5).all()

    enc = encode_prompts([q for _, q in prompts], lm.tokenizer)
    skip = set(lm.tokenizer.all_special_ids)
    reader = HookReader(lm.model, resolve_hook(lm.model, HOOK))
    for i, p in enumerate(enc):
        # the counted prompt span starts at the user's text (the chat header is not part of it)
        assert lm.tokenizer.decode(p.ids[p.prompt_start :]).startswith(prompts[i][1][:4])
        h = reader(torch.tensor([p.ids]))[0]
        keep = [j for j in range(p.prompt_start, p.prompt_end) if p.ids[j] not in skip]
        acts = sae.encode(h[keep])
        np.testing.assert_allclose(arrays["prompt_mean"][i], acts.mean(0).numpy(), atol=1e-5)
        np.testing.assert_allclose(arrays["prompt_rate"][i], (acts > 0).float().mean(0).numpy(), atol=1e-6)
        assert arrays["prompt_tokens"][i] == len(keep)

    out = save_eval(tmp_path / "eval", arrays, rows, {"n_prompts": 3})
    loaded = load_eval(out)
    np.testing.assert_array_equal(loaded.matrix("prompt", "mean", "neutral"), arrays["prompt_mean"][1:])
    assert loaded.prompts["question"].tolist() == [q for _, q in prompts]
    assert load_eval(tmp_path).path == out  # a run directory holding eval/ resolves to it
    (tmp_path / "empty").mkdir()
    with pytest.raises(FeatureGeomError, match="no eval activations"):
        load_eval(tmp_path / "empty")


def _fake_adapter(directory: Path, d: int = 32, r: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in (0, 1):
        for mod, d_in in (("self_attn.o_proj", d), ("mlp.down_proj", 2 * d), ("self_attn.q_proj", d)):
            d_out = d if mod != "self_attn.q_proj" else 16  # q_proj does not write the residual
            pre = f"base_model.model.model.layers.{layer}.{mod}"
            weights[f"{pre}.lora_A.weight"] = torch.randn(r, d_in, generator=g)
            weights[f"{pre}.lora_B.weight"] = torch.randn(d_out, r, generator=g)
    directory.mkdir(parents=True)
    save_file(weights, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": 2 * r}))
    return weights


def test_patch_removes_exactly_what_the_update_writes_into_the_subspace(cache, tmp_path) -> None:
    from safetensors.torch import load_file

    weights = _fake_adapter(tmp_path / "run" / "adapter")
    q, feats = harmful_basis(cache, "flagged")
    assert feats == [1, 9] and q.shape == (32, 2)
    report = patch_adapter(tmp_path / "run", q, tmp_path / "patched", {"subspace": "harmful"})
    patched = load_file(str(tmp_path / "patched" / "adapter" / "adapter_model.safetensors"))
    assert report["modules"] == 4 and len(report["skipped"]) == 2
    for name, b in weights.items():
        if "lora_A" in name or "q_proj" in name:
            assert torch.equal(patched[name], b)  # A and non-residual writers untouched
            continue
        a = weights[name.replace("lora_B", "lora_A")]
        delta, delta_p = b @ a, patched[name] @ a
        torch.testing.assert_close(q.T @ delta_p, torch.zeros(2, a.shape[1]), atol=1e-5, rtol=0)
        torch.testing.assert_close(delta_p, delta - q @ (q.T @ delta), atol=1e-5, rtol=1e-5)
    side = json.loads((tmp_path / "patched" / "patch.json").read_text())
    assert side["rank_removed"] == 2 and side["modules_patched"] == 4
    q_all, feats_all = harmful_basis(cache, "all")
    assert feats_all == HARMFUL and q_all.shape == (32, 5)
    torch.testing.assert_close(q_all.T @ q_all, torch.eye(5), atol=1e-5, rtol=0)
    assert orthonormal_basis(q_all.T).shape == (32, 5)
    with pytest.raises(FeatureGeomError, match="no adapter_model.safetensors"):
        patch_adapter(tmp_path, q, tmp_path / "x", {})


def test_cli_patch_and_diff_report_clear_errors(cache, tmp_path, capsys) -> None:
    from precompute.cli import main

    _fake_adapter(tmp_path / "run" / "adapter")
    assert (
        main(
            [
                "patch",
                "--adapter",
                str(tmp_path / "run"),
                "--cache",
                str(cache),
                "--random-seed",
                "2",
                "--out",
                str(tmp_path / "rand"),
            ]
        )
        == 0
    )
    assert "rank-2 random (seed 2) subspace" in capsys.readouterr().out
    side = json.loads((tmp_path / "rand" / "patch.json").read_text())
    assert side["subspace"] == "random (seed 2)" and side["features"] == [1, 9]
    assert (
        main(
            [
                "diff",
                "--before",
                str(tmp_path / "missing"),
                "--after",
                str(tmp_path / "missing"),
                "--cache",
                str(cache),
                "--out",
                str(tmp_path / "d"),
            ]
        )
        == 2
    )
    assert "no eval activations" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_encoder_basis_spans_the_features_encoder_columns(cache, tiny_sae_dir) -> None:
    q_enc, feats = harmful_basis(cache, "flagged", directions="encoder")
    w = load_sae(str(tiny_sae_dir)).W_enc.float()[:, feats]
    assert q_enc.shape == (32, 2)
    torch.testing.assert_close(q_enc @ (q_enc.T @ w), w, atol=1e-5, rtol=1e-5)
    with pytest.raises(FeatureGeomError, match="unknown directions"):
        harmful_basis(cache, "flagged", directions="sideways")
    with pytest.raises(FeatureGeomError, match="unknown harmful set"):
        harmful_basis(cache, "some")
