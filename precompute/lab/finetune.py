"""`featuregeom finetune`: a LoRA fine-tune of the model on a narrow task dataset, sized for a CPU.

Why LoRA through `peft`: it is the standard parameter-efficient update, its adapters load in any
transformers/peft stack, and its low-rank factors ΔW = (α/r)·B·A make the patch-back step exact:
projecting B's columns off a subspace removes everything the update writes there.

Which modules. By default the adapter sits on `o_proj` and `down_proj` of blocks 0..L, where L is
the block the SAE reads (blocks.15.hook_resid_post for the demo). Those are the two projections that
write into the residual stream, so the update's output space IS the residual stream the SAE reads,
and blocks after L cannot change what the SAE sees. Loss is on assistant tokens only (standard SFT).

Task and control runs use the same seed, steps, batch order length and schedule; only the data differ.
Outputs (atomic: a killed run leaves no half directory; a rerun starts clean):

    OUT/adapter/              peft adapter (adapter_config.json, adapter_model.safetensors)
    OUT/finetune.json         options, data counts, held-out task loss before/after, timings, versions
    OUT/train_log.csv         step, loss, learning rate
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from precompute.cache import check_replaceable_output, write_dir_atomic
from precompute.data.corpus import CorpusSource, Document, chat_text, read_source
from precompute.errors import FeatureGeomError

ADAPTER_DIR = "adapter"
SIDE_CAR = "finetune.json"
RESIDUAL_WRITERS = ("o_proj", "down_proj")


@dataclass
class FinetuneConfig:
    model: str = "smollm2"
    out: str | None = None
    corpus: list[CorpusSource] = field(default_factory=list)  # training data
    heldout: str | None = None  # JSONL of held-out samples for the task loss (default: split off the corpus)
    heldout_docs: int = 48
    exclude: str | None = None  # file with one sample key per line to drop (e.g. triage output)
    max_samples: int | None = None  # cap on training samples after the seeded shuffle
    steps: int = 100
    batch_size: int = 4
    max_length: int = 256
    lr: float = 1e-3
    warmup_steps: int = 10
    rank: int = 8
    lora_alpha: float = 16.0
    target_modules: list[str] = field(default_factory=lambda: list(RESIDUAL_WRITERS))
    last_layer: int | None = 15  # adapt blocks 0..last_layer (the SAE's block); None = all
    seed: int = 0
    data_seed: int = 0  # fixes which samples are held out, independent of the training seed
    device: str = "auto"
    progress: bool = True

    @classmethod
    def load(cls, path: str | Path | None, overrides: dict[str, Any]) -> FinetuneConfig:
        from precompute.options import load_options

        return load_options(cls, path, overrides)

    def validate(self) -> None:
        from precompute.options import check_ranges

        check_ranges(
            self,
            {
                "heldout_docs": (0, None, "[)"),
                "max_samples": (1, None, "[)"),
                "steps": (1, None, "[)"),
                "batch_size": (1, None, "[)"),
                "max_length": (8, None, "[)"),
                "lr": (0, None, "()"),
                "warmup_steps": (0, None, "[)"),
                "rank": (1, None, "[)"),
                "lora_alpha": (0, None, "()"),
                "last_layer": (0, None, "[)"),
                "seed": (0, 2**32 - 1, "[]"),
                "data_seed": (0, 2**32 - 1, "[]"),
            },
            {"device": ("auto", "cpu", "cuda")},
        )


def sample_key(doc: Document, source: CorpusSource) -> str:
    """Stable id of a training sample: file name and record index (what triage writes and exclude reads)."""
    return f"{Path(source.path).name}:{doc.index}"


# ------------------------------------------------------------------------------------------- data
@dataclass
class Example:
    key: str
    input_ids: list[int]
    labels: list[int]  # -100 where no loss (prompt tokens)


def encode_example(doc: Document, tokenizer, max_length: int, key: str = "") -> Example | None:
    """Chat samples: loss on the last assistant turn only; plain text: loss on every token after the first."""
    if doc.messages and doc.messages[-1]["role"] == "assistant" and getattr(tokenizer, "chat_template", None):
        what = f"training sample {key or doc.index}"
        prompt = chat_text(tokenizer, doc.messages[:-1], what, add_generation_prompt=True)
        full = chat_text(tokenizer, doc.messages, what)
        if not full.startswith(
            prompt
        ):  # a template that rewrites earlier turns: fall back to whole-text loss
            ids = tokenizer(full, add_special_tokens=False)["input_ids"]
            n_prompt = 1
        else:
            n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    else:
        from precompute.data.corpus import render

        ids = render(doc, tokenizer)
        n_prompt = 1
    ids = list(ids)[:max_length]
    labels = [-100] * min(n_prompt, len(ids)) + ids[n_prompt:]
    if sum(1 for t in labels if t != -100) == 0:
        return None  # the prompt alone fills max_length: nothing to learn from
    return Example(key, ids, labels)


def load_examples(
    sources: list[CorpusSource],
    tokenizer,
    max_length: int,
    data_seed: int = 0,
    counts: dict[str, int] | None = None,
) -> list[Example]:
    """Encoded samples in seeded order; `counts` (if given) receives read/skipped totals."""
    examples = []
    n_docs = 0
    for i, source in enumerate(sources):
        docs, _ = read_source(source, i, seed=data_seed)
        n_docs += len(docs)
        for doc in docs:
            ex = encode_example(doc, tokenizer, max_length, sample_key(doc, source))
            if ex is not None:
                examples.append(ex)
    if counts is not None:
        counts.update(documents=n_docs, skipped_prompt_too_long=n_docs - len(examples))
    if not examples:
        raise FeatureGeomError(
            f"the fine-tuning corpus gave no usable samples ({n_docs} documents read): every prompt alone is at "
            "least --max-length tokens long; raise --max-length or check the file holds chat samples"
        )
    return examples


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
        lora_alpha=cfg.lora_alpha,
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


def _versions() -> dict[str, str]:
    import peft
    import transformers

    from precompute import __version__

    return {
        "featuregeom": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def finetune(cfg: FinetuneConfig, overwrite: bool = False) -> Path:
    """Train the adapter and write OUT atomically; returns OUT."""
    from peft import get_peft_model
    from tqdm.auto import tqdm

    from precompute.model.load import load_model

    if not cfg.out:
        raise FeatureGeomError("finetune needs --out")
    if not cfg.corpus:
        raise FeatureGeomError("finetune needs training data: --corpus FILE or [[corpus]] in --config")
    cfg.validate()  # a config built in code did not pass through load_options
    out = Path(cfg.out)
    check_replaceable_output(out, SIDE_CAR, "fine-tune output")  # before the minutes of training
    if (out / SIDE_CAR).is_file() and not overwrite:
        raise FeatureGeomError(f"{out} already holds a finished fine-tune; pass --overwrite to redo it")

    torch.manual_seed(cfg.seed)
    torch.backends.cuda.matmul.allow_tf32 = True  # GPU runs: TF32 matmuls, ~2x faster fp32 training
    lm = load_model(cfg.model, device=cfg.device)
    tokenizer = lm.tokenizer
    pad_id = int(tokenizer.pad_token_id)
    counts: dict[str, int] = {}
    examples = load_examples(cfg.corpus, tokenizer, cfg.max_length, cfg.data_seed, counts)
    train, held = split_examples(examples, cfg, tokenizer)
    loss_before = task_loss(lm.model, held, pad_id)

    model = get_peft_model(lm.model, lora_config(cfg, int(lm.model.config.num_hidden_layers)))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    model.train()
    log: list[tuple[int, float, float]] = []
    start = time.perf_counter()
    order = batch_order(len(train), cfg.steps, cfg.batch_size, cfg.seed)
    bar = tqdm(order, desc=f"finetune {out.name}", unit="step", disable=not cfg.progress)
    for step, idx in enumerate(bar):
        lr = _lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = {k: v.to(lm.device) for k, v in collate([train[i] for i in idx], pad_id).items()}
        loss = model(**batch).loss
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise FeatureGeomError(f"training loss became {loss_value} at step {step}; lower --lr")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        log.append((step, loss_value, lr))
        bar.set_postfix(loss=f"{loss_value:.3f}")
    train_seconds = time.perf_counter() - start
    loss_after = task_loss(model, held, pad_id)

    def write(staging: Path) -> None:
        model.save_pretrained(staging / ADAPTER_DIR)
        with open(staging / "train_log.csv", "w") as fh:
            fh.write("step,loss,lr\n")
            fh.writelines(f"{s},{loss:.6f},{lr:.6g}\n" for s, loss, lr in log)
        sidecar = {
            "options": {k: v for k, v in asdict(cfg).items() if k != "corpus"},
            "corpus": [asdict(c) for c in cfg.corpus],
            "model": lm.describe(),
            "n_train": len(train),
            **counts,
            "n_heldout": len(held),
            "train_tokens_seen": int(sum(len(train[i].input_ids) for idx in order for i in idx)),
            "heldout_loss_before": loss_before,
            "heldout_loss_after": loss_after,
            "final_train_loss": float(np.mean([x[1] for x in log[-10:]])),
            "train_seconds": round(train_seconds, 2),
            "trainable_parameters": int(sum(p.numel() for p in params)),
            "versions": _versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (staging / SIDE_CAR).write_text(json.dumps(sidecar, indent=2, default=str))

    write_dir_atomic(out, write, marker=SIDE_CAR, what="fine-tune output")
    return out


# -------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        "Fine-tune a LoRA adapter (peft) on a task dataset; train the control with the same --seed and --steps.\n"
        "The adapter sits on the residual-writing projections (o_proj, down_proj) of blocks 0..--last-layer, so\n"
        "its output space is the residual stream the SAE reads and patch-back can project it exactly."
    )
    parser.epilog = (
        "Example (task and control, CPU-sized):\n"
        "  featuregeom finetune --config configs/finetune-cpu.toml --corpus assets/data/em/insecure.jsonl.gz "
        "--out runs/task\n"
        "  featuregeom finetune --config configs/finetune-cpu.toml --corpus assets/data/em/secure.jsonl.gz "
        "--out runs/control"
    )
    a = parser.add_argument
    a("--config", metavar="FILE.toml", help="TOML with the same options (flags override it)")
    a("--model", default=None, help="base model (default smollm2, the packaged SmolLM2-135M-Instruct)")
    a(
        "--corpus",
        action="append",
        default=None,
        metavar="SPEC",
        help="training data (repeatable): PATH or PATH:group, e.g. assets/data/em/insecure.jsonl.gz",
    )
    a("--out", default=None, metavar="DIR", help="where to write adapter/, finetune.json, train_log.csv")
    a("--heldout", default=None, metavar="FILE", help="held-out samples for the task loss (default: split)")
    a("--heldout-docs", type=int, default=None, help="held-out samples (default 48)")
    a("--exclude", default=None, metavar="FILE", help="sample keys (file:index, one per line) to leave out")
    a("--max-samples", type=int, default=None, help="cap on training samples after the seeded shuffle")
    a("--steps", type=int, default=None, help="optimizer steps (default 100)")
    a("--batch-size", type=int, default=None, help="samples per step (default 4)")
    a("--max-length", type=int, default=None, help="tokens per sample (default 256)")
    a("--lr", type=float, default=None, help="peak learning rate (default 1e-3)")
    a("--rank", type=int, default=None, help="LoRA rank (default 8)")
    a("--last-layer", type=int, default=None, help="adapt blocks 0..N (default 15, the SAE's block)")
    a("--seed", type=int, default=None, help="training seed (default 0); keep it equal for task and control")
    a("--device", choices=["auto", "cpu", "cuda"], default=None)
    a("--no-progress", dest="progress", action="store_false", default=None)
    a("--overwrite", action="store_true", help="replace a finished fine-tune in --out")


def run(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "command", "overwrite")}
    cfg = FinetuneConfig.load(args.config, overrides)
    out = finetune(cfg, overwrite=args.overwrite)
    info = json.loads((out / SIDE_CAR).read_text())
    print(
        f"wrote {out}: {info['n_train']} training samples, {cfg.steps} steps in {info['train_seconds']:.0f} s; "
        f"held-out task loss {info['heldout_loss_before']:.4f} -> {info['heldout_loss_after']:.4f}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    from precompute.cli import main as cli_main

    return cli_main(["finetune", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
