"""Search ranks by match strength (explorer/data/search.py): equal to a brute-force computation of the
documented score on a cache built by the real pipeline; a dense feature loses a tie; snippets stay inert."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from explorer.data import load_cache
from explorer.data.search import DENSE_FACTOR, MAX_RANK, W_ACT, W_LABEL, W_LENS, rank_features, snippet_html
from precompute.cli import main as cli_main


@pytest.fixture(scope="module")
def tiny_cache(
    tiny_model_dir: Path, tiny_sae_dir: Path, tiny_corpus: dict[str, Path], tmp_path_factory
) -> Path:
    """A cache built by `featuregeom precompute` on the tiny random model (real tokens and activations)."""
    out = tmp_path_factory.mktemp("search") / "tiny"
    args = ["precompute", "--model", str(tiny_model_dir), "--sae", str(tiny_sae_dir)]
    args += ["--hook", "blocks.1.hook_resid_post", "--out", str(out), "--device", "cpu", "--no-progress"]
    args += ["--context-size", "24", "--batch-size", "4", "--neighbors", "8", "--top-k-examples", "5"]
    args += ["--umap-neighbors", "5", "--outlier-norm-factor", "0"]
    for spec in (
        f"{tiny_corpus['task']}:task",
        f"{tiny_corpus['control']}:control",
        f"{tiny_corpus['harmful']}:harmful:@category",
        f"{tiny_corpus['benign']}:benign",
    ):
        args += ["--corpus", spec]
    assert cli_main(args) == 0
    return out


def brute_force(cache: Path, query: str) -> list[tuple[int, float]]:
    """The documented score, computed the slow, obvious way from the parquet files."""
    feats = pq.read_table(cache / "features.parquet").to_pylist()
    ex = pq.read_table(cache / "examples.parquet").to_pylist()
    q = query.lower()
    freqs = sorted(f["frequency"] for f in feats if f["frequency"] and f["frequency"] > 0)
    dense = DENSE_FACTOR * float(np.median(freqs))
    best: dict[int, float] = {}
    in_text: set[int] = set()
    for r in ex:
        if r["kind"] != "top" or r["rank"] >= MAX_RANK:
            continue
        toks = [t.lower() for t in r["tokens"]]
        text = "".join(toks)
        occ = [i for i in range(len(text)) if text.startswith(q, i)]
        if not occ:
            continue
        in_text.add(r["feature"])
        pos = 0
        for tok, act in zip(toks, r["activations"], strict=True):
            span = range(pos, pos + len(tok))
            if act > 0 and any(s < span.stop and s + len(q) > span.start for s in occ) and len(tok):
                best[r["feature"]] = max(best.get(r["feature"], 0.0), act)
            pos += len(tok)
    out = []
    for f in feats:
        i = f["feature"]
        label = q in (f["label"] or "").lower()
        explained = [f["explanation"] or "", f.get("auto_explanation") or ""]
        lens = any(q in e.lower() for e in explained) or any(q in t.lower() for t in f["top_promoted"] or [])
        if not (label or lens or i in in_text):
            continue
        a = min(1.0, best.get(i, 0.0) / f["max_activation"]) if f["max_activation"] > 0 else 0.0
        d = min(1.0, dense / f["frequency"]) if f["frequency"] > dense else 1.0
        out.append((i, (W_ACT * a + W_LABEL * label + W_LENS * lens) * d, f["frequency"]))
    out.sort(key=lambda t: (-t[1], t[2], t[0]))
    return [(i, s) for i, s, _ in out]


def common_queries(cache: Path) -> list[str]:
    """Queries taken from the cache's own example text (so they match), and one that matches nothing."""
    ex = pq.read_table(cache / "examples.parquet").to_pylist()
    words = Counter(w.lower() for r in ex for w in re.findall(r"[A-Za-z]{3,}", "".join(r["tokens"])))
    top = [w for w, _ in words.most_common(40)]
    return [top[0], top[5], top[-1], top[10][:2], "zzq-no-match"]


def test_ranking_equals_brute_force(tiny_cache: Path) -> None:
    c = load_cache(tiny_cache)
    checked = 0
    for q in common_queries(tiny_cache):
        got = c.search(q)
        want = brute_force(tiny_cache, q)
        assert got["feature"].tolist() == [i for i, _ in want], q
        np.testing.assert_allclose(got["score"].to_numpy(), [s for _, s in want], rtol=1e-6, atol=1e-9)
        checked += int(len(want) > 0 and got["act_match"].gt(0).any())
    assert checked >= 2, "the queries exercise activation on the match"
    assert c.search("zzq-no-match").empty


def test_dense_feature_loses_a_tie(synth_cache: Path) -> None:
    c = load_cache(synth_cache)
    f = c.features.copy()
    dense_f, rare_f = 3, 400  # the dense one has the lower id: an id tie-break would put it first
    f["label"] = "something else"
    f.loc[[dense_f, rare_f], "label"] = "uniquelabelword"
    f.loc[dense_f, "frequency"] = 0.30
    f.loc[rare_f, "frequency"] = float(np.median(f["frequency"]))
    res = rank_features(f, c._lens_text(), c.search_index(), "uniquelabelword")
    assert res["feature"].tolist()[:2] == [rare_f, dense_f]
    assert bool(res.iloc[1]["dense"]) and not bool(res.iloc[0]["dense"])
    assert res.iloc[1]["score"] < res.iloc[0]["score"]
    # without the density penalty, equal scores still go to the rarer feature
    f.loc[dense_f, "frequency"] = f.loc[rare_f, "frequency"] * 1.5
    res = rank_features(f, c._lens_text(), c.search_index(), "uniquelabelword")
    assert res["feature"].tolist()[:2] == [rare_f, dense_f] and res.iloc[0]["score"] == res.iloc[1]["score"]


def test_search_pages_past_50_and_pins_an_id(synth_cache: Path) -> None:
    c = load_cache(synth_cache)
    everything = c.search("a")
    assert len(everything) > 50 and everything["score"].is_monotonic_decreasing
    assert len(c.search("a", limit=50)) == 50
    assert c.search("#17")["feature"].iloc[0] == 17 and c.search("#17")["match"].iloc[0] == "id"


def test_hostile_snippet_stays_inert(xss_cache: Path) -> None:
    payload = '<img src=x onerror="window.__xss=1">'
    toks = ["before", " ", payload, " after"]
    out = snippet_html(toks, "onerror")
    assert "<img" not in out and "&lt;img src=x onerror=&quot;window.__xss=1&quot;&gt;" in out
    assert out.count("<mark>") == 1 and re.sub(r"</?mark>", "", out).count("<") == 0
    c = load_cache(xss_cache)
    res = c.search("onerror")
    snips = [c.snippet(int(r.feature), int(r.ex_rank), int(r.ex_token), "onerror") for r in res.itertuples()]
    snips = [s for s in snips if s]
    assert snips, "the planted payload is found in example text"
    for s in snips:
        assert "onerror" in s.lower() and re.sub(r"</?mark>", "", s).count("<") == 0


def test_map_page_pages_the_results(synth_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("FEATUREGEOM_CACHE", str(synth_cache))
    at = AppTest.from_file(
        str(Path(__file__).resolve().parents[2] / "explorer" / "app.py"), default_timeout=60
    )
    at.switch_page("views/map.py")
    at.run()
    at.text_input(key="map_q").input("a").run()
    found = load_cache(synth_cache).search("a")
    ranked = found.loc[found["score"] > 0, "feature"].tolist()  # score 0: has the text, fires on none of it
    inert = int((found["score"] == 0).sum())
    pick = next(sb for sb in at.selectbox if sb.label.endswith("matching features"))
    assert pick.label == f"{len(ranked):,} matching features" and len(pick.options) == 50
    if inert:
        assert any(f"{inert:,} more features have it" in c.value for c in at.caption)
    assert [int(o.split(" ·")[0].lstrip("#")) for o in pick.options] == ranked[:50]
    assert at.query_params["feature"] in ([str(ranked[0])], str(ranked[0]))  # the strongest match is selected
    at.number_input(key="map_page:a").set_value(2).run()
    pick = next(sb for sb in at.selectbox if sb.label.endswith("matching features"))
    assert not at.exception and [int(o.split(" ·")[0].lstrip("#")) for o in pick.options] == ranked[50:100]
    assert "<mark>" in "".join(str(h.proto.body) for h in at.html)  # snippets with the match marked


def test_featuregeom_explain_explanations_are_searched(tiny_cache: Path, tmp_path: Path) -> None:
    """An `auto_explanation` (written as featuregeom explain writes it: through the cache's staging)
    counts as a lens match (T), like an imported explanation."""
    import shutil

    import pandas as pd

    from precompute import cache as cache_io
    from precompute.pipeline.features import merge_feature_columns

    work = tmp_path / "cache"
    shutil.copytree(tiny_cache, work)
    n = len(pq.read_table(work / "features.parquet"))
    table = pd.DataFrame({"feature": [3], "auto_explanation": ["quokkas in a sentence"]})
    with cache_io.stage(work) as staged:
        merge_feature_columns(staged, n, table)
        staged.commit()
    got = load_cache(work).search("quokka")
    assert got["feature"].tolist() == [3] and got["lens_match"].tolist() == [1.0]
    assert got["feature"].tolist() == [i for i, _ in brute_force(work, "quokka")]
