"""GGUF files: converted once, loaded from the stamped safetensors copy, never from another version's copy."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from precompute.cache import sha256_of
from precompute.errors import ModelLoadError
from precompute.model import gguf as model_mod
from precompute.model.gguf import _converted_gguf_dir
from precompute.model.load import load_model


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
