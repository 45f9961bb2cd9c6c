"""`featuregeom patch` (patch-back): remove the part of a fine-tuning weight update that writes along
chosen residual directions.

    featuregeom patch --adapter runs/task --cache cache/demo --out runs/task-patched

If the harmful-feature decoder directions span a subspace S of the residual stream, projecting a
weight update onto the orthogonal complement of S (on the output side) means the patched layer can
no longer write anything into S. For a LoRA pair ΔW = B A, projecting B removes exactly what the
update writes into S.

The control (`--random-seed`) projects off the span of as many *other SAE features'* directions:
random features that are neither harmful nor task features, drawn to match the harmful set's
firing-frequency profile (precompute/lab/matching.py). An isotropic random subspace is the wrong
control: the decoder is anisotropic (docs/results.md), its directions crowd into the part of the
residual stream the model uses, so any set of SAE directions may take more of an update than an
isotropic subspace of the same rank; beating that does not single out the harmful features.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from precompute.cache import check_replaceable_output, write_dir_atomic
from precompute.errors import FeatureGeomError
from precompute.options import Command, option, require

# the sidecar that marks a patched adapter: only a folder holding it may be replaced by a rerun
PATCH_SIDECAR, PATCH_WHAT = "patch.json", "patched adapter"
HARMFUL_SETS = ("flagged", "risk", "all")
DIRECTIONS = ("decoder", "encoder")


# ------------------------------------------------------------------------------------------- maths
def orthonormal_basis(directions: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """Orthonormal basis Q [d, r] of the row span of ``directions`` [m, d].

    SVD with a relative rank tolerance, because decoder directions are often nearly collinear and
    a plain QR would keep numerically meaningless directions.
    """
    if directions.ndim == 1:
        directions = directions.unsqueeze(0)
    if directions.ndim != 2:
        raise ValueError("directions must be [m, d]")
    d = directions.shape[1]
    work = directions.detach().to(torch.float64)
    if work.shape[0] == 0:
        return torch.zeros(d, 0, dtype=directions.dtype, device=directions.device)
    _, s, vh = torch.linalg.svd(work, full_matrices=False)
    smax = s.max() if s.numel() else torch.tensor(0.0, dtype=torch.float64)
    r = int((s > rtol * smax).sum()) if smax > 0 else 0
    return vh[:r].T.contiguous().to(dtype=directions.dtype)


def _check(mat: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Validate shapes and return Q in mat's dtype/device."""
    if mat.ndim != 2 or q.ndim != 2 or q.shape[0] != mat.shape[0]:
        raise ValueError(f"need mat [d_out, k] and Q [d_out, r]; got {tuple(mat.shape)} and {tuple(q.shape)}")
    return q.to(dtype=mat.dtype, device=mat.device)


def project_out_output_space(delta_W: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """delta_W - Q Qᵀ delta_W: the update with everything it writes along span(Q) removed (Q orthonormal)."""
    q = _check(delta_W, Q)
    return delta_W - q @ (q.T @ delta_W)


def project_lora_B(B: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """B - Q Qᵀ B for a LoRA pair; since ΔW = B A, this equals projecting ΔW without materialising it."""
    return project_out_output_space(B, Q)


def norm_removed(delta_W: torch.Tensor, Q: torch.Tensor) -> float:
    """‖Q Qᵀ ΔW‖_F / ‖ΔW‖_F: the fraction of the update's norm that writes into span(Q) (NaN if ΔW = 0)."""
    q = _check(delta_W, Q)
    total = torch.linalg.matrix_norm(delta_W.to(torch.float64))
    if total == 0:
        return float("nan")
    inside = torch.linalg.matrix_norm((q @ (q.T @ delta_W)).to(torch.float64))
    return float(inside / total)


# ------------------------------------------------------------------------------------ the adapter
def harmful_basis(
    cache: str | Path,
    which: str = "flagged",
    top: int | None = None,
    directions: str = "decoder",
    task_set: str = "strict",
) -> tuple[torch.Tensor, list[int]]:
    """Orthonormal basis of the harmful directions to remove: `flagged` = harmful features in the cache's
    flagged overlaps; `risk` = the `top` harmful features by predicted risk; `all` = every harmful feature.

    `directions`: `decoder` (what the feature writes, the geometry the cache measures) or `encoder` (the
    W_enc columns the SAE reads the feature with; they differ from the decoder rows in a trained SAE, and
    only a write along them changes the feature's pre-activation). `task_set` (with `risk`): the task
    features the risk is measured against, as `featuregeom diff --task-set` takes them."""
    from precompute.lab.harm_geometry import load_harm_geometry
    from precompute.lab.risk import predicted_risk

    cache = Path(cache)
    geo = load_harm_geometry(cache)
    if which == "flagged":
        feats = sorted(set(pd.read_parquet(cache / "overlaps.parquet")["harmful_feature"].astype(int)))
    elif which == "risk":
        risk = predicted_risk(geo, task_features(geo, task_set))
        feats = risk.nlargest(top or 20, "risk_max_cos")["feature"].astype(int).tolist()
    elif which == "all":
        feats = geo.harmful.astype(int).tolist()
    else:
        raise FeatureGeomError(f"unknown harmful set {which!r}; use flagged, risk or all")
    if not feats:
        raise FeatureGeomError(f"the cache has no {which} harmful features to project out")
    return _basis_of(geo, feats, directions), feats


def task_features(geo: Any, task_set: str = "strict") -> np.ndarray:
    """The task features of `task_set` ('strict' = is_task, or exploratory 'ranked:N'), as the diff takes them."""
    from precompute.lab.matching import select_task_set

    f = geo.features.sort_index()
    has_score = "task_score" in f.columns and "frequency" in f.columns
    return select_task_set(
        task_set,
        f["is_task"].to_numpy(bool),
        f["task_score"].to_numpy(float) if has_score else None,
        f["frequency"].to_numpy(float) if has_score else None,
        f["is_harmful"].to_numpy(bool),
    ).features


def control_basis(
    cache: str | Path,
    feats: list[int],
    seed: int,
    directions: str = "decoder",
    n_bins: int = 10,
    exclude: np.ndarray | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """The control for a harmful basis over `feats`: as many random features that are neither harmful,
    task features (is_task) nor in `exclude` (e.g. an exploratory ranked task set), with the same
    firing-frequency profile (one draw of `reference_sets`), and their decoder (or encoder) directions'
    orthonormal basis."""
    from precompute.lab.harm_geometry import load_harm_geometry
    from precompute.lab.matching import reference_sets

    geo = load_harm_geometry(cache)
    feats_df = geo.features.sort_index()
    if "frequency" not in feats_df.columns:
        raise FeatureGeomError("features.parquet has no frequency column; rebuild the cache")
    frequency = feats_df["frequency"].to_numpy(np.float64)
    taken = feats_df["is_harmful"].to_numpy(bool) | feats_df["is_task"].to_numpy(bool)
    if exclude is not None:
        taken[np.asarray(exclude, np.int64)] = True
    pool = np.flatnonzero(~taken & (np.nan_to_num(frequency) > 0))
    drawn, _ = reference_sets(np.asarray(feats), pool, frequency, 1, n_bins, seed)
    chosen = sorted(int(x) for x in drawn[0])
    return _basis_of(geo, chosen, directions), chosen


def _basis_of(geo: Any, feats: list[int], directions: str) -> torch.Tensor:
    if directions == "decoder":
        return orthonormal_basis(geo.directions()[feats])
    if directions == "encoder":
        return orthonormal_basis(geo.sae.W_enc.float()[:, feats].T)
    raise FeatureGeomError(f"unknown directions {directions!r}; use decoder or encoder")


def patch_adapter(adapter: str | Path, basis: torch.Tensor, out: str | Path, meta: dict) -> dict[str, Any]:
    """Copy a peft LoRA adapter with every residual-writing B projected off span(basis); report norms removed."""
    from safetensors.torch import load_file, save_file

    from precompute.model.load import resolve_adapter_dir

    src = resolve_adapter_dir(adapter)
    weights = load_file(str(src / "adapter_model.safetensors"))
    patched: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    removed: list[float] = []
    d = basis.shape[0]
    for name, tensor in weights.items():
        if "lora_B" in name and tensor.shape[0] == d:
            delta = tensor.float() @ weights[name.replace("lora_B", "lora_A")].float()
            removed.append(norm_removed(delta, basis))
            patched[name] = project_lora_B(tensor.float(), basis).to(tensor.dtype).contiguous()
        else:
            if "lora_B" in name:
                skipped.append(name)  # writes somewhere other than the residual stream
            patched[name] = tensor
    if not removed:
        raise FeatureGeomError(f"no LoRA B matrix in {src} writes a {d}-dim residual; nothing to patch")

    def write(dest: Path) -> None:
        (dest / "adapter").mkdir()
        shutil.copy2(src / "adapter_config.json", dest / "adapter" / "adapter_config.json")
        save_file(patched, str(dest / "adapter" / "adapter_model.safetensors"))
        side = {
            **meta,
            "source_adapter": str(src),
            "rank_removed": int(basis.shape[1]),
            "modules_patched": len(removed),
            "skipped": skipped,
            "mean_norm_removed": float(np.mean(removed)),
        }
        (dest / PATCH_SIDECAR).write_text(json.dumps(side, indent=2, default=str))

    write_dir_atomic(Path(out), write, marker=PATCH_SIDECAR, what=PATCH_WHAT)
    return {
        "modules": len(removed),
        "skipped": skipped,
        "norm_removed": removed,
        "mean_norm_removed": float(np.mean(removed)),
    }


# -------------------------------------------------------------------------------------------- command
@dataclass
class PatchOptions:
    adapter: str | None = option(None, metavar="DIR", help="finetune output or peft adapter directory")
    cache: str | None = option(None, metavar="DIR", help="the precompute cache giving harmful features")
    harmful: str = option(
        "flagged",
        choices=HARMFUL_SETS,
        help="which harmful directions: flagged overlaps, top --top by risk, or all harmful features",
    )
    top: int = option(20, low=1, bounds="[)", help="with --harmful risk: how many")
    task_set: str = option(
        "strict",
        metavar="SET",
        help="with --harmful risk: task features the risk is measured against ('strict' or exploratory 'ranked:N')",
    )
    directions: str = option(
        "decoder",
        choices=DIRECTIONS,
        help="remove the features' decoder directions or the encoder directions the SAE reads them with",
    )
    random_seed: int | None = option(
        None,
        low=0,
        high=2**32 - 1,
        help="the control: project off as many random non-harmful SAE features' directions, frequency-matched",
    )
    out: str | None = option(None, metavar="DIR", help="where to write the patched adapter")


def run_patch(opts: PatchOptions) -> int:
    require(opts, "adapter", "cache", "out", command="patch")
    out = str(opts.out)
    check_replaceable_output(out, PATCH_SIDECAR, PATCH_WHAT)
    basis, feats = harmful_basis(str(opts.cache), opts.harmful, opts.top, opts.directions, opts.task_set)
    kind = f"harmful ({opts.directions})"
    control: list[int] | None = None
    if opts.random_seed is not None:
        exclude = None
        if opts.harmful == "risk" and opts.task_set != "strict":
            from precompute.lab.harm_geometry import load_harm_geometry

            exclude = task_features(load_harm_geometry(str(opts.cache)), opts.task_set)
        basis, control = control_basis(
            str(opts.cache), feats, opts.random_seed, opts.directions, exclude=exclude
        )
        kind = f"random SAE features, frequency-matched ({opts.directions}, seed {opts.random_seed})"
    # Keep the fine-tune's sidecar (held-out loss before) reachable for the diff summary.
    report = patch_adapter(
        str(opts.adapter),
        basis,
        out,
        {
            "subspace": kind,
            "harmful_set": opts.harmful,
            "task_set": opts.task_set if opts.harmful == "risk" else None,
            "directions": opts.directions,
            "features": feats,
            "control_features": control,
            "cache": opts.cache,
        },
    )
    print(
        f"wrote {out}: {report['modules']} B matrices projected off a rank-{basis.shape[1]} {kind} subspace; "
        f"mean share of the update's norm removed {report['mean_norm_removed']:.3f}"
    )
    return 0


COMMANDS = (
    Command(
        "patch",
        "project a LoRA adapter's output-space update off harmful directions",
        PatchOptions,
        run_patch,
        description="Patch-back: project every residual-writing LoRA B matrix off the span of harmful "
        "decoder directions (ΔW = B A, so this removes exactly what the update writes there). "
        "--random-seed replaces them by as many random non-harmful SAE features' directions with the same "
        "firing-frequency profile (the control).",
    ),
)
