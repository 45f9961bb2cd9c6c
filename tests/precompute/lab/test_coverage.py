"""Response-token coverage at a max_length: the arithmetic equals a token-by-token count, the measure
equals what the fine-tune's own encoding trains, and finetune refuses a max_length that trains too little."""

from __future__ import annotations

import json

import numpy as np
import pytest

from precompute.data.corpus import CorpusSource, read_source
from precompute.errors import FeatureGeomError
from precompute.lab.coverage import Coverage, check_share, measure
from precompute.lab.finetune import FinetuneConfig, encode_example, finetune, sample_key
from precompute.model.load import load_model


def brute(n_prompt, n_full, m):
    """Walk every token of every sample: a response token counts as trained when its position < m."""
    total = trained = 0
    for p, full in zip(n_prompt, n_full, strict=True):
        for pos in range(p, full):
            total += 1
            trained += pos < m
    return trained, total


def test_share_truncation_and_smallest_length_equal_a_token_count() -> None:
    rng = np.random.default_rng(0)
    n_prompt = rng.integers(5, 40, size=50)
    n_full = n_prompt + rng.integers(0, 300, size=50)
    cov = Coverage(n_prompt, n_full)
    for m in (1, 10, 37, 100, 250, 400):
        trained, total = brute(n_prompt, n_full, m)
        assert cov.trained(m) == trained and cov.response_tokens == total
        assert cov.share(m) == pytest.approx(trained / total)
        assert cov.truncated(m) == int((n_full > m).sum())
    for target in (0.5, 0.9, 0.95, 1.0):
        best = next(
            m
            for m in range(1, int(n_full.max()) + 1)
            if brute(n_prompt, n_full, m)[0] >= target * cov.response_tokens
        )
        assert cov.smallest_length(target) == best
    assert Coverage.of([(3, 3)]).share(10) != Coverage.of([(3, 3)]).share(10)  # NaN: no response token
    with pytest.raises(FeatureGeomError, match=r"trains only .*use --max-length \d+ .*min-response-share"):
        check_share(cov, 50, 0.95)
    check_share(cov, 50, 0.0)  # 0 allows any length
    check_share(cov, cov.smallest_length(0.95), 0.95)


def test_measure_counts_what_the_fine_tune_trains(tiny_model_dir, tiny_corpus) -> None:
    tok = load_model(str(tiny_model_dir), device="cpu").tokenizer
    source = CorpusSource(path=str(tiny_corpus["task"]), group="task")
    cov = measure([source], tok)[str(tiny_corpus["task"])]
    docs, _ = read_source(source, 0, seed=0)
    for m in (12, 16, 20, 64):
        examples = [encode_example(d, tok, m, sample_key(d, source)) for d in docs]
        labelled = sum(sum(1 for t in e.labels if t != -100) for e in examples if e is not None)
        assert cov.trained(m) == labelled
    assert cov.share(64) == 1.0


def test_finetune_records_the_share_and_refuses_too_short_a_max_length(
    tiny_model_dir, tiny_corpus, tmp_path
) -> None:
    cfg = dict(
        model=str(tiny_model_dir),
        corpus=[CorpusSource(path=str(tiny_corpus["task"]), group="task")],
        heldout_docs=2,
        steps=1,
        batch_size=2,
        rank=2,
        last_layer=0,
        device="cpu",
        progress=False,
    )
    out = finetune(FinetuneConfig(**cfg, out=str(tmp_path / "ok"), max_length=64))
    info = json.loads((out / "finetune.json").read_text())
    assert info["response_token_share"] == 1.0 and info["samples_truncated"] == 0
    assert info["response_tokens"] == info["response_tokens_trained"] > 0
    with pytest.raises(FeatureGeomError, match=r"--max-length 30 trains only .*use --max-length \d+"):
        finetune(FinetuneConfig(**cfg, out=str(tmp_path / "short"), max_length=30))
    assert not (tmp_path / "short").exists()
    out = finetune(
        FinetuneConfig(**cfg, out=str(tmp_path / "allowed"), max_length=30, min_response_share=0.0)
    )
    assert json.loads((out / "finetune.json").read_text())["response_token_share"] < 0.95
