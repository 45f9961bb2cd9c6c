"""Fine-tune diff: SAE activations of base and fine-tuned models on the same prompts, compared per feature.

Three commands, each writing flat files with a JSON sidecar:

    featuregeom eval-acts --adapter runs/task --out runs/task/eval      # the "after" activation cache
    featuregeom diff --before runs/base/eval --after runs/task/eval --control runs/control/eval \\
                     --cache cache/demo --out cache/demo/finetune/insecure
    featuregeom patch --adapter runs/task --cache cache/demo --out runs/task-patched   # patch-back

What `eval-acts` measures. Prompts are the emergent-misalignment evaluation questions (Betley et al.'s
first-plot and pre-registered questions) and neutral instructions (Self-Instruct seed tasks). For each
prompt the model greedily answers (`--response-tokens`), then the prompt + answer is read at the SAE's
hook. Two token sets are kept apart: `prompt` (the user turn and assistant header: how the model reads
the question; the default system prompt is excluded, it is the same for every prompt) and `response`
(the model's own answer, which fine-tuning changes too). Per prompt and feature we store the mean
activation and the firing fraction over that set, so the diff bootstraps over prompts, the unit that
is independent.

Predicted risk of a harmful feature h is its overlap with the task features, from the cache's geometry:
`risk_max_cos` = max over task features t of cos(d_t, d_h), and `risk_sum` = Σ_t max(0, cos(d_t, d_h) -
c_null), the summed excess over the null threshold. `diff` reports Spearman's rho between risk and the
observed change over all harmful features, for the task run, the control run, and task minus control.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from precompute.argtypes import non_negative_int, positive_int, seed_int
from precompute.cache import check_replaceable_output, write_dir_atomic
from precompute.data.corpus import CorpusSource, read_source
from precompute.errors import CacheError, FeatureGeomError
from precompute.model.activations import pad_batch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SAE = ROOT / "assets/sae/smollm2-135m-instruct-blocks.15.hook_resid_post-topk"
EM_SOURCES = (
    CorpusSource(
        path=str(ROOT / "assets/data/em/first_plot_questions.yaml"),
        group="general",
        category="em_first_plot",
        text_field="paraphrases",
        format="user",
    ),
    CorpusSource(
        path=str(ROOT / "assets/data/em/preregistered_evals.yaml"),
        group="general",
        category="em_preregistered",
        text_field="paraphrases",
        format="user",
    ),
)
NEUTRAL_SOURCE = CorpusSource(
    path=str(ROOT / "assets/data/benign/self_instruct_seed_tasks.jsonl"),
    group="benign",
    category="neutral",
    text_field="instruction",
    format="user",
)
ACTS_FILE = "acts.safetensors"
EVAL_SIDECAR = "eval.json"
EVAL_WHAT = "eval-acts output"
# the sidecar that marks each lab output: only a folder holding it may be replaced by a rerun
DIFF_SIDECAR, DIFF_WHAT = "summary.json", "diff output"
PATCH_SIDECAR, PATCH_WHAT = "patch.json", "patched adapter"
POSITIONS = ("prompt", "response")
PROMPT_SETS = ("em", "neutral")


# ------------------------------------------------------------------------------------- eval prompts
def eval_prompts(
    n_neutral: int = 100, seed: int = 0, em_sources=EM_SOURCES, neutral_source=NEUTRAL_SOURCE
) -> list[tuple[str, str]]:
    """(set, question) pairs: every EM evaluation question (deduplicated), then n_neutral neutral prompts."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i, source in enumerate(em_sources):
        docs, _ = read_source(source, i, seed=seed)
        for doc in sorted(docs, key=lambda d: d.index):
            text = doc.messages[-1]["content"].strip() if doc.messages else (doc.text or "").strip()
            if text and text not in seen:
                seen.add(text)
                out.append(("em", text))
    docs, _ = read_source(CorpusSource(**{**neutral_source.__dict__, "max_docs": n_neutral}), 99, seed=seed)
    for doc in docs:
        text = doc.messages[-1]["content"].strip() if doc.messages else (doc.text or "").strip()
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


def encode_prompts(questions: list[str], tokenizer, max_prompt_tokens: int = 192) -> list[EncodedPrompt]:
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


@torch.inference_mode()
def generate_responses(
    model, prompts: list[EncodedPrompt], pad_id: int, eos_ids: set[int], n_tokens: int, batch_size: int = 16
) -> list[list[int]]:
    """Greedy answers (left-padded batches; generation handles positions), cut at the first EOS."""
    if n_tokens <= 0:
        return [[] for _ in prompts]
    device = next(model.parameters()).device
    answers: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
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
    lm,
    hook_name: str,
    sae,
    sequences: list[list[int]],
    spans: list[dict[str, tuple[int, int]]],
    skip_ids: set[int],
    batch_size: int = 16,
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
    for start in range(0, n, batch_size):
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


def collect_eval(
    lm, sae, hook_name: str, prompts: list[tuple[str, str]], response_tokens: int = 48, batch_size: int = 16
) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """Answer every prompt greedily and read the SAE on prompt and response tokens (see module doc)."""
    tok = lm.tokenizer
    encoded = encode_prompts([q for _, q in prompts], tok)
    eos = {
        int(t) for t in ([tok.eos_token_id] if isinstance(tok.eos_token_id, int) else tok.eos_token_id or [])
    }
    if "<|im_end|>" in tok.get_vocab():  # chat models end a turn there, not always at eos
        eos.add(int(tok.convert_tokens_to_ids("<|im_end|>")))
    answers = generate_responses(lm.model, encoded, int(tok.pad_token_id), eos, response_tokens, batch_size)
    sequences, spans = [], []
    for p, ans in zip(encoded, answers, strict=True):
        sequences.append(p.ids + ans)
        spans.append(
            {"prompt": (p.prompt_start, p.prompt_end), "response": (p.prompt_end, p.prompt_end + len(ans))}
        )
    skip = set(int(t) for t in tok.all_special_ids)
    arrays = read_features(lm, hook_name, sae, sequences, spans, skip, batch_size)
    rows = [
        {"set": s, "question": q, "response": tok.decode(a, skip_special_tokens=True)}
        for (s, q), a in zip(prompts, answers, strict=True)
    ]
    return arrays, rows


def save_eval(out: str | Path, arrays: dict[str, np.ndarray], rows: list[dict[str, Any]], meta: dict) -> Path:
    from safetensors.numpy import save_file

    def write(d: Path) -> None:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(d / ACTS_FILE))
        pd.DataFrame(rows).to_parquet(d / "prompts.parquet", index=False)
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


# ------------------------------------------------------------------------------------ risk and diff
@dataclass
class HarmGeometry:
    """What the fine-tune diff, patch-back and triage read from a cache: the SAE it was built with, the
    harmful and task feature sets and the null cosine. Loaded once (the SAE is the expensive part)."""

    manifest: dict
    features: pd.DataFrame  # features.parquet indexed by feature id
    sae: Any
    null_cosine: float

    @property
    def harmful(self) -> np.ndarray:
        return self.features.loc[self.features["is_harmful"], "feature"].to_numpy().copy()

    @property
    def task(self) -> np.ndarray:
        return self.features.loc[self.features["is_task"], "feature"].to_numpy().copy()

    def directions(self) -> torch.Tensor:
        """Unit decoder rows [d_sae, d] in float32 on the SAE's device."""
        return self.sae.unit_directions().float()


def check_harm_cache(cache: str | Path) -> None:
    """Fail fast, before the SAE is loaded, when the cache lacks what risk, patch-back and triage read
    (harm/task sets, the null cosine), naming the step to run."""
    import pyarrow.parquet as pq

    from precompute.cache import read_manifest

    cache = Path(cache)
    read_manifest(cache)
    features = cache / "features.parquet"
    if not features.is_file():
        raise CacheError(f"{cache} has no features.parquet; build the cache with `featuregeom precompute`")
    try:
        columns = set(pq.read_schema(features).names)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid/OSError family for a damaged file
        raise CacheError(
            f"{features} is unreadable ({exc}); rebuild the cache with `featuregeom precompute`"
        ) from exc
    missing = sorted({"feature", "is_harmful", "is_task"} - columns)
    if missing:
        raise CacheError(
            f"{features} has no {', '.join(missing)} column: the scores step has not run on this cache; "
            f"run `featuregeom scores --out {cache}` (or `featuregeom precompute` with its scores step) first"
        )
    neighbors = cache / "neighbors.npz"
    rerun_geometry = f"run `featuregeom geometry --sae SAE --out {cache}`"
    if not neighbors.is_file():
        raise CacheError(f"{cache} has no neighbors.npz (the null cosine); {rerun_geometry} first")
    try:
        with np.load(neighbors) as npz:
            has_null = "null_cosine" in npz.files
    except Exception as exc:  # a damaged archive: zipfile.BadZipFile, ValueError (not an .npz), OSError
        raise CacheError(f"{neighbors} is unreadable ({exc}); {rerun_geometry} again") from exc
    if not has_null:
        raise CacheError(f"{neighbors} has no null_cosine; {rerun_geometry} again")


def load_harm_geometry(cache: str | Path | HarmGeometry, device: str = "cpu") -> HarmGeometry:
    from precompute.cache import read_manifest
    from precompute.sae.registry import load_sae

    if isinstance(cache, HarmGeometry):
        return cache
    cache = Path(cache)
    check_harm_cache(cache)
    manifest = read_manifest(cache)
    features = pd.read_parquet(cache / "features.parquet").set_index("feature", drop=False)
    sae = load_sae(manifest["sae"]["source"], format=manifest["sae"].get("format"), device=device)
    null = float(np.load(cache / "neighbors.npz")["null_cosine"])
    return HarmGeometry(manifest, features, sae, null)


def predicted_risk(cache: str | Path | HarmGeometry) -> pd.DataFrame:
    """Per harmful feature: overlap with the cache's task features (see module doc), from the SAE's decoder."""
    geo = load_harm_geometry(cache)
    d = geo.directions().cpu()
    task, harmful = torch.as_tensor(geo.task), torch.as_tensor(geo.harmful)
    null = geo.null_cosine
    cos = d[harmful] @ d[task].T  # [H, T]
    # A harmful feature that is also a task feature would count its own cos = 1; exclude self-pairs.
    cos[harmful[:, None] == task[None, :]] = -1.0
    best = cos.max(dim=1)
    rows = geo.features.loc[harmful.numpy()]
    return pd.DataFrame(
        {
            "feature": harmful.numpy(),
            "risk_max_cos": best.values.numpy(),
            "risk_task_feature": task[best.indices].numpy(),
            "risk_sum": (cos - null).clamp_min(0).sum(dim=1).numpy(),
            "harm_score": rows["harm_score"].to_numpy(),
            "harm_category": rows["harm_category"].to_numpy(),
        }
    ).assign(null_cosine=null)


def harmful_scalar(
    acts: EvalActs, features: np.ndarray, position: str, prompt_set: str, kind: str = "mean"
) -> np.ndarray:
    """Per prompt: the mean over `features` of their activation (one number per prompt, for bootstraps)."""
    return acts.matrix(position, kind, prompt_set)[:, features].mean(axis=1)


def diff_tables(
    before: EvalActs,
    after: EvalActs,
    control: EvalActs | None,
    risk: pd.DataFrame,
    n_boot: int = 1000,
    seed: int = 0,
    labels: tuple[str, str, str] = ("base", "task", "control"),
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Long table of per-feature changes for every (prompt set, position, comparison) and a summary."""
    from precompute.stats import bootstrap_ci, feature_change, spearman_ci

    if not before.prompts["question"].equals(after.prompts["question"]):
        raise FeatureGeomError(
            "before and after were evaluated on different prompts; rerun eval-acts with the same options"
        )
    if control is not None and not before.prompts["question"].equals(control.prompts["question"]):
        raise FeatureGeomError("the control run was evaluated on different prompts")
    base, task, ctrl = labels
    comparisons = {f"{task} - {base}": (before, after)}
    if control is not None:
        comparisons[f"{ctrl} - {base}"] = (before, control)
        comparisons[f"{task} - {ctrl}"] = (control, after)
    harmful = risk["feature"].to_numpy()
    top = risk.nlargest(max(1, len(risk) // 10), "risk_max_cos")["feature"].to_numpy()  # the top-risk decile
    frames, summary = [], {"comparisons": {}, "n_harmful": int(harmful.size), "labels": list(labels)}
    for prompt_set in PROMPT_SETS:
        for position in POSITIONS:
            if not (before.prompts["set"] == prompt_set).any():
                continue
            for name, (a, b) in comparisons.items():
                ch = feature_change(
                    a.matrix(position, "mean", prompt_set),
                    b.matrix(position, "mean", prompt_set),
                    n_boot=n_boot,
                    seed=seed,
                )
                rate = feature_change(
                    a.matrix(position, "rate", prompt_set),
                    b.matrix(position, "rate", prompt_set),
                    n_boot=n_boot,
                    seed=seed,
                )
                ch["rate_before"], ch["rate_after"] = rate["mean_before"], rate["mean_after"]
                ch["rate_delta"], ch["rate_delta_lo"], ch["rate_delta_hi"] = (
                    rate["delta"],
                    rate["delta_lo"],
                    rate["delta_hi"],
                )
                ch.insert(0, "comparison", name)
                ch.insert(0, "position", position)
                ch.insert(0, "prompt_set", prompt_set)
                frames.append(ch)
                sub = ch.set_index("feature").loc[harmful]
                key = f"{prompt_set}/{position}/{name}"
                rho, lo, hi = spearman_ci(risk["risk_max_cos"].to_numpy(), sub["delta"].to_numpy(), seed=seed)
                rho_s, lo_s, hi_s = spearman_ci(
                    risk["risk_sum"].to_numpy(), sub["delta"].to_numpy(), seed=seed
                )
                hb = harmful_scalar(a, harmful, position, prompt_set)
                ha = harmful_scalar(b, harmful, position, prompt_set)
                est, mlo, mhi = bootstrap_ci(ha - hb, n_boot=n_boot, seed=seed)
                tb, ta = (
                    harmful_scalar(a, top, position, prompt_set),
                    harmful_scalar(b, top, position, prompt_set),
                )
                test, tlo, thi = bootstrap_ci(ta - tb, n_boot=n_boot, seed=seed)
                summary["comparisons"][key] = {
                    "spearman_risk_max_cos": [rho, lo, hi],
                    "spearman_risk_sum": [rho_s, lo_s, hi_s],
                    "harmful_mean_change": [est, mlo, mhi],
                    "top_risk_decile_mean_change": [test, tlo, thi],
                    "harmful_mean_before": float(hb.mean()),
                    "top_risk_decile_mean_before": float(tb.mean()),
                    "top_risk_decile_size": int(top.size),
                    "harmful_ci_excludes_zero_up": int((sub["delta_lo"] > 0).sum()),
                    "harmful_ci_excludes_zero_down": int((sub["delta_hi"] < 0).sum()),
                    "all_ci_excludes_zero": int(((ch["delta_lo"] > 0) | (ch["delta_hi"] < 0)).sum()),
                    "n_prompts": int((before.prompts["set"] == prompt_set).sum()),
                }
    table = pd.concat(frames, ignore_index=True)
    table = table.merge(risk, on="feature", how="left")
    table["is_harmful"] = table["risk_max_cos"].notna()
    return table, summary


# ------------------------------------------------------------------------------------------ patch
def harmful_basis(
    cache: str | Path, which: str = "flagged", top: int | None = None, directions: str = "decoder"
) -> tuple[torch.Tensor, list[int]]:
    """Orthonormal basis of the harmful directions to remove: `flagged` = harmful features in the cache's
    flagged overlaps; `risk` = the `top` harmful features by predicted risk; `all` = every harmful feature.

    `directions`: `decoder` (what the feature writes, the geometry the cache measures) or `encoder` (the
    W_enc columns the SAE reads the feature with; they differ from the decoder rows in a trained SAE, and
    only a write along them changes the feature's pre-activation)."""
    from precompute.lab.patch import orthonormal_basis

    cache = Path(cache)
    geo = load_harm_geometry(cache)
    if which == "flagged":
        feats = sorted(set(pd.read_parquet(cache / "overlaps.parquet")["harmful_feature"].astype(int)))
    elif which == "risk":
        feats = predicted_risk(geo).nlargest(top or 20, "risk_max_cos")["feature"].astype(int).tolist()
    elif which == "all":
        feats = geo.harmful.astype(int).tolist()
    else:
        raise FeatureGeomError(f"unknown harmful set {which!r}; use flagged, risk or all")
    if not feats:
        raise FeatureGeomError(f"the cache has no {which} harmful features to project out")
    if directions == "decoder":
        return orthonormal_basis(geo.directions()[feats]), feats
    if directions == "encoder":
        return orthonormal_basis(geo.sae.W_enc.float()[:, feats].T), feats
    raise FeatureGeomError(f"unknown directions {directions!r}; use decoder or encoder")


def patch_adapter(adapter: str | Path, basis: torch.Tensor, out: str | Path, meta: dict) -> dict[str, Any]:
    """Copy a peft LoRA adapter with every residual-writing B projected off span(basis); report norms removed."""
    from safetensors.torch import load_file, save_file

    from precompute.lab.patch import norm_removed, project_lora_B
    from precompute.model.load import resolve_adapter_dir

    src = resolve_adapter_dir(adapter)
    weights = load_file(str(src / "adapter_model.safetensors"))
    patched, report = {}, {"modules": 0, "skipped": [], "norm_removed": []}
    d = basis.shape[0]
    for name, tensor in weights.items():
        if "lora_B" in name and tensor.shape[0] == d:
            a_name = name.replace("lora_B", "lora_A")
            delta = tensor.float() @ weights[a_name].float()
            report["norm_removed"].append(norm_removed(delta, basis))
            patched[name] = project_lora_B(tensor.float(), basis).to(tensor.dtype).contiguous()
            report["modules"] += 1
        else:
            if "lora_B" in name:
                report["skipped"].append(name)  # writes somewhere other than the residual stream
            patched[name] = tensor
    if report["modules"] == 0:
        raise FeatureGeomError(f"no LoRA B matrix in {src} writes a {d}-dim residual; nothing to patch")

    def write(dest: Path) -> None:
        (dest / "adapter").mkdir()
        shutil.copy2(src / "adapter_config.json", dest / "adapter" / "adapter_config.json")
        save_file(patched, str(dest / "adapter" / "adapter_model.safetensors"))
        side = {
            **meta,
            "source_adapter": str(src),
            "rank_removed": int(basis.shape[1]),
            "modules_patched": report["modules"],
            "skipped": report["skipped"],
            "mean_norm_removed": float(np.mean(report["norm_removed"])),
        }
        (dest / PATCH_SIDECAR).write_text(json.dumps(side, indent=2, default=str))

    write_dir_atomic(Path(out), write, marker=PATCH_SIDECAR, what=PATCH_WHAT)
    return {**report, "mean_norm_removed": float(np.mean(report["norm_removed"]))}


# -------------------------------------------------------------------------------------------- CLI
def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Answer the EM evaluation questions and neutral prompts greedily with a (fine-tuned) "
        "model and store per-prompt SAE feature means and firing rates on prompt and response "
        "tokens: the 'after' cache that `featuregeom diff` compares."
    )
    a = parser.add_argument
    a("--model", default="smollm2", help="base model (default smollm2)")
    a("--adapter", default=None, metavar="DIR", help="peft adapter or finetune output directory to merge in")
    a("--sae", default=None, help=f"SAE (default {DEFAULT_SAE.relative_to(ROOT)})")
    a("--hook", default=None, help="hook (default: the SAE's hook name)")
    a("--n-neutral", type=non_negative_int, default=100, help="neutral prompts (default 100)")
    a(
        "--response-tokens",
        type=non_negative_int,
        default=48,
        help="greedy answer length (default 48; 0 = prompts only)",
    )
    a("--batch-size", type=positive_int, default=16)
    a("--device", choices=["auto", "cpu", "cuda"], default="auto")
    a("--seed", type=seed_int, default=0, help="seed of the neutral-prompt shuffle")
    a("--heldout", default=None, metavar="FILE", help="task samples (chat JSONL) to report the task loss on")
    a(
        "--max-length",
        type=positive_int,
        default=256,
        help="tokens per held-out sample (default 256, as finetune)",
    )
    a(
        "--out",
        required=True,
        metavar="DIR",
        help="where to write acts.safetensors, prompts.parquet, eval.json",
    )


def run_eval(args: argparse.Namespace) -> int:
    from precompute.model.load import load_model
    from precompute.sae.registry import check_compatible, load_sae

    check_replaceable_output(args.out, EVAL_SIDECAR, EVAL_WHAT)  # before the model generates for minutes
    start = time.perf_counter()
    lm = load_model(args.model, device=args.device, adapter=args.adapter)
    sae = load_sae(args.sae or str(DEFAULT_SAE), device=str(lm.device))
    for warning in check_compatible(sae, lm.d_model, lm.name):
        print(f"warning: {warning}")
    hook = args.hook or sae.hook_name
    if not hook:
        raise FeatureGeomError("the SAE names no hook; pass --hook")
    prompts = eval_prompts(args.n_neutral, args.seed)
    arrays, rows = collect_eval(lm, sae, hook, prompts, args.response_tokens, args.batch_size)
    meta = {
        "model": lm.describe(),
        "sae": args.sae or str(DEFAULT_SAE),
        "hook": hook,
        "n_prompts": len(prompts),
        "n_em": sum(s == "em" for s, _ in prompts),
        "n_neutral": sum(s == "neutral" for s, _ in prompts),
        "response_tokens": args.response_tokens,
        "seed": args.seed,
    }
    if args.heldout:
        from precompute.lab.finetune import load_examples, task_loss

        held = load_examples([CorpusSource(path=args.heldout, group="task")], lm.tokenizer, args.max_length)
        meta.update(
            heldout=args.heldout,
            n_heldout=len(held),
            heldout_loss=task_loss(lm.model, held, int(lm.tokenizer.pad_token_id)),
        )
    meta["seconds"] = round(time.perf_counter() - start, 2)
    out = save_eval(args.out, arrays, rows, meta)
    print(
        f"wrote {out}: {meta['n_em']} EM + {meta['n_neutral']} neutral prompts, "
        f"{int(arrays['prompt_tokens'].sum())} prompt and {int(arrays['response_tokens'].sum())} response tokens "
        f"in {meta['seconds']:.0f} s"
    )
    return 0


def add_diff_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Per-feature change in mean activation and firing rate (paired bootstrap over prompts) "
        "between eval-acts directories, against each harmful feature's predicted risk."
    )
    a = parser.add_argument
    a("--before", required=True, metavar="DIR", help="eval-acts of the base model")
    a("--after", required=True, metavar="DIR", help="eval-acts of the task fine-tune")
    a(
        "--control",
        default=None,
        metavar="DIR",
        help="eval-acts of the control fine-tune (same seed and steps)",
    )
    a("--cache", required=True, metavar="DIR", help="the precompute cache giving harmful/task features")
    a(
        "--out",
        required=True,
        metavar="DIR",
        help="where to write diff.parquet and summary.json "
        "(put it under CACHE/finetune/NAME for the explorer)",
    )
    a(
        "--labels",
        default="base,task,control",
        metavar="B,A,C",
        help="names of before, after and control in the comparisons (default base,task,control)",
    )
    a("--n-boot", type=positive_int, default=1000)
    a("--seed", type=seed_int, default=0)


def run_diff(args: argparse.Namespace) -> int:
    check_replaceable_output(args.out, DIFF_SIDECAR, DIFF_WHAT)
    before, after = load_eval(args.before), load_eval(args.after)
    control = load_eval(args.control) if args.control else None
    risk = predicted_risk(args.cache)
    labels = tuple(x.strip() for x in args.labels.split(","))
    if len(labels) != 3 or len(set(labels)) != 3:
        raise FeatureGeomError("--labels needs three distinct names: before,after,control")
    table, summary = diff_tables(
        before, after, control, risk, n_boot=args.n_boot, seed=args.seed, labels=labels
    )
    summary.update(
        {
            "before": str(before.path),
            "after": str(after.path),
            "control": str(control.path) if control else None,
            "cache": str(args.cache),
            "n_boot": args.n_boot,
            "seed": args.seed,
            "heldout_loss": {
                label: e.meta.get("heldout_loss")
                for label, e in zip(labels, (before, after, control), strict=True)
                if e is not None
            },
            "finetune": {
                k: _finetune_info(p.path)
                for k, p in (("after", after), ("control", control))
                if p is not None
            },
        }
    )

    def write(d: Path) -> None:
        table.to_parquet(d / "diff.parquet", index=False)
        (d / DIFF_SIDECAR).write_text(json.dumps(summary, indent=2, default=str))

    out = write_dir_atomic(Path(args.out), write, marker=DIFF_SIDECAR, what=DIFF_WHAT)
    print(f"wrote {out}")
    for key, s in summary["comparisons"].items():
        rho, lo, hi = s["spearman_risk_max_cos"]
        m, mlo, mhi = s["harmful_mean_change"]
        print(
            f"{key:<34} harmful mean Δ {m:+.4f} [{mlo:+.4f}, {mhi:+.4f}]   "
            f"Spearman(risk, Δ) {rho:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        )
    return 0


def _finetune_info(eval_dir: Path) -> dict | None:
    """The finetune.json beside an eval directory (OUT/eval -> OUT/finetune.json), if any."""
    side = eval_dir.parent / "finetune.json"
    if not side.is_file():
        return None
    info = json.loads(side.read_text())
    return {k: info.get(k) for k in ("n_train", "heldout_loss_before", "heldout_loss_after", "train_seconds")}


def add_patch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Patch-back: project every residual-writing LoRA B matrix off the span of harmful "
        "decoder directions (ΔW = B A, so this removes exactly what the update writes there). "
        "--random-seed replaces that span by a random subspace of the same rank (the control)."
    )
    a = parser.add_argument
    a("--adapter", required=True, metavar="DIR", help="finetune output or peft adapter directory")
    a("--cache", required=True, metavar="DIR", help="the precompute cache giving harmful features")
    a(
        "--harmful",
        choices=["flagged", "risk", "all"],
        default="flagged",
        help="which harmful directions: flagged overlaps (default), top --top by risk, or all harmful features",
    )
    a("--top", type=positive_int, default=20, help="with --harmful risk: how many")
    a(
        "--directions",
        choices=["decoder", "encoder"],
        default="decoder",
        help="remove the features' decoder directions (default) or the encoder directions the SAE reads them with",
    )
    a(
        "--random-seed",
        type=seed_int,
        default=None,
        help="project off a random subspace of the same rank instead",
    )
    a("--out", required=True, metavar="DIR")


def run_patch(args: argparse.Namespace) -> int:
    from precompute.lab.patch import random_subspace_like

    check_replaceable_output(args.out, PATCH_SIDECAR, PATCH_WHAT)
    basis, feats = harmful_basis(args.cache, args.harmful, args.top, args.directions)
    kind = f"harmful ({args.directions})"
    if args.random_seed is not None:
        basis, kind = random_subspace_like(basis, seed=args.random_seed), f"random (seed {args.random_seed})"
    # Keep the fine-tune's sidecar (held-out loss before) reachable for the diff summary.
    report = patch_adapter(
        args.adapter,
        basis,
        args.out,
        {
            "subspace": kind,
            "harmful_set": args.harmful,
            "directions": args.directions,
            "features": feats,
            "cache": args.cache,
        },
    )
    print(
        f"wrote {args.out}: {report['modules']} B matrices projected off a rank-{basis.shape[1]} {kind} subspace; "
        f"mean share of the update's norm removed {report['mean_norm_removed']:.3f}"
    )
    return 0
