"""Shared by the corpus tests: a hand-checkable tokenizer, a one-call reader and small builders."""

from __future__ import annotations

from precompute.data.corpus import CorpusSource, Document, read_source

BAD = b"caf\xe9 \xff\xfe broken"  # Latin-1 bytes: not valid UTF-8


class WordTokenizer:
    """Whitespace 'tokenizer' whose token ids are the integers written in the text: hand-checkable."""

    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(w) for w in text.split()]}


def read(path, **kw):
    return read_source(CorpusSource(path=str(path), **kw), 0)


def texts(docs):
    return sorted(d.text for d in docs)


def doc(doc_id, text, source=0):
    return Document(doc_id, source, "general", None, text=text)


def windows(contexts):
    return [(c.token_ids.tolist(), c.doc_ids.tolist(), c.positions_in_doc.tolist()) for c in contexts]
