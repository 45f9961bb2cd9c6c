"""`featuregeom train-sae`: train a TopK SAE on one hook point of a model and write it in SAELens format.

One run: load the model, split the corpus into training and held-out documents, collect the
training activations into a store under --work-dir (resumable), train (checkpointed, resumable
bit for bit), evaluate on the held-out documents, and write the SAE directory with its sparsity
file and training_report.json in one atomic swap. `--eval-only` re-scores an SAE already written.
"""

from __future__ import annotations

import hashlib
import json
import math
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from precompute.atomic import write_atomic, write_text_atomic
from precompute.data.plan import CorpusPlan
from precompute.data.split import (
    DOCUMENTS_KEY,
    TRAINING_REPORT,
)
from precompute.errors import ConfigError, FeatureGeomError
from precompute.model.hooks import HookPoint, HookReader
from precompute.model.load import LoadedModel
from precompute.options import Command
from precompute.pipeline.distributed import World, barrier, start, stop, world_from_env
from precompute.provenance import sha256_of
from precompute.sae.base import SAE
from precompute.training.config import TrainSAEConfig
from precompute.training.evaluation import evaluate, log10_sparsity
from precompute.training.parallel import Reducer
from precompute.training.report import corpus_record, documents_record, machine_record
from precompute.training.store import (
    STORE_FILE,
    STORE_PROGRESS,
    ShuffledBatches,
    harvest_store,
    plan_split,
    sample_rows,
)
from precompute.training.trainer import CHECKPOINT, TopKSAETrainer, TrainResult, default_warmup, fit

RUN_FILE = "run.json"
REPORT_FILE = TRAINING_REPORT  # precompute.data.split reads the training documents from it

# Options that change the activation store, and (with these) the trained SAE.
DATA_KEYS = (
    "hook",
    "max_tokens",
    "heldout_fraction",
    "context_size",
    "packing",
    "harvest_batch_size",
    "store_dtype",
    "corpus_seed",
    "document_split",
    "scoring_fraction",
)
TRAIN_KEYS = (
    "d_sae",
    "k",
    "batch_size",
    "lr",
    "epochs",
    "steps",
    "warmup_steps",
    "decay_fraction",
    "buffer_tokens",
    "aux_k",
    "aux_coef",
    "dead_after_tokens",
    "init_b_dec",
)


def _signature(
    cfg: TrainSAEConfig,
    model_info: dict[str, Any],
    corpus_hashes: list[str],
    d_in: int,
    data_only: bool = False,
) -> str:
    """A hash of everything that changes the activation store (`data_only`) or the trained SAE.

    A checkpoint is reused only under the same full signature; the activation store only under
    the same data signature (so --overwrite with new optimiser settings does not re-collect it).
    """
    keys = DATA_KEYS if data_only else DATA_KEYS + TRAIN_KEYS
    payload: dict[str, Any] = {k: getattr(cfg, k) for k in keys}
    payload["corpus"] = [c.to_dict() for c in cfg.corpus]
    payload["corpus_sha256"] = corpus_hashes
    payload["model"] = {
        "spec": model_info.get("spec"),
        "sha256": model_info.get("sha256"),
        "architecture": model_info.get("architecture"),
        "d_model": d_in,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _command_line() -> str:
    """The command as the user typed it, for the report."""
    argv = list(sys.argv)
    if argv and argv[0].endswith("__main__.py"):
        argv = ["python", "-m", "precompute"] + argv[1:]
    elif argv:
        argv[0] = Path(argv[0]).name
    return shlex.join(argv)


def _summary(metrics: dict[str, Any]) -> str:
    line = (
        f"held-out ({metrics['tokens']:,} tokens): explained variance {metrics['explained_variance']:.4f} "
        f"({metrics['explained_variance_no_outliers']:.4f} without {metrics['outlier_tokens']} massive-norm "
        f"tokens), L0 {metrics['l0']:.1f}, dead {metrics['dead_fraction']:.2%}"
    )
    if "ce_clean" in metrics:
        line += (
            f", CE clean {metrics['ce_clean']:.4f} / spliced {metrics['ce_spliced']:.4f} / zero "
            f"{metrics['ce_zero_ablated']:.4f} (recovered {metrics['ce_recovered']:.1%})"
        )
    return line


# ============================================================================ steps of a run
def _check_output(cfg: TrainSAEConfig, out: Path, work: Path) -> None:
    """Refuse before any work: a user's folder at --out, an existing SAE without --overwrite, or
    --resume with nothing to resume. --overwrite drops the checkpoint (the activation store of the
    same data settings is reused)."""
    from precompute.cache import check_replaceable_output

    # --overwrite replaces an earlier SAE of ours, never a user's folder
    check_replaceable_output(out, REPORT_FILE, "train-sae output")
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise FeatureGeomError(
            f"{out} already exists; pass --overwrite to replace it (or choose another --out)"
        )
    if cfg.overwrite:
        for name in (CHECKPOINT, RUN_FILE):
            (work / name).unlink(missing_ok=True)
    if cfg.resume and not (work / CHECKPOINT).is_file() and not (work / STORE_PROGRESS).is_file():
        raise FeatureGeomError(f"--resume: no checkpoint in {work}; run without --resume to start")
    work.mkdir(parents=True, exist_ok=True)


def _claim_work_dir(work: Path, signature: str, cfg: TrainSAEConfig) -> None:
    """Record this run's settings in --work-dir, refusing one that holds a different run."""
    run_path = work / RUN_FILE
    if run_path.is_file():
        previous = json.loads(run_path.read_text()).get("signature")
        if previous != signature:
            raise FeatureGeomError(
                f"{work} holds a run with different settings; pass --overwrite to discard it or "
                "choose another --work-dir"
            )
    write_text_atomic(
        run_path, json.dumps({"signature": signature, "config": cfg.to_dict()}, indent=2, default=str)
    )


def _split(cfg: TrainSAEConfig, tokenizer: Any) -> tuple[CorpusPlan, CorpusPlan]:
    return plan_split(
        cfg.corpus,
        tokenizer,
        cfg.context_size,
        cfg.packing,
        cfg.max_tokens,
        cfg.heldout_fraction,
        cfg.corpus_seed,
        document_split=cfg.document_split,
        scoring_fraction=cfg.scoring_fraction,
    )


@dataclass
class _Trained:
    """What the collection and training steps produced."""

    result: TrainResult
    steps: int
    warmup: int
    lr: float
    rows: int  # training activations
    collect_s: float


def _collect_and_train(
    cfg: TrainSAEConfig,
    loaded: LoadedModel,
    hook: HookPoint,
    train_plan: CorpusPlan,
    work: Path,
    signatures: tuple[str, str],
    device: torch.device,
    say: Callable[..., None],
    world: World = World(),
) -> _Trained:
    """Collect the training activations into the store (resumable), then train (resumable)."""
    signature, data_signature = signatures
    d_in = loaded.d_model
    t_collect = time.perf_counter()
    reader = HookReader(loaded.model, hook)

    def collect() -> np.ndarray:
        return harvest_store(
            train_plan,
            reader,
            loaded.tokenizer,
            work,
            d_in,
            cfg.harvest_batch_size,
            device,
            cfg.store_dtype,
            cfg.corpus_seed,
            cfg.progress and world.main,
            data_signature,
        )

    # rank 0 writes the store; the others open it once it is complete
    store = collect() if world.main else None
    barrier(world)
    store = collect() if store is None else store
    collect_s = time.perf_counter() - t_collect
    n_rows = int(store.shape[0])
    data: np.ndarray | torch.Tensor = store
    if n_rows <= cfg.buffer_tokens:
        data = torch.from_numpy(np.asarray(store, dtype=np.float32))  # whole store in memory
    batches = ShuffledBatches(data, cfg.batch_size, cfg.seed, cfg.buffer_tokens)
    total_steps = cfg.steps or max(1, int(math.ceil(cfg.epochs * batches.steps_per_epoch)))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else default_warmup(total_steps)
    lr = cfg.resolved_lr()
    say(
        f"training: {n_rows:,} activations, {total_steps:,} steps of {cfg.batch_size} "
        f"({total_steps * cfg.batch_size / n_rows:.2f} epochs), d_sae {cfg.d_sae}, k {cfg.k}, lr {lr:g}"
    )
    trainer = TopKSAETrainer(d_in, cfg.d_sae, cfg.k, cfg.aux_k, cfg.aux_coef, cfg.dead_after_tokens, cfg.seed)
    trainer.reduce = Reducer(world)
    trainer.init_from_sample(sample_rows(data, 32768, cfg.seed), cfg.init_b_dec)
    result = fit(
        trainer,
        batches,
        total_steps,
        lr,
        warmup,
        cfg.decay_fraction,
        work,
        cfg.checkpoint_every,
        cfg.log_every,
        signature,
        progress=cfg.progress,
        device=device,
    )
    return _Trained(result, total_steps, warmup, lr, n_rows, collect_s)


def _evaluate(
    cfg: TrainSAEConfig,
    sae: SAE,
    loaded: LoadedModel,
    hook: HookPoint,
    held: CorpusPlan,
    device: torch.device,
) -> tuple[dict[str, Any], float]:
    """Held-out metrics (with `firing_counts`) and the seconds they took."""
    t_eval = time.perf_counter()
    metrics = evaluate(
        sae,
        loaded.model,
        hook,
        held.contexts,
        loaded.tokenizer,
        device,
        cfg.eval_batch_size,
        cfg.eval_tokens,
        cfg.eval_ce_tokens,
        cfg.progress,
    )
    return metrics, time.perf_counter() - t_eval


def _training_record(cfg: TrainSAEConfig, trained: _Trained, heldout_tokens: int) -> dict[str, Any]:
    return {
        "d_sae": cfg.d_sae,
        "k": cfg.k,
        "steps": trained.steps,
        "batch_size": cfg.batch_size,
        "lr": trained.lr,
        "warmup_steps": trained.warmup,
        "decay_fraction": cfg.decay_fraction,
        "aux_k": cfg.aux_k,
        "aux_coef": cfg.aux_coef,
        "dead_after_tokens": cfg.dead_after_tokens,
        "init_b_dec": cfg.init_b_dec,
        "seed": cfg.seed,
        "data_seed": cfg.corpus_seed,
        "train_activations": trained.rows,
        "epochs": trained.steps * cfg.batch_size / trained.rows,
        "heldout_fraction": cfg.heldout_fraction,
        "heldout_tokens": heldout_tokens,
        "norm_scaling_factor_folded": float(trained.result.trainer.norm_factor),
    }


# ============================================================================ the commands
def run(cfg: TrainSAEConfig) -> int:
    """Train, evaluate and write the SAE that `cfg` describes (or re-score it with --eval-only); under
    torchrun, data parallel (precompute/training/parallel.py)."""
    if cfg.eval_only:
        return eval_only(cfg)
    world = world_from_env()
    if world.parallel and cfg.batch_size % world.size:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} does not split over {world.size} processes; use a multiple of {world.size}"
        )
    start(world, cfg.device)
    try:
        return _train_and_write(cfg, world)
    finally:
        stop(world)


def _train_and_write(cfg: TrainSAEConfig, world: World) -> int:
    """`run` in each process; under torchrun rank 0 alone checks, evaluates and writes (parallel.py)."""
    from precompute.cache import write_dir_atomic
    from precompute.model.hooks import resolve_hook
    from precompute.model.load import load_model, resolve_device
    from precompute.sae.formats.saelens import save_saelens

    out, work = Path(str(cfg.out)), cfg.resolved_work_dir()
    say = print if cfg.progress and world.main else (lambda *a, **k: None)
    if world.main:
        _check_output(cfg, out, work)
    barrier(world)
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)

    loaded = load_model(cfg.model, device=str(device))
    hook = resolve_hook(loaded.model, cfg.hook)
    d_in = loaded.d_model
    say(
        f"model {cfg.model} ({loaded.describe()['architecture']}, d_model {d_in}) loaded in "
        f"{loaded.load_seconds:.1f} s; hook {hook.name} -> {hook.module_path}"
    )
    corpus_hashes = [sha256_of(c.path) for c in cfg.corpus]
    train_plan, held_plan = _split(cfg, loaded.tokenizer)
    say(
        f"corpus: {train_plan.n_tokens:,} training tokens ({len(train_plan.documents):,} documents), "
        f"{held_plan.n_tokens:,} held-out tokens ({len(held_plan.documents):,} documents)"
    )
    signature = _signature(cfg, loaded.describe(), corpus_hashes, d_in)
    data_signature = _signature(cfg, loaded.describe(), corpus_hashes, d_in, data_only=True)
    if world.main:
        _claim_work_dir(work, signature, cfg)
    trained = _collect_and_train(
        cfg, loaded, hook, train_plan, work, (signature, data_signature), device, say, world
    )
    if not world.main:
        barrier(world)  # wait for rank 0 to write: leaving early tore gloo down under it (SIGABRT in CI)
        return 0

    meta = {
        "model_name": loaded.name,
        "hook_name": hook.name,
        "context_size": cfg.context_size,
        "prepend_bos": False,
        "exclude_special_tokens": True,
        "dataset_path": ", ".join(c.path for c in cfg.corpus),
        "model_spec": cfg.model,
        "model_sha256": loaded.sha256,
        "hook_module": hook.module_path,
    }
    sae = trained.result.trainer.cpu().to_sae(hook_name=hook.name, model_name=loaded.name, metadata=meta)
    metrics, eval_s = _evaluate(cfg, sae, loaded, hook, held_plan, device)
    sparsity = log10_sparsity(metrics.pop("firing_counts"), metrics["tokens"])
    total_s = time.perf_counter() - t0

    training = _training_record(cfg, trained, metrics["tokens"])
    train_s = trained.result.train_seconds
    extra = {
        "metadata": {
            **meta,
            "norm_scaling_factor_folded": training["norm_scaling_factor_folded"],
            "eval": metrics,
            "training": training,
            "trained_with": "featuregeom train-sae (TopK, Gao et al. 2024)",
        }
    }
    report = {
        "command": _command_line(),
        "config": cfg.to_dict(),
        "model": loaded.describe(),
        "hook": hook.describe(),
        "corpus": corpus_record(cfg, corpus_hashes, train_plan, held_plan),
        DOCUMENTS_KEY: documents_record(cfg, train_plan, held_plan),
        "training": training,
        "eval": metrics,
        "timing": {
            "collect_s": trained.collect_s,
            "train_s": train_s,
            "eval_s": eval_s,
            "total_s": total_s,
            "resumed_from_step": trained.result.resumed_from,
        },
        "machine": machine_record(device),
        "curve": trained.result.curve,
    }

    def write(staging: Path) -> None:
        save_saelens(sae, staging, extra_cfg=extra, sparsity=sparsity)
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str))

    write_dir_atomic(out, write, marker=REPORT_FILE, what="train-sae output")
    if not cfg.keep_work:
        for name in (STORE_FILE, STORE_PROGRESS):
            (work / name).unlink(missing_ok=True)
    print(_summary(metrics))
    print(
        f"wrote {out} in {total_s / 60:.1f} min (collect {trained.collect_s:.0f} s, train {train_s:.0f} s, "
        f"eval {eval_s:.0f} s)"
    )
    barrier(world)
    return 0


def eval_only(cfg: TrainSAEConfig) -> int:
    """Re-score the SAE in --out on this config's held-out documents; rewrite its recorded figures."""
    from safetensors.torch import save_file

    from precompute.model.hooks import resolve_hook
    from precompute.model.load import load_model, resolve_device
    from precompute.sae.registry import load_sae_for_model

    out = Path(str(cfg.out))
    if not (out / "cfg.json").is_file():
        raise FeatureGeomError(f"--eval-only needs an SAE directory in --out; {out} has no cfg.json")
    device = resolve_device(cfg.device)
    loaded = load_model(cfg.model, device=str(device))
    sae, _ = load_sae_for_model(str(out), d_model=loaded.d_model, model_name=loaded.name)
    hook = resolve_hook(loaded.model, sae.hook_name or cfg.hook)
    _, held_plan = _split(cfg, loaded.tokenizer)
    metrics, eval_s = _evaluate(cfg, sae, loaded, hook, held_plan, device)
    sparsity = log10_sparsity(metrics.pop("firing_counts"), metrics["tokens"]).contiguous()
    write_atomic(out / "sparsity.safetensors", lambda tmp: save_file({"sparsity": sparsity}, str(tmp)))
    cfg_json = json.loads((out / "cfg.json").read_text())
    cfg_json.setdefault("metadata", {})["eval"] = metrics
    write_text_atomic(out / "cfg.json", json.dumps(cfg_json, indent=2))
    report_path = out / REPORT_FILE
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    report["eval"] = metrics
    report.setdefault("evaluations", []).append(
        {"command": _command_line(), "eval_s": eval_s, "eval": metrics}
    )
    write_text_atomic(report_path, json.dumps(report, indent=2, default=str))
    print(_summary(metrics))
    return 0


COMMANDS = (
    Command(
        "train-sae",
        "train a TopK SAE on a model's activations (SAELens format out)",
        TrainSAEConfig,
        run,
        description="Train a TopK sparse autoencoder (Gao et al. 2024) on activations streamed from any "
        "model/hook/corpus and write a SAELens-format directory. Options can come from --config "
        "FILE.toml (keys = option names with underscores, plus [[corpus]] tables with path/group/category/"
        "text_field/format/where/max_tokens); flags override the file. Rerunning the same command resumes "
        "from the last checkpoint in --work-dir; --overwrite starts afresh and replaces --out. Example: "
        "featuregeom train-sae --config configs/train-sae.toml --out "
        "assets/sae/smollm2-135m-instruct-blocks.15.hook_resid_post-topk",
    ),
)
