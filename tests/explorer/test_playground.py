"""The steering playground in the overlaps pair view: it finds the cache's own model and SAE (or says
why not), refuses other weights, and shows both completions of a real model (the tiny random Llama
through the real worker process) with escaped text and the watched features' activations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.synthetic_cache import write_synthetic_cache
from explorer.data import load_cache
from explorer.pair_status import feature_kind
from explorer.playground import PlaygroundError, SteeringWorker, WorkerSpec, worker_spec
from explorer.playground_panel import KIND_WORDS
from precompute.provenance import hash_path, is_descriptive
from tests.explorer.test_apptest import html_text, run_page
from tests.tiny import make_sae, save_sae

HOSTILE = '<img src=x onerror="document.title=1">'


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEATUREGEOM_REVIEWS", str(tmp_path / "reviews"))


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A 400-feature cache whose manifest names the tiny model and a tiny TopK SAE (d 32 -> 400) saved beside it."""
    tiny_sae_dir = save_sae(make_sae(32, 400, k=8, seed=4), tmp_path_factory.mktemp("sae") / "sae-400")
    path = write_synthetic_cache(tmp_path_factory.mktemp("caches") / "model", n_features=400, d=32, seed=3)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["model"].update(spec=str(tiny_model_dir), kind="local", path=str(tiny_model_dir), sha256=None)
    manifest["sae"].update(source=str(tiny_sae_dir), sha256=hash_path(tiny_sae_dir, skip=is_descriptive))
    manifest["hook"] = "blocks.1.hook_resid_post"
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_spec_names_why_the_playground_cannot_run(synth_cache: Path, tmp_path: Path) -> None:
    manifest = json.loads((synth_cache / "manifest.json").read_text())
    assert "not built by running a model" in str(worker_spec(manifest, synth_cache))
    manifest["model"].update(kind="packaged", spec="smollm2")
    manifest["sae"]["source"] = "assets/sae/no-such-sae"
    assert worker_spec(manifest, synth_cache) == (
        "the SAE this cache was built with (assets/sae/no-such-sae) is not on this machine"
    )
    manifest["model"].update(kind="local", path=str(tmp_path / "gone"))
    assert "is not on this machine" in str(worker_spec(manifest, synth_cache))


def test_spec_resolves_relative_sae_against_the_repository(synth_cache: Path) -> None:
    manifest = json.loads((synth_cache / "manifest.json").read_text())
    manifest["model"].update(kind="packaged", spec="smollm2", sha256="abc")
    manifest["sae"].update(
        source="assets/sae/smollm2-135m-instruct-blocks.15.hook_resid_post-topk", sha256="def"
    )
    spec = worker_spec(manifest, synth_cache)
    assert isinstance(spec, WorkerSpec)
    assert Path(spec.sae).is_absolute() and Path(spec.sae).is_dir()
    assert (spec.model, spec.model_sha256, spec.sae_sha256) == ("smollm2", "abc", "def")


def test_worker_refuses_an_sae_other_than_the_caches(model_cache: Path) -> None:
    spec = worker_spec(json.loads((model_cache / "manifest.json").read_text()), model_cache)
    assert isinstance(spec, WorkerSpec)
    other = WorkerSpec(**{**spec.__dict__, "sae_sha256": "0" * 64})
    with pytest.raises(PlaygroundError, match="not the one this cache was built with"):
        SteeringWorker(other)


def test_worker_reports_a_bad_request_and_keeps_serving(model_cache: Path) -> None:
    spec = worker_spec(json.loads((model_cache / "manifest.json").read_text()), model_cache)
    assert isinstance(spec, WorkerSpec)
    worker = SteeringWorker(spec)
    try:
        with pytest.raises(PlaygroundError, match="from 0 to 399"):
            worker.ask({"prompt": "hi", "feature": 400, "strength": 0.5})
        good = worker.ask({"prompt": "hi", "feature": 1, "strength": 0.5, "new_tokens": 4, "watch": [2]})
        assert good["watch"] == [1, 2] and len(good["steered"]["token_ids"]) <= 4
    finally:
        worker.close()
    assert not worker.alive


def test_pair_view_generates_both_completions(model_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    row = load_cache(model_cache).overlaps.iloc[0]
    t, h = int(row["task_feature"]), int(row["harmful_feature"])
    at = run_page("views/overlaps.py", model_cache, monkeypatch, task=str(t), harmful=str(h))
    assert not at.exception
    assert "Steering playground" in [s.value for s in at.subheader]
    key = f"pg:{t}:{h}"
    at.text_area(key=f"{key}:prompt").input(HOSTILE + " bake a cake")
    at.slider(key=f"{key}:strength").set_value(1.0)
    at.number_input(key=f"{key}:tokens").set_value(6)
    next(b for b in at.button if b.label == "Generate").click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    body = html_text(at)
    assert "**Unsteered**" in [m.value for m in at.markdown]
    assert HOSTILE not in body  # the model may echo the prompt: text is escaped, never markup
    table = at.dataframe[-1].value
    cache = load_cache(model_cache)
    assert list(table["feature"]) == [f"#{f} ({KIND_WORDS[feature_kind(cache.row(f))]})" for f in (t, h)]
    assert {"unsteered max", "steered max"} <= set(table.columns)
    caption = next(c.value for c in at.caption if "Steered along" in c.value)
    assert f"#{t}" in caption and "strength 1" in caption
    assert f"#{t}'s own activation rises by construction" in caption  # not offered as evidence


@pytest.mark.browser
@pytest.mark.slow
def test_playground_in_real_chromium(model_cache: Path, tmp_path: Path) -> None:
    """Type a hostile prompt, generate: both completions appear and no markup from the prompt runs."""
    from playwright.sync_api import expect, sync_playwright

    from tests.explorer.helpers import CHROMIUM, launch_chromium, streamlit_server, wait_for_app

    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found: apt-get install chromium (or set FEATUREGEOM_CHROMIUM)")
    row = load_cache(model_cache).overlaps.iloc[0]
    t, h = int(row["task_feature"]), int(row["harmful_feature"])
    with (
        streamlit_server(model_cache, reviews=tmp_path / "r.sqlite", log_dir=tmp_path) as srv,
        sync_playwright() as p,
    ):
        browser = launch_chromium(p)
        page = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
        page.set_default_timeout(60000)
        page.goto(srv.url + f"/overlaps?task={t}&harmful={h}")
        wait_for_app(page)
        page.get_by_role("heading", name="Steering playground").scroll_into_view_if_needed()
        page.get_by_label("Prompt (sent as one user turn").fill(HOSTILE + " and bake a cake")
        page.get_by_role("button", name="Generate").click()
        expect(page.get_by_text("Steered along", exact=False)).to_be_visible(timeout=120000)
        expect(page.get_by_text("Unsteered", exact=True)).to_be_visible()
        assert page.title() != "1"  # the onerror handler never ran
        assert page.locator('img[src="x"]').count() == 0
        browser.close()


def test_generated_text_is_escaped() -> None:
    from explorer.playground_panel import completion_html

    side = {"tokens": ["<img", " src=x onerror=alert(1)>", "&amp;"], "activations": {"3": [0.0, 2.0, 1.0]}}
    out = completion_html(side, 3, scale=2.0, color="#c81e1e")
    assert "<img" not in out and "&lt;img" in out and "&amp;amp;" in out
    assert "(the model ended its turn at once)" in completion_html({"tokens": []}, 3, 1.0, "#c81e1e")


def test_feature_page_offers_the_playground_on_the_feature_and_its_harmful_neighbour(
    model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = load_cache(model_cache)
    nb_harm = cache.features.loc[cache.features["is_harmful"], "feature"]
    f = int(next(x for x in cache.features["feature"] if cache.neighbours_of(int(x))["is_harmful"].any()))
    nb = cache.neighbours_of(f)
    h = int(nb.loc[nb["is_harmful"].astype(bool)].sort_values("cosine", ascending=False)["feature"].iloc[0])
    assert h in set(nb_harm)
    at = run_page("views/feature.py", model_cache, monkeypatch, feature=str(f))
    assert not at.exception
    assert "Steering playground" in [s.value for s in at.subheader]
    steer = at.radio(key=f"pgf:{f}:feature")
    assert list(steer.options) == [f"#{f} ({KIND_WORDS[feature_kind(cache.row(f))]})", f"#{h} (harmful)"]
