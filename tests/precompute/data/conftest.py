"""The tiny model's tokenizer, for the corpus tests that render chat templates."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The tiny model's tokenizer alone (building the model too would cost seconds)."""
    from transformers import AutoTokenizer

    from tests.tiny import make_tokenizer

    directory = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer(directory)
    return AutoTokenizer.from_pretrained(directory)
