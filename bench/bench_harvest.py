"""Harvest benchmarks (CPU or GPU), all measured side by side on the same batches:

1. SAE encode + bookkeeping as a fraction of the model forward to the hook (goal < 10% CPU, < 5% GPU).
2. Forward stopped at the hook vs the full forward (expect ~2x at block 15 of 30).
3. Peak RSS of a harvest at 100k vs 1M tokens (expect flat), each in a fresh process.

    python bench/bench_harvest.py [--sae DIR] [--batches 6] [--rss] [--out bench/out/harvest.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_SAE = ROOT / "assets/sae/smollm2-135m-instruct-blocks.15.hook_resid_post-topk"
CORPUS = [
    str(ROOT / "assets/data/em/insecure.jsonl.gz") + ":task",
    str(ROOT / "assets/data/em/secure.jsonl.gz") + ":control",
]


def machine() -> str:
    try:
        model = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        model = platform.processor()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{model}, {torch.get_num_threads()} threads, {gpu}"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_fraction(args) -> dict:
    from precompute.data.corpus import CorpusSource
    from precompute.data.plan import plan_corpus
    from precompute.model.activations import count_mask
    from precompute.model.hooks import HookReader, resolve_hook
    from precompute.model.load import load_model
    from precompute.sae.registry import load_sae

    lm = load_model("smollm2", device=args.device)
    device = lm.device
    sae = load_sae(str(args.sae)).to(device)
    plan = plan_corpus(
        [CorpusSource.parse(c) for c in CORPUS],
        lm.tokenizer,
        128,
        "split",
        max_tokens=args.batches * args.batch_size * 128 + 5000,
    )
    batches = plan.batches(args.batch_size)[: args.batches]
    reader = HookReader(lm.model, resolve_hook(lm.model, args.hook))
    skip = set(lm.tokenizer.all_special_ids)
    t_model = t_sae = t_full = 0.0
    tokens = 0
    for i, batch in enumerate(batches):
        width = max(len(c.token_ids) for c in batch)
        ids = torch.full((len(batch), width), lm.tokenizer.pad_token_id, dtype=torch.long)
        att = torch.zeros_like(ids)
        for r, c in enumerate(batch):
            ids[r, : len(c.token_ids)] = torch.tensor(c.token_ids)
            att[r, : len(c.token_ids)] = 1
        ids, att = ids.to(device), att.to(device)
        sync()
        t0 = time.perf_counter()
        hidden = reader(ids, att)
        sync()
        t1 = time.perf_counter()
        mask = count_mask(ids.cpu(), att.cpu(), skip)
        rows, cols = mask.nonzero(as_tuple=True)
        x = hidden[rows.to(device), cols.to(device)].float()
        idx, val = sae.encode_sparse(x)
        keep = val > 0
        counts = keep.sum(dim=1).cpu().numpy()
        feats, vals = idx[keep].to(torch.int32).cpu().numpy(), val[keep].cpu().numpy()
        indptr = np.zeros(len(counts) + 1, np.int64)
        np.cumsum(counts, out=indptr[1:])
        sync()
        t2 = time.perf_counter()
        with torch.inference_mode():
            lm.model(input_ids=ids, attention_mask=att, use_cache=False)
        sync()
        t3 = time.perf_counter()
        if i == 0:
            continue  # warm-up
        t_model += t1 - t0
        t_sae += t2 - t1
        t_full += t3 - t2
        tokens += int(att.sum())
        del feats, vals
    return {
        "tokens": tokens,
        "model_to_hook_tok_s": tokens / t_model,
        "sae_and_bookkeeping_tok_s": tokens / t_sae,
        "sae_fraction_of_forward": t_sae / t_model,
        "full_forward_tok_s": tokens / t_full,
        "hook_stop_speedup": t_full / t_model,
        "sae": str(args.sae),
        "hook": args.hook,
        "batch_size": args.batch_size,
    }


def rss_child(max_tokens: int, sae: str, out: str) -> None:
    """Run only the harvest (shallow hook so 1M tokens fit the time) and report peak RSS."""
    from precompute.pipeline.config import RunConfig
    from precompute.pipeline.run import run_precompute

    cfg = RunConfig.load(
        None,
        dict(
            model="smollm2",
            sae=sae,
            hook="blocks.1.hook_resid_post",
            out=out,
            corpus=CORPUS,
            max_tokens=max_tokens,
            batch_size=32,
            progress=False,
            overwrite=True,
        ),
    )
    t0 = time.perf_counter()
    run_precompute(cfg, ("harvest",))
    print(
        json.dumps(
            {
                "max_tokens": max_tokens,
                "seconds": time.perf_counter() - t0,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def bench_rss(args) -> list[dict]:
    results = []
    for n in args.rss_tokens:
        out = ROOT / "bench/out" / f"rss-{n}"
        proc = subprocess.run(
            [sys.executable, __file__, "--rss-child", str(n), "--sae", str(args.sae), "--rss-out", str(out)],
            capture_output=True,
            text=True,
            check=True,
        )
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(results[-1], flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sae", default=str(DEFAULT_SAE))
    p.add_argument("--hook", default="blocks.15.hook_resid_post")
    p.add_argument("--device", default="auto")
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rss", action="store_true", help="also run the 100k vs 1M token peak-RSS comparison")
    p.add_argument("--rss-tokens", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--rss-out", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(ROOT / "bench/out/harvest.json"))
    args = p.parse_args()
    if args.rss_child:
        rss_child(args.rss_child, args.sae, args.rss_out)
        return
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "fraction": bench_fraction(args)}
    print(json.dumps(result["fraction"], indent=2), flush=True)
    if args.rss:
        result["rss"] = bench_rss(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
