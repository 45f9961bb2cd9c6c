"""The precompute job's steps, in the order they run: harvest → geometry → scores → overlaps →
closeness → stability → labels.

Each step reads what earlier steps left in the cache, writes its own files plus a
`params/<step>.json` sidecar, and can run alone on an existing cache (latent-scope style). A step's
module holds `run(ctx, staged)`; it is imported when the step runs, so listing the steps (the
command line does) stays cheap.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from precompute.cache import StagedCache
    from precompute.pipeline.context import RunContext

# What a step can read besides the cache (`RunContext` loads each on first use).
MODEL, SAE, CORPUS = "model", "sae", "corpus"


@dataclass(frozen=True)
class Step:
    name: str
    module: str  # the module holding `run(ctx, staged)`
    needs: tuple[str, ...] = ()  # inputs it cannot run without
    uses: tuple[str, ...] = ()  # inputs it uses when the run has them (the scores' logit lens)
    starts_cache: bool = False  # reads nothing of the cache, so it may start a new one on its own

    def run(self, ctx: RunContext, staged: StagedCache) -> None:
        importlib.import_module(self.module).run(ctx, staged)


STEPS: dict[str, Step] = {
    step.name: step
    for step in (
        Step("harvest", "precompute.pipeline.harvest", needs=(MODEL, SAE, CORPUS)),
        Step("geometry", "precompute.pipeline.geometry", needs=(SAE,), starts_cache=True),
        Step("scores", "precompute.pipeline.scores", uses=(MODEL, SAE)),
        Step("overlaps", "precompute.pipeline.overlaps"),
        Step("closeness", "precompute.pipeline.closeness", needs=(SAE,)),
        Step("stability", "precompute.pipeline.stability", needs=(SAE,)),
        Step("labels", "precompute.pipeline.labels"),
    )
}
