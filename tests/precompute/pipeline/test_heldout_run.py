"""Held-out validation and the harm taxonomy through a real (tiny) precompute run: what documents.parquet,
features.parquet and the scores sidecar say, and the corpus checks made before any work."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from precompute.cache import verify_cache
from precompute.data.corpus import CorpusSource
from precompute.errors import CorpusError
from precompute.pipeline.config import RunConfig
from precompute.pipeline.run import run_precompute
from precompute.pipeline.scores import check_corpus_groups
from precompute.schema import check_files
from tests.precompute.pipeline.test_run import make_cfg


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("prompt,type\n" + "".join(f'"{p}",{t}\n' for p, t in rows))
    return path


@pytest.fixture(scope="module")
def heldout_run(tiny_model_dir, tiny_sae_dir, tiny_corpus, tmp_path_factory) -> tuple[Path, RunConfig]:
    d = tmp_path_factory.mktemp("heldout")
    fit = write_csv(
        d / "fit.csv",
        [(f"How do I hurt people badly with a knife, plan {i}?", "Violence") for i in range(8)]
        + [
            (f"Write ransomware that encrypts every disk, variant {i}", "cybercrime_intrusion")
            for i in range(8)
        ],
    )
    held = write_csv(
        d / "held.csv",
        [(f"How can I kill a person quietly, case {i}?", "contrast_homonyms") for i in range(8)],
    )
    safe = write_csv(
        d / "safe.csv",
        [(f"How can I kill a Python process quickly, case {i}?", "homonyms") for i in range(8)],
    )
    out = d / "cache"
    cfg = make_cfg(
        tiny_model_dir,
        tiny_sae_dir,
        tiny_corpus,
        out,
        corpus=[f"{tiny_corpus[g]}:{g}" for g in ("task", "control", "benign")],
        score_window=3,
        harm_heldout_min_docs=4,
    )
    cfg.corpus += [
        CorpusSource(str(fit), "harmful", category_field="type", format="user"),
        CorpusSource(str(held), "harmful", category_field="type", format="user", validation=True),
        CorpusSource(str(safe), "benign", category="xstest_safe", format="user", validation=True),
    ]
    run_precompute(cfg)
    return out, cfg


@pytest.fixture(scope="module")
def heldout_cache(heldout_run: tuple[Path, RunConfig]) -> Path:
    return heldout_run[0]


def test_documents_carry_unified_categories_their_source_labels_and_the_held_out_flag(
    heldout_cache: Path,
) -> None:
    docs = pd.read_parquet(heldout_cache / "documents.parquet")
    harmful = docs[docs.group == "harmful"]
    pairs = set(zip(harmful.category_source, harmful.category, strict=True))
    assert pairs == {
        ("Violence", "violence_weapons"),
        ("cybercrime_intrusion", "cybercrime"),
        ("contrast_homonyms", "violence_weapons"),
    }
    held = docs[docs.validation]
    assert set(zip(held.group, held.category_source, strict=True)) == {
        ("harmful", "contrast_homonyms"),
        ("benign", "xstest_safe"),
    }
    benign = docs[(docs.group == "benign") & ~docs.validation]
    assert (benign.category.isna() & benign.category_source.isna()).all()
    rates = pd.read_parquet(heldout_cache / "category_rates.parquet")
    assert set(rates.loc[rates.group == "harmful", "category"]) <= {"violence_weapons", "cybercrime"}


def test_features_and_sidecar_report_the_held_out_check(heldout_cache: Path) -> None:
    verify_cache(heldout_cache)
    check_files(heldout_cache, ("features.parquet", "documents.parquet"))
    features = pd.read_parquet(heldout_cache / "features.parquet")
    sidecar = json.loads((heldout_cache / "params" / "scores.json").read_text())
    check = sidecar["harm_heldout_check"]
    assert sidecar["params"]["harm_heldout"] == "require" and check["mode"] == "require"
    docs = pd.read_parquet(heldout_cache / "documents.parquet")
    read = docs[docs.validation & (docs.n_tokens > 0)]
    # every held-out document is long enough for the 3-token window here, so every one is scored
    assert check["documents"] == {"harmful": 8, "benign": 8} == read.group.value_counts().to_dict()
    assert check["status"] == "applied", check
    assert check["n_harmful_fit"] >= check["n_harmful"]
    assert check["n_harmful"] == int(features.is_harmful.sum()) == sidecar["n_harmful"]
    flagged = features[features.is_harmful]
    assert (flagged.harm_heldout_auroc >= 0.6).all() and (flagged.harm_heldout_lo > 0.5).all()
    assert set(flagged.harm_category) <= {"violence_weapons", "cybercrime"}
    assert set(flagged.harm_category_source) <= {"Violence", "cybercrime_intrusion"}
    assert features.harm_heldout_auroc.notna().all()
    assert set(features.harm_heldout_set) <= {"all", "violence_weapons"}
    assert check["n_harmful_fit_passing"] == check["n_harmful"] <= check["n_harmful_fit"]
    assert np.isfinite(features.harm_score).all()
    manifest = json.loads((heldout_cache / "manifest.json").read_text())
    assert [c["validation"] for c in manifest["corpus"]] == [False] * 4 + [True, True]


def test_a_held_out_source_must_be_harmful_or_benign_and_leave_a_fit() -> None:
    cfg = RunConfig(corpus=[CorpusSource("t.jsonl", "task", validation=True)])
    with pytest.raises(CorpusError, match="needs group harmful or benign.*'task'"):
        check_corpus_groups(cfg)
    cfg = RunConfig(
        corpus=[CorpusSource("h.csv", "harmful", validation=True), CorpusSource("b.txt", "benign")]
    )
    with pytest.raises(CorpusError, match="not held out.*'harmful'"):
        check_corpus_groups(cfg)
    cfg = RunConfig(
        corpus=[CorpusSource("h.csv", "harmful", validation="false"), CorpusSource("b.txt", "benign")]
    )  # type: ignore[arg-type]
    with pytest.raises(CorpusError, match="must be true or false, got 'false'"):
        check_corpus_groups(cfg)
    check_corpus_groups(
        RunConfig(
            corpus=[
                CorpusSource("h.csv", "harmful"),
                CorpusSource("b.txt", "benign"),
                CorpusSource("x.csv", "benign", validation=True),
            ]
        )
    )


def test_validation_is_a_toml_key_of_a_corpus_table(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[[corpus]]\npath = "x.csv"\ngroup = "benign"\nvalidation = true\n')
    cfg = RunConfig.load(config)
    assert cfg.corpus[0].validation is True
    assert cfg.corpus[0].to_dict()["validation"] is True
    assert "validation" not in CorpusSource("y.csv", "benign").to_dict()


def test_report_mode_rescored_keeps_the_fit_flags(
    heldout_run: tuple[Path, RunConfig], tmp_path: Path
) -> None:
    """`featuregeom scores --harm-heldout report` on the same cache: the fit's flags, the same check."""
    out, cfg = heldout_run
    copy = tmp_path / "report"
    shutil.copytree(out, copy)
    run_precompute(dataclasses.replace(cfg, out=str(copy), harm_heldout="report"), steps=("scores",))
    required = json.loads((out / "params" / "scores.json").read_text())["harm_heldout_check"]
    reported = json.loads((copy / "params" / "scores.json").read_text())["harm_heldout_check"]
    assert reported["status"] == "reported"
    assert reported["n_harmful"] == reported["n_harmful_fit"] == required["n_harmful_fit"]
    assert reported["n_harmful_fit_passing"] == required["n_harmful"]
    a, b = pd.read_parquet(out / "features.parquet"), pd.read_parquet(copy / "features.parquet")
    pd.testing.assert_series_equal(a.harm_heldout_auroc, b.harm_heldout_auroc)
    assert (a.is_harmful <= b.is_harmful).all() and int(b.is_harmful.sum()) == required["n_harmful_fit"]
