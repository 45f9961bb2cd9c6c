"""Neuronpedia import: export directories, single files, rejected files, features-only exports."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from precompute.errors import CorpusError
from precompute.pipeline.neuronpedia import import_neuronpedia

# ------------------------------------------------------------------------------------ Neuronpedia


def _expl(index, description, layer="6-res-jb", model="gpt2-small", **extra) -> dict:
    return {
        "id": f"e{index}{description[:3]}",
        "modelId": model,
        "layer": layer,
        "index": index,
        "description": description,
        "authorId": "x",
        "typeName": "oai_token-act-pair",
        "explanationModelName": "gpt-4o-mini",
        **extra,
    }


def test_import_neuronpedia_export_directory(tmp_path: Path) -> None:
    source = tmp_path / "exports" / "gpt2-small" / "6-res-jb"
    (source / "explanations").mkdir(parents=True)
    (source / "features").mkdir()
    b0 = [_expl("3", "the word 'bomb'"), _expl("3", "weapons"), _expl("0", " code ")]
    b1 = [_expl("7", "fraud"), _expl("9999", "too far"), _expl("3", "the word 'bomb'")]
    with gzip.open(source / "explanations" / "batch-0.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(e) for e in b0) + "\n")
    (source / "explanations" / "batch-1.jsonl").write_text("\n".join(json.dumps(e) for e in b1) + "\n")
    (source / "features" / "batch-0.jsonl").write_text(
        json.dumps({"modelId": "gpt2-small", "layer": "6-res-jb", "index": "5", "maxActApprox": 3.0}) + "\n"
    )
    (source / "release.jsonl").write_text("{}\n")

    for path in (source, tmp_path / "exports"):
        with pytest.warns(
            RuntimeWarning, match=r"ignored 1 Neuronpedia explanation\(s\) with index >= n_features"
        ):
            df = import_neuronpedia(path, 100)
        assert list(df.columns) == ["feature", "label", "explanation", "label_source"]
        assert df["feature"].tolist() == [0, 3, 7] and df["feature"].dtype == np.int64
        assert df["label"].tolist() == ["code", "the word 'bomb'", "fraud"]
        assert df.loc[1, "explanation"] == "the word 'bomb' | weapons"


def test_import_neuronpedia_single_files(tmp_path: Path) -> None:
    items = [_expl(2, "negation"), _expl("4", "insecure code", typeName=None)]
    as_json = tmp_path / "explanations.json"
    as_json.write_text(json.dumps(items))
    as_jsonl_gz = tmp_path / "explanations.jsonl.gz"
    with gzip.open(as_jsonl_gz, "wt") as f:
        f.write("\n".join(json.dumps(e) for e in items))
    # The API's feature JSON: explanations nested in a feature object.
    feature_json = tmp_path / "feature.json"
    feature_json.write_text(
        json.dumps(
            {
                "modelId": "gpt2-small",
                "layer": "6-res-jb",
                "index": "4",
                "explanations": [{"description": "insecure code"}],
            }
        )
    )
    for p in (as_json, as_jsonl_gz):
        df = import_neuronpedia(p, 5)
        assert df.to_dict("list") == {
            "feature": [2, 4],
            "label": ["negation", "insecure code"],
            "explanation": ["negation", "insecure code"],
            "label_source": ["neuronpedia", "neuronpedia"],
        }
    assert import_neuronpedia(feature_json, 5).to_dict("list") == {
        "feature": [4],
        "label": ["insecure code"],
        "explanation": ["insecure code"],
        "label_source": ["neuronpedia"],
    }


def test_import_neuronpedia_rejects_other_files(tmp_path: Path) -> None:
    not_export = tmp_path / "config.json"
    not_export.write_text(json.dumps({"d_sae": 16384, "hook_name": "blocks.6.hook_resid_post"}))
    with pytest.raises(CorpusError, match="not a Neuronpedia export"):
        import_neuronpedia(not_export, 10)
    garbage = tmp_path / "weights.bin"
    garbage.write_bytes(b"\x00\xff\xfe binary")
    with pytest.raises(CorpusError):
        import_neuronpedia(garbage, 10)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CorpusError, match=r"explanations/batch-N"):
        import_neuronpedia(tmp_path / "empty_dir", 10)
    with pytest.raises(CorpusError, match="does not exist"):
        import_neuronpedia(tmp_path / "nope", 10)
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps([_expl(1, "a"), _expl(1, "b", layer="8-res-jb")]))
    with pytest.raises(CorpusError, match="mixes explanations of 2 SAEs"):
        import_neuronpedia(mixed, 10)


def test_import_neuronpedia_features_only_export_warns(tmp_path: Path) -> None:
    (tmp_path / "features").mkdir()
    (tmp_path / "features" / "batch-0.jsonl").write_text(json.dumps({"index": "1", "maxActApprox": 2}) + "\n")
    with pytest.warns(RuntimeWarning, match="no explanations"):
        df = import_neuronpedia(tmp_path, 10)
    assert df.empty and list(df.columns) == ["feature", "label", "explanation", "label_source"]
    merged = pd.DataFrame({"feature": np.arange(3)}).merge(df, on="feature", how="left")
    assert merged["label"].isna().all()
