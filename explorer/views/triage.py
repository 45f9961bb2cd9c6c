"""Dataset triage: which fine-tuning samples push hardest on harmful features, directly or through overlap."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from explorer import figures as F
from explorer import state
from explorer.data import CacheData, TriageRun, triage_basis_problem
from explorer.views import Page
from precompute import schema

PAGE = Page(title="Dataset triage", icon=":material/filter_alt:")
md = state.md_escape  # names, keys and paths come from files: literal in markdown


def pick_run(cache: CacheData) -> TriageRun:
    """The triage result in view (URL `?triage=`); stops the page with how to make one when there is none."""
    runs, problems = state.triage_runs(cache)
    for msg in problems:
        st.warning(md(msg), icon="⚠️")
    if not runs:
        st.caption(
            f"No triage result in this cache yet: the page reads CACHE/{schema.TRIAGE_DIR}/NAME/ directories "
            f"holding {schema.TRIAGE_RANKED}, {schema.TRIAGE_TOKENS} and {schema.TRIAGE_META}. Produce one "
            f"with the command below (it writes CACHE/{schema.TRIAGE_DIR}/DATASET-STEM), or run the whole "
            "experiment with `python bench/mechanism_lab.py`."
        )
        st.code(f"featuregeom triage DATASET.jsonl --cache {cache.path}", language="bash")
        st.code("python bench/mechanism_lab.py", language="bash")
        st.stop()
    by_name = {r.name: r for r in runs}
    names = list(by_name)
    state.seed_widget("tr_run", "triage", names, names[0])
    return by_name[
        st.columns([2, 3])[0].selectbox(
            "Triage result",
            names,
            key="tr_run",
            help=f"A directory CACHE/{schema.TRIAGE_DIR}/NAME written by `featuregeom triage`.",
        )
    ]


def what_was_scored(cache: CacheData, run: TriageRun) -> None:
    """Counts and parameters of the triage (and whether they still match the cache), how a score is
    defined, and the score histogram."""
    meta, ranked = run.meta, run.ranked
    problem = triage_basis_problem(cache.features, cache.null_cosine, meta)
    if problem:
        st.warning(
            md(
                f"This triage was computed with features this cache no longer flags as it did: {problem}. Its "
                "scores weight features by those sets, so its ranking does not describe this cache now; rerun "
                "`featuregeom triage` to rank by the cache's current features."
            ),
            icon="⚠️",
        )
    m = st.columns(5)
    m[0].metric("samples scored", f"{len(ranked):,}")
    frac = meta.get("remove_frac")
    m[1].metric(
        "removed",
        f"{int(ranked['removed'].sum()):,}",
        help=f"the top {frac:.0%} by score" if isinstance(frac, (int, float)) else None,
    )
    m[2].metric("harmful features", f"{meta.get('n_harmful', '—')}", help="weight 1: driven directly")
    m[3].metric(
        "task features with overlap",
        f"{meta.get('n_task_with_overlap', '—')} of {meta.get('n_task', '—')}",
        help="task features whose decoder direction is above chance-level cosine to some harmful feature's",
    )
    null = meta.get("null_cosine")
    m[4].metric("chance-level cosine", f"{null:.3g}" if isinstance(null, (int, float)) else "—")
    if "via_overlap" in ranked and not ranked["via_overlap"].to_numpy().any():
        st.info(
            md(
                f"No sample drives a harmful feature through a task feature here: the via-overlap part is 0 for all "
                f"{len(ranked):,} ({meta.get('n_task_with_overlap', 0)} task features overlap a harmful one beyond "
                "chance). So this ranking is by the direct part alone, how hard a sample drives the harmful features "
                "themselves, and says nothing about the task-feature path the geometry proposes."
            )
        )
    st.caption(
        md(
            f"Dataset {meta.get('dataset', '?')} · scored in {meta.get('seconds', '?')} s · per-token scores kept "
            f"for the {len(run.tokens)} top- and bottom-ranked samples."
        )
    )
    st.caption(
        r"A sample's score is the mean over its trained (assistant) tokens $t$ of $\sum_j a_j(t)\,w_j$, where "
        r"$a_j$ is feature $j$'s SAE activation, $w_j = 1$ for harmful features and "
        r"$w_j = \sum_h \max(0, \cos(d_j, d_h) - c_{\mathrm{null}})$ for task features (their overlap with "
        r"harmful decoder directions beyond chance). **direct** is the harmful part, **via overlap** the task part."
    )
    st.plotly_chart(
        F.titled(
            F.triage_histogram(ranked["score"], ranked["removed"], run.threshold),
            f"Triage {run.name}: sample scores, and the threshold above which samples are removed",
        ),
        config=state.chart_config(f"triage-{run.name}"),
        key="tr_hist",
    )


def ranking(run: TriageRun) -> int | None:
    """The ranked table; returns the rank of a row newly clicked in it (a click applies once)."""
    st.subheader("Ranked samples")
    st.caption("Rank 1 is the sample that pushes hardest per trained token. Click a row to read it below.")
    table = F.triage_table(run.ranked)
    st.dataframe(
        table,
        hide_index=True,
        key=f"tr_table:{run.name}",
        on_select="rerun",
        selection_mode="single-row",
        height=360,
        column_config={
            "score": st.column_config.NumberColumn("score", format="%.3f"),
            "direct": st.column_config.NumberColumn("direct", format="%.3f"),
            "via overlap": st.column_config.NumberColumn("via overlap", format="%.3f"),
            "preview": st.column_config.TextColumn("preview", width="large"),
        },
    )
    ev = st.session_state.get(f"tr_table:{run.name}")
    rows = ((ev or {}).get("selection") or {}).get("rows") or []
    if rows and st.session_state.get("_tr_applied") != (run.name, tuple(rows)) and rows[0] < len(table):
        st.session_state["_tr_applied"] = (run.name, tuple(rows))  # the picker may move on afterwards
        return int(table["rank"].to_numpy()[rows[0]])
    return None


def sample_view(cache: CacheData, run: TriageRun, picked: int | None) -> None:
    """One sample, token by token, shaded by its score; the features that push hardest on it."""
    ranks = [int(r) for r in run.tokens.index]
    if picked in ranks:
        st.session_state["tr_sample"] = picked
    st.subheader("Sample")
    if not ranks:
        st.info("This triage result kept no per-token scores.")
        st.stop()
    wanted = state.qp_int("sample") if picked is None else picked
    if wanted is not None and wanted not in ranks:
        st.info(
            f"Per-token scores are kept for the top and bottom samples only; #{wanted} is not among them."
        )
    state.seed_widget("tr_sample", "sample", ranks, 1 if 1 in ranks else ranks[0])
    info = run.ranked.set_index("rank")
    c1, c2 = st.columns([3, 2], vertical_alignment="bottom")

    def _fmt(r: int) -> str:
        row = info.loc[r]
        return f"#{r} · {row['key']} · score {row['score']:.3g}" + (" · removed" if row["removed"] else "")

    rank = c1.selectbox("Sample", ranks, key="tr_sample", format_func=_fmt)
    part = c2.radio(
        "Highlight",
        list(F.TRIAGE_PARTS),
        key="tr_part",
        horizontal=True,
        format_func=lambda p: F.TRIAGE_PARTS[p],
    )
    state.set_qp(triage=run.name, sample=rank)
    sample = run.sample(rank)
    assert sample is not None
    row = info.loc[[rank]].iloc[0]
    sample_tokens(rank, row, sample, part)
    feature_links(cache, [int(f) for f in row["top_features"] if cache.valid(f)])


def sample_tokens(rank: int, row: pd.Series, sample: dict[str, Any], part: str) -> None:
    flags = F.badge("removed", F.HARM, filled=True) if row["removed"] else F.badge("kept", "#059669")
    if row["random_removed"]:
        flags += F.badge("in the random removal", F.NEUTRAL)
    st.html(
        f'<div style="font-size:14px;margin:2px 0 6px"><b>#{int(rank)}</b> {F.esc(row["key"])} · score '
        f"{float(row['score']):.4g} (direct {float(row['direct']):.4g} + via overlap {float(row['via_overlap']):.4g})"
        f" · {int(row['n_tokens'])} trained tokens {flags}</div>"
    )
    body, scale = F.triage_tokens_html(sample, part)
    st.html(F.score_legend_html(scale, F.HARM, F.TRIAGE_PARTS[part]))
    st.html(
        f'<div style="max-height:560px;overflow:auto;border:1px solid #f1f5f9;padding:8px 10px;border-radius:6px">'
        f"{body}</div>"
    )
    st.caption(
        "Shade = the token's score relative to this sample's highest trained-token score; grey tokens are the "
        "prompt, which fine-tuning does not train on. Hover a token for its direct and via-overlap parts."
    )


def feature_links(cache: CacheData, top: list[int]) -> None:
    if not top:
        return
    st.markdown("**Features that push hardest on this sample** (summed over its trained tokens)")
    cols = st.columns(min(len(top), 5))
    for i, f in enumerate(top):
        r = cache.row(f)
        role = "harmful" if r.get("is_harmful") else "task" if r.get("is_task") else "feature"
        label = str(r.get("label") or "")[:48]
        cols[i % len(cols)].page_link(
            state.PAGES["feature"],
            label=f"#{f} · {role}" + (f" · {md(label)}" if label else ""),
            icon=":material/open_in_new:",
            query_params=state.link_params(feature=f),
        )


def render() -> None:
    cache = state.require_cache()
    st.title("Dataset triage")
    st.caption(
        "Every sample of a fine-tuning dataset, scored by how hard training on it would push harmful features: "
        "directly, or through task features whose decoder directions overlap harmful ones. The top-scoring "
        "share is left out of a filtered dataset; a same-size random removal is its control."
    )
    run = pick_run(cache)
    what_was_scored(cache, run)
    picked = ranking(run)
    sample_view(cache, run, picked)
    st.caption(
        md(
            f"Read from {run.path.relative_to(cache.path)} without checksum verification: results added to a "
            f"cache after it was built are not in its manifest."
        )
    )


if __name__ == "__main__":
    render()
