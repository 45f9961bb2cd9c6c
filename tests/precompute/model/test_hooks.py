"""Hook points and the reader: module paths and SAELens names, early stop, padding, unreached hooks."""

from __future__ import annotations

import pytest
import torch

from precompute.errors import HookNotFoundError
from precompute.model.hooks import HookPoint, HookReader, resolve_hook


def capture(module: torch.nn.Module, fn):
    """Output of `module` during fn() (a full, unhooked forward pass)."""
    seen = []
    handle = module.register_forward_hook(
        lambda _m, _i, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        fn()
    finally:
        handle.remove()
    return seen[0]


# --------------------------------------------------------------------------- hooks
def test_resolve_module_path(lm):
    assert resolve_hook(lm.model, "model.layers.1") == HookPoint("model.layers.1", "model.layers.1", False)


@pytest.mark.parametrize(
    "name,module,read_input",
    [
        ("blocks.1.hook_resid_post", "model.layers.1", False),
        ("blocks.0.hook_resid_pre", "model.layers.0", True),
        ("blocks.1.hook_mlp_out", "model.layers.1.mlp", False),
        ("blocks.0.hook_attn_out", "model.layers.0.self_attn", False),
    ],
)
def test_resolve_saelens_names(lm, name, module, read_input):
    hook = resolve_hook(lm.model, name)
    assert hook == HookPoint(name, module, read_input)
    assert hook.describe() == {"name": name, "module": module, "reads": "input" if read_input else "output"}


def test_out_of_range_block(lm):
    with pytest.raises(HookNotFoundError, match=r"names block 2, but the model has 2 blocks \(0\.\.1\)"):
        resolve_hook(lm.model, "blocks.2.hook_resid_post")


def test_unsupported_saelens_kind(lm):
    with pytest.raises(
        HookNotFoundError, match="hook 'blocks.1.hook_resid_mid' is not supported for LlamaForCausalLM"
    ):
        resolve_hook(lm.model, "blocks.1.hook_resid_mid")


def test_unknown_name_lists_nearest(lm):
    with pytest.raises(HookNotFoundError) as err:
        resolve_hook(lm.model, "model.layer.1")
    msg = str(err.value)
    assert msg.startswith(
        "unknown hook 'model.layer.1' for LlamaForCausalLM; nearest valid names: model.layers.1,"
    )
    assert "'blocks.15.hook_resid_post'" in msg
    with pytest.raises(HookNotFoundError, match="nearest valid names: blocks.1.hook_resid_post,"):
        resolve_hook(lm.model, "blocks.1.hook_resid_psot")
    with pytest.raises(HookNotFoundError, match=r"\(none close\)"):
        resolve_hook(lm.model, "zzzzqqqq")
    with pytest.raises(HookNotFoundError, match="unknown hook ''"):
        resolve_hook(lm.model, "")


def test_resid_post_matches_hidden_states(lm, ids):
    hidden = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(hidden) == 3
    block0 = HookReader(lm.model, resolve_hook(lm.model, "blocks.0.hook_resid_post"))(ids)
    assert block0.shape == (1, ids.shape[1], 32)
    torch.testing.assert_close(block0, hidden[1], atol=1e-5, rtol=1e-5)
    assert torch.equal(block0, HookReader(lm.model, resolve_hook(lm.model, "model.layers.0"))(ids))
    # The last block: HF's last hidden state has the final norm applied; the hook reads the raw residual.
    last = HookReader(lm.model, resolve_hook(lm.model, "blocks.1.hook_resid_post"))(ids)
    assert not torch.allclose(last, hidden[2], atol=1e-3)
    torch.testing.assert_close(lm.model.model.norm(last), hidden[2], atol=1e-5, rtol=1e-5)


def test_resid_pre_reads_the_block_input(lm, ids):
    pre0 = HookReader(lm.model, resolve_hook(lm.model, "blocks.0.hook_resid_pre"))(ids)
    torch.testing.assert_close(pre0, lm.model.model.embed_tokens(ids), atol=0, rtol=0)
    pre1 = HookReader(lm.model, resolve_hook(lm.model, "blocks.1.hook_resid_pre"))(ids)
    post0 = HookReader(lm.model, resolve_hook(lm.model, "blocks.0.hook_resid_post"))(ids)
    torch.testing.assert_close(pre1, post0, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "name,module",
    [("blocks.1.hook_mlp_out", "model.layers.1.mlp"), ("blocks.0.hook_attn_out", "model.layers.0.self_attn")],
)
def test_submodule_outputs(lm, ids, name, module):
    expected = capture(dict(lm.model.named_modules())[module], lambda: lm.model(input_ids=ids))
    got = HookReader(lm.model, resolve_hook(lm.model, name))(ids)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def hook_counts(model: torch.nn.Module) -> list[tuple[int, int]]:
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


def test_reader_stops_early_and_removes_its_hook(lm, ids):
    lm.model(input_ids=ids)  # transformers installs its own output-capturing hooks on a first call
    before = hook_counts(lm.model)
    calls = []
    watched = {"layer1": lm.model.model.layers[1], "norm": lm.model.model.norm, "lm_head": lm.model.lm_head}
    handles = [m.register_forward_hook(lambda _m, _i, _o, n=n: calls.append(n)) for n, m in watched.items()]
    handles.append(
        lm.model.model.layers[1].register_forward_pre_hook(lambda _m, _a: calls.append("layer1-pre"))
    )
    try:
        HookReader(lm.model, resolve_hook(lm.model, "blocks.0.hook_resid_post"))(ids)
        assert calls == []
        HookReader(lm.model, resolve_hook(lm.model, "blocks.1.hook_resid_pre"))(ids)
        assert calls == ["layer1-pre"]  # reached block 1's input, never ran it
        calls.clear()
        HookReader(lm.model, resolve_hook(lm.model, "blocks.1.hook_resid_post"))(ids)
        assert calls == ["layer1-pre", "layer1"]  # no final norm, no lm_head
        calls.clear()
        lm.model(input_ids=ids)
        assert calls == ["layer1-pre", "layer1", "norm", "lm_head"]  # the watchers do work
    finally:
        for h in handles:
            h.remove()
    assert hook_counts(lm.model) == before


def test_reader_with_right_padding_matches_unpadded(lm, ids):
    reader = HookReader(lm.model, resolve_hook(lm.model, "blocks.1.hook_resid_post"))
    n = ids.shape[1]
    short = ids[:, : n - 4]
    batch = torch.full((2, n), lm.tokenizer.pad_token_id, dtype=torch.long)
    batch[0], batch[1, : n - 4] = ids[0], short[0]
    mask = (torch.arange(n) < torch.tensor([[n], [n - 4]])).long()
    out = reader(batch, mask)
    torch.testing.assert_close(out[0], reader(ids)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, : n - 4], reader(short)[0], atol=1e-5, rtol=1e-5)


def test_reader_reports_an_unreached_hook(lm, ids):
    # A module that exists but is not on the forward path of the causal LM.
    lm.model.add_module("orphan", torch.nn.Linear(2, 2))
    try:
        reader = HookReader(lm.model, HookPoint("orphan", "orphan"))
        with pytest.raises(HookNotFoundError, match="hook 'orphan' was never reached"):
            reader(ids)
    finally:
        del lm.model.orphan
