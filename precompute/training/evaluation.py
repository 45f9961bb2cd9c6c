"""How good a trained SAE is on held-out text: explained variance (with and without massive-norm
tokens), L0, dead latents, and the next-token cross-entropy and KL with the SAE's reconstruction
spliced in at the hook (against the clean model and against zero-ablating the hook)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from precompute.data.corpus import Context
from precompute.errors import FeatureGeomError
from precompute.model.activations import count_mask, pad_batch
from precompute.model.hooks import HookPoint, HookReader
from precompute.sae.base import SAE
from precompute.training.store import pad_id_of, skip_ids_of


@contextlib.contextmanager
def _hook_override(
    module: torch.nn.Module, hook: HookPoint, fn: Callable[[torch.Tensor], torch.Tensor | None]
) -> Iterator[None]:
    """Call `fn` on the hook's activations during a full forward pass; a tensor it returns replaces them."""
    if hook.read_input:

        def pre_hook(_m, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            new = fn(hidden)
            if new is None:
                return None
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:

        def post_hook(_m, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            new = fn(hidden)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        handle = module.register_forward_hook(post_hook)
    try:
        yield
    finally:
        handle.remove()


class VarianceStats:
    """Streaming sums for explained variance, 1 - sum||x - x_hat||^2 / sum||x - mean||^2 (float64)."""

    def __init__(self, d: int):
        self.n = 0
        self.sum_x = torch.zeros(d, dtype=torch.float64)
        self.sum_sq = 0.0
        self.sum_err = 0.0

    def add(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        if x.shape[0] == 0:
            return
        xd = x.double()
        self.n += x.shape[0]
        self.sum_x += xd.sum(dim=0).cpu()
        self.sum_sq += float(xd.pow(2).sum())
        self.sum_err += float((xd - x_hat.double()).pow(2).sum())

    @property
    def total_variance(self) -> float:
        return self.sum_sq - float((self.sum_x / max(self.n, 1)).pow(2).sum()) * self.n

    def explained_variance(self) -> float:
        return 1.0 - self.sum_err / self.total_variance if self.n > 1 else float("nan")


class _Capture:
    """Hook callback that keeps the activations and leaves them unchanged."""

    hidden: torch.Tensor

    def __call__(self, hidden: torch.Tensor) -> None:
        self.hidden = hidden


class _Splice:
    """Hook callback that replaces the activations at `mask` positions by `values`."""

    def __init__(self, mask: torch.Tensor, values: torch.Tensor):
        self.mask, self.values = mask, values

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        out = hidden.clone()
        out[self.mask] = self.values.to(hidden.dtype)
        return out


def _target_logprobs(logits: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Log-probabilities [n, vocab] at the positions whose next token is scored."""
    return torch.log_softmax(logits[:, :-1][target_mask].float(), dim=-1)


class _Quality:
    """Streaming reconstruction figures over counted positions: explained variance (all tokens, and
    without "massive activation" tokens), L0 and per-latent firing counts."""

    def __init__(self, sae: SAE, outlier_factor: float):
        self.sae, self.outlier_factor = sae, outlier_factor
        self.all, self.typical = VarianceStats(sae.d_in), VarianceStats(sae.d_in)
        self.threshold: float | None = None  # outlier norm, from the first batch's median
        self.n_tok = 0
        self.sum_l0 = 0.0
        self.counts = torch.zeros(sae.d_sae, dtype=torch.long)
        self.fast_topk = (
            sae.architecture == "topk"
            and sae.normalize_activations == "none"
            and not sae.rescale_acts_by_decoder_norm
        )

    def add(self, x: torch.Tensor) -> torch.Tensor:
        """Count the activations `x` [n, d_in]; return their reconstruction."""
        sae = self.sae
        if self.fast_topk:  # sparse path: no [N, d_sae] intermediate
            idx, vals = sae.encode_sparse(x)
            x_hat = F.embedding_bag(idx, sae.W_dec, per_sample_weights=vals, mode="sum") + sae.b_dec
            active = vals > 0
            fired = idx[active]
        else:
            acts = sae.encode(x)
            x_hat = sae.reconstruct(x)
            active = acts > 0
            fired = active.nonzero(as_tuple=True)[1]
        x_hat = x_hat.float()
        norms = x.norm(dim=1)
        if self.threshold is None and x.shape[0] > 0:
            self.threshold = self.outlier_factor * float(norms.median())
        typical = (
            norms <= self.threshold
            if self.threshold is not None
            else torch.ones_like(norms, dtype=torch.bool)
        )
        self.all.add(x, x_hat)
        self.typical.add(x[typical], x_hat[typical])
        self.n_tok += x.shape[0]
        self.sum_l0 += float(active.sum())
        self.counts.index_add_(0, fired.cpu(), torch.ones(fired.numel(), dtype=torch.long))
        return x_hat

    def figures(self) -> dict[str, Any]:
        n_tok, threshold, counts = self.n_tok, self.threshold, self.counts
        return {
            "tokens": n_tok,
            "explained_variance": self.all.explained_variance(),
            "explained_variance_no_outliers": self.typical.explained_variance(),
            "outlier_tokens": n_tok - self.typical.n,
            "outlier_norm_threshold": threshold,
            "outlier_variance_share": 1.0 - self.typical.total_variance / self.all.total_variance,
            "median_norm": threshold / self.outlier_factor if threshold else None,
            "mse_per_token": self.all.sum_err / n_tok,
            "l0": self.sum_l0 / n_tok,
            "dead_fraction": float((counts == 0).float().mean()),
            "dead_latents": int((counts == 0).sum()),
            "firing_counts": counts,
        }


class _CrossEntropy:
    """Next-token cross-entropy sums with the hook clean, spliced with the SAE reconstruction and
    zero-ablated, plus KL(clean || spliced); targets are the tokens after counted positions."""

    def __init__(self, model: torch.nn.Module, module: torch.nn.Module, hook: HookPoint):
        self.model, self.module, self.hook = model, module, hook
        self.sums = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
        self.kl_sum = 0.0
        self.n = 0

    def _logprobs(
        self,
        ids: torch.Tensor,
        attention: torch.Tensor,
        target_mask: torch.Tensor,
        fn: Callable[[torch.Tensor], torch.Tensor | None],
    ) -> torch.Tensor:
        with _hook_override(self.module, self.hook, fn):
            logits = self.model(input_ids=ids, attention_mask=attention, use_cache=False).logits
        return _target_logprobs(logits, target_mask)

    def add(self, ids: torch.Tensor, attention: torch.Tensor, mask: torch.Tensor, quality: _Quality) -> None:
        """Three forward passes over one batch; the clean pass's activations also go to `quality`."""
        # Targets: token t+1 predicted at a counted position t.
        target_mask = mask[:, :-1] & attention[:, 1:].bool()
        targets = ids[:, 1:][target_mask]
        capture = _Capture()
        lp_clean = self._logprobs(ids, attention, target_mask, capture)
        x_hat = quality.add(capture.hidden[mask].float())
        self.sums["clean"] += float(-lp_clean.gather(1, targets[:, None]).sum())
        lp = self._logprobs(ids, attention, target_mask, _Splice(mask, x_hat))
        self.sums["spliced"] += float(-lp.gather(1, targets[:, None]).sum())
        self.kl_sum += float((lp_clean.exp() * (lp_clean - lp)).sum())
        lp = self._logprobs(ids, attention, target_mask, _Splice(mask, torch.zeros_like(x_hat)))
        self.sums["zero"] += float(-lp.gather(1, targets[:, None]).sum())
        self.n += int(targets.numel())

    def figures(self) -> dict[str, Any]:
        clean, spliced, zero = (self.sums[key] / self.n for key in ("clean", "spliced", "zero"))
        return {
            "ce_tokens": self.n,
            "ce_clean": clean,
            "ce_spliced": spliced,
            "ce_zero_ablated": zero,
            "ce_increase": spliced - clean,
            "ce_recovered": (zero - spliced) / (zero - clean) if zero != clean else float("nan"),
            "kl_spliced": self.kl_sum / self.n,
        }


def _eval_batches(contexts: list[Context], batch_size: int) -> list[list[Context]]:
    """Long and short contexts interleaved in a fixed order, so a token cap samples all lengths."""
    order = sorted(contexts, key=lambda c: (-len(c.token_ids), c.context_id))
    rng = np.random.default_rng(1234)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


@torch.no_grad()
def evaluate(
    sae: SAE,
    model: torch.nn.Module,
    hook: HookPoint,
    contexts: list[Context],
    tokenizer: Any,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    max_tokens: int | None = None,
    ce_tokens: int = 20_000,
    progress: bool = False,
    outlier_factor: float = 10.0,
) -> dict[str, Any]:
    """Quality of `sae` (raw-activation space) on held-out contexts.

    * explained_variance = 1 - sum||x - x_hat||^2 / sum||x - mean(x)||^2 over counted positions;
    * explained_variance_no_outliers: the same without "massive activation" tokens (norm above
      `outlier_factor` x the median norm of the first batch). A handful of such tokens (e.g. a
      newline right after a window start in SmolLM2, norm ~100x the median) can hold most of the
      variance and, being easy to reconstruct, inflate the plain figure;
    * l0 = mean number of active latents; dead_fraction = share of latents that never fire;
    * on the first `ce_tokens` tokens: next-token cross-entropy with the clean model, with the hook
      activations replaced by the SAE reconstruction at counted positions ("spliced"), and with them
      zeroed; fraction of CE recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean).
    Returns the figures plus `firing_counts` (tensor [d_sae]) for the sparsity file.
    """
    device = torch.device(device)
    sae = sae.to(device)
    skip_ids, pad_id = skip_ids_of(tokenizer), pad_id_of(tokenizer)
    reader = HookReader(model, hook)
    quality = _Quality(sae, outlier_factor)
    ce = _CrossEntropy(model, dict(model.named_modules())[hook.module_path], hook)
    total = sum(len(c.token_ids) for c in contexts)
    if max_tokens is not None:
        total = min(total, max_tokens)
    bar = tqdm(total=total, desc="evaluate", unit="tok", unit_scale=True, disable=not progress)
    used = 0
    for batch in _eval_batches(contexts, batch_size):
        if max_tokens is not None and used >= max_tokens:
            break
        ids, attention = pad_batch([c.token_ids for c in batch], pad_id)
        mask = count_mask(ids, attention, skip_ids).to(device)
        ids, attention = ids.to(device), attention.to(device)
        if ce.n < ce_tokens:
            ce.add(ids, attention, mask, quality)
        else:
            quality.add(reader(ids, attention)[mask].float())
        tokens = int(attention.sum())
        used += tokens
        bar.update(tokens)
    bar.close()
    if quality.n_tok == 0:
        raise FeatureGeomError("the held-out set has no counted tokens to evaluate on")
    result = quality.figures()
    if ce.n:
        result.update(ce.figures())
    return result


def log10_sparsity(counts: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """SAELens' sparsity tensor: log10 of each latent's firing frequency (-10 for never)."""
    return torch.log10(counts.double() / max(n_tokens, 1) + 1e-10).float()
