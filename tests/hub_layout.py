"""Write repositories into a Hugging Face hub cache folder (`models--ORG--NAME/snapshots/COMMIT/...`,
`refs/main`), so that hub ids and SAELens release ids resolve offline (HF_HUB_OFFLINE=1, HF_HUB_CACHE
pointing here) exactly as they do after a real download."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def put_repo(hub_cache: Path, repo_id: str, files: dict[str, Path | bytes]) -> Path:
    """Place `files` (path in the repo -> a file to copy or its bytes) in the cache; the snapshot dir."""
    repo = hub_cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    for name, content in files.items():
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            shutil.copyfile(content, target)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def put_model_dir(hub_cache: Path, repo_id: str, model_dir: Path) -> Path:
    """A local transformers directory (config, weights, tokenizer) as hub repo `repo_id`."""
    return put_repo(hub_cache, repo_id, {p.name: p for p in model_dir.iterdir() if p.is_file()})


def put_llama_scope(
    hub_cache: Path,
    repo_id: str,
    folder: str,
    d_model: int,
    d_sae: int,
    hook: str,
    norm_factor: float,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A Llama Scope checkpoint in its published layout (`FOLDER/hyperparams.json`,
    `FOLDER/checkpoints/final.safetensors` with encoder/decoder weights in nn.Linear convention); its
    `dataset_average_activation_norm` is set so that √d_model / norm = `norm_factor` (the registry's value).
    Returns the raw tensors."""
    g = torch.Generator().manual_seed(seed)
    weights = {
        "encoder.weight": torch.randn(d_sae, d_model, generator=g) / d_model**0.5,
        "encoder.bias": torch.randn(d_sae, generator=g) * 0.1,
        "decoder.weight": torch.randn(d_model, d_sae, generator=g) / d_sae**0.5,
        "decoder.bias": torch.randn(d_model, generator=g) * 0.1,
    }
    hyper = {
        "d_model": d_model,
        "d_sae": d_sae,
        "hook_point_in": hook,
        "hook_point_out": hook,
        "jump_relu_threshold": 0.05,
        "dataset_average_activation_norm": {"in": d_model**0.5 / norm_factor, "out": 1.0},
    }
    staging = hub_cache / ".staging"
    staging.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, staging / "final.safetensors")
    put_repo(
        hub_cache,
        repo_id,
        {
            f"{folder}/hyperparams.json": json.dumps(hyper).encode(),
            f"{folder}/checkpoints/final.safetensors": staging / "final.safetensors",
        },
    )
    return weights
