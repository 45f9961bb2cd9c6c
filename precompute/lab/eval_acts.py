"""`featuregeom eval-acts`: SAE activations of a (fine-tuned) model on fixed prompts, the input of
`featuregeom diff`.

    featuregeom eval-acts --adapter runs/task --out runs/task/eval      # the "after" activation cache

What it measures. Prompts are the emergent-misalignment evaluation questions (Betley et al.'s
first-plot and pre-registered questions) and neutral instructions (Self-Instruct seed tasks). For each
prompt the model greedily answers (`--response-tokens`), then the prompt + answer is read at the SAE's
hook. Two token sets are kept apart: `prompt` (the user turn and assistant header: how the model reads
the question; the default system prompt is excluded, it is the same for every prompt) and `response`
(the model's own answer, which fine-tuning changes too). Per prompt and feature we store the mean
activation and the firing fraction over that set, and each prompt's base question (`base_id`: an EM
question's `_template` variant shares its base question's), so the diff can resample base questions,
the unit that is independent. With `--logprob` (on by default) the same directory also gets the
judge-free behavioural readout (precompute/lab/logprob.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from precompute.cache import check_replaceable_output, write_dir_atomic
from precompute.data.corpus import CorpusSource, Document, read_source
from precompute.defaults import DEFAULT_SAE, EM_QUESTIONS, NEUTRAL_PROMPTS, relative
from precompute.errors import FeatureGeomError
from precompute.model.activations import pad_batch
from precompute.options import Command, option, require
from precompute.pipeline.config import DEVICES

EM_SOURCES = tuple(
    CorpusSource(path=str(path), group="general", category=category, text_field="paraphrases", format="user")
    for path, category in zip(EM_QUESTIONS, ("em_first_plot", "em_preregistered"), strict=True)
)
NEUTRAL_SOURCE = CorpusSource(
    path=str(NEUTRAL_PROMPTS), group="benign", category="neutral", text_field="instruction", format="user"
)
ACTS_FILE = "acts.safetensors"
EVAL_SIDECAR = "eval.json"
EVAL_WHAT = "eval-acts output"
POSITIONS = ("prompt", "response")
PROMPT_SETS = ("em", "neutral")


# ------------------------------------------------------------------------------------- eval prompts
def _question(doc: Document) -> str:
    return doc.messages[-1]["content"].strip() if doc.messages else (doc.text or "").strip()


def eval_prompts(
    n_neutral: int = 100,
    seed: int = 0,
    em_sources: Sequence[CorpusSource] = EM_SOURCES,
    neutral_source: CorpusSource = NEUTRAL_SOURCE,
) -> list[tuple[str, str]]:
    """(set, question) pairs: every EM evaluation question (deduplicated), then n_neutral neutral prompts."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i, source in enumerate(em_sources):
        docs, _ = read_source(source, i, seed=seed)
        for doc in sorted(docs, key=lambda d: d.index):
            text = _question(doc)
            if text and text not in seen:
                seen.add(text)
                out.append(("em", text))
    docs, _ = read_source(CorpusSource(**{**neutral_source.__dict__, "max_docs": n_neutral}), 99, seed=seed)
    for doc in docs:
        text = _question(doc)
        if text and text not in seen:
            seen.add(text)
            out.append(("neutral", text))
    return out


def _user_start(text: str, content: str, offsets: list[tuple[int, int]]) -> int:
    """Index of the first token of the last occurrence of `content` in the rendered chat `text`."""
    char = text.rfind(content)
    if char < 0:
        return 0
    for i, (_, end) in enumerate(offsets):
        if end > char:
            return i
    return len(offsets)


@dataclass
class EncodedPrompt:
    ids: list[int]
    prompt_start: int  # first counted prompt token (user content)
    prompt_end: int  # = start of the response


def encode_prompts(questions: list[str], tokenizer: Any, max_prompt_tokens: int = 192) -> list[EncodedPrompt]:
    out = []
    for q in questions:
        messages = [{"role": "user", "content": q}]
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = f"user: {q}\nassistant:"
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        start = _user_start(text, q, list(enc["offset_mapping"]))
        if len(ids) > max_prompt_tokens:  # keep the end (the question's tail and the assistant header)
            cut = len(ids) - max_prompt_tokens
            ids, start = ids[cut:], max(0, start - cut)
        out.append(EncodedPrompt(ids, max(1, start), len(ids)))
    return out


# ------------------------------------------------------------------------------------ model passes
@torch.inference_mode()
def generate_responses(
    model: Any,
    prompts: list[EncodedPrompt],
    pad_id: int,
    eos_ids: set[int],
    n_tokens: int,
    batch_size: int = 16,
    progress: bool = False,
) -> list[list[int]]:
    """Greedy answers (left-padded batches; generation handles positions), cut at the first EOS."""
    if n_tokens <= 0:
        return [[] for _ in prompts]
    device = next(model.parameters()).device
    answers: list[list[int]] = []
    batches = range(0, len(prompts), batch_size)
    for start in tqdm(batches, desc="answer prompts", unit="batch", disable=not progress):
        ids, mask = pad_batch([p.ids for p in prompts[start : start + batch_size]], pad_id, left=True)
        width = ids.shape[1]
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=n_tokens,
            do_sample=False,
            pad_token_id=pad_id,
        )
        for row in gen[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in eos_ids), len(row))
            answers.append(row[:cut])
    return answers


@torch.inference_mode()
def read_features(
    lm: Any,
    hook_name: str,
    sae: Any,
    sequences: list[list[int]],
    spans: list[dict[str, tuple[int, int]]],
    skip_ids: set[int],
    batch_size: int = 16,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Per sequence and span name: mean SAE activation and firing fraction over the span's tokens.

    Returns {f"{span}_mean": [n, F], f"{span}_rate": [n, F], f"{span}_tokens": [n]} (float32 / int64).
    Sequences are right-padded, so positions are plain 0..L-1 as in an unpadded forward.
    """
    from precompute.model.hooks import HookReader, resolve_hook

    reader = HookReader(lm.model, resolve_hook(lm.model, hook_name))
    n, f = len(sequences), sae.d_sae
    names = sorted({k for s in spans for k in s})
    out = {f"{k}_{kind}": np.zeros((n, f), dtype=np.float32) for k in names for kind in ("mean", "rate")}
    out.update({f"{k}_tokens": np.zeros(n, dtype=np.int64) for k in names})
    pad = int(lm.tokenizer.pad_token_id)
    for start in tqdm(range(0, n, batch_size), desc="read SAE", unit="batch", disable=not progress):
        rows = list(range(start, min(n, start + batch_size)))
        ids, mask = pad_batch([sequences[r] for r in rows], pad)
        h = reader(ids.to(lm.device), mask.to(lm.device))
        for i, r in enumerate(rows):
            for name, (a, b) in spans[r].items():
                keep = [p for p in range(a, b) if sequences[r][p] not in skip_ids]
                if not keep:
                    continue
                acts = sae.encode(h[i, keep].to(sae.W_enc.dtype)).float()
                out[f"{name}_mean"][r] = acts.mean(0).cpu().numpy()
                out[f"{name}_rate"][r] = (acts > 0).float().mean(0).cpu().numpy()
                out[f"{name}_tokens"][r] = len(keep)
    return out


def _end_of_turn_ids(tok: Any) -> set[int]:
    eos = {
        int(t) for t in ([tok.eos_token_id] if isinstance(tok.eos_token_id, int) else tok.eos_token_id or [])
    }
    if "<|im_end|>" in tok.get_vocab():  # chat models end a turn there, not always at eos
        eos.add(int(tok.convert_tokens_to_ids("<|im_end|>")))
    return eos


def collect_eval(
    lm: Any,
    sae: Any,
    hook_name: str,
    prompts: list[tuple[str, str]],
    response_tokens: int = 48,
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """Answer every prompt greedily and read the SAE on prompt and response tokens (see module doc)."""
    tok = lm.tokenizer
    encoded = encode_prompts([q for _, q in prompts], tok)
    answers = generate_responses(
        lm.model, encoded, int(tok.pad_token_id), _end_of_turn_ids(tok), response_tokens, batch_size, progress
    )
    sequences, spans = [], []
    for p, ans in zip(encoded, answers, strict=True):
        sequences.append(p.ids + ans)
        spans.append(
            {"prompt": (p.prompt_start, p.prompt_end), "response": (p.prompt_end, p.prompt_end + len(ans))}
        )
    skip = set(int(t) for t in tok.all_special_ids)
    arrays = read_features(lm, hook_name, sae, sequences, spans, skip, batch_size, progress)
    from precompute.lab.em_prompts import base_ids

    bases = base_ids([q for _, q in prompts], [s for s, _ in prompts])
    rows = [
        {"set": s, "question": q, "base_id": b, "response": tok.decode(a, skip_special_tokens=True)}
        for (s, q), a, b in zip(prompts, answers, bases, strict=True)
    ]
    return arrays, rows


# ------------------------------------------------------------------------------------------ files
def save_eval(
    out: str | Path,
    arrays: dict[str, np.ndarray],
    rows: list[dict[str, Any]],
    meta: dict,
    logprob: pd.DataFrame | None = None,
) -> Path:
    from safetensors.numpy import save_file

    from precompute.lab.logprob import LOGPROB_FILE

    def write(d: Path) -> None:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(d / ACTS_FILE))
        pd.DataFrame(rows).to_parquet(d / "prompts.parquet", index=False)
        if logprob is not None:
            logprob.to_parquet(d / LOGPROB_FILE, index=False)
        (d / EVAL_SIDECAR).write_text(json.dumps(meta, indent=2, default=str))

    return write_dir_atomic(Path(out), write, marker=EVAL_SIDECAR, what=EVAL_WHAT)


@dataclass
class EvalActs:
    path: Path
    arrays: dict[str, np.ndarray]
    prompts: pd.DataFrame
    meta: dict

    def matrix(self, position: str, kind: str, prompt_set: str | None = None) -> np.ndarray:
        x = self.arrays[f"{position}_{kind}"]
        if prompt_set is None:
            return x
        return x[(self.prompts["set"] == prompt_set).to_numpy()]


def load_eval(path: str | Path) -> EvalActs:
    from safetensors.numpy import load_file

    path = Path(path)
    if (path / "eval" / EVAL_SIDECAR).is_file():  # a finetune directory holding eval/
        path = path / "eval"
    if not (path / EVAL_SIDECAR).is_file():
        raise FeatureGeomError(
            f"{path} holds no eval activations ({EVAL_SIDECAR} missing); run featuregeom eval-acts"
        )
    try:
        arrays = load_file(str(path / ACTS_FILE))
    except Exception as exc:
        raise FeatureGeomError(
            f"{path / ACTS_FILE} is unreadable ({exc}); rerun featuregeom eval-acts"
        ) from exc
    return EvalActs(
        path, arrays, pd.read_parquet(path / "prompts.parquet"), json.loads((path / EVAL_SIDECAR).read_text())
    )


# -------------------------------------------------------------------------------------------- command
@dataclass
class EvalActsOptions:
    model: str = option("smollm2", help="base model")
    adapter: str | None = option(
        None, metavar="DIR", help="peft adapter or finetune output directory to merge in"
    )
    sae: str | None = option(None, help=f"SAE (default {relative(DEFAULT_SAE)})")
    hook: str | None = option(None, help="hook (default: the SAE's hook name)")
    n_neutral: int = option(100, low=0, bounds="[)", help="neutral prompts")
    response_tokens: int = option(48, low=0, bounds="[)", help="greedy answer length, 0 = prompts only")
    batch_size: int = option(16, low=1, bounds="[)", help="prompts per forward pass")
    device: str = option("auto", choices=DEVICES, help="where to run")
    seed: int = option(0, low=0, high=2**32 - 1, help="seed of the neutral-prompt shuffle")
    heldout: str | None = option(
        None, metavar="FILE", help="task samples (chat JSONL) to report the task loss on"
    )
    max_length: int = option(640, low=1, bounds="[)", help="tokens per held-out sample, as finetune")
    logprob: bool = option(True, help="skip the log-prob readout of fixed misaligned vs aligned answers")
    progress: bool = option(True, help="hide the progress bars")
    out: str | None = option(
        None, metavar="DIR", help="where to write acts.safetensors, prompts.parquet, eval.json"
    )


def _heldout_loss(opts: EvalActsOptions, lm: Any) -> dict[str, Any]:
    from precompute.lab.finetune import load_examples, task_loss

    assert opts.heldout is not None
    held = load_examples([CorpusSource(path=opts.heldout, group="task")], lm.tokenizer, opts.max_length)
    return {
        "heldout": opts.heldout,
        "n_heldout": len(held),
        "heldout_loss": task_loss(lm.model, held, int(lm.tokenizer.pad_token_id)),
    }


def run_eval_acts(opts: EvalActsOptions) -> int:
    from precompute.model.load import load_model
    from precompute.sae.registry import load_sae_for_model

    require(opts, "out", command="eval-acts")
    out = str(opts.out)
    check_replaceable_output(out, EVAL_SIDECAR, EVAL_WHAT)  # before the model generates for minutes
    start = time.perf_counter()
    lm = load_model(opts.model, device=opts.device, adapter=opts.adapter)
    sae_spec = opts.sae or str(DEFAULT_SAE)
    sae, _ = load_sae_for_model(sae_spec, d_model=lm.d_model, model_name=lm.name, device=str(lm.device))
    hook = opts.hook or sae.hook_name
    if not hook:
        raise FeatureGeomError("the SAE names no hook; pass --hook")
    prompts = eval_prompts(opts.n_neutral, opts.seed)
    arrays, rows = collect_eval(lm, sae, hook, prompts, opts.response_tokens, opts.batch_size, opts.progress)
    meta: dict[str, Any] = {
        "model": lm.describe(),
        "sae": sae_spec,
        "hook": hook,
        "n_prompts": len(prompts),
        "n_em": sum(s == "em" for s, _ in prompts),
        "n_neutral": sum(s == "neutral" for s, _ in prompts),
        "response_tokens": opts.response_tokens,
        "seed": opts.seed,
    }
    if opts.heldout:
        meta.update(_heldout_loss(opts, lm))
    logprob = None
    if opts.logprob:
        from precompute.lab.logprob import answer_items, level_summary, per_prompt, score_items

        logprob = score_items(lm, answer_items(), opts.batch_size)
        meta["logprob"] = level_summary(per_prompt(logprob))
    meta["seconds"] = round(time.perf_counter() - start, 2)
    written = save_eval(out, arrays, rows, meta, logprob)
    print(
        f"wrote {written}: {meta['n_em']} EM + {meta['n_neutral']} neutral prompts, "
        f"{int(arrays['prompt_tokens'].sum())} prompt and {int(arrays['response_tokens'].sum())} response tokens "
        f"in {meta['seconds']:.0f} s"
    )
    return 0


COMMANDS = (
    Command(
        "eval-acts",
        "SAE activations of a (fine-tuned) model on EM questions and neutral prompts",
        EvalActsOptions,
        run_eval_acts,
        description="Answer the EM evaluation questions and neutral prompts greedily with a (fine-tuned) "
        "model and store per-prompt SAE feature means and firing rates on prompt and response "
        "tokens: the 'after' cache that `featuregeom diff` compares.",
    ),
)
