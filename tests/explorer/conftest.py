"""Fixtures for the explorer tests: small synthetic caches (built once per session) and broken copies.

`browser_cache_dir` is the cache the browser tests open. It defaults to a synthetic cache; point
FEATUREGEOM_TEST_CACHE at another cache (e.g. one built from a tiny real model), or override the
fixture in a conftest closer to the test, to run the same end-to-end flows on it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from bench.synthetic_cache import write_synthetic_cache
from tests.explorer.lab_fixture import LabFixture, write_lab_outputs


@pytest.fixture(scope="session")
def _synth_and_lab(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LabFixture]:
    path = write_synthetic_cache(tmp_path_factory.mktemp("caches") / "synth", n_features=600, d=32, seed=0)
    return path, write_lab_outputs(path)


@pytest.fixture(scope="session")
def synth_cache(_synth_and_lab: tuple[Path, LabFixture]) -> Path:
    """A 600-feature synthetic cache, with fine-tune diffs and a triage result inside (tests/explorer/lab_fixture.py);
    read-only by convention (copy it before changing it)."""
    return _synth_and_lab[0]


@pytest.fixture(scope="session")
def lab(_synth_and_lab: tuple[Path, LabFixture]) -> LabFixture:
    """What write_lab_outputs() put into synth_cache: the exact values the lab pages must show."""
    return _synth_and_lab[1]


@pytest.fixture(scope="session")
def xss_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache whose labels, tokens and documents carry <script>, <img onerror> and javascript: payloads."""
    return write_synthetic_cache(
        tmp_path_factory.mktemp("caches") / "xss", n_features=400, d=32, seed=1, inject_html=True
    )


@pytest.fixture(scope="session")
def notask_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 400-feature synthetic cache in which no feature passes the task test: no task feature, no flagged
    pair, closeness not testable (read-only by convention)."""
    return write_synthetic_cache(
        tmp_path_factory.mktemp("caches") / "notask", n_features=400, d=32, seed=2, task_features=False
    )


@pytest.fixture(scope="session")
def browser_cache_dir(synth_cache: Path) -> Path:
    env = os.environ.get("FEATUREGEOM_TEST_CACHE")
    return Path(env) if env else synth_cache


@pytest.fixture
def cache_copy(synth_cache: Path, tmp_path: Path) -> Path:
    """A private copy of the synthetic cache that a test may damage."""
    dst = tmp_path / "cache"
    shutil.copytree(synth_cache, dst)
    return dst


@pytest.fixture
def wrong_schema_cache(cache_copy: Path) -> Path:
    m = json.loads((cache_copy / "manifest.json").read_text())
    m["schema_version"] = 99
    (cache_copy / "manifest.json").write_text(json.dumps(m))
    return cache_copy


@pytest.fixture
def tampered_cache(cache_copy: Path) -> Path:
    p = cache_copy / "features.parquet"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    return cache_copy


def plant_bidirectional_pair(src: Path, dst: Path) -> tuple[int, int]:
    """Copy `src` to `dst` and plant a pair listed both ways, as the overlaps step wrote before it kept each
    unordered pair once: the top flagged pair (t, h) with both features made task and harmful, and the
    reverse row (h, t) added at half the risk. Returns (t, h), the higher-risk direction."""
    import pandas as pd

    from precompute import schema
    from precompute.cache import stage

    shutil.copytree(src, dst)
    ov = pd.read_parquet(dst / schema.OVERLAPS)
    top = ov.sort_values("risk", ascending=False).iloc[0]
    t, h = int(top["task_feature"]), int(top["harmful_feature"])
    rev = top.copy()
    rev["task_feature"], rev["harmful_feature"], rev["risk"] = h, t, float(top["risk"]) / 2
    ov = pd.concat([ov, rev.to_frame().T.astype(ov.dtypes.to_dict())], ignore_index=True)
    feats = pd.read_parquet(dst / schema.FEATURES)
    feats.loc[h, "is_task"] = True
    feats.loc[t, "is_harmful"] = True
    with stage(dst) as staged:
        for name, df in ((schema.OVERLAPS, ov), (schema.FEATURES, feats)):
            df.to_parquet(staged.path(name), index=False)
        staged.commit()
    return t, h


@pytest.fixture(scope="session")
def bidir_cache(synth_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple[int, int]]:
    """synth_cache with a planted bidirectional pair (plant_bidirectional_pair); (its path, (t, h))."""
    dst = tmp_path_factory.mktemp("caches") / "bidir"
    return dst, plant_bidirectional_pair(synth_cache, dst)
