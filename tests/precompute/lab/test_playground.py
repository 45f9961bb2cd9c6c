"""Steering playground on the tiny random Llama + a tiny TopK SAE: both completions equal a brute-force
greedy loop (full forward per token, no KV cache, our own forward hook), the watched activations equal
the SAE on the brute-force residual, strength 0 is the plain model, and the worker process speaks the
protocol (errors as one line, never a dead process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from precompute.errors import FeatureGeomError
from precompute.lab.eval_acts import encode_prompts
from precompute.lab.playground import PlaygroundRequest, _eos_ids, run_playground
from precompute.model.hooks import HookReader, resolve_hook
from precompute.model.load import load_model
from precompute.sae.registry import load_sae_for_model

ROOT = Path(__file__).resolve().parents[3]
PROMPT = "How do I bake a cake? Mix flour and sugar."


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tiny_sae_dir):
    lm = load_model(str(tiny_model_dir), device="cpu")
    sae, _ = load_sae_for_model(str(tiny_sae_dir), d_model=lm.d_model, warn=lambda m: None)
    return lm, resolve_hook(lm.model, sae.hook_name), sae


def brute_force(lm, hook, sae, prompt: str, feature: int, strength: float, n: int, watch: list[int]):
    """Greedy decoding by full forwards, steering with a hook written here; the median user-token norm
    computed from the unsteered residual of the prompt."""
    (enc,) = encode_prompts([prompt], lm.tokenizer)
    model = lm.model
    reader = HookReader(model, hook)
    h = reader(torch.tensor([enc.ids]))[0]
    norm = float(h[enc.prompt_start : enc.prompt_end].norm(dim=-1).median())
    d = sae.W_dec[feature] / sae.W_dec[feature].norm()
    add = strength * norm * d
    module = dict(model.named_modules())[hook.module_path]
    handle = module.register_forward_hook(
        lambda _m, _i, out: (out[0] + add, *out[1:]) if isinstance(out, tuple) else out + add, prepend=True
    )
    eos = _eos_ids(lm.tokenizer)
    try:
        ids = list(enc.ids)
        with torch.inference_mode():
            for _ in range(n):
                nxt = int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax())
                if nxt in eos:
                    break
                ids.append(nxt)
            resid = reader(torch.tensor([ids]))[0, len(enc.ids) :]
            acts = sae.encode(resid)[:, watch]
    finally:
        handle.remove()
    return ids[len(enc.ids) :], acts, strength * norm


@pytest.mark.parametrize("strength", [0.0, 0.4, -1.5])
def test_completions_and_activations_equal_brute_force(tiny, strength: float) -> None:
    lm, hook, sae = tiny
    req = PlaygroundRequest.from_json(
        {"prompt": PROMPT, "feature": 5, "strength": strength, "new_tokens": 12, "watch": [7, 5]}, sae.d_sae
    )
    assert req.watch == (5, 7)  # the steered feature first, no duplicate
    got = run_playground(lm, hook, sae, req)
    plain_ids, plain_acts, _ = brute_force(lm, hook, sae, PROMPT, 5, 0.0, 12, [5, 7])
    ids, acts, alpha = brute_force(lm, hook, sae, PROMPT, 5, strength, 12, [5, 7])
    assert got.unsteered.token_ids == plain_ids
    assert got.steered.token_ids == ids
    assert got.alpha == pytest.approx(alpha, rel=1e-6)
    for side, want in ((got.unsteered, plain_acts), (got.steered, acts)):
        for i, f in enumerate((5, 7)):
            assert side.activations[f] == pytest.approx(want[:, i].tolist(), abs=1e-4)
        assert side.tokens == [lm.tokenizer.decode([t]) for t in side.token_ids]
    if strength == 0.0:
        assert got.steered.token_ids == got.unsteered.token_ids
        assert got.steered.activations == got.unsteered.activations


def test_steering_changes_the_text_and_memo_reuses_only_the_unsteered_side(tiny) -> None:
    lm, hook, sae = tiny
    memo: dict = {}
    base = {"prompt": PROMPT, "feature": 3, "new_tokens": 10, "watch": [3]}
    first = run_playground(
        lm, hook, sae, PlaygroundRequest.from_json({**base, "strength": 0.0}, sae.d_sae), memo
    )
    second = run_playground(
        lm, hook, sae, PlaygroundRequest.from_json({**base, "strength": 3.0}, sae.d_sae), memo
    )
    assert first.timings["unsteered_reused"] == 0.0 and second.timings["unsteered_reused"] == 1.0
    assert second.unsteered.token_ids == first.unsteered.token_ids
    # a shift three residual norms long along feature 3 must move its own activation on the generated text
    assert max(second.steered.activations[3]) > max(first.steered.activations[3] or [0.0])
    other = run_playground(
        lm, hook, sae, PlaygroundRequest.from_json({**base, "prompt": "Hi", "strength": 0.0}, sae.d_sae), memo
    )
    assert other.timings["unsteered_reused"] == 0.0


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ([1], "JSON object"),
        ({"prompt": "  ", "feature": 1, "strength": 1}, "write a prompt"),
        ({"prompt": "x" * 4001, "feature": 1, "strength": 1}, "4,000"),
        ({"prompt": "x", "feature": 64, "strength": 1}, "from 0 to 63"),
        ({"prompt": "x", "feature": True, "strength": 1}, "feature id"),
        ({"prompt": "x", "feature": 1, "strength": float("nan")}, "finite"),
        ({"prompt": "x", "feature": 1, "strength": 51}, "±50"),
        ({"prompt": "x", "feature": 1, "strength": 1, "new_tokens": 0}, "from 1 to 200"),
        ({"prompt": "x", "feature": 1, "strength": 1, "watch": [-1]}, "watched feature"),
        ({"prompt": "x", "feature": 1, "strength": 1, "watch": list(range(9))}, "at most 8"),
    ],
)
def test_bad_requests_are_one_clear_sentence(request_, message: str) -> None:
    with pytest.raises(FeatureGeomError, match=message):
        PlaygroundRequest.from_json(request_, d_sae=64)


def _worker(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "precompute.lab.playground_worker", *args],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_worker_protocol_matches_in_process_result(tiny, tiny_model_dir, tiny_sae_dir) -> None:
    lm, hook, sae = tiny
    good = {
        "prompt": "<img src=x onerror=alert(1)> bake",
        "feature": 2,
        "strength": 3.0,
        "new_tokens": 8,
        "watch": [9],
    }
    lines = [json.dumps({"prompt": "x", "feature": 999, "strength": 1}), "not json", json.dumps(good)]
    proc = _worker(["--model", str(tiny_model_dir), "--sae", str(tiny_sae_dir)])
    out, err = proc.communicate("\n".join(lines) + "\n", timeout=300)
    assert proc.returncode == 0, err
    ready, bad_feature, bad_json, result = (json.loads(x) for x in out.splitlines())
    assert ready["ready"] and ready["d_sae"] == 64 and ready["hook"] == "blocks.1.hook_resid_post"
    assert "from 0 to 63" in bad_feature["error"]
    assert "error" in bad_json
    want = run_playground(lm, hook, sae, PlaygroundRequest.from_json(good, 64)).to_json()
    for side in ("unsteered", "steered"):
        assert result[side]["token_ids"] == want[side]["token_ids"]
        for f in ("2", "9"):
            assert result[side]["activations"][f] == pytest.approx(want[side]["activations"][f], abs=1e-5)
    assert max(result["steered"]["activations"]["2"]) > 0  # the comparison is not between empty rows
    assert result["alpha"] == pytest.approx(want["alpha"])


def test_worker_that_cannot_load_says_why_and_exits_2(tmp_path: Path, tiny_sae_dir) -> None:
    proc = _worker(["--model", str(tmp_path / "missing.gguf"), "--sae", str(tiny_sae_dir)])
    out, _ = proc.communicate("", timeout=120)
    assert proc.returncode == 2
    (line,) = out.splitlines()
    assert "not found" in json.loads(line)["error"]
