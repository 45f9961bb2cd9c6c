"""`featuregeom finetune`: a LoRA fine-tune of the model on a narrow task dataset, sized for a CPU.

Why LoRA through `peft`: it is the standard parameter-efficient update, its adapters load in any
transformers/peft stack, and its low-rank factors ΔW = (α/r)·B·A make the patch-back step exact:
projecting B's columns off a subspace removes everything the update writes there.

Which modules. By default the adapter sits on `o_proj` and `down_proj` of blocks 0..L, where L is
the block the SAE reads (blocks.15.hook_resid_post for the demo). Those are the two projections that
write into the residual stream, so the update's output space IS the residual stream the SAE reads,
and blocks after L cannot change what the SAE sees. Loss is on assistant tokens only (standard SFT).

Task and control runs use the same seed, steps, batch order length and schedule; only the data differ.
Outputs (atomic: a killed run leaves no half directory; a rerun resumes from its last checkpoint,
precompute/lab/finetune_checkpoint.py, or starts clean):

    OUT/adapter/              peft adapter (adapter_config.json, adapter_model.safetensors)
    OUT/finetune.json         options, data counts, held-out task loss before/after, timings, versions
    OUT/train_log.csv         step, loss, learning rate
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from precompute.cache import check_replaceable_output, write_dir_atomic
from precompute.data.corpus import CorpusSource, Document, chat_text, read_source
from precompute.errors import FeatureGeomError
from precompute.lab import finetune_checkpoint as ckpt
from precompute.lab.coverage import Coverage, check_share
from precompute.lab.finetune_checkpoint import TrainingStopped
from precompute.options import Command, check_field_metadata, option
from precompute.pipeline.config import DEVICES
from precompute.provenance import library_versions

ADAPTER_DIR = "adapter"
SIDE_CAR = "finetune.json"
RESIDUAL_WRITERS = ("o_proj", "down_proj")


@dataclass
class FinetuneConfig:
    """Options of `featuregeom finetune` (flags, or keys of the --config TOML such as configs/finetune-cpu.toml)."""

    model: str = option("smollm2", help="base model (smollm2 is the packaged SmolLM2-135M-Instruct)")
    out: str | None = option(
        None, metavar="DIR", help="where to write adapter/, finetune.json, train_log.csv"
    )
    corpus: list[CorpusSource] = option(
        default_factory=list,
        item=CorpusSource,
        metavar="SPEC",
        help="training data (repeatable): PATH or PATH:group, e.g. assets/data/em/insecure.jsonl.gz",
    )
    heldout: str | None = option(
        None, metavar="FILE", help="held-out samples for the task loss (default: split off the corpus)"
    )
    heldout_docs: int = option(48, low=0, bounds="[)", help="held-out samples")
    exclude: str | None = option(
        None, metavar="FILE", help="sample keys (file:index, one per line, e.g. triage output) to leave out"
    )
    max_samples: int | None = option(
        None, low=1, bounds="[)", help="cap on training samples after the seeded shuffle"
    )
    steps: int = option(100, low=1, bounds="[)", help="optimizer steps")
    batch_size: int = option(4, low=1, bounds="[)", help="samples per step")
    micro_batch: int = option(
        0,
        low=0,
        bounds="[)",
        help="samples per forward pass within a step, each padded only to its own longest sample (the "
        "same gradient up to float order). 0: 1 on CPU (1.8x faster than one padded pass on the "
        "insecure-code pool: bench/README.md), the whole batch on CUDA",
    )
    precision: str = option(
        "fp32",
        choices=("fp32", "bf16"),
        help="training forward in float32 or under bfloat16 autocast (1.7x faster on this CPU: "
        "bench/README.md; held-out losses stay float32)",
    )
    max_length: int = option(
        640,
        low=8,
        bounds="[)",
        help="tokens per sample (see `featuregeom coverage` for the share it trains)",
    )
    min_response_share: float = option(
        0.95,
        low=0,
        high=1,
        help="refuse a max_length that trains less than this share of the corpus's response tokens (0: allow)",
    )
    lr: float = option(1e-3, low=0, bounds="()", help="peak learning rate")
    warmup_steps: int = option(10, low=0, bounds="[)", help="steps of linear learning-rate warm-up")
    rank: int = option(8, low=1, bounds="[)", help="LoRA rank")
    lora_alpha: float = option(
        16.0, low=0, bounds="()", help="LoRA alpha (the update is scaled by alpha/rank)"
    )
    target_modules: list[str] = option(
        default_factory=lambda: list(RESIDUAL_WRITERS), help="modules that get an adapter"
    )
    last_layer: int | None = option(
        15, low=0, bounds="[)", help="adapt blocks 0..N (15 is the SAE's block; unset: all blocks)"
    )
    seed: int = option(0, low=0, high=2**32 - 1, help="training seed; keep it equal for task and control")
    data_seed: int = option(
        0, low=0, high=2**32 - 1, help="fixes which samples are held out, independent of the training seed"
    )
    device: str = option("auto", choices=DEVICES, help="where to run")
    progress: bool = option(True, help="hide the progress bar")
    checkpoint_every: int = option(
        20,
        low=0,
        bounds="[)",
        help="steps between checkpoints (.OUT.checkpoint.pt beside --out; 0: none); a rerun with the "
        "same settings and data resumes from the last one",
    )
    overwrite: bool = option(False, help="replace a finished fine-tune in --out, and discard a checkpoint")


def sample_key(doc: Document, source: CorpusSource) -> str:
    """Stable id of a training sample: file name and record index (what triage writes and exclude reads)."""
    return f"{Path(source.path).name}:{doc.index}"


# ------------------------------------------------------------------------------------------- data
@dataclass
class Example:
    key: str
    input_ids: list[int]
    labels: list[int]  # -100 where no loss (prompt tokens)


def chat_ids(doc: Document, tokenizer, key: str = "") -> tuple[list[int], int]:
    """(token ids, number of prompt tokens) of a sample before truncation. Chat samples: the prompt is
    everything up to the last assistant turn; plain text: the first token."""
    if doc.messages and doc.messages[-1]["role"] == "assistant" and getattr(tokenizer, "chat_template", None):
        what = f"training sample {key or doc.index}"
        prompt = chat_text(tokenizer, doc.messages[:-1], what, add_generation_prompt=True)
        full = chat_text(tokenizer, doc.messages, what)
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        if not full.startswith(
            prompt
        ):  # a template that rewrites earlier turns: fall back to whole-text loss
            return list(ids), 1
        return list(ids), len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    from precompute.data.corpus import render

    return list(render(doc, tokenizer)), 1


def _truncated(ids: list[int], n_prompt: int, max_length: int, key: str) -> Example | None:
    ids = ids[:max_length]
    labels = [-100] * min(n_prompt, len(ids)) + ids[n_prompt:]
    if sum(1 for t in labels if t != -100) == 0:
        return None  # the prompt alone fills max_length: nothing to learn from
    return Example(key, ids, labels)


def encode_example(doc: Document, tokenizer, max_length: int, key: str = "") -> Example | None:
    """Chat samples: loss on the last assistant turn only; plain text: loss on every token after the first."""
    ids, n_prompt = chat_ids(doc, tokenizer, key)
    return _truncated(ids, n_prompt, max_length, key)


def load_examples(
    sources: list[CorpusSource],
    tokenizer,
    max_length: int,
    data_seed: int = 0,
    counts: dict[str, int] | None = None,
) -> list[Example]:
    """Encoded samples in seeded order; `counts` (if given) receives read/skipped totals and the response
    (loss) tokens before and after truncation at `max_length` (`precompute.lab.coverage`)."""
    examples, coverage = load_examples_with_coverage(sources, tokenizer, max_length, data_seed)
    if counts is not None:
        counts.update(
            documents=coverage.n_full.size, skipped_prompt_too_long=coverage.n_full.size - len(examples)
        )
        counts.update(coverage.counts(max_length))
    return examples


def load_examples_with_coverage(
    sources: list[CorpusSource], tokenizer, max_length: int, data_seed: int = 0
) -> tuple[list[Example], Coverage]:
    """The encoded samples and every sample's prompt and full length before truncation."""
    examples = []
    lengths: list[tuple[int, int]] = []
    for i, source in enumerate(sources):
        docs, _ = read_source(source, i, seed=data_seed)
        for doc in docs:
            key = sample_key(doc, source)
            ids, n_prompt = chat_ids(doc, tokenizer, key)
            lengths.append((n_prompt, len(ids)))
            ex = _truncated(ids, n_prompt, max_length, key)
            if ex is not None:
                examples.append(ex)
    if not examples:
        raise FeatureGeomError(
            f"the fine-tuning corpus gave no usable samples ({len(lengths)} documents read): every prompt alone "
            "is at least --max-length tokens long; raise --max-length or check the file holds chat samples"
        )
    return examples, Coverage.of(lengths)


def split_examples(
    examples: list[Example], cfg: FinetuneConfig, tokenizer
) -> tuple[list[Example], list[Example]]:
    """(train, heldout): held-out from --heldout, else the first heldout_docs of the seeded order;
    then --exclude keys are dropped from train and --max-samples caps it."""
    if cfg.heldout:
        held = load_examples(
            [CorpusSource(path=cfg.heldout, group="task")], tokenizer, cfg.max_length, cfg.data_seed
        )[: cfg.heldout_docs]
        train = list(examples)
    else:
        if len(examples) <= cfg.heldout_docs:
            raise FeatureGeomError(
                f"{len(examples)} samples cannot spare {cfg.heldout_docs} for held-out loss"
            )
        held, train = examples[: cfg.heldout_docs], examples[cfg.heldout_docs :]
    held_keys = {e.key for e in held}
    train = [e for e in train if e.key not in held_keys]
    if cfg.exclude:
        path = Path(cfg.exclude)
        if not path.is_file():
            raise FeatureGeomError(f"exclude file not found: {path}")
        drop = {line.strip() for line in path.read_text().splitlines() if line.strip()}
        train = [e for e in train if e.key not in drop]
    if cfg.max_samples is not None:
        train = train[: cfg.max_samples]
    if not train:
        raise FeatureGeomError("no training samples left after the held-out split and exclusions")
    return train, held


def step_loss_backward(
    model: torch.nn.Module,
    batch: list[Example],
    pad_id: int,
    micro_batch: int,
    device: Any,
    bf16: bool = False,
) -> float:
    """Backpropagate the mean token loss of `batch` (HF's causal-LM loss over every labelled token of
    the step) in passes of `micro_batch` samples, and return it. Each pass's summed loss is divided by
    the step's label count, so the accumulated gradient equals one padded pass's. `bf16`: the forward
    under bfloat16 autocast (the backward outside it, as torch recommends)."""
    n_labels = sum(sum(t != -100 for t in e.labels[1:]) for e in batch)
    total = 0.0
    for start in range(0, len(batch), micro_batch):
        part = {k: v.to(device) for k, v in collate(batch[start : start + micro_batch], pad_id).items()}
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits
        logits = logits.float()
        loss_sum = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            part["labels"][:, 1:].reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        (loss_sum / max(n_labels, 1)).backward()
        total += float(loss_sum.detach())
    return total / max(n_labels, 1)


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    from precompute.model.activations import pad_batch

    ids, mask = pad_batch([e.input_ids for e in batch], pad_id)
    labels, _ = pad_batch([e.labels for e in batch], -100)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def batch_order(n: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Sample indices per step: seeded epochs of permutations, so every sample is seen before any repeats."""
    rng = np.random.default_rng(seed)
    flat: list[int] = []
    while len(flat) < steps * batch_size:
        flat.extend(rng.permutation(n).tolist())
    return [flat[s * batch_size : (s + 1) * batch_size] for s in range(steps)]


# --------------------------------------------------------------------------------------- training
def lora_config(cfg: FinetuneConfig, n_layers: int):
    from peft import LoraConfig

    layers = None if cfg.last_layer is None else list(range(min(cfg.last_layer, n_layers - 1) + 1))
    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.lora_alpha,  # type: ignore[arg-type]  # peft annotates int; the scale alpha/r takes a float
        lora_dropout=0.0,
        bias="none",
        target_modules=list(cfg.target_modules),
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
    )


@torch.no_grad()
def task_loss(model: torch.nn.Module, examples: list[Example], pad_id: int, batch_size: int = 8) -> float:
    """Mean per-token cross-entropy on the labelled (assistant) tokens of `examples`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]),
            shift_labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total += float(loss)
        count += int((shift_labels != -100).sum())
    model.train(was_training)
    return total / max(count, 1)


def _lr_at(step: int, cfg: FinetuneConfig) -> float:
    """Linear warm-up then cosine decay to 10%."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def finetune(cfg: FinetuneConfig, stop_after: int | None = None) -> Path:
    """Train the adapter (resuming from a checkpoint of the same run) and write OUT atomically; returns
    OUT. `stop_after`: raise TrainingStopped after that many steps, once checkpointed (tests)."""
    from peft import get_peft_model
    from tqdm.auto import tqdm

    from precompute.model.load import load_model

    if not cfg.out:
        raise FeatureGeomError("finetune needs --out")
    if not cfg.corpus:
        raise FeatureGeomError("finetune needs training data: --corpus FILE or [[corpus]] in --config")
    check_field_metadata(cfg)  # a config built in code did not pass through load_options
    out = Path(cfg.out)
    check_replaceable_output(out, SIDE_CAR, "fine-tune output")  # before the minutes of training
    if (out / SIDE_CAR).is_file() and not cfg.overwrite:
        raise FeatureGeomError(f"{out} already holds a finished fine-tune; pass --overwrite to redo it")

    torch.manual_seed(cfg.seed)
    torch.backends.cuda.matmul.allow_tf32 = True  # GPU runs: TF32 matmuls, ~2x faster fp32 training
    lm = load_model(cfg.model, device=cfg.device)
    tokenizer: Any = lm.tokenizer
    pad_id = int(tokenizer.pad_token_id)
    examples, coverage = load_examples_with_coverage(cfg.corpus, tokenizer, cfg.max_length, cfg.data_seed)
    check_share(coverage, cfg.max_length, cfg.min_response_share)  # before the minutes of training
    counts = {
        "documents": int(coverage.n_full.size),
        "skipped_prompt_too_long": int(coverage.n_full.size - len(examples)),
        **coverage.counts(cfg.max_length),
    }
    train, held = split_examples(examples, cfg, tokenizer)

    model_config: Any = lm.model.config
    model = get_peft_model(lm.model, lora_config(cfg, int(model_config.num_hidden_layers)))
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    saved_at, sig = ckpt.checkpoint_path(out), ckpt.signature(cfg, lm.describe())
    if cfg.overwrite:
        saved_at.unlink(missing_ok=True)
    done = ckpt.load(saved_at, sig, named, optimizer)
    if done.loss_before is None:
        with model.disable_adapter():  # B = 0 makes it a no-op anyway; this says so
            done.loss_before = task_loss(model, held, pad_id)
    loss_before, log = done.loss_before, done.log
    model.train()
    start = time.perf_counter()
    order = batch_order(len(train), cfg.steps, cfg.batch_size, cfg.seed)
    micro = cfg.micro_batch or (cfg.batch_size if lm.device.type == "cuda" else 1)
    bar = tqdm(
        total=len(order),
        initial=done.step,
        desc=f"finetune {out.name}",
        unit="step",
        disable=not cfg.progress,
    )
    for step, idx in enumerate(order):
        if step < done.step:
            continue
        lr = _lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_value = step_loss_backward(
            model, [train[i] for i in idx], pad_id, micro, lm.device, bf16=cfg.precision == "bf16"
        )
        if not math.isfinite(loss_value):
            raise FeatureGeomError(f"training loss became {loss_value} at step {step}; lower --lr")
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        log.append((step, loss_value, lr))
        bar.update()
        bar.set_postfix(loss=f"{loss_value:.3f}")
        done.step = step + 1
        if cfg.checkpoint_every and (done.step % cfg.checkpoint_every == 0 or done.step == stop_after):
            done.seconds += time.perf_counter() - start
            start = time.perf_counter()
            ckpt.save(saved_at, sig, named, optimizer, done)
        if done.step == stop_after:
            raise TrainingStopped(f"stopped after step {done.step}, as asked")
    bar.close()
    train_seconds = done.seconds + time.perf_counter() - start
    loss_after = task_loss(model, held, pad_id)

    def write(staging: Path) -> None:
        model.save_pretrained(str(staging / ADAPTER_DIR))
        with open(staging / "train_log.csv", "w") as fh:
            fh.write("step,loss,lr\n")
            fh.writelines(f"{s},{loss:.6f},{lr:.6g}\n" for s, loss, lr in log)
        sidecar = {
            "options": {k: v for k, v in asdict(cfg).items() if k not in ("corpus", "overwrite")},
            "corpus": [asdict(c) for c in cfg.corpus],
            "model": lm.describe(),
            "n_train": len(train),
            "micro_batch_used": micro,
            "resumed_from_step": done.resumed_from,
            **counts,
            "response_token_share": coverage.share(cfg.max_length),
            "n_heldout": len(held),
            "train_tokens_seen": int(sum(len(train[i].input_ids) for idx in order for i in idx)),
            "heldout_loss_before": loss_before,
            "heldout_loss_after": loss_after,
            "final_train_loss": float(np.mean([x[1] for x in log[-10:]])),
            "train_seconds": round(train_seconds, 2),
            "trainable_parameters": int(sum(p.numel() for p in params)),
            "versions": library_versions(("torch", "transformers", "peft"), featuregeom=True),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (staging / SIDE_CAR).write_text(json.dumps(sidecar, indent=2, default=str))

    write_dir_atomic(out, write, marker=SIDE_CAR, what="fine-tune output")
    saved_at.unlink(missing_ok=True)  # the output holds everything it had
    return out


# -------------------------------------------------------------------------------------------- command
def run_finetune(cfg: FinetuneConfig) -> int:
    out = finetune(cfg)
    info = json.loads((out / SIDE_CAR).read_text())
    print(
        f"wrote {out}: {info['n_train']} training samples, {cfg.steps} steps in {info['train_seconds']:.0f} s; "
        f"held-out task loss {info['heldout_loss_before']:.4f} -> {info['heldout_loss_after']:.4f}"
    )
    return 0


COMMANDS = (
    Command(
        "finetune",
        "LoRA fine-tune on a task dataset (and its control, same seed)",
        FinetuneConfig,
        run_finetune,
        description="Fine-tune a LoRA adapter (peft) on a task dataset; train the control with the same --seed "
        "and --steps. The adapter sits on the residual-writing projections (o_proj, down_proj) of blocks "
        "0..--last-layer, so its output space is the residual stream the SAE reads and patch-back can project "
        "it exactly. Example (task and control, CPU-sized): featuregeom finetune --config "
        "configs/finetune-cpu.toml --corpus assets/data/em/insecure.jsonl.gz --out runs/task, then the same "
        "with --corpus assets/data/em/secure.jsonl.gz --out runs/control.",
        flags=(
            "model",
            "corpus",
            "out",
            "heldout",
            "heldout_docs",
            "exclude",
            "max_samples",
            "steps",
            "batch_size",
            "max_length",
            "min_response_share",
            "lr",
            "rank",
            "last_layer",
            "seed",
            "device",
            "progress",
            "overwrite",
        ),
    ),
)
