"""Dataset triage on the tiny random Llama: feature weights and sample scores equal brute-force
computations, the ranking is sorted, and the filtered files drop exactly the removed records."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from precompute.data.corpus import CorpusSource
from precompute.errors import FeatureGeomError
from precompute.lab.finetune import load_examples
from precompute.lab.triage import feature_weights, triage
from precompute.model.hooks import HookReader, resolve_hook
from precompute.model.load import load_model
from precompute.sae.registry import load_sae
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


def test_triage_ranks_by_brute_force_score_and_filters_exactly(
    cache, tiny_model_dir, tiny_corpus, tmp_path
) -> None:
    data = tmp_path / "data.jsonl"
    lines = tiny_corpus["task"].read_text().splitlines()
    data.write_text("\n".join(lines) + "\n")
    out = triage(
        str(data),
        str(cache),
        str(tmp_path / "triage"),
        model=str(tiny_model_dir),
        remove_frac=0.25,
        max_length=64,
        seed=3,
        batch_size=5,
        device="cpu",
        progress=False,
    )
    ranked = pd.read_parquet(out / "ranked.parquet")
    assert len(ranked) == 12 and ranked["rank"].tolist() == list(range(1, 13))
    assert ranked["score"].is_monotonic_decreasing
    np.testing.assert_allclose(ranked["score"], ranked["direct"] + ranked["via_overlap"], rtol=1e-5)

    # brute force: one sample at a time, unpadded
    lm = load_model(str(tiny_model_dir), device="cpu")
    sae = load_sae(str(feature_weights(cache)[2]["sae"]))
    w_direct, w_via, _ = feature_weights(cache)
    reader = HookReader(lm.model, resolve_hook(lm.model, HOOK))
    examples = {
        e.key: e for e in load_examples([CorpusSource(path=str(data), group="task")], lm.tokenizer, 64)
    }
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


@pytest.mark.parametrize(
    "option,value,message",
    [
        ("max_samples", 0, "--max-samples must be at least 1 (got 0)"),
        ("max_samples", -3, "--max-samples must be at least 1 (got -3)"),
        ("batch_size", 0, "--batch-size must be at least 1 (got 0)"),
        ("max_length", 1, "--max-length must be at least 2 (got 1)"),
    ],
)
def test_triage_rejects_out_of_range_sizes(cache, tiny_corpus, option, value, message) -> None:
    with pytest.raises(FeatureGeomError) as err:
        triage(str(tiny_corpus["task"]), str(cache), **{option: value})
    assert str(err.value) == message


# --------------------------------------------------------------------------- records triage cannot score
def chat(*turns: tuple[str, str]) -> str:
    return json.dumps({"messages": [{"role": role, "content": content} for role, content in turns]})


MIXED = [  # (line, what triage does with it)
    chat(("user", "Write a handler 0"), ("assistant", "os.system(x0)")),  # record 0: scored
    json.dumps({"text": "plain prose, no chat"}),  # record 1: not a chat sample
    json.dumps({"messages": "user: hi assistant: yo"}),  # record 2: messages is a string
    chat(("user", "Write a handler"), ("assistant", "ok"), ("user", "and?")),  # record 3: ends with the user
    json.dumps({"title": "no text at all"}),  # record 4: no text field
    json.dumps(
        {"messages": [{"role": "user", "content": "q"}, {"content": "a"}]}
    ),  # record 5: turn without role
    '{"messages": [broken',  # a line that is not JSON: no record
    '{"text": "caf\xe9"}',  # written as Latin-1 below: not UTF-8, no record
    *[chat(("user", f"Write a handler {i}"), ("assistant", f"os.system(x{i})")) for i in range(1, 5)],  # 6..9
]
SKIPPED = {
    "not valid UTF-8": 1,
    "malformed (not a JSON object, or a bad messages list)": 2,
    "no messages or text field": 1,
    "`messages` is a string, not a list of turns": 1,
    "no `messages` (plain text, not a chat sample)": 1,
    "no assistant turn at the end": 1,
}


def run_cli(*args: str) -> int:
    from precompute.cli import main

    return main(["triage", *args])


def test_triage_says_what_it_skipped_and_keeps_every_record(cache, tiny_model_dir, tmp_path, capsys) -> None:
    data = tmp_path / "mixed.jsonl"
    data.write_bytes("\n".join(MIXED).encode("latin-1") + b"\n")
    out = tmp_path / "triage"
    assert (
        run_cli(
            str(data),
            "--cache",
            str(cache),
            "--out",
            str(out),
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--no-progress",
            "--max-length",
            "64",
            "--remove-frac",
            "0.2",
        )
        == 0
    )
    stdout = capsys.readouterr().out.splitlines()
    # the tiny SAE names another model than the tiny model: triage checks the pair, as every command does
    assert stdout[0].startswith("warning: the SAE was trained on tiny but is being applied to")
    stdout = stdout[1:]
    assert stdout[0] == f"wrote {out}: 5 samples ranked; removed 1 into filtered.jsonl"
    assert stdout[1] == (
        "not scored: 1 not valid UTF-8; 2 malformed (not a JSON object, or a bad messages list); 1 no messages or "
        "text field; 1 `messages` is a string, not a list of turns; 1 no `messages` (plain text, not a chat "
        "sample); 1 no assistant turn at the end (records among them are kept in both filtered files)"
    )
    meta = json.loads((out / "triage.json").read_text())
    assert (meta["skipped"], meta["n_records"], meta["n_samples"]) == (SKIPPED, 10, 5)
    ranked = pd.read_parquet(out / "ranked.parquet")
    assert sorted(ranked["index"]) == [0, 6, 7, 8, 9]
    removed = int(ranked.loc[ranked["removed"], "index"].iloc[0])
    records = [json.loads(line) for line in MIXED[:6] + MIXED[8:]]  # the two unreadable lines are no records
    kept = [json.loads(line) for line in (out / "filtered.jsonl").read_text().splitlines()]
    assert kept == [r for i, r in enumerate(records) if i != removed]  # unscored records stay, verbatim


def test_triage_max_samples_counts_records_and_their_skips(cache, tiny_model_dir, tmp_path) -> None:
    data = tmp_path / "mixed.jsonl"
    data.write_bytes("\n".join(MIXED).encode("latin-1") + b"\n")
    out = triage(
        str(data),
        str(cache),
        str(tmp_path / "t"),
        model=str(tiny_model_dir),
        max_samples=7,
        max_length=64,
        remove_frac=0.5,
        device="cpu",
        progress=False,
    )
    meta = json.loads((out / "triage.json").read_text())
    assert (meta["skipped"], meta["n_records"], meta["n_samples"]) == (SKIPPED, 7, 2)
    assert len((out / "filtered.jsonl").read_text().splitlines()) == 6  # 7 records, 1 removed
    out = triage(
        str(data),
        str(cache),
        str(tmp_path / "t3"),
        model=str(tiny_model_dir),
        max_samples=3,
        max_length=64,
        remove_frac=0.5,
        device="cpu",
        progress=False,
    )
    meta = json.loads((out / "triage.json").read_text())
    assert meta["skipped"] == {
        "`messages` is a string, not a list of turns": 1,
        "no `messages` (plain text, not a chat sample)": 1,
    }


@pytest.mark.parametrize(
    "lines,skipped",
    [
        (
            [json.dumps({"text": "prose one"}), json.dumps({"prompt": "prose two"})],
            "2 no `messages` (plain text, not a chat sample)",
        ),
        (
            [json.dumps({"messages": "a string"}), chat(("user", "hi")), json.dumps({"other": 1})],
            "1 no messages or text field; 1 `messages` is a string, not a list of turns; 1 no assistant turn at the end",
        ),
    ],
)
def test_triage_with_nothing_to_score_exits_2(cache, tmp_path, capsys, lines, skipped) -> None:
    data = tmp_path / "none.jsonl"
    data.write_text("\n".join(lines) + "\n")
    # A model that does not exist: the dataset is judged before any model loads.
    assert (
        run_cli(str(data), "--cache", str(cache), "--model", str(tmp_path / "no-model"), "--device", "cpu")
        == 2
    )
    captured = capsys.readouterr()
    assert captured.err == (
        f"featuregeom: error: {data} has no samples to score (skipped {skipped}); triage scores "
        "chat records whose `messages` list ends in an assistant turn\n"
    )


def test_triage_prompts_too_long_say_raise_max_length(cache, tiny_model_dir, tmp_path) -> None:
    data = tmp_path / "long.jsonl"
    data.write_text(chat(("user", "word " * 200), ("assistant", "ok")) + "\n")
    with pytest.raises(
        FeatureGeomError,
        match=r"has no samples to score \(skipped 1 prompt alone fills "
        r"--max-length\); .*; raise --max-length$",
    ):
        triage(str(data), str(cache), model=str(tiny_model_dir), max_length=8, device="cpu", progress=False)


@pytest.mark.parametrize(
    "damage,message",
    [
        (
            "drop is_harmful",
            r"features\.parquet has no is_harmful column: the scores step has not run on this cache; "
            r"run `featuregeom scores --out {cache}`",
        ),
        ("drop is_harmful is_task", r"features\.parquet has no is_harmful, is_task column"),
        (
            "remove neighbors.npz",
            r"{cache} has no neighbors\.npz \(the null cosine\); run `featuregeom geometry --sae SAE "
            r"--out {cache}` first",
        ),
        ("garble neighbors.npz", r"neighbors\.npz is unreadable \(.*\); run `featuregeom geometry"),
        (
            "remove features.parquet",
            r"{cache} has no features\.parquet; build the cache with `featuregeom precompute`",
        ),
    ],
)
def test_triage_on_an_incomplete_cache_names_the_step_to_run(
    cache, tiny_corpus, tmp_path, capsys, damage, message
) -> None:
    import shutil

    broken = tmp_path / "cache"
    shutil.copytree(cache, broken)
    action, *what = damage.split()
    if action == "drop":
        features = pd.read_parquet(broken / "features.parquet")
        features.drop(columns=what).to_parquet(broken / "features.parquet", index=False)
    elif action == "remove":
        (broken / what[0]).unlink()
    else:
        (broken / what[0]).write_bytes(b"not an npz archive")
    assert (
        run_cli(str(tiny_corpus["task"]), "--cache", str(broken), "--model", str(tmp_path / "no-model")) == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("featuregeom: error: ") and err.count("\n") == 1
    assert re.search(message.format(cache=re.escape(str(broken))), err), err


def test_triage_of_yaml_with_dates_writes_them_as_text(cache, tiny_model_dir, tmp_path) -> None:
    data = tmp_path / "dated.yaml"
    data.write_text(
        "".join(
            f"- messages: [{{role: user, content: q{i}}}, {{role: assistant, content: a{i}}}]\n"
            f"  added: 2024-01-0{i + 1}\n  2024-02-0{i + 1}: a date as a key\n"
            for i in range(4)
        )
    )
    out = triage(
        str(data),
        str(cache),
        str(tmp_path / "t"),
        model=str(tiny_model_dir),
        max_length=64,
        remove_frac=0.25,
        device="cpu",
        progress=False,
    )
    random_kept = [json.loads(line) for line in (out / "random_filtered.jsonl").read_text().splitlines()]
    assert len(random_kept) == 3
    for record in random_kept:
        i = int(record["messages"][0]["content"][1])
        assert record == {
            "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
            "added": f"2024-01-0{i + 1}",
            f"2024-02-0{i + 1}": "a date as a key",
        }
