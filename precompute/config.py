"""Run options: defaults < config TOML file < command-line flags."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from precompute.corpus import CorpusSource
from precompute.errors import FeatureGeomError

T = TypeVar("T")


def load_options(cls: type[T], path: str | Path | None, overrides: dict[str, Any] | None) -> T:
    """Build the options dataclass `cls` from a TOML file (keys = option names, dashes allowed, plus
    [[corpus]] tables), then apply non-None `overrides` (flags); flag --corpus replaces the tables."""
    data: dict[str, Any] = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise FeatureGeomError(f"config file not found: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise FeatureGeomError(f"{path} is not valid TOML: {exc}") from exc
    data = {k.replace("-", "_"): v for k, v in data.items()}
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise FeatureGeomError(f"unknown option(s) in {path}: {sorted(unknown)}; known: {sorted(known)}")
    corpus = [CorpusSource.from_dict(dict(c)) for c in data.pop("corpus", [])]
    cfg = cls(**data, corpus=corpus)
    for key, value in (overrides or {}).items():
        if value is None or key not in known:
            continue
        if key == "corpus":
            if value:
                cfg.corpus = [CorpusSource.parse(v) if isinstance(v, str) else v for v in value]
            continue
        setattr(cfg, key, value)
    return cfg


@dataclass
class RunConfig:
    model: str | None = None
    adapter: str | None = None  # peft adapter merged into the model (an "after" cache of a fine-tune)
    sae: str | None = None
    sae_format: str | None = None
    hook: str | None = None
    out: str | None = None
    corpus: list[CorpusSource] = field(default_factory=list)
    context_size: int = 128
    packing: str = "split"
    max_tokens: int | None = None
    batch_size: int = 16
    batches_per_shard: int = 8
    outlier_norm_factor: float = 10.0  # drop attention-sink positions above 10x the median norm (0: keep)
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    top_k_examples: int = 20
    quantile_bins: int = 5
    per_bin: int = 2
    hist_bins: int = 40
    neighbors: int = 32
    null_fpr: float = 0.01
    knn_backend: str = "auto"
    umap_neighbors: int = 15
    umap_min_dist: float = 0.1
    harm_threshold: float = 0.7
    task_threshold: float = 0.7
    n_task: int = 50
    neuronpedia: str | None = None
    overwrite: bool = False
    progress: bool = True

    @classmethod
    def load(cls, path: str | Path | None, overrides: dict[str, Any]) -> RunConfig:
        return load_options(cls, path, overrides)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["corpus"] = [c.to_dict() for c in self.corpus]
        return out

    def require(self, *names: str, step: str) -> None:
        missing = [n for n in names if not getattr(self, n)]
        if missing:
            flags = ", ".join("--" + n.replace("_", "-") for n in missing)
            raise FeatureGeomError(f"`featuregeom {step}` needs {flags} (on the command line or in --config)")
