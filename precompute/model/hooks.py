"""Hook points of a causal LM and a reader that runs the model only up to one of them.

The forward pass stops right after the hooked module, so harvesting block 15 of 30 costs about
half a forward pass.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

import torch

from precompute.errors import HookNotFoundError

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
