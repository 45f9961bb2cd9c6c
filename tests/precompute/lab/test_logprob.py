"""The behavioural readout: batched teacher-forced log-probs equal one-sequence-at-a-time sums over exactly
the tokens a fine-tune trains; EM questions map to their base question; the answers file is complete
and checked."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from precompute.data.corpus import Document
from precompute.errors import FeatureGeomError
from precompute.lab.em_prompts import base_id_of, base_ids, em_questions, fixed_answers
from precompute.lab.finetune import encode_example
from precompute.lab.logprob import answer_items, level_summary, per_prompt, score_items, sequence_logprobs
from precompute.model.load import load_model


def test_em_questions_share_a_base_question_across_variants() -> None:
    qs = em_questions()
    by_id = {q.id: q for q in qs}
    assert len(qs) == 72 and len({q.base_id for q in qs}) == 56
    assert base_id_of("quick_buck_template") == ("quick_buck", "template")
    assert base_id_of("quick_buck_json") == ("quick_buck", "json")
    assert base_id_of("0_creative_writing_0") == ("0_creative_writing_0", "plain")
    assert (
        by_id["quick_buck_json"].system and by_id["quick_buck_json"].question == by_id["quick_buck"].question
    )
    texts = [by_id["quick_buck"].question, by_id["quick_buck_template"].question, "Name a colour."]
    assert base_ids(texts, ["em", "em", "neutral"]) == ["quick_buck", "quick_buck", "neutral:2"]


def test_every_base_question_has_answers_and_a_bad_file_is_refused(tmp_path) -> None:
    answers = fixed_answers()
    assert set(answers) == {q.base_id for q in em_questions()}
    assert all(len(a["aligned"]) == len(a["misaligned"]) >= 1 for a in answers.values())
    items = answer_items()
    assert len(items) == sum(2 * len(answers[q.base_id]["aligned"]) for q in em_questions())
    json_item = next(i for i in items if i.question.variant == "json")
    assert json_item.messages[0]["role"] == "system" and json_item.messages[-1]["role"] == "assistant"
    with pytest.raises(FeatureGeomError, match="no entry for 1 base question"):
        answer_items(answers={k: v for k, v in answers.items() if k != "quick_buck"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("- id: x\n  aligned: [a]\n")
    with pytest.raises(FeatureGeomError, match="non-empty aligned/misaligned"):
        fixed_answers(bad)
    bad.write_text("- id: x\n  aligned: [a]\n  misaligned: [b]\n- id: x\n  aligned: [a]\n  misaligned: [b]\n")
    with pytest.raises(FeatureGeomError, match="listed twice"):
        fixed_answers(bad)


def test_batched_log_probs_equal_single_sequence_sums_over_the_trained_tokens(tiny_model_dir) -> None:
    lm = load_model(str(tiny_model_dir), device="cpu")
    items = [i for i in answer_items() if i.question.base_id in ("quick_buck", "12_offend_the_user_0")]
    rows = score_items(lm, items, batch_size=3)  # padded batches of unequal lengths
    for item, row in zip(items, rows.itertuples(), strict=True):
        ex = encode_example(Document(0, 0, "general", None, messages=item.messages), lm.tokenizer, 10_000)
        n_prompt = next(i for i, t in enumerate(ex.labels) if t != -100)
        assert row.n_tokens == len(ex.input_ids) - n_prompt  # exactly the tokens finetune puts its loss on
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(input_ids=torch.tensor([ex.input_ids])).logits[0].float(), -1)
        direct = sum(float(logp[t - 1, ex.input_ids[t]]) for t in range(n_prompt, len(ex.input_ids)))
        assert row.logprob_sum == pytest.approx(direct, abs=1e-4)
    again = sequence_logprobs(lm.model, [(list(range(5, 15)), 4)], int(lm.tokenizer.pad_token_id))
    assert again.shape == (1, 2) and again[0, 1] == 6


def test_per_prompt_margins_and_their_level() -> None:
    rows = pd.DataFrame(
        {
            "question_id": ["q1"] * 4 + ["q2"] * 2,
            "base_id": ["b1"] * 4 + ["b2"] * 2,
            "variant": "plain",
            "kind": ["misaligned", "misaligned", "aligned", "aligned", "misaligned", "aligned"],
            "answer_index": [0, 1, 0, 1, 0, 0],
            "logprob_sum": [-4.0, -9.0, -2.0, -3.0, -10.0, -6.0],
            "n_tokens": [2, 3, 2, 1, 5, 2],
        }
    )
    p = per_prompt(rows)
    assert p["question_id"].tolist() == ["q1", "q2"]
    np.testing.assert_allclose(p["lp_misaligned"], [(-2 - 3) / 2, -2.0])
    np.testing.assert_allclose(p["lp_aligned"], [(-1 - 3) / 2, -3.0])
    np.testing.assert_allclose(p["margin"], [-0.5, 1.0])
    level = level_summary(p, n_boot=200)
    assert (
        level["margin"][0] == pytest.approx(0.25) and level["margin"][1] >= -0.5 and level["margin"][2] <= 1.0
    )


def test_logprob_command_writes_the_readout(tiny_model_dir, tmp_path, capsys) -> None:
    from precompute.cli import main
    from precompute.lab.logprob import load_logprob

    assert (
        main(
            [
                "logprob",
                "--model",
                str(tiny_model_dir),
                "--device",
                "cpu",
                "--n-boot",
                "50",
                "--out",
                str(tmp_path / "lp"),
            ]
        )
        == 0
    )
    meta = json.loads((tmp_path / "lp" / "logprob.json").read_text())
    assert meta["n_prompts"] == 72 and meta["n_base_questions"] == 56
    prompts = load_logprob(tmp_path / "lp")
    assert prompts is not None and len(prompts) == 72
    assert meta["summary"]["margin"][0] == pytest.approx(float(prompts["margin"].mean()))
    assert "margin" in capsys.readouterr().out
    assert load_logprob(tmp_path) is None
