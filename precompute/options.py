"""Run options: defaults < config TOML file < command-line flags."""

from __future__ import annotations

import math
import tomllib
import types
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from precompute.data.corpus import CorpusSource
from precompute.errors import ConfigError, FeatureGeomError

T = TypeVar("T")


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def coerce_value(name: str, value: Any, annotation: Any, where: str) -> Any:
    """`value` checked against a dataclass field's annotation (str, int, float, bool, X | None,
    list[X], dict[str, str]); an int is accepted for a float. A mismatch is a ConfigError naming
    the option, the value and the expected type, never a TypeError later in the run."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return coerce_value(name, value, option, where)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"option {name!r}{where} must be a list, got {value!r}")
        return [coerce_value(name, v, args[0], where) for v in value] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"option {name!r}{where} must be a table of key = value, got {value!r}")
        return {str(k): coerce_value(name, v, args[1], where) for k, v in value.items()} if args else value
    if annotation is bool:
        if not isinstance(value, bool):  # "no" or 0 must not silently mean true or false
            raise ConfigError(f"option {name!r}{where} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"option {name!r}{where} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"option {name!r}{where} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"option {name!r}{where} must be a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"option {name!r}{where} must be a string, got {value!r}")
        return value
    if isinstance(annotation, type) and isinstance(value, annotation):
        return value
    raise ConfigError(f"option {name!r}{where} must be {_type_name(annotation)}, got {value!r}")


def _corpus_tables(raw: Any, where: str) -> list[CorpusSource]:
    if not isinstance(raw, list) or not all(isinstance(c, dict) for c in raw):
        raise ConfigError(f"'corpus'{where} must be a list of [[corpus]] tables, got {raw!r}")
    hints = get_type_hints(CorpusSource)
    out = []
    for i, table in enumerate(raw):
        if "path" not in table:
            raise ConfigError(
                f"[[corpus]] table {i + 1}{where} has no 'path'; each corpus needs path = \"FILE\""
            )
        # unknown keys are left for CorpusSource.from_dict, which names the known ones
        checked = {
            k: coerce_value(f"corpus.{k}", v, hints[k], where) if k in hints else v for k, v in table.items()
        }
        out.append(CorpusSource.from_dict(checked))
    return out


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file not found: {path}" if not path.exists() else f"config {path} is not a file"
        )
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}); save the config as UTF-8") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc


def load_options(cls: type[T], path: str | Path | None, overrides: dict[str, Any] | None) -> T:
    """Build the options dataclass `cls` from a TOML file (keys = option names, dashes allowed, plus
    [[corpus]] tables), then apply non-None `overrides` (flags); flag --corpus replaces the tables.

    Every value, from the file or a flag, is checked against the field's type; then the class's
    `validate()` (when it has one) checks ranges. Bad values are ConfigErrors (exit 2, one line)."""
    data: dict[str, Any] = read_toml(path) if path else {}
    where = f" in {path}" if path else ""
    data = {k.replace("-", "_"): v for k, v in data.items()}
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"unknown option(s){where}: {sorted(unknown)}; known: {sorted(known)}")
    corpus = _corpus_tables(data.pop("corpus", []), where) if "corpus" in known else []
    checked = {k: coerce_value(k, v, hints[k], where) for k, v in data.items()}
    cfg = cls(**checked, corpus=corpus) if "corpus" in known else cls(**checked)
    for key, value in (overrides or {}).items():
        if value is None or key not in known:
            continue
        if key == "corpus":
            if value:
                cfg.corpus = [CorpusSource.parse(v) if isinstance(v, str) else v for v in value]  # type: ignore[attr-defined]
            continue
        setattr(cfg, key, coerce_value(key, value, hints[key], " (command line)"))
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


def check_ranges(
    cfg: Any,
    ranges: dict[str, tuple[float | None, float | None, str]],
    choices: dict[str, tuple[str, ...]] | None = None,
) -> None:
    """`ranges[name] = (low, high, kind)`: kind '[]' closed, '()' open, '[)' / '(]' half-open; None
    bounds are unbounded. A None value (an optional option left unset) is fine."""
    for name, (low, high, kind) in ranges.items():
        value = getattr(cfg, name)
        if value is None:
            continue
        ok_low = low is None or (value >= low if kind[0] == "[" else value > low)
        ok_high = high is None or (value <= high if kind[1] == "]" else value < high)
        if not (ok_low and ok_high):
            lo = "-inf" if low is None else f"{low:g}"
            hi = "inf" if high is None else f"{high:g}"
            raise ConfigError(
                f"--{name.replace('_', '-')} must be in {kind[0]}{lo}, {hi}{kind[1]}, got {value!r}"
            )
    for name, allowed in (choices or {}).items():
        value = getattr(cfg, name)
        if value is not None and value not in allowed:
            raise ConfigError(
                f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {value!r}"
            )


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

    def validate(self) -> None:
        """Ranges of every numeric option; the neighbour count is checked against the SAE's width
        when the geometry step knows it."""
        check_ranges(
            self,
            {
                "context_size": (2, None, "[)"),
                "max_tokens": (0, None, "()"),
                "batch_size": (1, None, "[)"),
                "batches_per_shard": (1, None, "[)"),
                "outlier_norm_factor": (0, None, "[)"),
                "seed": (0, 2**32 - 1, "[]"),
                "top_k_examples": (1, None, "[)"),
                "quantile_bins": (1, None, "[)"),
                "per_bin": (1, None, "[)"),
                "hist_bins": (1, None, "[)"),
                "neighbors": (1, None, "[)"),
                "null_fpr": (0, 1, "()"),
                "umap_neighbors": (2, None, "[)"),
                "umap_min_dist": (0, None, "[)"),
                "harm_threshold": (0, 1, "[]"),
                "task_threshold": (0, 1, "[]"),
                "n_task": (0, None, "[)"),
            },
            {
                "packing": ("split", "truncate", "pack"),
                "device": ("auto", "cpu", "cuda"),
                "dtype": ("float32", "bfloat16", "float16"),
                "knn_backend": ("auto", "torch", "faiss"),
            },
        )

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["corpus"] = [c.to_dict() for c in self.corpus]
        return out

    def require(self, *names: str, step: str) -> None:
        missing = [n for n in names if not getattr(self, n)]
        if missing:
            flags = ", ".join("--" + n.replace("_", "-") for n in missing)
            raise FeatureGeomError(f"`featuregeom {step}` needs {flags} (on the command line or in --config)")
