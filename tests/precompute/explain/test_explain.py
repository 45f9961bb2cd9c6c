"""`featuregeom explain` on a real tiny cache (tiny random Llama as explainer and scorer, which is why
no explanation here is expected to be good): the excerpts mark exactly the activating tokens, the
negatives are contexts where the feature never fires (checked against the shards) from the positives'
groups, the score is the Mann-Whitney AUROC, the cache gains its columns atomically and keeps earlier
runs' features, and an OpenAI-compatible endpoint is spoken correctly (a local server in front of the
same tiny model)."""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from precompute.cache import verify_cache
from precompute.cli import main
from precompute.explain.clients import LocalModel
from precompute.explain.detection import detection_auroc, feature_texts, firing_contexts
from precompute.explain.prompts import clean_explanation, excerpt
from precompute.pipeline.run import run_precompute
from precompute.pipeline.shards import Shard, list_shards
from precompute.schema import check_files
from tests.precompute.pipeline.test_run import make_cfg


@pytest.fixture(scope="module")
def cache(tiny_model_dir: Path, tiny_sae_dir: Path, tiny_corpus: dict[str, Path], tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("explain") / "cache"
    run_precompute(make_cfg(tiny_model_dir, tiny_sae_dir, tiny_corpus, out))
    return out


def test_excerpt_marks_tokens_at_30_percent_of_the_peak_and_keeps_12_each_side() -> None:
    tokens = [f"t{i} " for i in range(40)]
    acts = [0.0] * 40
    acts[20], acts[21], acts[5] = 10.0, 3.0, 2.9
    text = excerpt(tokens, acts, 20, mark=True)
    assert text.startswith("t8 ") and text.endswith("t32")
    assert "<<t20 >>" in text and "<<t21 >>" in text and "<<t5" not in text
    assert "<<" not in excerpt(tokens, acts, 20, mark=False)


def test_clean_explanation() -> None:
    assert clean_explanation('\n  Explanation: "code that reads files"\nmore') == "code that reads files"
    assert len(clean_explanation("x" * 500)) == 160


def test_detection_auroc_is_the_pairwise_win_rate() -> None:
    rng = np.random.default_rng(0)
    pos, neg = rng.random(13).round(1), rng.random(9).round(1)  # rounded: ties count one half
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    assert detection_auroc(pos, neg) == pytest.approx(wins / (13 * 9))
    assert np.isnan(detection_auroc([], [0.1]))


def test_negatives_never_fire_and_match_the_positives_groups(cache: Path) -> None:
    examples = pd.read_parquet(cache / "examples.parquet")
    n = int(json.loads((cache / "manifest.json").read_text())["n_features"])
    features = sorted(examples.loc[examples["kind"] == "top", "feature"].unique().tolist())[:6]
    fires = firing_contexts(list_shards(cache / "harvest"), features, n)
    brute: dict[int, set[int]] = {f: set() for f in features}
    for path in list_shards(cache / "harvest"):
        shard = Shard.load(path)
        dense = shard.matrix(n).toarray()
        for f in features:
            brute[f] |= set(shard.context_id[dense[:, f] > 0].tolist())
    assert fires == brute
    group_of = examples.drop_duplicates("context_id").set_index("context_id")["group"]
    for f in features:
        texts = feature_texts(examples, f, fires[f], n_shown=3, n_scored=4, seed=0)
        shown = examples[(examples["feature"] == f) & (examples["kind"] == "top")].sort_values("rank").head(3)
        assert not set(texts.positive_contexts) & set(shown["context_id"])  # held out of the explanation
        assert not set(texts.negative_contexts) & fires[f]
        assert len(texts.negatives) == len(texts.positives) and len(set(texts.negative_contexts)) == len(
            texts.negatives
        )
        matched = sum(
            group_of[neg] == group_of[pos]
            for pos, neg in zip(texts.positive_contexts, texts.negative_contexts, strict=True)
        )
        assert matched == texts.negative_groups_matched


def test_explain_writes_its_columns_and_keeps_earlier_features(
    cache: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    work = tmp_path / "cache"
    shutil.copytree(cache, work)
    argv = [
        "explain",
        "--out",
        str(work),
        "--explainer",
        str(tiny_model_dir),
        "--n-shown",
        "3",
        "--n-scored",
        "3",
    ]
    assert main([*argv, "--features", "1,2", "--max-new-tokens", "8", "--no-progress"]) == 0
    assert main([*argv, "--features", "3", "--max-new-tokens", "8", "--no-progress"]) == 0
    verify_cache(work)
    check_files(
        work, ["features.parquet"]
    )  # the new columns have the contract's types (nullable Int64 included)
    f = pd.read_parquet(work / "features.parquet").set_index("feature")
    explained = f["auto_explanation_model"].dropna()
    fired = set(pd.read_parquet(work / "examples.parquet")["feature"])
    assert set(explained.index) == {1, 2, 3} & fired
    assert all(m.startswith("local:") for m in explained)
    scored = f.loc[list(explained.index), "auto_explanation_scored"]
    assert (scored <= 6).all()
    d = f["auto_explanation_detection"].dropna()
    assert ((d >= 0) & (d <= 1)).all()
    params = json.loads((work / "params" / "explain.json").read_text())
    assert params["features"] == [3] and params["params"]["n_scored"] == 3


def test_bad_requests_exit_2(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert main(["explain", "--out", str(cache), "--explainer", "openai:gpt-4o-mini", "--features", "1"]) == 2
    assert "needs an API key in $OPENAI_API_KEY" in capsys.readouterr().err
    assert main(["explain", "--out", str(cache), "--features", "99999"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["explain", "--out", str(tmp_path / "nope"), "--features", "1"]) == 2


class _Endpoint(BaseHTTPRequestHandler):
    """/v1/chat/completions answered by the tiny model (greedy), as an OpenAI-compatible server would."""

    model: LocalModel
    seen: list[dict[str, Any]]

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
        if body.get("max_tokens") == 1:
            p = self.model.yes_probability(body["messages"])
            content = "Yes" if p >= 0.5 else "No"
            reply = {"choices": [{"message": {"content": content}, "logprobs": {"content": [{"top_logprobs": [
                {"token": "Yes", "logprob": float(np.log(max(p, 1e-9)))},
                {"token": "No", "logprob": float(np.log(max(1 - p, 1e-9)))}]}]}}]}  # fmt: skip
        else:
            reply = {
                "choices": [
                    {"message": {"content": self.model.complete(body["messages"], body["max_tokens"])}}
                ]
            }
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


def test_openai_compatible_endpoint(
    cache: Path, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _Endpoint.model = LocalModel(str(tiny_model_dir), "cpu")
    _Endpoint.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    work = tmp_path / "cache"
    shutil.copytree(cache, work)
    monkeypatch.setenv("MY_KEY", "sekrit")
    base = f"http://127.0.0.1:{server.server_port}/v1"
    try:
        argv = [
            "explain",
            "--out",
            str(work),
            "--explainer",
            "openai:tiny",
            "--api-base",
            base,
            "--api-key-env",
            "MY_KEY",
        ]
        assert main([*argv, "--features", "1", "--n-shown", "3", "--n-scored", "3", "--no-progress"]) == 0
    finally:
        server.shutdown()
    assert {s["path"] for s in _Endpoint.seen} == {"/v1/chat/completions"}
    assert {s["auth"] for s in _Endpoint.seen} == {"Bearer sekrit"} and {
        s["model"] for s in _Endpoint.seen
    } == {"tiny"}
    assert all(s["temperature"] == 0 for s in _Endpoint.seen)
    row = pd.read_parquet(work / "features.parquet").set_index("feature").loc[1]
    assert row["auto_explanation_model"] == f"openai:tiny@{base}"
    want = LocalModel(str(tiny_model_dir), "cpu")  # the same model in process gives the same explanation
    from precompute.explain.detection import feature_texts as texts_of
    from precompute.explain.prompts import explainer_messages

    examples = pd.read_parquet(work / "examples.parquet")
    shown = texts_of(examples, 1, set(), 3, 3, 0).shown
    assert row["auto_explanation"] == (
        clean_explanation(want.complete(explainer_messages(shown), 40)) or None
    )


def test_neuronpedia_export_carries_the_explanations_and_their_model(
    cache: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import gzip

    work = tmp_path / "cache"
    shutil.copytree(cache, work)
    argv = ["explain", "--out", str(work), "--explainer", str(tiny_model_dir), "--features", "1,2"]
    assert main([*argv, "--n-shown", "3", "--n-scored", "2", "--max-new-tokens", "6", "--no-progress"]) == 0
    assert main(["export", "--neuronpedia", str(tmp_path / "np"), "--cache", str(work), "--no-progress"]) == 0
    rows = [
        json.loads(line)
        for path in sorted((tmp_path / "np").rglob("explanations/batch-*.jsonl.gz"))
        for line in gzip.decompress(path.read_bytes()).decode().splitlines()
    ]
    auto = {int(r["index"]): r for r in rows if r["typeName"] == "featuregeom-explain"}
    f = pd.read_parquet(work / "features.parquet").set_index("feature")
    want = f["auto_explanation"].dropna()
    assert set(auto) == set(want.index)
    for i, r in auto.items():
        assert r["description"] == want[i] and r["explanationModelName"] == f.loc[i, "auto_explanation_model"]
    assert [int(r["index"]) for r in rows] == sorted(
        int(r["index"]) for r in rows
    )  # by index, as export-data.py
