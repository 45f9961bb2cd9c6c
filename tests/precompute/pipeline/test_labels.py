"""The labels step: every firing feature's label equals a brute-force recomputation from examples.parquet
on a real tiny cache; imported labels survive a rescore + relabel; dead features get none; reruns are
idempotent."""

from __future__ import annotations

import json
import shutil
import unicodedata
from pathlib import Path

import pandas as pd

from precompute.cache import verify_cache
from precompute.pipeline.config import RunConfig
from precompute.pipeline.labels import feature_labels, peak_label
from precompute.pipeline.run import run_step
from precompute.schema import check_files
from tests.precompute.pipeline.test_run import built_cache  # noqa: F401 - the module's real tiny cache


def strs(values) -> list[str | None]:
    """A column's values with every missing value as None (pandas may read them back as NaN)."""
    return [v if isinstance(v, str) else None for v in values]


def brute_label(peaks: list[str], promoted: list[str] | None) -> str | None:
    """The documented rule, written out plainly: count stripped, case-folded peak tokens with a letter or
    digit (all peaks when none has one), show the top one and up to two more seen at least twice."""
    if not peaks:
        return None

    def content(t: str) -> bool:
        return any(unicodedata.category(c)[0] in "LN" for c in t)

    if any(content(p.strip()) for p in peaks):
        kept = [(r, p.strip()) for r, p in enumerate(peaks) if content(p.strip())]
    else:
        vis = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}
        kept = [(r, p.strip() or "".join(vis.get(c, c) for c in p)) for r, p in enumerate(peaks)]
    stats: dict[str, list] = {}  # key -> [count, first rank, as written]
    for r, t in kept:
        s = stats.setdefault(t.casefold(), [0, r, t])
        s[0] += 1
    ranked = sorted(stats.values(), key=lambda s: (-s[0], s[1]))
    shown = [ranked[0]] + [s for s in ranked[1:3] if s[0] >= 2]

    def cut(t: str) -> str:
        return t if len(t) <= 24 else t[:23] + "…"

    text = " · ".join(f'"{cut(s[2])}"' for s in shown) + f" ({sum(s[0] for s in shown)}/{len(peaks)} peaks)"
    lens = [cut(p.replace("␣", " ").strip()) for p in (promoted if promoted is not None else [])]
    lens = [p for p in lens if content(p)][:3]
    return text + (" → promotes: " + ", ".join(lens) if lens else "")


def brute_labels(cache: Path) -> dict[int, str | None]:
    ex = pd.read_parquet(cache / "examples.parquet")
    feats = pd.read_parquet(cache / "features.parquet")
    out = {}
    for f in feats["feature"]:
        rows = ex[(ex["feature"] == f) & (ex["kind"] == "top")].sort_values("rank")
        peaks = [str(t[p]) for t, p in zip(rows["tokens"], rows["max_position"], strict=True)]
        promoted = feats.loc[f, "top_promoted"] if "top_promoted" in feats else None
        out[int(f)] = None if feats.loc[f, "dead"] else brute_label(peaks, promoted)
    return out


def test_peak_label_counts_case_folded_content_tokens() -> None:
    peaks = [" Asian", "white", " asian", ",", " White", "Asian", " men", "\n", "men", " dog"]
    assert peak_label(peaks, ["␣people", "!!", "␣men", "x", "y"]) == (
        '"Asian" · "white" · "men" (7/10 peaks) → promotes: people, men, x'
    )
    assert peak_label([" a", " b", " c"], None) == '"a" (1/3 peaks)'  # singletons after the first: not shown
    assert peak_label(["\n", "\n", " .", "\n"], []) == '"↵" (3/4 peaks)'  # only punctuation: shown
    assert peak_label(["x" * 40], None) == f'"{"x" * 23}…" (1/1 peaks)'
    assert peak_label([], ["␣x"]) is None


def test_peak_label_equals_brute_force_on_edge_cases() -> None:
    cases = [
        ([" B", "b", " c", "C", " d"], ["␣q", "␣r"]),
        ([" ", "\t", "  "], None),
        (["<|im_start|>", "<|im_start|>", " ok"], ["??", "␣"]),
        (["é", "É", " É", "1", "1", "1"], ["␣ça"]),
    ]
    for peaks, promoted in cases:
        assert peak_label(peaks, promoted) == brute_label(peaks, promoted), peaks


def test_every_feature_label_equals_brute_force_on_a_real_cache(built_cache) -> None:  # noqa: F811
    cache, _ = built_cache
    feats = pd.read_parquet(cache / "features.parquet")
    expect = brute_labels(cache)
    assert strs(feats["label"]) == [expect[f] for f in feats["feature"]]
    sources = strs(feats["label_source"])
    assert sources == ["peak_tokens" if expect[f] is not None else None for f in feats["feature"]]
    firing = ~feats["dead"]
    assert feats.loc[firing, "label"].notna().all() and firing.sum() > 0  # every firing feature: a label
    assert json.loads((cache / "params" / "labels.json").read_text())["n_computed"] == int(firing.sum())


def test_dead_features_get_no_label() -> None:
    features = pd.DataFrame({"feature": [0, 1], "dead": [True, False], "label": [None, None]})
    examples = pd.DataFrame(
        {
            "feature": [0, 1],
            "rank": [0, 0],
            "kind": ["top", "top"],
            "tokens": [[" a"], [" b"]],
            "max_position": [0, 0],
        }
    )
    out = feature_labels(features, examples)
    assert strs(out["label"]) == [None, '"b" (1/1 peaks)']
    assert strs(out["label_source"]) == [None, "peak_tokens"]
    # a feature with no top example at all (it never fired) gets none either
    out = feature_labels(features.assign(dead=False), examples[examples["feature"] == 1])
    assert strs(out["label"]) == [None, '"b" (1/1 peaks)'] and strs(out["label_source"])[0] is None


def test_a_cache_scored_before_label_source_keeps_its_labels_as_imported() -> None:
    features = pd.DataFrame({"feature": [0, 1], "dead": [False, False], "label": ["from export", None]})
    examples = pd.DataFrame(
        {
            "feature": [0, 1],
            "rank": [0, 0],
            "kind": ["top", "top"],
            "tokens": [[" a"], [" b"]],
            "max_position": [0, 0],
        }
    )
    out = feature_labels(features, examples)
    assert strs(out["label"]) == ["from export", '"b" (1/1 peaks)']
    assert strs(out["label_source"]) == ["neuronpedia", "peak_tokens"]
    # with label_source (an arrow string column: missing values are NA), only "neuronpedia" is kept
    sourced = features.assign(
        label=pd.array(["from export", "old computed"], dtype="string"),
        label_source=pd.array(["neuronpedia", pd.NA], dtype="string"),
    )
    assert strs(feature_labels(sourced, examples)["label"]) == ["from export", '"b" (1/1 peaks)']


def test_imported_labels_win_and_reruns_are_idempotent(built_cache, tmp_path: Path) -> None:  # noqa: F811
    cache, cfg = built_cache
    out = tmp_path / "cache"
    shutil.copytree(cache, out)
    export = tmp_path / "np.json"
    export.write_text(json.dumps([{"index": "3", "description": "imported <b>three</b>"}]))
    run_step("scores", RunConfig.load(None, {"out": str(out), "neuronpedia": str(export)}))
    run_step("labels", RunConfig.load(None, {"out": str(out)}))
    first = pd.read_parquet(out / "features.parquet")
    expect = brute_labels(cache)
    assert first.loc[3, "label"] == "imported <b>three</b>" and first.loc[3, "label_source"] == "neuronpedia"
    others = first["feature"] != 3
    assert first.loc[others, "label"].tolist() == [expect[f] for f in first.loc[others, "feature"]]
    # a second run changes nothing
    run_step("labels", RunConfig.load(None, {"out": str(out)}))
    again = pd.read_parquet(out / "features.parquet")
    pd.testing.assert_frame_equal(first, again)
    check_files(out, ("features.parquet",))
    verify_cache(out)
    # a rescore without the export drops the import; labels then computes feature 3 too
    run_step("scores", RunConfig.load(None, {"out": str(out)}))
    assert pd.read_parquet(out / "features.parquet")["label_source"].isna().all()
    run_step("labels", RunConfig.load(None, {"out": str(out)}))
    assert strs(pd.read_parquet(out / "features.parquet")["label"]) == list(expect.values())


def test_labels_on_a_cache_without_examples_is_one_clear_error(built_cache, tmp_path: Path, capsys) -> None:  # noqa: F811
    from precompute.cli import main as cli_main

    cache, _ = built_cache
    out = tmp_path / "cache"
    shutil.copytree(cache, out)
    (out / "examples.parquet").unlink()
    assert cli_main(["labels", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "has no examples.parquet; run `featuregeom harvest` first" in err and "Traceback" not in err
