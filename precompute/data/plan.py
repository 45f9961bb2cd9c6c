"""Plan a corpus into token contexts: read every source, share the token budget, cut documents into
contexts and batch them deterministically.

Shared by `harvest` (SAE features per token) and `train-sae` (raw activations), so both see the
same tokens and the same batching.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from precompute.data.corpus import Context, CorpusSource, Document, pack_contexts, read_source
from precompute.data.records import ReadStats
from precompute.data.split import DEFAULT_SCORING_FRACTION
from precompute.errors import CorpusError


@dataclass
class CorpusPlan:
    sources: list[CorpusSource]
    documents: list[Document]
    contexts: list[Context]
    stats: list[ReadStats]
    tokens_per_source: list[int] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.contexts)

    def batches(self, batch_size: int) -> list[list[Context]]:
        """Deterministic batches; contexts sorted by length so padding stays small."""
        order = sorted(self.contexts, key=lambda c: (-len(c.token_ids), c.context_id))
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def plan_corpus(
    sources: list[CorpusSource],
    tokenizer,
    context_size: int = 128,
    packing: str = "split",
    max_tokens: int | None = None,
    seed: int = 0,
    document_split: str = "all",
    scoring_fraction: float = DEFAULT_SCORING_FRACTION,
) -> CorpusPlan:
    """Read every source and cut it into contexts; `max_tokens` is shared equally between sources
    that set no budget of their own, so no group is starved by the order of the sources."""
    if not sources:
        raise CorpusError("no corpus given: pass --corpus PATH[:GROUP[:CATEGORY]] at least once")
    documents: list[Document] = []
    contexts: list[Context] = []
    stats: list[ReadStats] = []
    per_source_tokens: list[int] = []
    unbudgeted = [s for s in sources if s.max_tokens is None]
    share = None
    if max_tokens is not None:
        fixed = sum(s.max_tokens or 0 for s in sources)
        share = max(0, max_tokens - fixed) // max(1, len(unbudgeted))
    for index, source in enumerate(sources):
        docs, st = read_source(
            source, index, len(documents), seed, split=document_split, scoring_fraction=scoring_fraction
        )
        budget = source.max_tokens if source.max_tokens is not None else share
        made = list(
            pack_contexts(docs, tokenizer, context_size, packing, budget, first_context_id=len(contexts))
        )
        if not made:
            raise CorpusError(
                f"corpus source {source.path} (group {source.group!r}) gave no tokens within the budget"
            )
        documents.extend(docs)
        contexts.extend(made)
        stats.append(st)
        per_source_tokens.append(sum(len(c.token_ids) for c in made))
    return CorpusPlan(sources, documents, contexts, stats, per_source_tokens)
