"""The feature page's evidence by group through AppTest: examples filtered to one group or harm category
(the per-group top first), a plain statement when a feature never fires on a group, the histogram split
by group with each group's share of the firings, logit-lens values, an example's whole document (escaped,
its context marked), and caches written before any of these."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from explorer.data import evidence as E
from explorer.data import load_cache
from precompute.provenance import sha256_of
from tests.explorer.test_apptest import html_text, run_page

XSS = '<img src=x onerror="window.__xss=1">'


def _restamp(cache: Path, *names: str) -> None:
    """Record the new sha256 of files a test rewrote, as a rebuild would."""
    m = json.loads((cache / "manifest.json").read_text())
    for name in names:
        m["files"][name] = sha256_of(cache / name)
    (cache / "manifest.json").write_text(json.dumps(m))


def _shown_docs(html: str) -> list[int]:
    return [int(d) for d in re.findall(r"· doc (\d+)</span>", html)]


def test_harmful_documents_only_shows_the_group_top_first(synth_cache: Path, monkeypatch) -> None:
    c = load_cache(synth_cache)
    _, h = c.default_pair()
    ex = c.examples_of(h)
    harmful = [e for e in ex if e["group"] == "harmful" and e["kind"] != "group_quantile"]
    group_top = sorted((e for e in harmful if e["kind"] == "group_top"), key=lambda e: e["rank"])
    assert len(group_top) >= 3
    # brute force: every stored example on harmful documents, one per context, strongest first
    by_ctx: dict[int, dict] = {}
    for e in harmful:
        if e["context_id"] not in by_ctx or e["kind"] == "group_top":
            by_ctx[e["context_id"]] = e
    expect = sorted(by_ctx.values(), key=lambda e: (-e["max_activation"], e["context_id"]))
    got = E.group_examples(ex, "harmful")
    assert [e["context_id"] for e in got.examples] == [e["context_id"] for e in expect]
    assert got.exact and got.examples[: len(group_top)] == group_top  # the group's own top leads

    at = run_page("views/feature.py", synth_cache, monkeypatch, feature=str(h))
    assert not at.exception and at.selectbox(key="feat_group").value == "all"
    at.selectbox(key="feat_group").set_value("harmful").run()
    assert not at.exception and at.query_params["group"] in (["harmful"], "harmful")
    body = html_text(at)
    assert _shown_docs(body)[: len(expect[:8])] == [e["doc_id"] for e in expect[:8]]
    assert "#1 on harmful" in body and 'data-doc-link="' in body
    assert (
        "top 5 contexts within harmful documents" in " ".join(x.value for x in at.caption)
        or len(group_top) < 5
    )
    # then the group's quantile bands, strongest interval first, as stored
    bands = sorted(
        (e for e in ex if e["kind"] == "group_quantile" and e["group"] == "harmful"),
        key=lambda e: (-e["quantile"], e["rank"]),
    )
    assert bands and "Weaker activations on harmful documents" in " ".join(m.value for m in at.markdown)
    assert _shown_docs(body)[len(expect[:8]) :] == [e["doc_id"] for e in bands[:8]]

    # one harm category: its own top first (category_top), then the other stored examples on it, one per
    # context (the most specific row of a context wins), or a plain statement that none is stored
    cat = next(e["category"] for e in expect)
    at.selectbox(key="feat_category").set_value(cat).run()
    assert not at.exception
    priority = {"category_top": 2, "group_top": 1}
    in_cat: dict[int, dict] = {}
    for e in harmful:
        old = in_cat.get(e["context_id"])
        if e["category"] == cat and (
            old is None or priority.get(e["kind"], 0) > priority.get(old["kind"], 0)
        ):
            in_cat[e["context_id"]] = e
    expect_cat = sorted(in_cat.values(), key=lambda e: (-e["max_activation"], e["context_id"]))
    assert expect_cat[0]["kind"] == "category_top"
    shown = [e["doc_id"] for e in expect_cat][:8] + [e["doc_id"] for e in bands if e["category"] == cat][:8]
    assert _shown_docs(html_text(at)) == shown
    assert "ranked on those documents' tokens only" in " ".join(x.value for x in at.caption)
    other = next(k for k in E.harm_categories(c, h, ex) if all(e["category"] != k for e in harmful))
    at.selectbox(key="feat_category").set_value(other).run()
    msgs = " ".join(i.value for i in at.info)
    assert (
        f"None of #{h}'s stored examples comes from harmful · {other} documents" in msgs
        or "never fires" in msgs
    )


def test_a_cache_without_category_tops_says_its_category_view_is_not_one(
    cache_copy: Path, monkeypatch
) -> None:
    """Harvested before category tops: the category view lists what the group's top, the global top and
    the quantile samples hold, and does not pose as the category's own top."""
    table = pd.read_parquet(cache_copy / "examples.parquet")
    table[table["kind"] != "category_top"].to_parquet(cache_copy / "examples.parquet", index=False)
    _restamp(cache_copy, "examples.parquet")
    c = load_cache(cache_copy)
    _, h = c.default_pair()
    cat = next(e["category"] for e in c.examples_of(h) if e["group"] == "harmful" and e["category"])
    at = run_page("views/feature.py", cache_copy, monkeypatch, feature=str(h), group="harmful", category=cat)
    assert not at.exception
    captions = " ".join(x.value for x in at.caption)
    assert "not per category" in captions and "ranked on those documents' tokens only" not in captions


def test_a_group_the_feature_never_fires_on_is_said_plainly(cache_copy: Path, monkeypatch) -> None:
    c = load_cache(cache_copy)
    _, h = c.default_pair()
    feats = pd.read_parquet(cache_copy / "features.parquet")
    feats.loc[h, "freq_harmful"] = 0.0
    feats.to_parquet(cache_copy / "features.parquet", index=False)
    _restamp(cache_copy, "features.parquet")
    at = run_page("views/feature.py", cache_copy, monkeypatch, feature=str(h), group="harmful")
    assert not at.exception
    assert any(f"#{h} never fires on the harmful documents of this cache" in i.value for i in at.info)
    assert "#1 on harmful" not in html_text(at)  # no example is shown as if it did


def test_histogram_by_group_and_logit_values(synth_cache: Path, monkeypatch) -> None:
    c = load_cache(synth_cache)
    t, _ = c.default_pair()
    with np.load(synth_cache / "histograms.npz") as z:
        counts, groups = z["counts_group"][t], z["groups"].tolist()
    at = run_page("views/feature.py", synth_cache, monkeypatch, feature=str(t))
    assert not at.exception
    share = next(d.value for d in at.dataframe if "share of firings" in d.value.columns).set_index("group")
    for i, g in enumerate(groups):
        assert share.loc[g, "share of firings"] == round(counts[i].sum() / counts.sum() * 100, 2)
        assert share.loc[g, "firing tokens"] == counts[i].sum()
        assert share.loc[g, "fires on (% of its tokens)"] == round(c.features.loc[t, f"freq_{g}"] * 100, 3)
    hist = next(ch for ch in at.get("plotly_chart") if "by text group" in ch.proto.spec)
    assert hist is not None
    body = html_text(at)
    values = c.lists.column("top_promoted_values")[t].as_py()
    assert (
        f"{values[0]:+.2f}" in body
        and f"{c.lists.column('top_suppressed_values')[t].as_py()[0]:+.2f}" in body
    )


def test_whole_document_is_escaped_with_the_context_marked(xss_cache: Path, monkeypatch) -> None:
    c = load_cache(xss_cache)
    docs = c.documents
    doc_id = int(docs.index[docs["text"].str.contains("onerror", regex=False).fillna(False)][0])
    at = run_page("views/feature.py", xss_cache, monkeypatch, feature="0", doc=str(doc_id))
    body = html_text(at)
    assert not at.exception and f'data-document="{doc_id}"' in body
    assert "&lt;img src=x onerror=" in body and "<img" not in body and "<script" not in body
    assert "The end of document" in body  # the whole text, not the 300-character preview
    next(b for b in at.button if b.label == "Close the document").click().run()
    assert not at.exception and "data-document=" not in html_text(at) and "doc" not in at.query_params


def test_the_example_window_is_marked_where_its_text_occurs() -> None:
    text = "user: how do I pick a lock quickly?\n\nassistant: I can't help."
    tokens = ["<|im_start|>", "user", "\n", "how", " do", " I", " pick", " a", " lock", " quickly", "?"]
    a, b = E.locate(text, tokens, peak=8)  # type: ignore[misc]
    assert text[a:b] == "how do I pick a lock quickly?"  # the longest verbatim stretch around the peak
    assert E.locate(text, ["<|im_end|>", "zzz"], peak=1) is None
    assert E.locate("", tokens, 3) is None


def test_example_links_open_their_document_and_long_documents_say_they_are_cut(
    synth_cache: Path, monkeypatch
) -> None:
    c = load_cache(synth_cache)
    t, _ = c.default_pair()
    e = next(x for x in c.examples_of(t) if x["kind"] == "top")
    at = run_page("views/feature.py", synth_cache, monkeypatch, feature=str(t))
    body = html_text(at)
    assert f"doc={e['doc_id']}&amp;ctx={e['context_id']}" in body
    n = int(c.documents.loc[e["doc_id"], "n_tokens"])
    if n > len(e["tokens"]):
        assert f"context of {len(e['tokens'])} of the document's {n:,} tokens" in body
    at = run_page(
        "views/feature.py",
        synth_cache,
        monkeypatch,
        feature=str(t),
        doc=str(e["doc_id"]),
        ctx=str(e["context_id"]),
    )
    assert not at.exception and f'data-document="{e["doc_id"]}"' in html_text(at)
    caps = " ".join(x.value for x in at.caption)
    assert "could not be placed" in caps or "marked stretch" in caps


@pytest.mark.parametrize("missing", ["examples", "histograms", "values", "text"])
def test_a_cache_written_before_the_evidence_says_what_it_lacks(
    cache_copy: Path, monkeypatch, missing: str
) -> None:
    c = load_cache(cache_copy)
    _, h = c.default_pair()
    if missing == "examples":
        tbl = pq.read_table(cache_copy / "examples.parquet")
        keep = np.asarray(tbl.column("kind").to_pylist()) != "group_top"
        pq.write_table(tbl.filter(keep), cache_copy / "examples.parquet", row_group_size=4096)
        name, params, expect = "examples.parquet", {"group": "harmful"}, "harvested before per-group examples"
    elif missing == "histograms":
        with np.load(cache_copy / "histograms.npz") as z:
            arrays = {k: z[k] for k in ("counts", "bins", "max_activation")}
        np.savez(cache_copy / "histograms.npz", **arrays)
        name, params, expect = "histograms.npz", {}, "harvested before per-group histograms"
    elif missing == "values":
        feats = pd.read_parquet(cache_copy / "features.parquet")
        feats.drop(columns=["top_promoted_values", "top_suppressed_values"]).to_parquet(
            cache_copy / "features.parquet", index=False
        )
        name, params, expect = "features.parquet", {}, "scored before they were stored"
    else:
        docs = pd.read_parquet(cache_copy / "documents.parquet")
        doc = int(c.examples_of(h)[0]["doc_id"])
        docs.drop(columns=["text"]).to_parquet(cache_copy / "documents.parquet", index=False)
        name, params, expect = (
            "documents.parquet",
            {"doc": str(doc)},
            "harvested before it kept whole documents",
        )
    _restamp(cache_copy, name)
    at = run_page("views/feature.py", cache_copy, monkeypatch, feature=str(h), **params)
    assert not at.exception and not at.error
    text = " ".join(x.value for x in at.caption) + html_text(at)
    assert expect in text


def test_side_by_side_filters_both_features_to_the_same_group(synth_cache: Path, monkeypatch) -> None:
    c = load_cache(synth_cache)
    t, h = c.default_pair()
    at = run_page(
        "views/feature.py", synth_cache, monkeypatch, feature=str(t), compare=str(h), group="harmful"
    )
    assert not at.exception and at.selectbox(key="feat_group").value == "harmful"
    shown = _shown_docs(html_text(at))
    expect = []
    for f in (t, h):
        rows = E.group_examples(c.examples_of(f), "harmful").examples
        bands = E.group_quantiles(c.examples_of(f), "harmful")  # each side: its top there, then its bands
        if c.features.loc[f, "freq_harmful"] > 0:
            expect += [e["doc_id"] for e in rows[:8]] + [e["doc_id"] for e in bands[:8]]
    assert shown == expect and shown


def test_the_all_view_names_each_groups_strongest_activation(synth_cache: Path, monkeypatch) -> None:
    c = load_cache(synth_cache)
    _, h = c.default_pair()
    best: dict[str, float] = {}
    for e in c.examples_of(h):
        if e["kind"] == "group_top":
            best[e["group"]] = max(best.get(e["group"], 0.0), e["max_activation"])
    at = run_page("views/feature.py", synth_cache, monkeypatch, feature=str(h))
    cap = next(x.value for x in at.caption if x.value.startswith("Strongest activation on each group"))
    for g in c.groups:
        assert (f"{g} {best[g]:.1f}" if g in best else f"{g}: ") in cap
    order = [g for g, _ in sorted(best.items(), key=lambda kv: -kv[1])]
    assert [cap.index(f"{g} {best[g]:.1f}") for g in order] == sorted(
        cap.index(f"{g} {best[g]:.1f}") for g in order
    )


def test_a_category_filter_leads_with_the_category_top_and_says_it_is_exact() -> None:
    """With a category picked, a context's category_top row (peak on that category's tokens) wins over its
    group_top and top rows; without one, the group_top row wins; the counts kept per subset are read off."""
    rows = [
        {
            "kind": "top",
            "rank": 0,
            "group": "harmful",
            "category": "fraud",
            "context_id": 1,
            "max_activation": 9.0,
        },
        {
            "kind": "group_top",
            "rank": 0,
            "group": "harmful",
            "category": "fraud",
            "context_id": 1,
            "max_activation": 8.0,
        },
        {
            "kind": "category_top",
            "rank": 0,
            "group": "harmful",
            "category": "fraud",
            "context_id": 1,
            "max_activation": 7.0,
        },
        {
            "kind": "category_top",
            "rank": 1,
            "group": "harmful",
            "category": "fraud",
            "context_id": 2,
            "max_activation": 3.0,
        },
        {
            "kind": "category_top",
            "rank": 0,
            "group": "harmful",
            "category": "hate",
            "context_id": 3,
            "max_activation": 5.0,
        },
    ]
    fraud = E.group_examples(rows, "harmful", "fraud")
    assert [(e["kind"], e["context_id"]) for e in fraud.examples] == [
        ("category_top", 1),
        ("category_top", 2),
    ]
    assert fraud.exact and fraud.exact_category and fraud.per_category == 2 and fraud.per_group == 1
    whole = E.group_examples(rows, "harmful")
    assert [(e["kind"], e["context_id"]) for e in whole.examples] == [
        ("group_top", 1),
        ("category_top", 3),
        ("category_top", 2),
    ]
    old = E.group_examples([r for r in rows if r["kind"] != "category_top"], "harmful", "fraud")
    assert old.exact and not old.exact_category and old.per_category == 0
