"""The logit lens against brute force, readable tokens, finding the unembedding and final norm."""

from __future__ import annotations

import pytest
import torch

from precompute.errors import ModelLoadError
from precompute.pipeline.logit_lens import logit_lens, logit_lens_values, model_unembedding, readable_token

# ----------------------------------------------------------------------------------- logit lens


class StubTokenizer:
    def __init__(self, vocab: list[str], raw: list[str] | None = None) -> None:
        self.vocab, self.raw = vocab, raw

    def decode(self, ids: list[int]) -> str:
        return "".join(self.vocab[i] for i in ids)

    def convert_ids_to_tokens(self, i: int) -> str:
        return self.raw[i] if self.raw else self.vocab[i]


def test_logit_lens_matches_brute_force() -> None:
    gen = torch.Generator().manual_seed(0)
    n, d, vocab, k = 37, 8, 50, 6
    dirs = torch.randn(n, d, generator=gen)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    unembed = torch.randn(vocab, d, generator=gen)
    norm_w = torch.rand(d, generator=gen) + 0.5
    tok = StubTokenizer([f"t{i}" for i in range(vocab)])
    for w in (norm_w, None):
        promoted, suppressed = logit_lens(dirs, unembed, w, tok, k=k, block=5)
        logits = (dirs * (w if w is not None else 1.0)).double() @ unembed.double().T
        top = torch.argsort(logits, dim=1, descending=True)[:, :k]
        bottom = torch.argsort(logits, dim=1)[:, :k]
        assert promoted == [[f"t{i}" for i in row] for row in top.tolist()]
        assert suppressed == [[f"t{i}" for i in row] for row in bottom.tolist()]
    # k larger than the vocabulary is capped; block larger than n is fine.
    p, s = logit_lens(dirs[:2], unembed[:4], None, tok, k=10, block=4096)
    assert [len(r) for r in p] == [4, 4] and sorted(p[0]) == sorted(s[0])


def test_logit_lens_values_are_the_logits_of_the_listed_tokens() -> None:
    gen = torch.Generator().manual_seed(1)
    n, d, vocab, k = 23, 8, 40, 5
    dirs = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1)
    unembed = torch.randn(vocab, d, generator=gen)
    norm_w = torch.rand(d, generator=gen) + 0.5
    tok = StubTokenizer([f"t{i}" for i in range(vocab)])
    lens = logit_lens_values(dirs, unembed, norm_w, tok, k=k, block=4)
    logits = (dirs * norm_w).double() @ unembed.double().T
    for f in range(n):
        top = torch.argsort(logits[f], descending=True)[:k].tolist()
        bottom = torch.argsort(logits[f])[:k].tolist()
        assert lens.promoted[f] == [f"t{i}" for i in top]
        assert lens.suppressed[f] == [f"t{i}" for i in bottom]
        assert lens.promoted_values[f] == pytest.approx(logits[f, top].tolist(), abs=1e-5)
        assert lens.suppressed_values[f] == pytest.approx(logits[f, bottom].tolist(), abs=1e-5)
        assert lens.promoted_values[f][0] > 0 > lens.suppressed_values[f][0]  # random: both signs exist
    empty = logit_lens_values(dirs, unembed, None, tok, k=0)
    assert empty.promoted_values == [[]] * n and empty.suppressed == [[]] * n


def test_readable_token_makes_whitespace_visible() -> None:
    tok = StubTokenizer([" hello", "\n", "\t x", "", "a\x00"])
    assert [readable_token(tok, i) for i in range(5)] == ["␣hello", "↵", "⇥␣x", "<3>", "a\\x00"]
    # SentencePiece: decode drops the word-initial space; the raw piece "▁the" gives it back.
    sp = StubTokenizer(["the", "", "of"], raw=["▁the", "<pad>", "of"])
    assert [readable_token(sp, i) for i in range(3)] == ["␣the", "<pad>", "of"]

    class NoRaw:
        def decode(self, ids: list[int]) -> str:
            return ""

    assert readable_token(NoRaw(), 7) == "<7>"


class _Head(torch.nn.Module):
    def __init__(self, vocab: int, d: int, norm: bool, model_type: str = "llama") -> None:
        super().__init__()
        self.lm_head = torch.nn.Linear(d, vocab, bias=False)
        self.model = torch.nn.Module()
        if norm:
            self.model.norm = torch.nn.LayerNorm(d)
            torch.nn.init.uniform_(self.model.norm.weight)
        self.config = type("Cfg", (), {"model_type": model_type})()

    def get_output_embeddings(self):
        return self.lm_head


def test_model_unembedding_finds_head_and_norm() -> None:
    m = _Head(11, 4, norm=True)
    unembed, w = model_unembedding(m)
    assert torch.equal(unembed, m.lm_head.weight) and torch.equal(w, m.model.norm.weight)
    gemma = _Head(11, 4, norm=True, model_type="gemma2")
    _, wg = model_unembedding(gemma)
    assert torch.allclose(wg, gemma.model.norm.weight + 1.0)
    assert model_unembedding(_Head(11, 4, norm=False))[1] is None

    class NoHead(torch.nn.Module):
        def get_output_embeddings(self):
            return None

    with pytest.raises(ModelLoadError, match="output embedding"):
        model_unembedding(NoHead())
