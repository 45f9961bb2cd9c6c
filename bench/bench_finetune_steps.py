"""One LoRA fine-tuning step three ways, side by side: one padded float32 pass (the baseline), per-sample
float32 passes (`finetune --micro-batch 1`), one padded pass under bfloat16 autocast (`--precision bf16`).

    python bench/bench_finetune_steps.py --corpus runs/lab/data/insecure_pool.jsonl --steps 4

The packaged SmolLM2 with configs/finetune-cpu.toml's adapter, the step order `finetune` uses (seed 0),
steps alternated between the ways so drift on a shared machine hits both; prints seconds per step
and the ratio, and the tokens each way computes (padding included).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from precompute.data.corpus import CorpusSource  # noqa: E402
from precompute.lab.finetune import (  # noqa: E402
    FinetuneConfig,
    batch_order,
    load_examples,
    lora_config,
    step_loss_backward,
)
from precompute.model.load import load_model  # noqa: E402
from precompute.options import load_options  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True, help="chat JSONL to train on (e.g. the lab's insecure pool)")
    ap.add_argument("--config", default="configs/finetune-cpu.toml")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per way")
    args = ap.parse_args(argv)
    from peft import get_peft_model

    cfg = load_options(FinetuneConfig, args.config)
    lm = load_model(cfg.model, device="cpu")
    pad = int(lm.tokenizer.pad_token_id)
    examples = load_examples([CorpusSource(path=args.corpus, group="task")], lm.tokenizer, cfg.max_length)
    model = get_peft_model(lm.model, lora_config(cfg, int(lm.model.config.num_hidden_layers)))
    order = batch_order(len(examples), args.steps + 1, cfg.batch_size, 0)
    ways = {
        "padded fp32": (cfg.batch_size, False),
        "per-sample fp32": (1, False),
        "padded bf16": (cfg.batch_size, True),
    }
    seconds: dict[str, list[float]] = {w: [] for w in ways}
    losses: dict[str, list[float]] = {w: [] for w in ways}
    padded = sum(max(len(examples[i].input_ids) for i in b) * len(b) for b in order[1:])
    real = sum(len(examples[i].input_ids) for b in order[1:] for i in b)
    step_loss_backward(model, [examples[i] for i in order[0]], pad, cfg.batch_size, lm.device)  # warm-up
    for idx in order[1:]:
        for way, (micro, bf16) in ways.items():
            model.zero_grad(set_to_none=True)
            t = time.perf_counter()
            losses[way].append(
                step_loss_backward(model, [examples[i] for i in idx], pad, micro, lm.device, bf16)
            )
            seconds[way].append(time.perf_counter() - t)
    print(
        f"torch threads {torch.get_num_threads()}, batch {cfg.batch_size}, max_length {cfg.max_length}, "
        f"{args.steps} steps; tokens computed: padded {padded:,}, per-sample {real:,}"
    )
    base = statistics.median(seconds["padded fp32"])
    for way in ways:
        med = statistics.median(seconds[way])
        gap = max(abs(a - b) for a, b in zip(losses[way], losses["padded fp32"], strict=True))
        print(
            f"{way:16s} {med:6.2f} s/step  baseline/this {base / med:.2f}x  max |loss - fp32 loss| {gap:.2g}"
        )


if __name__ == "__main__":
    main()
