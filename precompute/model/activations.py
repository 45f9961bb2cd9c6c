"""Stream hook activations of planned contexts, batch by batch: padding, the mask of positions that
count, and the attention-sink outlier filter.

Shared by `harvest` (SAE features per token) and `train-sae` (raw activations), so both see the
same masking of special positions and the same batching.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from precompute.data.corpus import Context
from precompute.model.hooks import HookReader


def pad_batch(
    sequences: Sequence[Sequence[int] | np.ndarray], pad_value: int, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, max_len] long tensor of the sequences padded with `pad_value`, and the attention mask (1 = token).

    Right padding keeps positions 0..L-1 as in an unpadded forward; `left=True` is for `generate`.
    """
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_value, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        cols = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, cols] = torch.as_tensor(seq, dtype=torch.long)
        attention[row, cols] = 1
    return ids, attention


@dataclass
class ActivationBatch:
    index: int
    contexts: list[Context]
    acts: torch.Tensor  # [N, d_model] float32, only counted positions
    context_id: np.ndarray  # [N] int32
    position: np.ndarray  # [N] int32 (position in context)
    token_id: np.ndarray  # [N] int32
    doc_id: np.ndarray  # [N] int32


def count_mask(
    input_ids: torch.Tensor, attention: torch.Tensor, skip_ids: set[int], exclude_first: bool = True
) -> torch.Tensor:
    """Positions whose activations count: real tokens, not special tokens, not position 0
    (the first position carries the attention-sink outlier norm in most models)."""
    mask = attention.bool().clone()
    if exclude_first:
        mask[:, 0] = False
    for sid in skip_ids:
        mask &= input_ids != sid
    return mask


def iter_activations(
    reader: HookReader,
    batches: list[list[Context]],
    pad_id: int,
    skip_ids: set[int],
    device: torch.device,
    start_batch: int = 0,
    exclude_first: bool = True,
    outlier_norm_factor: float | None = None,
) -> Iterator[ActivationBatch]:
    """Yield hook activations of counted positions, batch by batch.

    `outlier_norm_factor`: also drop positions whose activation norm exceeds this multiple of the
    batch median. A few tokens (e.g. the second position of a window that starts mid-document)
    reach ~100x the median norm in SmolLM2; they are attention-sink artefacts, not content, and
    would otherwise top the examples of dozens of features."""
    for index in range(start_batch, len(batches)):
        batch = batches[index]
        ids, attention = pad_batch([c.token_ids for c in batch], pad_id)
        doc = pad_batch([c.doc_ids for c in batch], 0)[0].to(torch.int32)
        hidden = reader(ids.to(device), attention.to(device))
        mask = count_mask(ids, attention, skip_ids, exclude_first)
        rows, cols = mask.nonzero(as_tuple=True)
        acts = hidden[rows.to(hidden.device), cols.to(hidden.device)].float()
        if outlier_norm_factor and len(acts):
            norms = acts.norm(dim=1)
            keep = (norms <= outlier_norm_factor * norms.median()).cpu()
            rows, cols, acts = rows[keep], cols[keep], acts[keep.to(acts.device)]
        cids = torch.tensor([c.context_id for c in batch], dtype=torch.int32)
        yield ActivationBatch(
            index=index,
            contexts=batch,
            acts=acts,
            context_id=cids[rows].numpy(),
            position=cols.to(torch.int32).numpy(),
            token_id=ids[rows, cols].to(torch.int32).numpy(),
            doc_id=doc[rows, cols].numpy(),
        )
