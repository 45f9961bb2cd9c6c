"""Corpus sources and their documents: what a `--corpus` names, how a record becomes documents (text or
chat messages), and how documents are cut into fixed-size token contexts.

Every document keeps its group and category so they travel into the examples. Reading the files
themselves is `precompute.data.records`.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from precompute.data.records import ReadStats, has_surrogates, kind_of, read_records, shorten
from precompute.data.split import DEFAULT_SCORING_FRACTION, on_side
from precompute.errors import CorpusError

GROUPS = ("task", "control", "harmful", "benign", "general")
# Field names tried, in order, when a source names no text field.
TEXT_FIELDS = (
    "messages",
    "text",
    "prompt",
    "forbidden_prompt",
    "Behavior",
    "goal",
    "Goal",
    "instruction",
    "question",
    "turns",
    "paraphrases",
    "chosen",
    "content",
)
_HH_TURN = re.compile(r"\n\n(Human|Assistant):\s?")

log = logging.getLogger(__name__)


@dataclass
class CorpusSource:
    path: str
    group: str = "general"
    category: str | None = None  # fixed category for every document
    category_field: str | None = None  # or read it per record from this field/column
    text_field: str | None = None
    format: str = "auto"  # auto | text | user (wrap plain text as one user chat turn) | chat
    where: dict[str, str] = field(default_factory=dict)  # keep records whose field equals the value
    # Keep only the first user turn of chat documents: multi-turn dialogues (hh-rlhf) next to
    # single prompts would otherwise let "is a dialogue" pass for "is harmful".
    first_user_turn: bool = False
    max_docs: int | None = None
    max_tokens: int | None = None
    validation: bool = False  # held out of the harm fit to check it (precompute.pipeline.heldout)

    def __post_init__(self) -> None:
        if self.group not in GROUPS:
            raise CorpusError(
                f"unknown corpus group {self.group!r} for {self.path}; use one of {', '.join(GROUPS)}"
            )
        if self.format not in ("auto", "text", "user", "chat"):
            raise CorpusError(
                f"unknown corpus format {self.format!r} for {self.path}; use auto, text, user or chat"
            )

    @classmethod
    def parse(cls, spec: str) -> CorpusSource:
        """`PATH[:GROUP[:CATEGORY]]`; CATEGORY `@column` reads the category from that field."""
        parts = spec.split(":")
        # Allow Windows-style or odd paths by only splitting off known groups from the right.
        if len(parts) >= 3 and parts[-2] in GROUPS:
            path, group, category = ":".join(parts[:-2]), parts[-2], parts[-1]
        elif len(parts) >= 2 and parts[-1] in GROUPS:
            path, group, category = ":".join(parts[:-1]), parts[-1], None
        else:
            path, group, category = spec, "general", None
            # `data.csv:harmfull` is an existing file with a misspelt group: say so, not "file not found".
            if not Path(spec).expanduser().exists():
                for cut in (1, 2):
                    if len(parts) > cut and Path(":".join(parts[:-cut])).expanduser().is_file():
                        raise CorpusError(
                            f"unknown corpus group {parts[-cut]!r} in {spec!r}; use one of {', '.join(GROUPS)}"
                        )
        if category and category.startswith("@"):
            return cls(path=path, group=group, category_field=category[1:])
        return cls(path=path, group=group, category=category or None)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CorpusSource:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise CorpusError(f"unknown corpus option(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, {}, "auto") and v is not False}


@dataclass
class Document:
    doc_id: int
    source: int
    group: str
    category: str | None
    text: str | None = None
    messages: list[dict[str, str]] | None = None
    index: int = 0  # record index in its file

    def preview(self, n: int = 300) -> str:
        if self.messages:
            return " | ".join(f"{m['role']}: {m['content']}" for m in self.messages)[:n]
        return (self.text or "")[:n]


class MalformedRecord(ValueError):
    """A record that is valid JSON/CSV but cannot be a document (e.g. a chat turn without a role)."""


def _hh_to_messages(text: str) -> list[dict[str, str]] | None:
    parts = _HH_TURN.split(text)
    if len(parts) < 3:
        return None
    messages: list[dict[str, str]] = []
    for role, content in zip(parts[1::2], parts[2::2], strict=False):
        role = "user" if role == "Human" else "assistant"
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n" + content.strip()
        else:
            messages.append({"role": role, "content": content.strip()})
    return messages if messages and messages[0]["role"] == "user" else None


def _chat_turns(value: list[Any], name: str) -> list[dict[str, str]]:
    """Validated `{role, content}` turns; anything else makes the whole record malformed."""
    turns = []
    for i, turn in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(turn, dict):
            raise MalformedRecord(f"{where} is {kind_of(turn)}, not a {{role, content}} object")
        role = turn.get("role")
        if role is None:
            raise MalformedRecord(f"{where} has no role")
        if not isinstance(role, str) or not role.strip():
            raise MalformedRecord(f"{where}.role is {shorten(repr(role), 40)}, not a role name")
        turns.append({"role": role, "content": _turn_content(turn.get("content"), where)})
    return turns


def _turn_content(content: Any, where: str) -> str:
    """A turn's text: a string, nothing (null, as in tool-call turns), or a list of text parts (OpenAI)."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list) and all(
        isinstance(part, str) or (isinstance(part, dict) and isinstance(part.get("text"), str))
        for part in content
    ):
        # Joined without a separator, as the chat templates that accept parts render them.
        return "".join(part if isinstance(part, str) else part["text"] for part in content)
    found = "a list with a part that is not text" if isinstance(content, list) else kind_of(content)
    raise MalformedRecord(f"{where}.content is {found}, not a string or a list of text parts")


def to_documents(record: dict[str, Any], source: CorpusSource) -> list[tuple[str | None, list | None]]:
    docs = _to_documents_all_turns(record, source)
    if source.first_user_turn:
        docs = [(t, [m[0]] if m and m[0]["role"] == "user" else m) for t, m in docs]
    return docs


def _to_documents_all_turns(
    record: dict[str, Any], source: CorpusSource
) -> list[tuple[str | None, list | None]]:
    """One record -> list of (text, messages); a list of strings (paraphrases) gives several."""
    fields = [source.text_field] if source.text_field else [f for f in TEXT_FIELDS if f in record]
    if not fields or fields[0] not in record:
        return []
    name, value = fields[0], record[fields[0]]
    if name == "turns" and isinstance(value, list) and value:
        return [(None, [{"role": "user", "content": str(value[0])}])]
    if name == "messages" and not isinstance(value, list | str | None):
        raise MalformedRecord(f"messages is {kind_of(value)}, not a list of turns")
    # A `messages` list, or any list holding an object, is a chat: every element must be a turn.
    if isinstance(value, list) and (name == "messages" or any(isinstance(v, dict) for v in value)):
        messages = _chat_turns(value, name)
        if not messages:
            return []
        return (
            [(None, messages)]
            if source.format != "text"
            else [("\n".join(m["content"] for m in messages), None)]
        )
    values = value if isinstance(value, list) else [value]
    out: list[tuple[str | None, list | None]] = []
    for item in values:
        if item is None or (isinstance(item, float) and item != item):
            continue
        text = str(item)
        if not text.strip():
            continue
        if source.format in ("auto", "chat") and (hh := _hh_to_messages(text)) is not None:
            out.append((None, hh))
        elif source.format == "user":
            out.append((None, [{"role": "user", "content": text}]))
        else:
            out.append((text, None))
    return out


def _record_category(record: dict[str, Any], source: CorpusSource) -> str | None:
    """The source's fixed category, or the one read from the record's category field."""
    if not source.category_field:
        return source.category
    raw = record.get(source.category_field)
    if isinstance(raw, list):
        raw = raw[0] if raw else None
    return str(raw) if raw not in (None, "") else None


def _is_utf8(text: str | None, messages: list | None) -> bool:
    return not any(
        s is not None and has_surrogates(s) for s in [text] + [m["content"] for m in messages or []]
    )


def _record_documents(
    path: Path, source: CorpusSource, source_index: int, stats: ReadStats
) -> tuple[list[Document], bool]:
    """Every document of the file in record order (ids not yet given), and whether any record had the
    source's category field."""
    docs: list[Document] = []
    category_field_seen = False
    for index, record in enumerate(read_records(path, stats)):
        stats.records += 1
        category_field_seen = category_field_seen or source.category_field in record
        if any(str(record.get(k)) != str(v) for k, v in source.where.items()):  # TOML may give ints
            stats.skipped_filtered += 1
            continue
        category = _record_category(record, source)
        try:
            items = to_documents(record, source)
        except MalformedRecord as exc:
            stats.malformed(f"record {index}: {exc}")
            continue
        if not items:
            stats.skipped_empty += 1
        for text, messages in items:
            if _is_utf8(text, messages):
                docs.append(Document(0, source_index, source.group, category, text, messages, index))
            else:
                stats.skipped_non_utf8 += 1
    return docs, category_field_seen


def _check_read(path: Path, source: CorpusSource, docs: list[Document], stats: ReadStats, seen: bool) -> None:
    """Refuse a source that gave nothing usable; warn about what was skipped."""
    if source.category_field and stats.records and not seen:
        # A misspelt @column would otherwise leave every category empty without a word.
        raise CorpusError(
            f"no record of {path} has the category field {source.category_field!r} (@column in the corpus "
            "spec, or category_field); check the column name"
        )
    if not docs:
        first = f"; first malformed: {stats.first_malformed}" if stats.first_malformed else ""
        raise CorpusError(
            f"corpus source {path} (group {source.group!r}) yielded no documents "
            f"({stats.records} records, {stats.skipped_non_utf8} not UTF-8, {stats.skipped_malformed} malformed, "
            f"{stats.skipped_empty} without a text field, {stats.skipped_filtered} filtered out{first}); "
            f"check text_field (tried {source.text_field or ', '.join(TEXT_FIELDS)})"
        )
    if stats.skipped_non_utf8 or stats.skipped_malformed or stats.skipped_empty:
        log.warning("%s: %d documents read; skipped %s", path, stats.documents, stats.skipped_summary())


def read_source(
    source: CorpusSource,
    source_index: int,
    first_doc_id: int = 0,
    seed: int = 0,
    split: str = "all",
    scoring_fraction: float = DEFAULT_SCORING_FRACTION,
) -> tuple[list[Document], ReadStats]:
    """The documents of one source on one side of the document split (`precompute.data.split`),
    shuffled by `seed`, cut to `max_docs`, numbered from `first_doc_id`."""
    path = Path(source.path).expanduser()
    if path.is_dir():
        raise CorpusError(f"corpus path {path} is a directory; name a file inside it (one --corpus per file)")
    if not path.is_file():
        raise CorpusError(f"corpus file not found: {path}")
    stats = ReadStats()
    docs, category_field_seen = _record_documents(path, source, source_index, stats)
    if split != "all":
        kept = [d for d in docs if on_side(d, split, scoring_fraction)]
        stats.other_split = len(docs) - len(kept)
        if docs and not kept:
            raise CorpusError(
                f"corpus file {path} has no document on the {split!r} side of the document split "
                f"({len(docs)} on the other); use more documents, another --scoring-fraction or "
                "--document-split all"
            )
        docs = kept
    # A seeded shuffle so a token budget takes a random subset, not the first rows of a sorted file.
    random.Random(f"{seed}:{source.path}").shuffle(docs)
    if source.max_docs is not None:
        docs = docs[: source.max_docs]
    for offset, doc in enumerate(docs):
        doc.doc_id = first_doc_id + offset
    stats.documents = len(docs)
    _check_read(path, source, docs, stats, category_field_seen)
    return docs, stats


def chat_text(
    tokenizer: Any, messages: list[dict[str, str]], what: str, hint: str = "", **kwargs: Any
) -> str:
    """The model's chat template applied to `messages`; a template that rejects them (e.g. "roles must
    alternate user/assistant") is a CorpusError naming `what` (the record), not a jinja2 traceback."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except TemplateError as exc:
        raise CorpusError(
            f"the model's chat template rejects {what}: {exc}; fix or drop that record{hint}"
        ) from exc


def render(doc: Document, tokenizer: Any) -> list[int]:
    """Token ids of one document; chat messages go through the model's chat template."""
    if doc.messages is not None:
        if getattr(tokenizer, "chat_template", None):
            text = chat_text(
                tokenizer,
                doc.messages,
                f"record {doc.index} of corpus source {doc.source} (group {doc.group!r})",
                hint=", or read the source with format=text",
            )
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])
        text = "\n".join(f"{m['role']}: {m['content']}" for m in doc.messages)
        return list(tokenizer(text)["input_ids"])
    return list(tokenizer(doc.text)["input_ids"])


@dataclass
class Context:
    """One window of tokens. The per-token fields are int32 arrays (`Context.of` builds them): as Python
    lists they cost ~56 bytes a token for the whole run, against ~16 (tracemalloc of a plan; ~5 GB at 10^8
    tokens)."""

    context_id: int
    source: int
    token_ids: np.ndarray  # int32 [n]
    doc_ids: np.ndarray  # int32 [n]: the document of each token
    positions_in_doc: np.ndarray  # int32 [n]

    @classmethod
    def of(cls, context_id: int, source: int, tokens: Any, docs: Any, positions: Any) -> Context:
        """A context from any sequences of ints (lists while it is being cut)."""
        return cls(
            context_id,
            source,
            np.asarray(tokens, dtype=np.int32),
            np.asarray(docs, dtype=np.int32),
            np.asarray(positions, dtype=np.int32),
        )


def pack_contexts(
    docs: list[Document],
    tokenizer: Any,
    context_size: int,
    mode: str = "split",
    max_tokens: int | None = None,
    first_context_id: int = 0,
) -> Iterator[Context]:
    """Cut one source's documents into contexts of at most `context_size` tokens.

    split: each document alone, long ones cut into consecutive windows;
    truncate: only each document's first window;
    pack: documents concatenated (never across sources) into full windows.
    """
    if mode not in ("split", "truncate", "pack"):
        raise CorpusError(f"unknown packing mode {mode!r}; use split, truncate or pack")
    if context_size < 2:
        raise CorpusError("--context-size must be at least 2")
    budget = max_tokens if max_tokens is not None else float("inf")
    used = 0
    cid = first_context_id
    buf_tok: list[int] = []
    buf_doc: list[int] = []
    buf_pos: list[int] = []
    source = docs[0].source if docs else 0
    for doc in docs:
        if used >= budget:
            break
        ids = render(doc, tokenizer)
        if not ids:
            continue
        windows = range(0, len(ids), context_size) if mode != "truncate" else range(0, 1)
        if mode == "pack":
            for pos, tok in enumerate(ids):
                buf_tok.append(tok)
                buf_doc.append(doc.doc_id)
                buf_pos.append(pos)
                if len(buf_tok) == context_size:
                    take = int(min(context_size, budget - used))
                    yield Context.of(cid, source, buf_tok[:take], buf_doc[:take], buf_pos[:take])
                    cid += 1
                    used += take
                    buf_tok, buf_doc, buf_pos = [], [], []
                    if used >= budget:
                        return
            continue
        for start in windows:
            window = ids[start : start + context_size]
            if len(window) < 2:  # a lone token (short document or tail) has no counted position; skip it
                continue
            take = int(min(len(window), budget - used))
            if take <= 1:  # the budget is spent
                return
            yield Context.of(cid, source, window[:take], [doc.doc_id] * take, range(start, start + take))
            cid += 1
            used += take
            if used >= budget:
                return
    if mode == "pack" and len(buf_tok) > 1 and used < budget:
        take = int(min(len(buf_tok), budget - used))
        yield Context.of(cid, source, buf_tok[:take], buf_doc[:take], buf_pos[:take])
