"""`featuregeom demo` installs the packaged lab results into the cache it builds: only into a cache built
from the SAE they were computed with, never over a result already there, each copy whole."""

from __future__ import annotations

import json
from pathlib import Path

from precompute.demo import DEMO_LAB, DEMO_LAB_SOURCE, install_lab_results
from precompute.schema import SCHEMA_VERSION


def _cache(path: Path, sha: str) -> Path:
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(
        json.dumps({"schema_version": SCHEMA_VERSION, "sae": {"sha256": sha}})
    )
    return path


def _lab(path: Path, sha: str) -> Path:
    run = path / "finetune" / "insecure"
    run.mkdir(parents=True)
    (run / "diff.parquet").write_bytes(b"PAR1 fake table")
    (run / "summary.json").write_text('{"labels": ["base", "task", "control"]}')
    (path / "triage" / "half").mkdir(parents=True)  # no triage.json: not a finished result, not copied
    (path / DEMO_LAB_SOURCE).write_text(json.dumps({"sae_sha256": sha}))
    return path


def test_lab_results_are_installed_once_and_only_onto_their_sae(tmp_path: Path, capsys) -> None:
    lab = _lab(tmp_path / "lab", "abc")
    other = _cache(tmp_path / "other", "def")
    assert install_lab_results(other, lab) == []
    assert not (other / "finetune").exists() and "another SAE" in capsys.readouterr().out

    cache = _cache(tmp_path / "cache", "abc")
    assert install_lab_results(cache, lab) == [cache / "finetune" / "insecure"]
    for name in ("diff.parquet", "summary.json"):
        assert (cache / "finetune" / "insecure" / name).read_bytes() == (
            lab / "finetune/insecure" / name
        ).read_bytes()
    assert not (cache / "triage" / "half").exists()
    assert sorted(p.name for p in (cache / "finetune").iterdir()) == ["insecure"]  # no staging left

    (cache / "finetune" / "insecure" / "summary.json").write_text('{"mine": true}')
    assert install_lab_results(cache, lab) == []  # a result already in the cache is the user's: kept
    assert json.loads((cache / "finetune" / "insecure" / "summary.json").read_text()) == {"mine": True}


def test_the_packaged_lab_results_match_the_demo_sae() -> None:
    """What the repository ships: computed with the demo's SAE, each run complete."""
    from precompute.provenance import hash_path, is_descriptive

    meta = json.loads((DEMO_LAB / DEMO_LAB_SOURCE).read_text())
    sae = "assets/sae/smollm2-135m-instruct-blocks.15.hook_resid_post-topk"
    assert meta["sae_sha256"] == hash_path(sae, skip=is_descriptive)
    runs = sorted((DEMO_LAB / "finetune").iterdir())
    assert runs and all((r / "diff.parquet").is_file() and (r / "summary.json").is_file() for r in runs)
