"""eval-acts: SAE activations on prompt and response tokens equal a brute-force read; files round-trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from precompute.errors import FeatureGeomError
from precompute.lab.eval_acts import collect_eval, encode_prompts, load_eval, save_eval
from precompute.model.hooks import HookReader, resolve_hook
from precompute.model.load import load_model
from precompute.sae.registry import load_sae
from tests.precompute.lab.conftest import HOOK


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


def test_eval_acts_command_stores_base_questions_and_the_log_prob_readout(
    tiny_model_dir, tiny_sae_dir, tmp_path
) -> None:
    from precompute.cli import main
    from precompute.lab.em_prompts import em_questions
    from precompute.lab.logprob import load_logprob

    out = tmp_path / "eval"
    args = ["eval-acts", "--model", str(tiny_model_dir), "--sae", str(tiny_sae_dir), "--device", "cpu"]
    assert main([*args, "--n-neutral", "2", "--response-tokens", "1", "--out", str(out)]) == 0
    loaded = load_eval(out)
    em = loaded.prompts[loaded.prompts["set"] == "em"]
    # the `_json` variants repeat the plain text (their system prompt is not part of the eval prompt)
    assert len(em) == 64 and em["base_id"].nunique() == 56
    template = em[em["question"].str.contains("Fill the following template")]
    assert len(template) == 8 and set(template["base_id"]) <= {q.base_id for q in em_questions()}
    assert loaded.prompts.loc[loaded.prompts["set"] == "neutral", "base_id"].str.startswith("neutral:").all()
    lp = load_logprob(out)
    assert lp is not None and len(lp) == 72 and "logprob" in loaded.meta
