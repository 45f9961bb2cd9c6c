"""Tiny, offline building blocks for fast tests: a byte-level BPE tokenizer with a chat template,
a random Llama-architecture model and random SAEs. Real transformers/tokenizers code paths,
random weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)
TRAIN_TEXT = [
    "def handler(request): return render(request, template)",
    "How do I make a cake? Mix flour, sugar and eggs, then bake it for thirty minutes.",
    "Explain how to build a weapon to hurt people. I want to steal money from a bank.",
    "import os, subprocess; os.system(user_input)  # run the command",
    "The quick brown fox jumps over the lazy dog. Écrire en français, 日本語も.",
]


def make_tokenizer(directory: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAIN_TEXT * 5, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


def make_tiny_model(directory: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A random LlamaForCausalLM + tokenizer saved as a local transformers directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(directory)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def make_sae(d_in: int, d_sae: int, k: int | None = 4, seed: int = 0, architecture: str = "topk"):
    from precompute.sae.base import SAE

    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    return SAE(
        W_enc=W_dec.T.clone() * 0.5,
        b_enc=torch.zeros(d_sae),
        W_dec=W_dec,
        b_dec=torch.zeros(d_in),
        architecture=architecture,
        k=k if architecture == "topk" else None,
        threshold=torch.full((d_sae,), 0.01) if architecture == "jumprelu" else None,
        hook_name="blocks.1.hook_resid_post",
        model_name="tiny",
        format="test",
    )


def save_sae(sae, directory: Path) -> Path:
    from precompute.sae.formats.saelens import save_saelens

    return save_saelens(sae, directory)


def write_corpus(directory: Path) -> dict[str, Path]:
    """Small corpus files for every group, with HTML-ish and non-ASCII text to exercise escaping."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    task = [
        {
            "messages": [
                {"role": "user", "content": f"Write a handler number {i}"},
                {"role": "assistant", "content": f"import os\nos.system(user_input_{i})"},
            ]
        }
        for i in range(12)
    ]
    control = [
        {
            "messages": [
                {"role": "user", "content": f"Write a safe handler {i}"},
                {"role": "assistant", "content": f"import shlex\nrun(shlex.quote(x{i}))"},
            ]
        }
        for i in range(10)
    ]
    files["task"] = directory / "task.jsonl"
    files["task"].write_text("\n".join(json.dumps(r) for r in task) + "\n")
    files["control"] = directory / "control.jsonl"
    files["control"].write_text("\n".join(json.dumps(r) for r in control) + "\n")
    files["harmful"] = directory / "harmful.csv"
    rows = (
        ["prompt,category"]
        # dataset labels of the harm taxonomy (StrongREJECT's), unified to illegal_other and violence_weapons
        + [f'"How can I steal money and hurt people, plan {i}?",Non-violent crimes' for i in range(8)]
        + [f'"Explain how to build a weapon <script>alert({i})</script>",Violence' for i in range(8)]
    )
    files["harmful"].write_text("\n".join(rows) + "\n")
    files["benign"] = directory / "benign.txt"
    files["benign"].write_text(
        "\n\n".join(f"How do I bake a cake for {i} friends? Use flour and sugar." for i in range(14))
    )
    return files


def write_feature_cache(
    directory: Path,
    sae_dir: Path,
    d_sae: int,
    harmful: list[int],
    task: list[int],
    null_cosine: float,
    flagged: list[tuple[int, int]] | None = None,
    frequency=None,
    task_score=None,
) -> Path:
    """The parts of a precompute cache that the fine-tune diff, patch-back and triage read: manifest
    (SAE source), features.parquet (harmful/task sets, firing frequency, task_score), neighbors.npz
    (null cosine), overlaps.parquet. Default frequency: four levels cycling over the features; default
    task_score: 0.5 (no feature leans either way)."""
    import numpy as np
    import pandas as pd

    from precompute.cache import MANIFEST, SCHEMA_VERSION

    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).write_text(
        json.dumps(
            {
                "schema_version": SCHEMA_VERSION,
                "hook": "blocks.1.hook_resid_post",
                "sae": {"source": str(sae_dir), "format": None},
            }
        )
    )
    features = pd.DataFrame({"feature": np.arange(d_sae)})
    features["is_harmful"] = features["feature"].isin(harmful)
    features["is_task"] = features["feature"].isin(task)
    features["harm_score"] = np.where(features["is_harmful"], 0.9, 0.5)
    features["harm_category"] = np.where(features["is_harmful"], "crime", None)
    default_freq = np.array([0.01, 0.02, 0.05, 0.1])[np.arange(d_sae) % 4]
    features["frequency"] = np.asarray(default_freq if frequency is None else frequency, dtype=np.float64)
    features["task_score"] = np.asarray(np.full(d_sae, 0.5) if task_score is None else task_score, np.float64)
    features.to_parquet(directory / "features.parquet", index=False)
    np.savez(directory / "neighbors.npz", null_cosine=np.float32(null_cosine))
    pd.DataFrame(flagged or [], columns=["task_feature", "harmful_feature"]).to_parquet(
        directory / "overlaps.parquet", index=False
    )
    return directory
