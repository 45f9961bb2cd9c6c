"""The tiny model, loaded once per test module, and a short input for it."""

from __future__ import annotations

import pytest
import torch

from precompute.model.load import load_model


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def ids(lm):
    text = "How do I make a cake? Mix flour, sugar and eggs."
    return torch.tensor([lm.tokenizer(text)["input_ids"]])
