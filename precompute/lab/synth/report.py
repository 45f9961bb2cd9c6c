"""What a planted-ground-truth run leaves behind: the report JSON, the recovered-vs-planted plot, the
true dictionary, the SAE (SAELens format), and a summary in words."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from precompute.lab.synth.config import DICTIONARY_FILE, PLOT_FILE, REPORT_FILE, SAE_DIR
from precompute.lab.synth.jsonable import jsonable

if TYPE_CHECKING:
    from precompute.lab.synth.run import SynthRun


def plot_recovered(report: dict[str, Any], path: Path) -> list[Path]:
    """Recovered vs planted cosine (one point per task x rho), partners/decoys at 0, the null line.

    Writes HTML (plotly, self-contained); also a PNG when plotly's image export (kaleido) is there.
    """
    import plotly.graph_objects as go

    geo = report["geometry"]
    xs, ys, text = [], [], []
    rng = np.random.default_rng(0)
    for e in geo["tasks"]:
        for r in e.get("recovered", []):
            if r["cosine"] is None:
                continue
            xs.append(r["rho"] + rng.uniform(-0.012, 0.012))
            ys.append(r["cosine"])
            text.append(f"task {e['task']} / planted {r['planted']}: rank {r['rank']}")
    fp_x, fp_y, fp_text = [], [], []
    for e in geo["tasks"]:
        for n in e.get("neighbours", []):
            if n["role"] in ("partner", "decoy"):
                fp_x.append(rng.uniform(-0.03, 0.03))
                fp_y.append(n["cosine"])
                fp_text.append(f"task {e['task']} / {n['role']} {n['true']}")
    null = geo["null_cosine"]
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=[-0.05, 1.0],
            y=[-0.05, 1.0],
            mode="lines",
            name="recovered = planted",
            line={"dash": "dot", "color": "grey"},
        )
    )
    fig.add_trace(
        go.Scatter(
            x=xs,
            y=ys,
            mode="markers",
            name="planted harmful neighbour",
            text=text,
            marker={"size": 8, "color": "#d62728"},
        )
    )
    fig.add_trace(
        go.Scatter(
            x=fp_x,
            y=fp_y,
            mode="markers",
            name="partner / decoy in the kNN list (planted 0 or random)",
            text=fp_text,
            marker={"size": 6, "color": "#1f77b4", "opacity": 0.6},
        )
    )
    fig.add_hline(
        y=null,
        line={"color": "black", "dash": "dash"},
        annotation_text=f"null at fpr={geo['fpr']:g}: {null:.3f}",
        annotation_position="bottom right",
    )
    rc = report["recovery"]
    fig.update_layout(
        title=f"Planted ground truth: recovered vs planted decoder cosine (d={report['dictionary']['d']}, "
        f"{report['dictionary']['n_features']} true features, d_sae={report['config']['d_sae']}, "
        f"MCC {rc['mcc']:.3f})",
        xaxis_title="planted cosine rho",
        yaxis_title="learned decoder cosine to the task feature",
        template="plotly_white",
        width=900,
        height=600,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)
    written = [path]
    try:  # pragma: no cover - kaleido is optional and absent from the project's environment
        png = path.with_suffix(".png")
        fig.write_image(str(png))
        written.append(png)
    except Exception:
        pass
    return written


def write_outputs(run_: SynthRun, out: str | Path) -> dict[str, str]:
    """Report JSON, plot, true dictionary (npz) and the SAE in SAELens format under ``out``."""
    from precompute.sae.formats.saelens import save_saelens

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    plots = plot_recovered(run_.report, out / PLOT_FILE)
    files["plot"] = str(plots[0])
    if len(plots) > 1:
        files["plot_png"] = str(plots[1])
    roles = run_.dictionary.roles
    np.savez(
        out / DICTIONARY_FILE,
        directions=run_.dictionary.directions,
        feature=roles["feature"].to_numpy(),
        role=roles["role"].to_numpy().astype(str),
        task=roles["task"].to_numpy(),
        target_cosine=roles["target_cosine"].to_numpy(),
        assignment=run_.match.assignment,
        matched_cos=run_.match.matched_cos,
    )
    files["dictionary"] = str(out / DICTIONARY_FILE)
    sae = run_.sae
    sae.metadata = {k: v for k, v in sae.metadata.items() if k != "sparsity"}
    sae.metadata["synth_config"] = jsonable(run_.config.to_dict())
    save_saelens(sae, out / SAE_DIR)
    files["sae"] = str(out / SAE_DIR)
    report = dict(run_.report)
    report["files"] = files
    (out / REPORT_FILE).write_text(json.dumps(jsonable(report), indent=1))
    files["report"] = str(out / REPORT_FILE)
    return files


def summary_lines(report: dict[str, Any]) -> list[str]:
    """Human-readable summary of a run's report."""
    rc, geo, co = report["recovery"], report["geometry"], report["geometry"]["coactivation"]
    fp = geo["false_positives"]
    cfg = report["config"]
    lines = [
        f"dictionary: d={cfg['d']}, {report['dictionary']['n_features']} true features "
        f"{report['dictionary']['counts']}, true L0 {report['data']['true_l0']:.2f}; SAE d_sae={cfg['d_sae']}, "
        f"k={cfg['k']}, {cfg['steps']} steps, FVU {report['training']['fvu']:.4f}",
        f"recovery: MCC {rc['mcc']:.4f}, MMCS {rc['mmcs']:.4f}, min matched |cos| {rc['min_matched_cos']:.3f}, "
        f"{rc['true_features_below_0.9']} true features below 0.9",
        f"order: planted neighbours in rho order for {geo['order_accuracy']:.0%} of task features "
        f"(pairwise {geo['pairwise_order_accuracy']:.1%}); null cosine {geo['null_cosine']:.3f} at fpr {geo['fpr']:g}",
    ]
    for r in geo["recovered_by_rho"]:
        lines.append(
            f"  rho {r['rho']:.2f}: recovered {r['mean_cosine']:.3f} +- {r['std_cosine']:.3f}, "
            f"above null {r['above_null_fraction']:.0%}, merged with the task latent "
            f"{r['merged_with_task']}/{r['n']}"
        )
    lines.append(
        f"false positives: {fp['flagged']}/{fp['pairs']} partner/decoy pairs above the null "
        f"(expected {fp['expected_flagged']:.3f}); task features with a false flag "
        f"{fp['tasks_with_false_flag']} ({fp['task_rate']:.1%} vs fpr {fp['fpr']:g})"
    )
    p, q = co["partner"], co["planted"]
    if "latent_jaccard_mean" in p and "latent_jaccard_mean" in q:
        lines.append(
            f"co-activation (Jaccard, true / SAE feature-level / matched latent): partners "
            f"{p['true_jaccard_mean']:.3f} / {p['feature_jaccard_mean']:.3f} / {p['latent_jaccard_mean']:.3f} "
            f"(min {p['feature_jaccard_min']:.3f} feature-level) at learned cosine {p['mean_learned_cosine']:.3f}; "
            f"planted {q['true_jaccard_mean']:.3f} / {q['feature_jaccard_mean']:.3f} / {q['latent_jaccard_mean']:.3f} "
            f"(max {q['feature_jaccard_max']:.3f}) at cosine {q['mean_learned_cosine']:.3f}; separation AUROC "
            f"feature-level {co.get('feature_separation_auroc')}, matched latents {co.get('latent_separation_auroc')}"
        )
    lines.append(
        f"unmatched latents above the null in task lists: {geo['flagged_unmatched_latents']} "
        f"(composites of a task and its partner: {geo['flagged_composites']}; task features with a live "
        f"composite latent: {geo['tasks_with_composite']}/{len(geo['tasks'])})"
    )
    lines.append(f"bars: {report['bars']}")
    lines.append(f"time: {report['timings_s']['total']:.1f} s (train {report['timings_s']['train']:.1f} s)")
    return lines
