"""`featuregeom export --neuronpedia`: a real tiny cache (labels imported from a Neuronpedia file, the
logit lens run with the model) and a synthetic one with hostile text, exported and read back: labels
through the project's own Neuronpedia importer, every other field against the cache's files."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from precompute.cache import verify_cache
from precompute.cli import main as cli_main
from precompute.errors import ConfigError
from precompute.export.neuronpedia import BATCH_SIZE, MARKER, write_export
from precompute.pipeline.neuronpedia import import_neuronpedia
from precompute.pipeline.run import run_precompute
from precompute.provenance import sha256_of
from tests.precompute.pipeline.test_run import make_cfg

# The Neuron columns neuronpedia-utils export-data.py writes, in its order (the format's spec).
NEURON_COLUMNS = (
    "modelId layer index maxActApprox creatorId frac_nonzero freq_hist_data_bar_heights "
    "freq_hist_data_bar_values logits_hist_data_bar_heights logits_hist_data_bar_values "
    "neuron_alignment_indices neuron_alignment_l1 neuron_alignment_values correlated_neurons_indices "
    "correlated_neurons_l1 correlated_neurons_pearson decoder_weights_dist neg_str neg_values pos_str "
    "pos_values sourceSetName topkCosSimIndices topkCosSimValues vector vectorLabel hookName "
    "vectorDefaultSteerStrength hasVector"
).split()
# Labels the tiny cache imports: markup, quotes, a newline, non-ASCII, the importer's own " | " separator.
HOSTILE = [
    "<script>alert('x')</script> task feature",
    'quote " and backslash \\ and </pre>',
    "two\nlines",
    "日本語 — ünïcödé ✓",
    "a | b",
    "<img src=x onerror=alert(1)>",
]


def _snapshot(root: Path, skip: Path | None = None) -> dict[str, str]:
    """Every file under root (but `skip`) with its sha256: what a command must leave as it was."""
    return {
        str(p.relative_to(root)): sha256_of(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and (skip is None or not p.is_relative_to(skip))
    }


def _lines(files: list[Path]) -> list[dict[str, Any]]:
    out = []
    for path in files:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            out += [json.loads(line) for line in fh if line.strip()]
    return out


def _number(path: Path) -> int:
    return int(path.name.split("-")[1].split(".")[0])


def _batches(folder: Path) -> list[Path]:
    """batch-N.jsonl.gz files by N; feature and explanation batches are numbered 0, 1, ... without a gap
    (activation batches skip a range of features without examples)."""
    files = sorted(folder.glob("batch-*.jsonl.gz"), key=_number)
    assert len(files) == len(list(folder.iterdir()))
    if folder.name != "activations":
        assert [_number(p) for p in files] == list(range(len(files)))
    return files


@pytest.fixture(scope="module")
def labelled_cache(tiny_model_dir, tiny_sae_dir, tiny_corpus, tmp_path_factory) -> Path:
    """The tiny pipeline cache with labels imported from a Neuronpedia explanations file."""
    root = tmp_path_factory.mktemp("np-export")
    expl = root / "explanations.jsonl"
    rows = [{"index": str(3 * i + 1), "description": text} for i, text in enumerate(HOSTILE)]
    rows.append({"index": "1", "description": "a second explanation of feature 1"})
    expl.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    out = root / "cache"
    run_precompute(make_cfg(tiny_model_dir, tiny_sae_dir, tiny_corpus, out, neuronpedia=str(expl)))
    return out


def _export(cache: Path, out: Path, *extra: str) -> int:
    return cli_main(["export", "--neuronpedia", str(out), "--cache", str(cache), "--no-progress", *extra])


def check_export(cache: Path, source: Path, batch_size: int = BATCH_SIZE) -> None:
    """Every exported field equals the cache file it comes from."""
    feats = pd.read_parquet(cache / "features.parquet")
    examples = pd.read_parquet(cache / "examples.parquet")
    n = len(feats)
    with np.load(cache / "neighbors.npz") as z:
        nb_idx, nb_cos = z["indices"], z["cosine"]
    with np.load(cache / "histograms.npz") as z:
        counts, hmax = z["counts"], z["max_activation"]

    files = _batches(source / "features")
    assert len(files) == -(-n // batch_size)
    records = []
    for b, path in enumerate(files):
        batch = _lines([path])
        assert [int(r["index"]) for r in batch] == list(range(b * batch_size, min(n, (b + 1) * batch_size)))
        records += batch
    for f, rec in enumerate(records):
        assert list(rec) == NEURON_COLUMNS
        assert rec["topkCosSimIndices"] == [f, *nb_idx[f].tolist()]
        assert rec["topkCosSimValues"] == [1.0, *(float(v) for v in nb_cos[f])]
        assert rec["frac_nonzero"] == feats["frequency"][f]
        assert rec["maxActApprox"] == feats["max_activation"][f]
        if counts[f].sum():
            assert rec["freq_hist_data_bar_heights"] == counts[f].tolist()
            edges = np.linspace(0.0, float(hmax[f]), counts.shape[1] + 1)
            np.testing.assert_allclose(
                rec["freq_hist_data_bar_values"], (edges[:-1] + edges[1:]) / 2, rtol=1e-12
            )
        else:
            assert rec["freq_hist_data_bar_heights"] == rec["freq_hist_data_bar_values"] == []
        for side, col in (("pos", "top_promoted"), ("neg", "top_suppressed")):
            assert rec[f"{side}_str"] == list(feats[col][f])
            values = feats[f"{col}_values"][f]  # the real logits, since the cache holds them
            assert rec[f"{side}_values"] == [float(v) for v in values] and len(values) == len(feats[col][f])

    acts = _lines(_batches(source / "activations"))
    # a group_top (category_top) example whose context the feature already shows (as top, or for another
    # group or category) is left out: Neuronpedia would list the same text twice; per-group quantile
    # samples are left out (Neuronpedia's bins are the feature's global intervals)
    assert (examples.kind == "group_quantile").any()
    tops = examples[examples.kind == "top"]
    shown = set(zip(tops.feature, tops.context_id, strict=True))
    keep = []
    for _, row in examples.iterrows():
        if row["kind"] == "group_quantile":
            continue
        key = (row["feature"], row["context_id"])
        if row["kind"] in ("group_top", "category_top"):  # a top within a group (category)
            if key in shown:
                continue
            shown.add(key)
        keep.append(row)
    examples = pd.DataFrame(keep)
    assert len(acts) == len(examples) and len({a["id"] for a in acts}) == len(acts)
    for path in _batches(source / "activations"):
        assert {int(a["index"]) // batch_size for a in _lines([path])} == {_number(path)}
    for a, (_, row) in zip(acts, examples.iterrows(), strict=True):
        assert int(a["index"]) == row["feature"]
        assert a["tokens"] == list(row["tokens"])
        assert a["values"] == [float(v) for v in row["activations"]]
        assert a["maxValue"] == row["max_activation"]
        assert a["values"][a["maxValueTokenIndex"]] == pytest.approx(a["maxValue"], rel=1e-6)  # float32
        assert a["maxValueTokenIndex"] == row["max_position"] and a["minValue"] == min(a["values"])
        assert a["dataIndex"] == str(row["doc_id"]) and a["dataSource"].split("/")[0] == row["group"]
        feat_max = feats["max_activation"][row["feature"]]
        if row["kind"] in ("top", "group_top", "category_top"):
            assert (a["binMin"], a["binMax"], a["binContains"]) == (-1.0, feat_max, -1.0)
        else:
            assert a["binMin"] == row["quantile"] * feat_max
            if a["binMax"] is not None:  # the harvest's interval holds the example's peak
                assert a["binMin"] <= a["maxValue"] * (1 + 1e-6) and a["maxValue"] <= a["binMax"] * (1 + 1e-6)


def labels_of(cache: Path) -> dict[int, str]:
    feats = pd.read_parquet(cache / "features.parquet", columns=["feature", "label"])
    return {
        int(f): lab for f, lab in zip(feats["feature"], feats["label"], strict=True) if isinstance(lab, str)
    }


def sources_of(cache: Path) -> dict[int, str]:
    feats = pd.read_parquet(cache / "features.parquet", columns=["feature", "label", "label_source"])
    return {
        int(f): src
        for f, lab, src in zip(feats["feature"], feats["label"], feats["label_source"], strict=True)
        if isinstance(lab, str)
    }


def test_export_round_trips_through_the_neuronpedia_importer(labelled_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("FEATUREGEOM_HOME", str(tmp_path / "home"))
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("a file beside DIR")
    before, cache_before = _snapshot(work), _snapshot(labelled_cache)
    out = work / "np"
    assert _export(labelled_cache, out) == 0

    labels = labels_of(labelled_cache)
    feats = pd.read_parquet(labelled_cache / "features.parquet", columns=["label", "label_source"])
    imported = feats.loc[feats["label_source"] == "neuronpedia", "label"]
    assert sorted(imported) == sorted(HOSTILE)  # the cache holds every hostile label, as imported
    source = out / "tiny" / "1-res-topk"  # model name from the SAE, layer from blocks.1, res-topk
    assert sorted(p.name for p in source.iterdir()) == sorted(
        ["activations", "explanations", "features", "model.jsonl", "source.jsonl", "sourceset.jsonl"]
    )
    back = import_neuronpedia(out, len(pd.read_parquet(labelled_cache / "features.parquet")))
    assert dict(zip(back["feature"].tolist(), back["label"], strict=True)) == labels
    # each label comes back with its source: the imported ones as neuronpedia, the computed ones computed
    assert dict(zip(back["feature"].tolist(), back["label_source"], strict=True)) == sources_of(
        labelled_cache
    )
    assert set(back["label_source"]) == {"neuronpedia", "peak_tokens"}
    assert (back["label"] == back["explanation"]).all()  # one explanation per feature: the label
    check_export(labelled_cache, source)

    expl = _lines(_batches(source / "explanations"))
    assert all(e["authorId"] and len(e["id"]) == 25 and e["layer"] == "1-res-topk" for e in expl)
    meta = {name: json.loads((source / name).read_text()) for name in ("model.jsonl", "source.jsonl")}
    assert meta["model.jsonl"]["id"] == "tiny" and meta["source.jsonl"]["setName"] == "res-topk"
    assert json.loads((out / MARKER).read_text())["explanations"] == len(labels)

    # nothing beside DIR, and nothing in the cache, changed
    assert _snapshot(work, skip=out) == before and _snapshot(labelled_cache) == cache_before
    assert sorted(p.name for p in work.iterdir()) == ["keep.txt", "np"]


def test_small_batches_follow_the_export_data_layout(labelled_cache, tmp_path):
    from precompute.export.command import ExportOptions, read_cache, resolve_target

    data = read_cache(labelled_cache)
    target = resolve_target(ExportOptions(model_id="m", layer=7, source_set="res-x"), data.manifest)
    out = tmp_path / "export"
    counts = write_export(out, data, target, batch_size=10)
    source = out / "m" / "7-res-x"
    check_export(labelled_cache, source, batch_size=10)
    assert len(_batches(source / "features")) == 7  # 64 features: 6 of 10, then 4
    # explanations: 10 per file, by index (LIMIT/OFFSET over the table, not index ranges)
    expl = _lines(_batches(source / "explanations"))
    labels = labels_of(labelled_cache)  # imported and computed (labels step): one explanation each
    assert [int(e["index"]) for e in expl] == sorted(labels) and counts["explanations"] == len(labels)
    back = import_neuronpedia(source, 64)  # the source directory: the marker two levels up is found
    assert dict(zip(back["feature"].tolist(), back["label"], strict=True)) == labels_of(labelled_cache)
    assert dict(zip(back["feature"].tolist(), back["label_source"], strict=True)) == sources_of(
        labelled_cache
    )
    # the same cache gives the same ids: a second import adds nothing (ON CONFLICT DO NOTHING)
    again = write_export(tmp_path / "again", data, target, batch_size=10)
    assert again == counts
    first, second = (_lines(_batches(d / "m" / "7-res-x" / "activations")) for d in (out, tmp_path / "again"))
    assert first == second


def test_synthetic_cache_with_hostile_text(tmp_path):
    from bench.synthetic_cache import write_synthetic_cache

    cache = write_synthetic_cache(tmp_path / "synth", n_features=1100, inject_html=True, n_quantile=2)
    out = tmp_path / "np"
    assert _export(cache, out, "--model-id", "synthetic-model") == 0
    source = out / "synthetic-model" / "0-res-topk"
    check_export(cache, source)  # 1100 features: batch-0 (1024) and batch-1 (76)
    labels = {f: lab.strip() for f, lab in labels_of(cache).items() if lab.strip()}
    assert any("<script" in lab for lab in labels.values())
    back = import_neuronpedia(out, 1100)
    assert dict(zip(back["feature"].tolist(), back["label"], strict=True)) == labels
    raw = b"".join(gzip.decompress(p.read_bytes()) for p in (source / "features").iterdir())
    assert b"<script" in raw  # markup travels as JSON string data, for Neuronpedia to escape on display


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("featuregeom: error: "), err
    return err[0]


def _tampered(cache: Path, dest: Path) -> Path:
    copy = Path(shutil.copytree(cache, dest))
    with open(copy / "features.parquet", "ab") as fh:
        fh.write(b"\0")
    return copy


def _without_cosine(cache: Path, dest: Path) -> Path:
    """A cache whose checksums verify but whose neighbors.npz lacks an array of the contract."""
    copy = Path(shutil.copytree(cache, dest))
    with np.load(copy / "neighbors.npz") as z:
        arrays = {k: z[k] for k in z.files if k != "cosine"}
    np.savez(copy / "neighbors.npz", **arrays)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["neighbors.npz"] = sha256_of(copy / "neighbors.npz")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize(
    ("make", "expect"),
    [
        (lambda c, d: d / "missing", "is not a directory"),
        (_tampered, "does not match the checksum"),
        (_without_cosine, "cosine"),
    ],
)
def test_a_bad_cache_is_one_line_and_exit_2(labelled_cache, tmp_path, capsys, monkeypatch, make, expect):
    monkeypatch.setenv("FEATUREGEOM_HOME", str(tmp_path / "home"))
    cache = make(labelled_cache, tmp_path / "bad")
    capsys.readouterr()
    assert _export(cache, tmp_path / "np") == 2
    assert expect in _one_error_line(capsys)
    assert not (tmp_path / "np").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left


def test_existing_dir_and_bad_names_are_refused(labelled_cache, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FEATUREGEOM_HOME", str(tmp_path / "home"))
    cache_before = _snapshot(labelled_cache)
    users = tmp_path / "users-folder"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    for extra in ((), ("--overwrite",)):  # a folder of the user's is never replaced
        assert _export(labelled_cache, users, *extra) == 2
        assert "never replaces" in _one_error_line(capsys)
        assert [p.name for p in users.iterdir()] == ["notes.txt"]

    out = tmp_path / "np"
    assert _export(labelled_cache, out) == 0
    first = _snapshot(out)
    assert _export(labelled_cache, out) == 2  # an earlier export needs --overwrite
    assert "--overwrite" in _one_error_line(capsys) and _snapshot(out) == first
    assert _export(labelled_cache, out, "--overwrite") == 0
    again = _snapshot(out)
    assert set(again) == set(first)
    assert all(again[k] == first[k] for k in again if "/features/" in k or "/activations/" in k)

    inside = labelled_cache / "np"
    assert _export(labelled_cache, inside) == 2  # would break the cache's checksums
    assert "outside the cache" in _one_error_line(capsys) and not inside.exists()
    assert _export(labelled_cache, tmp_path / "x", "--model-id", "Bad/Id") == 2
    assert "not a Neuronpedia id" in _one_error_line(capsys)
    assert cli_main(["export", "--cache", str(labelled_cache)]) == 2
    assert "--neuronpedia" in _one_error_line(capsys)
    assert _snapshot(labelled_cache) == cache_before
    verify_cache(labelled_cache)


def test_identifiers_default_from_the_manifest():
    from precompute.export.command import ExportOptions, resolve_target

    manifest = {
        "hook": "blocks.15.hook_resid_post",
        "sae": {"architecture": "topk", "model_name": "HuggingFaceTB/SmolLM2-135M-Instruct"},
    }
    t = resolve_target(ExportOptions(), manifest)
    assert (t.model_id, t.source_id, t.source_set) == ("smollm2-135m-instruct", "15-res-topk", "res-topk")
    mlp = {"hook": "model.layers.3.mlp", "sae": {"architecture": "jumprelu"}, "model": {"spec": "/m/gpt2"}}
    assert resolve_target(ExportOptions(), mlp).source_id == "3-mlp-jumprelu"
    assert resolve_target(ExportOptions(), mlp).model_id == "gpt2"
    with pytest.raises(ConfigError, match="--layer"):
        resolve_target(ExportOptions(), {"hook": "embed", "sae": {}, "model": {"spec": "m"}})


def test_logit_values_fall_back_to_the_webapps_missing_value_only_when_absent() -> None:
    from precompute.export.neuronpedia import MISSING_LOGIT_VALUE, _logits

    old = {"top_promoted": [["a", "b"]]}  # a cache scored before logit values
    assert _logits(old, "top_promoted", 0) == (["a", "b"], [MISSING_LOGIT_VALUE] * 2)
    new = old | {"top_promoted_values": [np.array([2.5, 1.25], np.float32)]}
    assert _logits(new, "top_promoted", 0) == (["a", "b"], [2.5, 1.25])
    assert _logits({"top_promoted": [None], "top_promoted_values": [None]}, "top_promoted", 0) == ([], [])


def test_reading_an_export_back_keeps_computed_labels_computed(labelled_cache, tmp_path):
    """`featuregeom scores --neuronpedia DIR` on our own export: the imported labels stay `neuronpedia`, the
    computed ones come back `peak_tokens` and the labels step recomputes them to the same text."""
    import shutil

    from precompute.pipeline.config import RunConfig
    from precompute.pipeline.run import run_step

    out = tmp_path / "np"
    assert _export(labelled_cache, out) == 0
    copy = tmp_path / "cache"
    shutil.copytree(labelled_cache, copy)
    run_step("scores", RunConfig.load(None, {"out": str(copy), "neuronpedia": str(out), "progress": False}))
    assert sources_of(copy) == sources_of(labelled_cache)
    run_step("labels", RunConfig.load(None, {"out": str(copy), "progress": False}))
    assert labels_of(copy) == labels_of(labelled_cache) and sources_of(copy) == sources_of(labelled_cache)
