"""Fine-tune diff: did fine-tuning move the harmful features that the decoder geometry said it would?"""

from __future__ import annotations

import math

import streamlit as st

from explorer import figures as F
from explorer import state
from explorer.data import MEASURES, compare_runs_table

cache = state.require_cache()
md = state.md_escape  # run names and labels come from files: literal in markdown
SETS = {"em": "EM questions", "neutral": "neutral prompts"}
# prompt tokens first: the same tokens for every model, so the intervals are tight (docs/results.md)
POSITIONS = {"prompt": "prompt tokens", "response": "response tokens"}


def ci(v: list[float] | tuple[float, ...] | None, fmt: str = "+.3g") -> str:
    """'+0.012 [+0.003, +0.02]', or 'n/a' when the summary has no finite value."""
    if not v or len(v) != 3 or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in v):
        return "n/a"
    return f"{v[0]:{fmt}} [{v[1]:{fmt}}, {v[2]:{fmt}}]"


st.title("Fine-tune diff")
st.caption(
    "How fine-tuning changed each harmful feature's activation on evaluation prompts, plotted against its "
    "predicted risk: how close its decoder direction is to a task feature's. If the geometry matters, the "
    "harmful features nearest the task should move most after the task fine-tune, and not after the control "
    "fine-tune (same recipe, harmless data)."
)

runs, problems = state.finetune_runs(cache)
for msg in problems:
    st.warning(md(msg), icon="⚠️")
if not runs:
    out = cache.path / "finetune" / "insecure"
    st.caption(
        "No fine-tune diff in this cache yet: the page reads CACHE/finetune/NAME/ directories holding "
        "diff.parquet and summary.json. Produce them all with `python bench/mechanism_lab.py`, or one run "
        "with the commands below."
    )
    st.code("python bench/mechanism_lab.py", language="bash")
    st.code(
        "featuregeom finetune --config configs/finetune-cpu.toml --corpus TASK.jsonl --out runs/task\n"
        "featuregeom finetune --config configs/finetune-cpu.toml --corpus CONTROL.jsonl --out runs/control\n"
        "featuregeom eval-acts --out runs/base/eval\n"
        "featuregeom eval-acts --adapter runs/task --out runs/task/eval\n"
        "featuregeom eval-acts --adapter runs/control --out runs/control/eval\n"
        "featuregeom diff --before runs/base/eval --after runs/task/eval --control runs/control/eval "
        f"--cache {cache.path} --out {out}",
        language="bash",
    )
    st.stop()

# --- controls (each kept in the URL) ----------------------------------------------------------------
by_name = {r.name: r for r in runs}
names = list(by_name)
c1, c2, c3, c4 = st.columns([1.6, 1.2, 1.2, 1.3], vertical_alignment="bottom")
state.seed_widget("ft_run", "run", names, "insecure" if "insecure" in names else names[0])
run = by_name[
    c1.selectbox(
        "Run", names, key="ft_run", help="A directory CACHE/finetune/NAME written by `featuregeom diff`."
    )
]
sets = run.prompt_sets
state.seed_widget("ft_set", "set", sets, sets[0])
prompt_set = c2.radio(
    "Prompts",
    sets,
    key="ft_set",
    horizontal=True,
    format_func=lambda s: SETS.get(s, s),
    help="EM: the emergent-misalignment evaluation questions; neutral: everyday instructions.",
)
positions = run.positions
state.seed_widget("ft_pos", "pos", positions, "prompt" if "prompt" in positions else positions[0])
position = c3.radio(
    "Tokens",
    positions,
    key="ft_pos",
    horizontal=True,
    format_func=lambda p: POSITIONS.get(p, p),
    help="response: the model's own greedy answer; prompt: the question as the model reads it.",
)
state.seed_widget("ft_measure", "measure", list(MEASURES), "mean")
measure = c4.radio(
    "Measure",
    list(MEASURES),
    key="ft_measure",
    horizontal=True,
    format_func=lambda m: F.MEASURE_NAMES[m],
    help="Per prompt: the feature's mean activation over the tokens, or the share of tokens where it fires.",
)
state.set_qp(run=run.name, set=prompt_set, pos=position, measure=measure)

b, a, c = run.labels
cmp = run.comparisons()
after = cmp["after"]
assert after is not None  # load_finetune_run() rejects a run without it
what = F.MEASURE_NAMES[measure]
where = f"{SETS.get(prompt_set, prompt_set)}, {POSITIONS.get(position, position)}"
after_df = run.harmful(prompt_set, position, after)
n_harm = len(after_df)
first = run.stats(prompt_set, position, after)
n_prompts = first.get("n_prompts")
st.caption(
    md(
        f"Run {run.name}: before = {b}, after = {a}"
        + (f", control = {c}" if cmp["control"] else " (no control run)")
        + f" · {n_harm} harmful features · {n_prompts if n_prompts is not None else '?'} prompts in this set"
        + f" · {run.summary.get('n_boot', '?')} bootstrap resamples"
    )
)

# --- metrics row: pooled change of all harmful features, held-out task loss ------------------------
kinds = [(k, cmp[k]) for k in ("after", "control", "direct") if cmp[k]]
losses = [
    (lab, run.heldout_loss(lab))
    for lab in dict.fromkeys((b, a, c) if cmp["control"] else (b, a))
    if lab in (run.summary.get("heldout_loss") or {})
]
cols = st.columns(len(kinds) + len(losses))
for col, (_, name) in zip(cols, kinds, strict=False):
    est = run.stats(prompt_set, position, str(name)).get("harmful_mean_change")
    ok = ci(est) != "n/a"
    col.metric(
        f"mean Δ · {md(name)}",
        f"{est[0]:+.3g}" if ok else "—",
        help="Change of the mean activation averaged over all harmful features (one number per prompt, "
        "then a paired bootstrap over prompts). Always mean activation, whatever the measure above.",
    )
    col.caption(f"95% CI {est[1]:+.3g} to {est[2]:+.3g}" if ok else "no CI in the summary")
# the pre-registered statistic of docs/results.md: the harmful features nearest the task features
tops = [(name, run.stats(prompt_set, position, str(name))) for _, name in kinds]
if any(ci(t.get("top_risk_decile_mean_change")) != "n/a" for _, t in tops):
    for col, (name, t) in zip(st.columns(len(kinds) + len(losses)), tops, strict=False):
        est, size = t.get("top_risk_decile_mean_change"), t.get("top_risk_decile_size")
        ok = ci(est) != "n/a"
        col.metric(
            f"top-risk decile Δ · {md(name)}",
            f"{est[0]:+.3g}" if ok else "—",
            help=f"Change of the mean activation averaged over the {size or 'top tenth of'} harmful features "
            "with the highest predicted risk (paired bootstrap over prompts).",
        )
        col.caption(f"95% CI {est[1]:+.3g} to {est[2]:+.3g}" if ok else "no CI in the summary")
for col, (lab, loss) in zip(cols[len(kinds) :], losses, strict=False):
    col.metric(
        f"held-out loss · {md(lab)}",
        f"{loss:.4f}" if loss is not None else "—",
        help="Task loss (cross-entropy) on held-out task samples: did the fine-tune (or patch) still learn "
        "the task?",
    )

# --- risk vs change ----------------------------------------------------------------------------------
null = after_df["null_cosine"].dropna()
null_cos = float(null.iloc[0]) if len(null) else cache.null_cosine


def legend(name: str) -> str:
    return f"{name}: ρ = {ci(state.run_spearman(run, prompt_set, position, name, measure), '+.2f')}"


tab_vs, tab_direct = st.tabs(["Each run vs before", "Fine-tune vs control"])
with tab_vs:
    series = [(after, legend(after), after_df, F.COMPARISON_COLORS["after"])]
    if cmp["control"]:
        series.append(
            (
                cmp["control"],
                legend(cmp["control"]),
                run.harmful(prompt_set, position, cmp["control"]),
                F.COMPARISON_COLORS["control"],
            )
        )
    st.plotly_chart(
        F.change_scatter(series, measure, null_cos),
        config=state.chart_config(f"finetune-{run.name}"),
        key="ft_scatter",
    )
    st.caption(
        md(
            f"Each dot is one harmful feature. x: its predicted risk, the largest cosine between its decoder "
            f"direction and a task feature's (dashed line: chance level). y: change in {what} on {where}, with "
            f"the 95% CI over prompts (paired bootstrap). Spearman ρ of risk vs change [95% CI]: "
            + "; ".join(
                f"{s[0]} {ci(state.run_spearman(run, prompt_set, position, s[0], measure), '+.2f')}"
                for s in series
            )
            + ". If the overlap with the task explains the fine-tune's effect, ρ is positive for the fine-tune "
            "and near 0 for its control; a positive ρ for both means the geometry predicts what any such "
            "fine-tune moves, not what the task adds."
        )
    )
with tab_direct:
    if cmp["direct"]:
        direct_df = run.harmful(prompt_set, position, cmp["direct"])
        st.plotly_chart(
            F.change_scatter(
                [(cmp["direct"], legend(cmp["direct"]), direct_df, F.COMPARISON_COLORS["direct"])],
                measure,
                null_cos,
            ),
            config=state.chart_config(f"finetune-{run.name}-direct"),
            key="ft_scatter_direct",
        )
        st.caption(
            md(
                f"The same harmful features, {a} minus {c} directly: what the task data did beyond "
                f"fine-tuning as such. Spearman ρ of risk vs change: "
                f"{ci(state.run_spearman(run, prompt_set, position, cmp['direct'], measure), '+.2f')}."
            )
        )
    else:
        st.info(md(f"Run {run.name} has no control, so there is no direct {a} − control comparison."))

# --- plain-language reading and the feature table -----------------------------------------------------
main = cmp["direct"] or after
ref = c if cmp["direct"] else b
col, lo_c, hi_c = MEASURES[measure]
main_df = run.harmful(prompt_set, position, main)
others = {n: run.harmful(prompt_set, position, n) for n in (after, cmp["control"]) if n and n != main}
labels = cache.features["label"].to_numpy(dtype=object)
table = F.finetune_table(main_df, main, others, measure, labels=labels, extra_query=state.extra_query())
st.subheader("Harmful features, largest change first")
if len(table):
    top, low = table.iloc[0], table.iloc[-1]
    chg = f"Δ {main}"
    lines = [
        f"Largest increase: fine-tuning on {a} changed harmful feature #{int(top['feature'])}'s {what} by "
        f"{top[chg]:+.3g} (95% CI {top['CI low']:+.3g} to {top['CI high']:+.3g}) compared with {ref}, on {where}."
    ]
    if low[chg] < 0:
        lines.append(
            f"Largest decrease: #{int(low['feature'])}, {low[chg]:+.3g} "
            f"(95% CI {low['CI low']:+.3g} to {low['CI high']:+.3g})."
        )
    up, down = int((table["CI low"] > 0).sum()), int((table["CI high"] < 0).sum())
    lines.append(
        f"The 95% CI excludes 0 for {up} features (up) and {down} (down) of {len(table)}. With this many "
        f"features about {0.05 * len(table):.0f} would do so by chance alone even if nothing had changed "
        f"(multiple comparisons): a single feature here is a lead to read on its Feature page, not a "
        f"finding; the pooled mean change and ρ above are the tests."
    )
    model = (cache.manifest.get("model") or {}).get("spec") or "the model"
    lines.append(
        f"These are changes in SAE feature activations of {model} on "
        f"{n_prompts if n_prompts is not None else 'the'} evaluation prompts: they show what changed in the "
        f"model's internal features, not how it behaves, and do not by themselves show that the model became "
        f"misaligned."
    )
    st.caption(md(" ".join(lines)))
changes = {
    c: st.column_config.NumberColumn(c, format="%.3g")
    for c in table.columns
    if c.startswith("Δ ") or c in ("CI low", "CI high")
}  # firing-rate changes are ~1e-4
st.dataframe(
    table,
    hide_index=True,
    key=f"ft_table:{run.name}",
    column_config={
        **changes,
        "open": st.column_config.LinkColumn("open", display_text="open ↗", width="small"),
        "feature": st.column_config.NumberColumn("feature", format="#%d", width="small"),
        "nearest task feature": st.column_config.NumberColumn("nearest task feature", format="#%d"),
        "risk (max cos)": st.column_config.NumberColumn("risk (max cos)", format="%.3f"),
    },
)

# --- compare runs that share the baseline -------------------------------------------------------------
same = [r for r in runs if r.labels[0] == b]
if len(same) >= 2:
    st.subheader("Compare runs")
    rows = compare_runs_table(same, prompt_set, position)
    st.plotly_chart(
        F.compare_runs_figure(rows), config=state.chart_config(f"finetune-runs-{b}"), key="ft_compare_runs"
    )
    st.caption(
        md(
            f"Every run in this cache measured against the same before ({b}): the change in mean activation "
            f"pooled over all harmful features on {where}, for the run's fine-tune and for its control, with "
            f"95% CIs; hover for the held-out task loss. A patch that works lowers its bar towards the "
            f"control's without raising the held-out loss much; random-subspace patches are its control."
        )
    )
st.caption(
    md(
        f"Read from {run.path.relative_to(cache.path)} without checksum verification: results added to a "
        f"cache after it was built are not in its manifest."
    )
)
