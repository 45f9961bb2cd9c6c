"""`featuregeom export`: the command line of the exports (today one format, `--neuronpedia DIR`, whose
layout and sources are described in precompute/export/neuronpedia.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from precompute import schema
from precompute.errors import CacheError, ConfigError
from precompute.export.neuronpedia import (
    DEFAULT_CREATOR_ID,
    LOGIT_VALUES,
    MARKER,
    WHAT,
    CacheData,
    Target,
    write_export,
)
from precompute.options import Command, option, require

# Neuronpedia ids: the Model id's own rule (letters, digits, dashes, underscores; lower-cased), plus dots
# (ids such as llama3.1-8b exist); never a path separator.
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")


# ------------------------------------------------------------------------------------------ options
@dataclass
class ExportOptions:
    neuronpedia: str | None = option(
        None, metavar="DIR", help="write the cache as a Neuronpedia export (neuronpedia-utils layout) to DIR"
    )
    cache: str | None = option(None, metavar="CACHE", help="the featuregeom cache to export")
    model_id: str | None = option(
        None,
        help="Neuronpedia model id (default: the SAE's model name, lower-cased, e.g. smollm2-135m-instruct)",
    )
    layer: int | None = option(
        None, low=0, help="layer number of the source id (default: the first number in the cache's hook)"
    )
    source_set: str | None = option(
        None,
        help="Neuronpedia source set; the source id is LAYER-SET (default: the hook's site and the SAE's "
        "architecture, e.g. res-topk)",
    )
    creator_id: str = option(
        DEFAULT_CREATOR_ID, help="Neuronpedia user id that owns the rows: the bot user every instance seeds"
    )
    overwrite: bool = option(False, help="replace DIR when it holds an earlier export of ours")
    progress: bool = option(True, help="hide progress bars")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")


def _site(hook: str) -> str:
    """Neuronpedia's name for where an SAE reads (res, mlp, att), from the hook or module name."""
    h = hook.lower()
    if "mlp" in h:
        return "mlp"
    if "attn" in h or "hook_z" in h:
        return "att"
    return "res"


def _checked_name(value: str, flag: str) -> str:
    if not _NAME.fullmatch(value):
        raise ConfigError(
            f"{flag} {value!r} is not a Neuronpedia id: use lower-case letters, digits, '.', '_' and '-' "
            "(starting with a letter or digit)"
        )
    return value


def resolve_target(opts: ExportOptions, manifest: dict[str, Any]) -> Target:
    """The options, or defaults from the cache manifest (the SAE's model name, the hook, the SAE's
    architecture); ConfigError naming the flag to pass when a default cannot be derived."""
    sae, model = manifest.get("sae") or {}, manifest.get("model") or {}
    hook = str(manifest.get("hook") or sae.get("hook_name") or "")
    model_id = opts.model_id
    if model_id is None:
        name = str(sae.get("model_name") or model.get("spec") or "")
        model_id = _slug(name.rstrip("/").rsplit("/", 1)[-1])
        if not model_id:
            raise ConfigError("the cache's manifest names no model; pass --model-id")
    layer = opts.layer
    if layer is None:
        number = re.search(r"\d+", hook)
        if number is None:
            raise ConfigError(f"the cache's hook {hook!r} names no layer number; pass --layer")
        layer = int(number.group())
    source_set = opts.source_set or f"{_site(hook)}-{_slug(str(sae.get('architecture') or 'sae')) or 'sae'}"
    return Target(
        _checked_name(model_id, "--model-id"),
        layer,
        _checked_name(source_set, "--source-set"),
        opts.creator_id,
    )


# ------------------------------------------------------------------------------------ reading a cache
def read_cache(cache: str | Path) -> CacheData:
    """Verify the files the export reads (checksums and the cache contract) and load all but the
    examples, which are streamed. CacheError with the step to rerun when a file fails."""
    import pyarrow.parquet as pq

    from precompute.cache import verify_cache

    path = Path(cache)
    if not path.is_dir():
        raise CacheError(f"--cache {path} is not a directory; pass a cache built by `featuregeom precompute`")
    needed = (schema.FEATURES, schema.NEIGHBORS, schema.EXAMPLES)
    files = (*needed, schema.HISTOGRAMS) if (path / schema.HISTOGRAMS).is_file() else needed
    manifest = verify_cache(path, files)
    schema.check_files(path, files)
    wanted = ["feature", "frequency", "max_activation", "label", "label_source", "auto_explanation"]
    wanted += ["auto_explanation_model"]
    wanted += [*LOGIT_VALUES, *LOGIT_VALUES.values()]
    present = set(schema.parquet_dtypes(path / schema.FEATURES))
    columns = pq.read_table(path / schema.FEATURES, columns=[c for c in wanted if c in present]).to_pydict()
    n = len(columns["feature"])
    if columns["feature"] != list(range(n)):
        raise CacheError(
            f"{path / schema.FEATURES}: row i must be feature i (docs/cache.md); rebuild the cache"
        )
    with np.load(path / schema.NEIGHBORS) as z:
        nb_indices, nb_cosine = z["indices"], z["cosine"]
    hist_counts = hist_max = None
    if schema.HISTOGRAMS in files:
        with np.load(path / schema.HISTOGRAMS) as z:
            hist_counts, hist_max = z["counts"], z["max_activation"]
    for name, rows in (
        (schema.NEIGHBORS, len(nb_indices)),
        (schema.HISTOGRAMS, n if hist_counts is None else len(hist_counts)),
    ):
        if rows != n:
            raise CacheError(f"{path / name} has {rows} rows for {n} features; rebuild the cache")
    return CacheData(path, manifest, columns, nb_indices, nb_cosine, hist_counts, hist_max)


# ------------------------------------------------------------------------------------------ command
def check_destination(out: Path, cache: Path, overwrite: bool) -> None:
    """Before any work: DIR must be outside the cache, and new, empty, or (with --overwrite) an earlier
    export of ours. A user's folder is never replaced, whatever the flags."""
    o, c = out.resolve(), cache.resolve()
    if o.is_relative_to(c) or c.is_relative_to(o):
        raise CacheError(
            f"--neuronpedia {out} and --cache {cache} overlap; write the export outside the cache"
        )
    if not out.exists():
        return
    if not out.is_dir():
        raise CacheError(f"--neuronpedia {out} exists and is not a directory; choose another DIR")
    if not any(out.iterdir()):
        return
    if not (out / MARKER).is_file():
        raise CacheError(
            f"--neuronpedia {out} is a non-empty directory that is not a {WHAT} (no {MARKER}); featuregeom "
            "never replaces such a directory, even with --overwrite. Choose a new or empty DIR"
        )
    if not overwrite:
        raise CacheError(f"--neuronpedia {out} already holds a {WHAT}; pass --overwrite to replace it")


def run_export(opts: ExportOptions) -> int:
    from precompute.cache import write_dir_atomic

    require(opts, "neuronpedia", "cache", command="export")
    out, cache = Path(str(opts.neuronpedia)), Path(str(opts.cache))
    check_destination(out, cache, opts.overwrite)
    data = read_cache(cache)
    target = resolve_target(opts, data.manifest)
    counts: dict[str, int] = {}

    def write(staging: Path) -> None:
        counts.update(write_export(staging, data, target, progress=opts.progress))

    write_dir_atomic(out, write, marker=MARKER, what=WHAT)
    print(
        f"wrote {out / target.model_id / target.source_id}: {counts['features']} features, "
        f"{counts['activations']} activations, {counts['explanations']} explanations. Load it with "
        f"Neuronpedia's importer (modelId={target.model_id}, sourceId={target.source_id})"
    )
    return 0


COMMANDS = (
    Command(
        "export",
        "write a cache in another tool's format (--neuronpedia DIR: a Neuronpedia export)",
        ExportOptions,
        run_export,
        description="Write --cache as a Neuronpedia export in DIR: DIR/MODEL/LAYER-SET/ with features/, "
        "activations/ and explanations/ batch-N.jsonl.gz as neuronpedia-utils' export-data.py lays them "
        "out, plus model.jsonl, sourceset.jsonl and source.jsonl, for a Neuronpedia instance's importer. "
        "The ids default from the cache's manifest (--model-id, --layer, --source-set override them).",
    ),
)
