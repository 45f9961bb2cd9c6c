"""What one run of the pipeline reads, each loaded on first use and only once: the model, the SAE and
the corpus plan.

A step asks its `RunContext` for what it needs (`ctx.model`, `ctx.sae`, `ctx.plan`); the orchestration
(`precompute.pipeline.run`) decides which inputs a run has. When a step updates an existing cache,
`recorded` is that cache's manifest and a model or SAE other than the one it was built with is
refused as soon as it is loaded: one cache never mixes two.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from precompute.data.plan import CorpusPlan, plan_corpus
from precompute.errors import CacheError, FeatureGeomError
from precompute.model.load import LoadedModel, load_model
from precompute.pipeline.config import RunConfig
from precompute.pipeline.shards import plan_fingerprint
from precompute.sae.base import SAE
from precompute.sae.registry import load_sae_for_model


def log(msg: str) -> None:
    print(f"[featuregeom] {msg}", flush=True)


def work_dir_for(out: Path) -> Path:
    """Where the harvest writes its shards before they move into the cache (kept to resume a run)."""
    return out.with_name(out.name + ".work")


def model_identity(lm: LoadedModel, spec: str) -> str:
    model_id = lm.sha256 or spec
    if lm.info.get("adapter"):  # a fine-tuned model is another model: its cache must not mix with the base's
        model_id = f"{model_id}+adapter:{lm.info['adapter']['sha256']}"
    return model_id


def check_same_source(kind: str, given: str | None, recorded: str | None, out: Path) -> None:
    if given and recorded and given != recorded:
        raise CacheError(
            f"this --{kind} is not the {kind.upper() if kind == 'sae' else kind} the cache at {out} was built with "
            f"(sha256 {given[:12]}… vs {recorded[:12]}…); one cache never mixes two. Use the cache's own "
            f"--{kind} (see `featuregeom info {out}`), or write to another --out"
        )


def required(value: str | None, option: str) -> str:
    """An option the orchestration has already required (`RunConfig.require`)."""
    if not value:
        raise FeatureGeomError(f"--{option.replace('_', '-')} is needed here")
    return value


class RunContext:
    """One run's options and inputs. `with_model`: whether this run reads the model (a single step on
    a cache may run without it); the SAE is then checked against the model when it is loaded."""

    def __init__(
        self, cfg: RunConfig, out: Path, recorded: dict[str, Any] | None = None, with_model: bool = True
    ) -> None:
        self.cfg = cfg
        self.out = out
        self.recorded: dict[str, Any] = recorded or {}
        self.with_model = with_model
        self._model: LoadedModel | None = None
        self._sae: tuple[SAE, dict[str, Any]] | None = None
        self._plan: CorpusPlan | None = None
        self._fingerprint: str | None = None
        # under torchrun, on rank 0: each rank's harvest timings, for params/harvest.json
        self.rank_timings: list[dict[str, Any]] | None = None
        # ...and the aggregation the ranks made together, one feature range each: (key, result)
        self.aggregated: tuple[str, dict[str, Any]] | None = None
        # a cache that keeps no shards: the run's shard_source.RecomputedShards, shared by its steps
        self.recomputed: Any = None
        # ...and the scores' window maxima its harvest computed in its examples pass: (key, [Windowed])
        self.windowed_ahead: tuple[str, Any] | None = None

    @property
    def model(self) -> LoadedModel:
        if self._model is None:
            cfg = self.cfg
            lm = load_model(
                required(cfg.model, "model"), device=cfg.device, dtype=cfg.dtype, adapter=cfg.adapter
            )
            recorded = (self.recorded.get("identity") or {}).get("model")
            check_same_source("model", model_identity(lm, required(cfg.model, "model")), recorded, self.out)
            self._model = lm
        return self._model

    def _load_sae(self) -> tuple[SAE, dict[str, Any]]:
        if self._sae is None:
            lm = self.model if self.with_model else None
            sae, info = load_sae_for_model(
                required(self.cfg.sae, "sae"),
                self.cfg.sae_format,
                d_model=lm.d_model if lm else None,
                model_name=lm.name if lm else None,
            )
            check_same_source(
                "sae", info.get("sha256"), (self.recorded.get("sae") or {}).get("sha256"), self.out
            )
            self._sae = sae, info
        return self._sae

    @property
    def sae(self) -> SAE:
        return self._load_sae()[0]

    @property
    def sae_info(self) -> dict[str, Any]:
        """The SAE's description as the manifest records it (format, architecture, sha256...)."""
        return self._load_sae()[1]

    @property
    def model_id(self) -> str:
        """What identifies the model in a cache: its file's sha256 (or spec), plus any adapter's."""
        return model_identity(self.model, required(self.cfg.model, "model"))

    @property
    def hook(self) -> str:
        return required(self.cfg.hook, "hook")

    @property
    def plan(self) -> CorpusPlan:
        if self._plan is None:
            cfg = self.cfg
            self._plan = plan_corpus(
                cfg.corpus,
                self.model.tokenizer,
                cfg.context_size,
                cfg.packing,
                cfg.max_tokens,
                cfg.seed,
                document_split=cfg.document_split,
                scoring_fraction=cfg.scoring_fraction,
            )
        return self._plan

    @property
    def fingerprint(self) -> str:
        """Identity of the harvest: same fingerprint, same batches, so finished shards can be reused."""
        if self._fingerprint is None:
            cfg = self.cfg
            self._fingerprint = plan_fingerprint(
                self.plan,
                {
                    "model": self.model_id,
                    "sae": self.sae_info["sha256"],
                    "hook": cfg.hook,
                    "batch_size": cfg.batch_size,
                    "batches_per_shard": cfg.batches_per_shard,
                    "outlier_norm_factor": cfg.outlier_norm_factor,
                    # a resumed run must not mix shard encodings
                    "shard_values": cfg.shard_values,
                    "shard_compression": cfg.shard_compression,
                },
            )
        return self._fingerprint

    @property
    def work_dir(self) -> Path:
        return work_dir_for(self.out)
