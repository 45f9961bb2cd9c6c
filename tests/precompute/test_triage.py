"""Dataset triage on the tiny random Llama: feature weights and sample scores equal brute-force
computations, the ranking is sorted, and the filtered files drop exactly the removed records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from precompute.corpus import CorpusSource
from precompute.errors import FeatureGeomError
from precompute.finetune import load_examples
from precompute.model import HookReader, load_model, resolve_hook
from precompute.sae.registry import load_sae
from precompute.triage import feature_weights, triage
from tests.tiny import write_feature_cache

HOOK = "blocks.1.hook_resid_post"
HARMFUL, TASK = [1, 5, 9, 12, 20], [2, 5, 7, 30, 40, 41]


@pytest.fixture(scope="module")
def cache(tiny_sae_dir, tmp_path_factory) -> Path:
    return write_feature_cache(tmp_path_factory.mktemp("cache"), tiny_sae_dir, 64, HARMFUL, TASK, 0.05)


def test_feature_weights_match_brute_force(cache, tiny_sae_dir) -> None:
    w_direct, w_via, info = feature_weights(cache)
    d = load_sae(str(tiny_sae_dir)).unit_directions().double()
    assert np.flatnonzero(w_direct).tolist() == HARMFUL and set(w_direct[HARMFUL]) == {1.0}
    for j in range(64):
        if j in TASK and j not in HARMFUL:  # 5 is both: counted once, directly
            expected = sum(max(0.0, float(d[j] @ d[h]) - 0.05) for h in HARMFUL)
            assert w_via[j] == pytest.approx(expected, abs=1e-5)
        else:
            assert w_via[j] == 0.0
    assert info["n_harmful"] == 5 and info["n_task"] == 5


def test_triage_ranks_by_brute_force_score_and_filters_exactly(cache, tiny_model_dir, tiny_corpus, tmp_path) -> None:
    data = tmp_path / "data.jsonl"
    lines = tiny_corpus["task"].read_text().splitlines()
    data.write_text("\n".join(lines) + "\n")
    out = triage(str(data), str(cache), str(tmp_path / "triage"), model=str(tiny_model_dir), remove_frac=0.25,
                 max_length=64, seed=3, batch_size=5, device="cpu", progress=False)
    ranked = pd.read_parquet(out / "ranked.parquet")
    assert len(ranked) == 12 and ranked["rank"].tolist() == list(range(1, 13))
    assert ranked["score"].is_monotonic_decreasing
    np.testing.assert_allclose(ranked["score"], ranked["direct"] + ranked["via_overlap"], rtol=1e-5)

    # brute force: one sample at a time, unpadded
    lm = load_model(str(tiny_model_dir), device="cpu")
    sae = load_sae(str(feature_weights(cache)[2]["sae"]))
    w_direct, w_via, _ = feature_weights(cache)
    reader = HookReader(lm.model, resolve_hook(lm.model, HOOK))
    examples = {e.key: e for e in load_examples([CorpusSource(path=str(data), group="task")], lm.tokenizer, 64)}
    for row in ranked.itertuples():
        ex = examples[row.key]
        acts = sae.encode(reader(torch.tensor([ex.input_ids]))[0]).double().numpy()
        trained = np.array([lab != -100 for lab in ex.labels])
        per_token = acts @ (w_direct + w_via).astype(np.float64)
        assert row.score == pytest.approx(per_token[trained].mean(), rel=1e-4, abs=1e-6)
        assert row.n_tokens == trained.sum()

    removed = set(ranked.loc[ranked["removed"], "index"])
    assert removed == set(ranked["index"].iloc[:3])
    assert ranked["random_removed"].sum() == 3
    kept = [json.loads(x) for x in (out / "filtered.jsonl").read_text().splitlines()]
    assert kept == [json.loads(lines[i]) for i in range(12) if i not in removed]  # verbatim, file order
    random_kept = (out / "random_filtered.jsonl").read_text().splitlines()
    assert len(random_kept) == 9
    assert (out / "removed.txt").read_text().split() == ranked["key"].iloc[:3].tolist()

    tokens = pd.read_parquet(out / "tokens.parquet")
    assert sorted(tokens["rank"]) == list(range(1, 13))
    first = tokens.set_index("rank").loc[1]
    assert len(first["tokens"]) == len(first["trained"]) == len(first["direct"]) == len(first["via_overlap"])
    meta = json.loads((out / "triage.json").read_text())
    assert meta["n_samples"] == 12 and meta["n_removed"] == 3

    with pytest.raises(FeatureGeomError, match="between 0 and 1"):
        triage(str(data), str(cache), str(tmp_path / "t2"), model=str(tiny_model_dir), remove_frac=1.0)
