"""Fine-tune diff: did fine-tuning move the harmful features that the decoder geometry said it would?"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd
import streamlit as st

from explorer import figures as F
from explorer import state
from explorer.data import MEASURES, CacheData, FinetuneRun, basis_problem, compare_runs_table
from explorer.views import Page
from precompute import schema

PAGE = Page(title="Fine-tune diff", icon=":material/difference:")
md = state.md_escape  # run names and labels come from files: literal in markdown
SETS = {"em": "EM questions", "neutral": "neutral prompts"}
# prompt tokens first: the same tokens for every model, so the intervals are tight (docs/results.md)
POSITIONS = {"prompt": "prompt tokens", "response": "response tokens"}


def ci(v: Any, fmt: str = "+.3g") -> str:
    """'+0.012 [+0.003, +0.02]', or 'n/a' when the summary has no finite value."""
    if not v or len(v) != 3 or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in v):
        return "n/a"
    return f"{v[0]:{fmt}} [{v[1]:{fmt}}, {v[2]:{fmt}}]"


@dataclass(frozen=True)
class View:
    """One run seen through the page's controls: which prompts, tokens and measure."""

    run: FinetuneRun
    prompt_set: str
    position: str
    measure: str

    @property
    def where(self) -> str:
        return f"{SETS.get(self.prompt_set, self.prompt_set)}, {POSITIONS.get(self.position, self.position)}"

    @property
    def what(self) -> str:
        return F.MEASURE_NAMES[self.measure]

    def harmful(self, comparison: str) -> pd.DataFrame:
        return self.run.harmful(self.prompt_set, self.position, comparison)

    def stats(self, comparison: str) -> dict[str, Any]:
        return self.run.stats(self.prompt_set, self.position, comparison)

    def rho(self, comparison: str) -> str:
        """Spearman's rho of risk vs change [95% CI], formatted."""
        return ci(
            state.run_spearman(self.run, self.prompt_set, self.position, comparison, self.measure), "+.2f"
        )


def how_to_make_runs(cache: CacheData) -> None:
    out = cache.path / schema.FINETUNE_DIR / "insecure"
    st.caption(
        f"No fine-tune diff in this cache yet: the page reads CACHE/{schema.FINETUNE_DIR}/NAME/ directories "
        f"holding {schema.FINETUNE_DIFF} and {schema.FINETUNE_SUMMARY}. Produce them all with "
        "`python bench/mechanism_lab.py` (`make lab`), or one diff with the commands below: three training "
        "seeds per arm, so that the intervals cover the seed-to-seed variation."
    )
    st.code("python bench/mechanism_lab.py", language="bash")
    st.code(
        "for s in 0 1 2; do\n"
        "  featuregeom finetune --config configs/finetune-cpu.toml --corpus TASK.jsonl --seed $s --out runs/task-s$s\n"
        "  featuregeom finetune --config configs/finetune-cpu.toml --corpus CONTROL.jsonl --seed $s --out runs/control-s$s\n"
        "  featuregeom eval-acts --adapter runs/task-s$s --out runs/task-s$s/eval\n"
        "  featuregeom eval-acts --adapter runs/control-s$s --out runs/control-s$s/eval\n"
        "done\n"
        "featuregeom eval-acts --out runs/base/eval\n"
        "featuregeom diff --before runs/base/eval --after runs/task-s{0,1,2}/eval --control runs/control-s{0,1,2}/eval "
        f"--cache {cache.path} --out {out}",
        language="bash",
    )


def controls(runs: list[FinetuneRun]) -> View:
    """Run, prompts, tokens and measure, each kept in the URL."""
    by_name = {r.name: r for r in runs}
    names = list(by_name)
    c1, c2, c3, c4 = st.columns([1.6, 1.2, 1.2, 1.3], vertical_alignment="bottom")
    state.seed_widget("ft_run", "run", names, "insecure" if "insecure" in names else names[0])
    run = by_name[
        c1.selectbox(
            "Run",
            names,
            key="ft_run",
            help=f"A directory CACHE/{schema.FINETUNE_DIR}/NAME written by `featuregeom diff`.",
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
    return View(run, str(prompt_set), str(position), str(measure))


def metric_ci(col: Any, label: str, est: Any, help: str) -> None:
    """A metric of an estimate [est, lo, hi] with its CI underneath, or — when there is none."""
    ok = ci(est) != "n/a"
    col.metric(label, f"{est[0]:+.3g}" if ok else "—", help=help)
    col.caption(f"95% CI {est[1]:+.3g} to {est[2]:+.3g}" if ok else "no CI in the summary")


def metrics_row(v: View, kinds: list[str], risk_ok: bool = True) -> None:
    """Pooled change of all harmful features (and of the top-risk decile unless the risk is stale), held-out
    task loss."""
    b, a, c = v.run.labels
    control = v.run.comparisons()["control"]
    losses = [
        (lab, v.run.heldout_loss(lab))
        for lab in dict.fromkeys((b, a, c) if control else (b, a))
        if lab in (v.run.summary.get("heldout_loss") or {})
    ]
    cols = st.columns(len(kinds) + len(losses))
    for col, name in zip(cols, kinds, strict=False):
        metric_ci(
            col,
            f"mean Δ · {md(name)}",
            v.stats(name).get("harmful_mean_change"),
            "Change of the mean activation averaged over the diff's harmful features (one number per prompt, "
            "then a paired bootstrap over prompts). Always mean activation, whatever the measure above.",
        )
    # the pre-registered statistic of docs/results.md: the harmful features nearest the task features
    tops = [(name, v.stats(name)) for name in kinds]
    if risk_ok and any(ci(t.get("top_risk_decile_mean_change")) != "n/a" for _, t in tops):
        for col, (name, t) in zip(st.columns(len(kinds) + len(losses)), tops, strict=False):
            size = t.get("top_risk_decile_size")
            metric_ci(
                col,
                f"top-risk decile Δ · {md(name)}",
                t.get("top_risk_decile_mean_change"),
                f"Change of the mean activation averaged over the {size or 'top tenth of'} harmful features "
                "with the highest predicted risk (paired bootstrap over prompts).",
            )
    for col, (lab, loss) in zip(cols[len(kinds) :], losses, strict=False):
        col.metric(
            f"held-out loss · {md(lab)}",
            f"{loss:.4f}" if loss is not None else "—",
            help="Task loss (cross-entropy) on held-out task samples: did the fine-tune (or patch) still learn "
            "the task?",
        )


def risk_vs_change(v: View, null_cos: float) -> None:
    """Each harmful feature's change against its predicted risk: each run vs before, and run vs control."""
    run = v.run
    _, a, c = run.labels
    cmp = run.comparisons()
    after = cmp["after"]
    assert after is not None  # load_finetune_run() rejects a run without it
    tab_vs, tab_direct = st.tabs(["Each run vs before", "Fine-tune vs control"])
    with tab_vs:
        series = [(after, f"{after}: ρ = {v.rho(after)}", v.harmful(after), F.COMPARISON_COLORS["after"])]
        if cmp["control"]:
            series.append(
                (
                    cmp["control"],
                    f"{cmp['control']}: ρ = {v.rho(cmp['control'])}",
                    v.harmful(cmp["control"]),
                    F.COMPARISON_COLORS["control"],
                )
            )
        st.plotly_chart(
            F.titled(
                F.change_scatter(series, v.measure, null_cos),
                f"Run {run.name}: change in {v.what} on {v.where} against predicted risk",
            ),
            config=state.chart_config(f"finetune-{run.name}"),
            key="ft_scatter",
        )
        st.caption(
            md(
                f"Each dot is one harmful feature. x: its predicted risk, the largest cosine between its decoder "
                f"direction and a task feature's (dashed line: chance level). y: change in {v.what} on "
                f"{v.where}, with the 95% CI over prompts (paired bootstrap). Spearman ρ of risk vs change "
                f"[95% CI]: "
                + "; ".join(f"{s[0]} {v.rho(s[0])}" for s in series)
                + ". If the overlap with the task explains the fine-tune's effect, ρ is positive for the fine-tune "
                "and near 0 for its control; a positive ρ for both means the geometry predicts what any such "
                "fine-tune moves, not what the task adds."
            )
        )
    with tab_direct:
        direct = cmp["direct"]
        if not direct:
            st.info(md(f"Run {run.name} has no control, so there is no direct {a} − control comparison."))
            return
        direct_fig = F.change_scatter(
            [(direct, f"{direct}: ρ = {v.rho(direct)}", v.harmful(direct), F.COMPARISON_COLORS["direct"])],
            v.measure,
            null_cos,
        )
        st.plotly_chart(
            F.titled(direct_fig, f"Run {run.name}: {a} minus {c}, change in {v.what} against predicted risk"),
            config=state.chart_config(f"finetune-{run.name}-direct"),
            key="ft_scatter_direct",
        )
        st.caption(
            md(
                f"The same harmful features, {a} minus {c} directly: what the task data did beyond "
                f"fine-tuning as such. Spearman ρ of risk vs change: {v.rho(direct)}."
            )
        )


def reading(
    cache: CacheData, v: View, table: pd.DataFrame, main: str, ref: str, n_prompts: Any, which: str
) -> str:
    """The largest changes of the feature table in plain language, with the caveats that go with them;
    `which` names the features ('harmful feature', or what they were when the diff ran)."""
    a = v.run.labels[1]
    top, low = table.iloc[0], table.iloc[-1]
    chg = f"Δ {main}"
    lines = [
        f"Largest increase: fine-tuning on {a} changed {which} #{int(top['feature'])}'s {v.what} by "
        f"{top[chg]:+.3g} (95% CI {top['CI low']:+.3g} to {top['CI high']:+.3g}) compared with {ref}, on "
        f"{v.where}."
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
    return " ".join(lines)


def feature_table(cache: CacheData, v: View, n_prompts: Any, risk_ok: bool = True) -> None:
    """The harmful features by change (fine-tune − control when there is a control), read out in words;
    without the predicted-risk columns when the risk is stale."""
    b, _, c = v.run.labels
    cmp = v.run.comparisons()
    after = cmp["after"]
    assert after is not None
    main = cmp["direct"] or after
    ref = c if cmp["direct"] else b
    others = {n: v.harmful(n) for n in (after, cmp["control"]) if n and n != main}
    labels = cache.features["label"].to_numpy(dtype=object).tolist()
    table = F.finetune_table(
        v.harmful(main), main, others, v.measure, labels=labels, extra_query=state.extra_query()
    )
    if not risk_ok:
        table = table.drop(columns=["risk (max cos)", "nearest task feature"])
    st.subheader(
        "Harmful features, largest change first" if risk_ok else "The diff's features, largest change first"
    )
    which = "harmful feature" if risk_ok else "feature"
    if len(table):
        st.caption(md(reading(cache, v, table, main, ref, n_prompts, which)))
    changes = {
        c: st.column_config.NumberColumn(c, format="%.3g")
        for c in table.columns
        if c.startswith("Δ ") or c in ("CI low", "CI high")
    }  # firing-rate changes are ~1e-4
    st.dataframe(
        table,
        hide_index=True,
        key=f"ft_table:{v.run.name}",
        column_config={
            **changes,
            "open": st.column_config.LinkColumn("open", display_text="open ↗", width="small"),
            "feature": st.column_config.NumberColumn("feature", format="#%d", width="small"),
            "nearest task feature": st.column_config.NumberColumn("nearest task feature", format="#%d"),
            "risk (max cos)": st.column_config.NumberColumn("risk (max cos)", format="%.3f"),
        },
    )


def _seeds(covered: Any) -> str:
    # None: a statistic without an estimate (nothing matched), so no seeds for its interval to cover
    covered = {k: ok for k, ok in covered.items() if ok is not None} if isinstance(covered, dict) else {}
    if not covered:
        return "—"
    return "yes" if all(covered.values()) else "no: " + ", ".join(k for k, ok in covered.items() if not ok)


def controls_table(v: View) -> None:
    """The diff's controls (summary.json of `featuregeom diff` with seeds): rho against its null band, harmful
    minus closeness-matched non-harmful features, and whether the intervals cover the single seeds."""
    rows = []
    for name in [n for n in v.run.comparisons().values() if n]:
        s = v.stats(name)
        null = s.get("rho_null")
        if not isinstance(null, dict):
            continue
        rows.append(
            {
                "comparison": name,
                "ρ(risk, Δ)": ci(s.get("spearman_risk_max_cos"), "+.3f"),
                "null band (reference sets)": ci([null.get("mean"), null.get("lo"), null.get("hi")], "+.3f"),
                "p (null ≥ ρ)": f"{null.get('p_greater', float('nan')):.3f}",
                "ρ − null": ci(null.get("excess"), "+.3f"),
                "harmful − matched": ci(s.get("harmful_minus_matched")),
                "… top-risk decile": ci(s.get("harmful_minus_matched_top_decile")),
                "CIs cover each seed": _seeds(s.get("covers_seeds")),
            }
        )
    if not rows:
        return
    st.subheader("Against its controls")
    st.dataframe(pd.DataFrame(rows), hide_index=True, key=f"ft_controls:{v.run.name}")
    n = v.run.summary.get("n_seeds") or {}
    st.caption(
        md(
            f"On {v.where}, mean activation; {n.get('after', '?')} task and {n.get('control', '?')} control "
            "training seeds. Intervals: hierarchical bootstrap over seeds and prompts clustered by base question. "
            "Null band: ρ when the risk is the closeness to random non-harmful feature sets of the task set's "
            "size and firing frequencies instead of the task set. Harmful − matched: the change of harmful "
            "features minus that of non-harmful features at the same closeness to the task set and firing "
            "frequency (for task − control: the difference in differences)."
        )
    )


def behaviour_table(run: FinetuneRun) -> None:
    """The judge-free log-prob readout: misaligned − aligned per-token log-prob, per model and comparison."""
    beh = run.summary.get("behaviour")
    if not (isinstance(beh, dict) and beh.get("available")):
        return
    rows = [
        {"model or comparison": k, **{m: ci(e.get(m)) for m in ("margin", "lp_misaligned", "lp_aligned")}}
        for part in ("levels", "comparisons")
        for k, e in (beh.get(part) or {}).items()
        if isinstance(e, dict)
    ]
    st.subheader("Behaviour: fixed misaligned vs aligned answers")
    st.dataframe(pd.DataFrame(rows), hide_index=True, key=f"ft_behaviour:{run.name}")
    st.caption(
        md(
            f"Teacher-forced mean per-token log-probability of fixed misaligned and aligned answers to the "
            f"{beh.get('n_prompts', '?')} EM question variants ({beh.get('n_base_questions', '?')} base "
            "questions); margin = misaligned − aligned (> 0: the misaligned answer is the likelier). No judge, "
            "no sampling; intervals as above."
        )
    )


def compare_runs(runs: list[FinetuneRun], v: View) -> None:
    """Every run that shares this run's `before`: pooled harmful change of its fine-tune and control."""
    b = v.run.labels[0]
    same = [r for r in runs if r.labels[0] == b]
    if len(same) < 2:
        return
    st.subheader("Compare runs")
    rows = compare_runs_table(same, v.prompt_set, v.position)
    st.plotly_chart(
        F.titled(
            F.compare_runs_figure(rows), f"Runs measured against {b}: pooled change of the harmful features"
        ),
        config=state.chart_config(f"finetune-runs-{b}"),
        key="ft_compare_runs",
    )
    st.caption(
        md(
            f"Every run in this cache measured against the same before ({b}): the change in mean activation "
            f"pooled over all harmful features on {v.where}, for the run's fine-tune and for its control, with "
            f"95% CIs; hover for the held-out task loss. A patch that works lowers its bar towards the "
            f"control's without raising the held-out loss much; random control patches (as many random SAE "
            f"directions) are its control."
        )
    )


def render() -> None:
    cache = state.require_cache()
    st.title("Fine-tune diff")
    st.caption(
        "How fine-tuning changed each harmful feature's activation on evaluation prompts, plotted against its "
        "predicted risk: how close its decoder direction is to a task feature's. If the geometry matters, the "
        "harmful features nearest the task should move most after the task fine-tune, and not after the "
        "control fine-tune (same recipe, harmless data)."
    )
    runs, problems = state.finetune_runs(cache)
    for msg in problems:
        st.warning(md(msg), icon="⚠️")
    if not runs:
        how_to_make_runs(cache)
        st.stop()

    v = controls(runs)
    run = v.run
    b, a, c = run.labels
    cmp = run.comparisons()
    after = cmp["after"]
    assert after is not None  # load_finetune_run() rejects a run without it
    after_df = v.harmful(after)
    n_prompts = v.stats(after).get("n_prompts")
    st.caption(
        md(
            f"Run {run.name}: before = {b}, after = {a}"
            + (f", control = {c}" if cmp["control"] else " (no control run)")
            + f" · {len(after_df)} harmful features · {n_prompts if n_prompts is not None else '?'} prompts in "
            f"this set · {run.summary.get('n_boot', '?')} bootstrap resamples"
        )
    )
    task_set = run.summary.get("task_set")
    if run.summary.get("exploratory"):
        spec = task_set.get("spec") if isinstance(task_set, dict) else "?"
        st.warning(
            md(
                f"Exploratory: run {run.name} used the task set {spec}, the most task-leaning features by "
                "task_score chosen by rank, not features that pass the task test (is_task). Its numbers show "
                "the machinery at work, not evidence about task features."
            ),
            icon="⚠️",
        )
    problem = basis_problem(cache.features, run.diff, task_set)
    if problem:
        st.warning(
            md(
                f"Run {run.name} was computed with features this cache no longer flags: {problem}. Its predicted "
                "risk (closeness to task features) does not describe this cache, so the risk-vs-change charts, "
                f"Spearman ρ and the top-risk decile are withheld. The changes below are measurements of the "
                f"{after_df['feature'].nunique()} features that were harmful when the diff ran."
            ),
            icon="⚠️",
        )
    metrics_row(v, [name for k in ("after", "control", "direct") if (name := cmp[k])], risk_ok=not problem)
    if not problem:
        null = after_df["null_cosine"].dropna()
        risk_vs_change(v, float(null.iloc[0]) if len(null) else cache.null_cosine)
    if not problem:
        controls_table(v)
    behaviour_table(v.run)
    feature_table(cache, v, n_prompts, risk_ok=not problem)
    compare_runs(runs, v)
    st.caption(
        md(
            f"Read from {run.path.relative_to(cache.path)} without checksum verification: results added to a "
            f"cache after it was built are not in its manifest."
        )
    )


if __name__ == "__main__":
    render()
