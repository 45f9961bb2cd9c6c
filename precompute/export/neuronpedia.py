"""`featuregeom export --neuronpedia DIR --cache CACHE`: a cache as a Neuronpedia export, so a team can
load its features, examples and labels into its own Neuronpedia instance.

DIR is laid out as neuronpedia-utils' export script writes its `./exports` folder, which the webapp's
importer reads from its dataset bucket (sync DIR there):

    DIR/featuregeom-export.json                     ours: what was exported from where (marks DIR as ours)
    DIR/MODEL/SOURCE/model.jsonl, sourceset.jsonl, source.jsonl
    DIR/MODEL/SOURCE/features/batch-N.jsonl.gz      1024 feature rows per file, by index
    DIR/MODEL/SOURCE/activations/batch-N.jsonl.gz   the examples of features 1024·N … 1024·N+1023
    DIR/MODEL/SOURCE/explanations/batch-N.jsonl.gz  1024 explanation rows per file, by index

SOURCE is Neuronpedia's source id LAYER-SET (e.g. `15-res-topk`; the webapp reads the layer from before
the first dash). Matched against github.com/hijohnnylin/neuronpedia (field names and order, batch size,
file layout; no code copied):

* utils/neuronpedia-utils/neuronpedia_utils/export-data.py: the layout, the batch size 1024, the columns
  of Neuron, Activation and Explanation rows; every batch gzipped, the metadata files not;
* utils/neuronpedia-utils/neuronpedia_utils/db_models/{feature,activation,explanation,model,source,
  source_set}.py and convert-saedashboard-to-neuronpedia-export.py: the metadata rows, maxValue and
  minValue, the bin convention of examples (binMin and binContains -1 on top examples);
* apps/webapp/prisma/schema.prisma: the required fields (Activation.id and creatorId, Explanation.id and
  authorId: Prisma's cuid() default is not in the database, and the importer inserts raw rows);
* apps/webapp/lib/db/import.ts, app/api/admin/import/route.ts: a table's columns come from a batch's
  first line, rows go in with ON CONFLICT DO NOTHING (ids here are deterministic, so importing an export
  twice adds nothing), and model.jsonl, sourceset.jsonl and source.jsonl must exist;
* apps/webapp/components/panes/cossim-pane.tsx: topkCosSimValues[j + 1] belongs to the j-th neighbour,
  so both lists start with the feature itself (cosine 1); components/feature-stats.tsx reads
  pos_values[i] for every pos_str[i] and shows -10000 (MISSING_LOGIT_VALUE) as "N/A";
* apps/webapp/lib/env.ts, prisma/seed.ts: the default creator id, the bot user every instance seeds.

From the cache: topkCosSim* from neighbors.npz; frac_nonzero = frequency, maxActApprox = max_activation;
freq_hist_data_bar_heights = histograms.npz counts, _values = the bin midpoints (empty for a feature that
never fired); pos_str / neg_str = top_promoted / top_suppressed with their logits when the cache holds
them (`top_promoted_values`, `top_suppressed_values`), else -10000; one Activation row per examples.parquet
row (dataSource: the document's group/category, dataIndex: its doc_id; a quantile example's binMin/binMax
is its activation interval; a per-group top example is a top example, left out when its context is
already one); one Explanation row per non-empty `label` (stripped; typeName and
explanationModelName null, since they must name rows of the instance's own tables; so where each label
came from - `label_source`, e.g. computed from peak tokens - goes into our marker file, `label_sources`,
which `featuregeom`'s importer reads back: a computed label re-imported stays computed, not
`neuronpedia`). Neuronpedia has no
field for the harm and task scores; they stay in the cache. Corpus text is written as JSON strings only.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from precompute import __version__, schema
from precompute.errors import CacheError

BATCH_SIZE = 1024  # export-data.py FEATURES_EXPLANATIONS_BATCH_SIZE and ACTIVATIONS_BATCH_SIZE
MARKER = "featuregeom-export.json"
WHAT = "featuregeom Neuronpedia export"
DEFAULT_CREATOR_ID = "clkht01d40000jv08hvalcvly"
MISSING_LOGIT_VALUE = -10000.0
GROUP_TOP = "group_top"  # examples.parquet kind: a feature's top contexts within one corpus group
GROUP_QUANTILE = "group_quantile"  # examples.parquet kind: quantile samples within one corpus group
CATEGORY_TOP = "category_top"  # examples.parquet kind: top contexts within one (group, category)
SUBSET_TOPS = (GROUP_TOP, CATEGORY_TOP)  # top examples of a subset of the documents
# Logit values of the logit-lens tokens, used when a cache has them (caches scored before them lack them).
LOGIT_VALUES = {"top_promoted": "top_promoted_values", "top_suppressed": "top_suppressed_values"}

FEATURE_KEYS = (  # export-data.py's Neuron columns, in its order
    "modelId",
    "layer",
    "index",
    "maxActApprox",
    "creatorId",
    "frac_nonzero",
    "freq_hist_data_bar_heights",
    "freq_hist_data_bar_values",
    "logits_hist_data_bar_heights",
    "logits_hist_data_bar_values",
    "neuron_alignment_indices",
    "neuron_alignment_l1",
    "neuron_alignment_values",
    "correlated_neurons_indices",
    "correlated_neurons_l1",
    "correlated_neurons_pearson",
    "decoder_weights_dist",
    "neg_str",
    "neg_values",
    "pos_str",
    "pos_values",
    "sourceSetName",
    "topkCosSimIndices",
    "topkCosSimValues",
    "vector",
    "vectorLabel",
    "hookName",
    "vectorDefaultSteerStrength",
    "hasVector",
)


@dataclass(frozen=True)
class Target:
    """Where the rows go in Neuronpedia: model, layer and source set (the source id is LAYER-SET)."""

    model_id: str
    layer: int
    source_set: str
    creator_id: str

    @property
    def source_id(self) -> str:
        return f"{self.layer}-{self.source_set}"


# ------------------------------------------------------------------------------------ reading a cache
@dataclass
class CacheData:
    """What the export reads: the manifest, features.parquet's columns, neighbours and histograms."""

    path: Path
    manifest: dict[str, Any]
    columns: dict[str, list[Any]]
    nb_indices: np.ndarray
    nb_cosine: np.ndarray
    hist_counts: np.ndarray | None
    hist_max: np.ndarray | None

    @property
    def n(self) -> int:
        return len(self.columns["feature"])


# ------------------------------------------------------------------------------------------ records
def _row_id(seed: str, *parts: object) -> str:
    """A 25-character id shaped like a cuid, the same for the same cache and row (so a re-import of the
    same export is a no-op under the importer's ON CONFLICT DO NOTHING)."""
    return "c" + hashlib.sha256("/".join(map(str, (seed, *parts))).encode()).hexdigest()[:24]


def _logits(columns: dict[str, list[Any]], name: str, f: int) -> tuple[list[str], list[float]]:
    """A logit-lens column's tokens of feature f, with their logits or the webapp's "N/A" value."""
    tokens = list(columns[name][f] or []) if name in columns else []
    values = columns[LOGIT_VALUES[name]][f] if LOGIT_VALUES[name] in columns else None
    if values is None or len(values) != len(tokens):
        values = [MISSING_LOGIT_VALUE] * len(tokens)
    return tokens, [float(v) for v in values]


def _histogram(data: CacheData, f: int) -> tuple[list[int], list[float]]:
    if data.hist_counts is None or data.hist_max is None or not data.hist_counts[f].any():
        return [], []
    bins = data.hist_counts.shape[1]
    mids = (np.arange(bins) + 0.5) * (float(data.hist_max[f]) / bins)
    return data.hist_counts[f].tolist(), mids.tolist()


def feature_record(data: CacheData, t: Target, f: int) -> dict[str, Any]:
    """The Neuron row of feature f, with FEATURE_KEYS in export-data.py's order."""
    c = data.columns
    heights, mids = _histogram(data, f)
    pos_str, pos_values = _logits(c, "top_promoted", f)
    neg_str, neg_values = _logits(c, "top_suppressed", f)
    values = {
        "modelId": t.model_id,
        "layer": t.source_id,
        "index": str(f),
        "maxActApprox": float(c["max_activation"][f]),
        "creatorId": t.creator_id,
        "frac_nonzero": float(c["frequency"][f]),
        "freq_hist_data_bar_heights": heights,
        "freq_hist_data_bar_values": mids,
        "neg_str": neg_str,
        "neg_values": neg_values,
        "pos_str": pos_str,
        "pos_values": pos_values,
        "sourceSetName": t.source_set,
        "topkCosSimIndices": [f, *data.nb_indices[f].tolist()],
        "topkCosSimValues": [1.0, *data.nb_cosine[f].tolist()],
        "vectorLabel": None,
        "hookName": None,
        "vectorDefaultSteerStrength": None,
        "hasVector": False,
    }
    return {k: values.get(k, []) for k in FEATURE_KEYS}


def explanation_records(data: CacheData, t: Target, seed: str) -> Iterator[dict[str, Any]]:
    """Explanation rows by index (export-data.py's columns): each feature's non-empty label, then its
    `featuregeom explain` explanation with the model that wrote it (`explanationModelName`)."""
    labels = data.columns.get("label") or [None] * data.n
    auto = data.columns.get("auto_explanation") or [None] * data.n
    models = data.columns.get("auto_explanation_model") or [None] * data.n
    for f in range(data.n):
        for kind, text, model in (("explanation", labels[f], None), ("auto-explanation", auto[f], models[f])):
            if not isinstance(text, str) or not text.strip():
                continue
            yield {
                "id": _row_id(seed, kind, t.model_id, t.source_id, f),
                "modelId": t.model_id,
                "layer": t.source_id,
                "index": str(f),
                "authorId": t.creator_id,
                "description": text.strip(),
                "embedding": None,
                "typeName": "featuregeom-explain" if model else None,
                "explanationModelName": model,
                "umap_x": None,
                "umap_y": None,
                "umap_cluster": None,
                "umap_log_feature_sparsity": None,
            }


def label_sources(data: CacheData) -> dict[str, list[int]]:
    """label_source -> the exported features whose label came from it (`precompute.pipeline.labels`);
    a cache without the column (imported labels only) says `neuronpedia` for every label."""
    out: dict[str, list[int]] = {}
    sources = data.columns.get("label_source") or [None] * data.n
    for f, (label, source) in enumerate(zip(data.columns.get("label") or [], sources, strict=False)):
        if isinstance(label, str) and label.strip():
            out.setdefault(source if isinstance(source, str) and source else "neuronpedia", []).append(f)
    return out


_EXAMPLE_COLUMNS = [
    "feature",
    "kind",
    "rank",
    "group",
    "category",
    "doc_id",
    "context_id",
    "tokens",
    "activations",
    "max_activation",
    "max_position",
    "quantile",
]


def _activation(row: dict[str, Any], data: CacheData, t: Target, seed: str, qwidth: float | None):
    f = int(row["feature"])
    values = [float(v) for v in row["activations"]]
    feat_max = float(data.columns["max_activation"][f])
    bin_max: float | None
    if row["kind"] != "quantile":  # a top example, of all documents or of one group (group_top)
        bin_min, bin_max, contains = -1.0, feat_max, -1.0
    else:  # the activation interval the harvest sampled it from, as a share of the feature's maximum
        q = float(row["quantile"])
        bin_min, bin_max, contains = q * feat_max, None if qwidth is None else (q + qwidth) * feat_max, None
    source = row["group"] if row["category"] is None else f"{row['group']}/{row['category']}"
    return {  # export-data.py's Activation columns, plus dataIndex (a column of the table)
        "id": _row_id(seed, "activation", t.model_id, t.source_id, f, *_id_parts(row)),
        "modelId": t.model_id,
        "layer": t.source_id,
        "index": str(f),
        "creatorId": t.creator_id,
        "dataSource": source,
        "dataIndex": str(row["doc_id"]),
        "tokens": list(row["tokens"]),
        "maxValue": float(row["max_activation"]),
        "minValue": min(values) if values else 0.0,
        "values": values,
        "maxValueTokenIndex": int(row["max_position"]),
        "dfaValues": [],
        "dfaMaxValue": None,
        "dfaTargetIndex": None,
        "binContains": contains,
        "binMin": bin_min,
        "binMax": bin_max,
    }


def _id_parts(row: dict[str, Any]) -> tuple[Any, ...]:
    """What names an example within its feature: kind and rank (and the group for group_top, and the
    group and category for category_top, whose ranks restart in each); top and quantile ids are as
    before group_top existed."""
    if row["kind"] == CATEGORY_TOP:
        return (row["kind"], row["group"], row["category"], row["rank"])
    return (
        (row["kind"], row["group"], row["rank"]) if row["kind"] == GROUP_TOP else (row["kind"], row["rank"])
    )


def _without_repeats(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Leave out a group_top (category_top) example whose context is already a top example (or an
    earlier group_top or category_top) of the same feature: Neuronpedia would list the same text twice. Per-group quantile samples are
    left out too: Neuronpedia's bins are a feature's global intervals, and these would read as more
    global samples."""
    shown = {(r["feature"], r["context_id"]) for r in rows if r["kind"] == "top"}
    out = []
    for r in rows:
        if r["kind"] == GROUP_QUANTILE:
            continue
        key = (r["feature"], r["context_id"])
        if r["kind"] in SUBSET_TOPS:
            if key in shown:
                continue
            shown.add(key)
        out.append(r)
    return out


def activation_batches(
    data: CacheData, t: Target, seed: str, batch_size: int, bar: Any = None
) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """(N, Activation rows of features batch_size·N ...) streamed from examples.parquet, which is sorted
    by feature (docs/cache.md); batches without an example are skipped, not written empty."""
    import pyarrow.parquet as pq

    bins = ((data.manifest.get("params") or {}).get("harvest") or {}).get("quantile_bins")
    qwidth = 1.0 / bins if isinstance(bins, int) and bins > 0 else None
    current, rows = -1, list[dict[str, Any]]()
    for batch in pq.ParquetFile(data.path / schema.EXAMPLES).iter_batches(4096, columns=_EXAMPLE_COLUMNS):
        cols = batch.to_pydict()
        for i in range(batch.num_rows):
            b = int(cols["feature"][i]) // batch_size
            if b < current:
                raise CacheError(
                    f"{data.path / schema.EXAMPLES} is not sorted by feature (docs/cache.md); rerun "
                    "`featuregeom harvest`"
                )
            if b != current and rows:
                yield current, [_activation(r, data, t, seed, qwidth) for r in _without_repeats(rows)]
                rows = []
            current = b
            rows.append({k: v[i] for k, v in cols.items()})
        if bar is not None:
            bar.update(batch.num_rows)
    if rows:
        yield current, [_activation(r, data, t, seed, qwidth) for r in _without_repeats(rows)]


def metadata_records(data: CacheData, t: Target, now: str) -> dict[str, dict[str, Any]]:
    """model.jsonl, sourceset.jsonl and source.jsonl: the rows the importer needs before the features
    (db_models/model.py, source_set.py, source.py). No release: it is optional to the importer."""
    m, sae, model = data.manifest, data.manifest.get("sae") or {}, data.manifest.get("model") or {}
    name = str(sae.get("model_name") or model.get("spec") or t.model_id)
    width = int(m.get("n_features") or data.n)
    corpus = m.get("corpus") or []
    harvest = (m.get("params") or {}).get("harvest") or {}
    return {
        "model.jsonl": {
            "id": t.model_id,
            "instruct": "instruct" in t.model_id or t.model_id.endswith("-it"),
            "creatorId": t.creator_id,
            "displayNameShort": t.model_id,
            "displayName": name,
            "tlensId": None,
            "dimension": model.get("d_model"),
            "visibility": "PUBLIC",
            "defaultSourceSetName": None,
            "defaultSourceId": None,
            "inferenceEnabled": False,
            "layers": int(model.get("n_layers") or 0),
            "neuronsPerLayer": 0,
            "createdAt": now,
            "owner": "",
            "updatedAt": now,
            "website": None,
        },
        "sourceset.jsonl": {
            "modelId": t.model_id,
            "name": t.source_set,
            "creatorId": t.creator_id,
            "hasDashboards": True,
            "visibility": "PUBLIC",
            "description": f"{sae.get('architecture') or 'SAE'} on {m.get('hook')}, {width} features",
            "type": "",
            "creatorName": "featuregeom",
            "urls": [],
            "creatorEmail": None,
            "releaseName": None,
            "defaultOfModelId": None,
            "defaultRange": 1,
            "defaultShowBreaks": True,
            "showDfa": False,
            "showCorrelated": False,
            "showHeadAttribution": False,
            "showUmap": False,
            "createdAt": now,
        },
        "source.jsonl": {
            "id": t.source_id,
            "modelId": t.model_id,
            "setName": t.source_set,
            "creatorId": t.creator_id,
            "hasDashboards": True,
            "inferenceEnabled": False,
            "inferenceHosts": [],
            "saelensConfig": None,
            "saelensRelease": None,
            "saelensSaeId": None,
            "hfRepoId": None,
            "hfFolderId": None,
            "visibility": "PUBLIC",
            "defaultOfModelId": None,
            "hasUmap": False,
            "hasUmapLogSparsity": False,
            "hasUmapClusters": False,
            "num_prompts": sum(int(c.get("documents") or 0) for c in corpus),
            "num_tokens_in_prompt": harvest.get("context_size"),
            # file names only: a user's local paths do not belong in a shared export
            "dataset": ", ".join(sorted({Path(str(c.get("path"))).name for c in corpus})),
            "notes": f"exported by featuregeom {__version__} (hook {m.get('hook')})",
            "createdAt": now,
        },
    }


# ------------------------------------------------------------------------------------------ writing
def _open_out(path: Path, gz: bool) -> IO[str]:
    """A text file to write; gzipped with no timestamp in the header (mtime 0), so the same cache
    exports the same bytes whenever it runs."""
    if not gz:
        return open(path, "w", encoding="utf-8")
    return io.TextIOWrapper(gzip.GzipFile(path, mode="wb", compresslevel=5, mtime=0), encoding="utf-8")


def _write_jsonl(path: Path, records: Iterable[dict[str, Any]], where: Path, gz: bool = True) -> int:
    """Records as JSON lines (gzip level 5, as export-data.py); a NaN or infinity is a CacheError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with _open_out(path, gz) as fh:
        for record in records:
            try:
                fh.write(json.dumps(record, allow_nan=False) + "\n")
            except ValueError as exc:
                raise CacheError(f"{where} holds a NaN or infinite value ({exc}); rebuild the cache") from exc
            n += 1
    return n


def write_export(
    out: Path, data: CacheData, t: Target, batch_size: int = BATCH_SIZE, progress: bool = False
) -> dict[str, int]:
    """Write the export into the (staging) directory `out`; returns the rows written per table."""
    from tqdm.auto import tqdm

    from precompute.cache import now_iso

    files = data.manifest.get("files") or {}
    seed = f"{files.get(schema.FEATURES)}:{files.get(schema.EXAMPLES)}"  # ids differ between caches
    src, now = out / t.model_id / t.source_id, now_iso()
    for name, record in metadata_records(data, t, now).items():
        _write_jsonl(src / name, [record], data.path / "manifest.json", gz=False)
    where = data.path / schema.FEATURES
    counts = {"features": 0, "activations": 0, "explanations": 0}
    with tqdm(total=data.n, desc="features", unit="feat", disable=not progress) as bar:
        for b, start in enumerate(range(0, data.n, batch_size)):
            stop = min(start + batch_size, data.n)
            rows = (feature_record(data, t, f) for f in range(start, stop))
            counts["features"] += _write_jsonl(src / "features" / f"batch-{b}.jsonl.gz", rows, where)
            bar.update(stop - start)
    import pyarrow.parquet as pq

    total = pq.ParquetFile(data.path / schema.EXAMPLES).metadata.num_rows
    with tqdm(total=total, desc="activations", unit="ex", disable=not progress) as bar:
        for b, rows_ in activation_batches(data, t, seed, batch_size, bar):
            path = src / "activations" / f"batch-{b}.jsonl.gz"
            counts["activations"] += _write_jsonl(path, rows_, data.path / schema.EXAMPLES)
    (src / "explanations").mkdir(parents=True, exist_ok=True)
    explanations = list(explanation_records(data, t, seed))
    for b, start in enumerate(range(0, len(explanations), batch_size)):
        path = src / "explanations" / f"batch-{b}.jsonl.gz"
        counts["explanations"] += _write_jsonl(path, explanations[start : start + batch_size], where)
    marker = {
        "format": "Neuronpedia export (neuronpedia-utils export-data.py layout)",
        "label_sources": label_sources(data),
        "tool_version": __version__,
        "created": now,
        "cache": str(data.path.resolve()),
        "modelId": t.model_id,
        "sourceId": t.source_id,
        "source_dir": f"{t.model_id}/{t.source_id}",
        **counts,
    }
    (out / MARKER).write_text(json.dumps(marker, indent=2), encoding="utf-8")
    return counts
