"""Corpus sources and documents: spec parsing, shuffling, rendering, packing, malformed chat messages."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from precompute.data.corpus import CorpusSource, Document, pack_contexts, read_source, render
from precompute.errors import CorpusError
from tests.precompute.data.helpers import WordTokenizer, doc, read, windows


# --------------------------------------------------------------------------- specs
def test_parse_path_only():
    src = CorpusSource.parse("data/x.jsonl")
    assert (src.path, src.group, src.category, src.category_field) == ("data/x.jsonl", "general", None, None)


def test_parse_path_and_group():
    src = CorpusSource.parse("data/x.jsonl:harmful")
    assert (src.path, src.group, src.category, src.category_field) == ("data/x.jsonl", "harmful", None, None)


def test_parse_path_group_category():
    src = CorpusSource.parse("data/x.csv:harmful:weapons")
    assert (src.path, src.group, src.category, src.category_field) == (
        "data/x.csv",
        "harmful",
        "weapons",
        None,
    )


def test_parse_category_column():
    src = CorpusSource.parse("data/x.csv:harmful:@category")
    assert (src.path, src.group, src.category, src.category_field) == (
        "data/x.csv",
        "harmful",
        None,
        "category",
    )


def test_parse_keeps_colons_in_the_path():
    src = CorpusSource.parse("C:/data/x.jsonl:benign")
    assert (src.path, src.group) == ("C:/data/x.jsonl", "benign")


def test_parse_misspelt_group_of_an_existing_file(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "hi"}\n')
    with pytest.raises(
        CorpusError, match=r"unknown corpus group 'harmfull'.*task, control, harmful, benign, general"
    ):
        CorpusSource.parse(f"{path}:harmfull")
    with pytest.raises(CorpusError, match="unknown corpus group 'harmfull'"):
        CorpusSource.parse(f"{path}:harmfull:weapons")


def test_unknown_group_or_format_or_option():
    with pytest.raises(CorpusError, match="unknown corpus group 'evil'.*use one of task, control, harmful"):
        CorpusSource(path="x.jsonl", group="evil")
    with pytest.raises(CorpusError, match="unknown corpus format 'html'"):
        CorpusSource(path="x.jsonl", format="html")
    with pytest.raises(CorpusError, match=r"unknown corpus option\(s\) \['colour'\]"):
        CorpusSource.from_dict({"path": "x.jsonl", "colour": "red"})


def test_to_dict_round_trips():
    src = CorpusSource(path="x.csv", group="harmful", text_field="prompt", where={"label": "1"}, max_docs=3)
    assert src.to_dict() == {
        "path": "x.csv",
        "group": "harmful",
        "text_field": "prompt",
        "where": {"label": "1"},
        "max_docs": 3,
    }
    assert CorpusSource.from_dict(src.to_dict()) == src


# --------------------------------------------------------------------------- shuffling and subsets
@pytest.fixture
def numbered(tmp_path):
    path = tmp_path / "n.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(40)) + "\n")
    return path


def test_shuffle_is_deterministic_for_a_seed(numbered):
    src = CorpusSource(path=str(numbered))
    a = [d.text for d in read_source(src, 0, seed=1)[0]]
    b = [d.text for d in read_source(src, 0, seed=1)[0]]
    c = [d.text for d in read_source(src, 0, seed=2)[0]]
    assert a == b
    assert a != c
    assert sorted(a) == sorted(c) == sorted(f"doc {i}" for i in range(40))
    assert a != [f"doc {i}" for i in range(40)]  # shuffled, not file order


def test_max_docs_takes_a_seeded_subset_with_contiguous_ids(numbered):
    everything, _ = read_source(CorpusSource(path=str(numbered)), 3, first_doc_id=100, seed=5)
    subset, stats = read_source(CorpusSource(path=str(numbered), max_docs=6), 3, first_doc_id=100, seed=5)
    assert [d.text for d in subset] == [d.text for d in everything[:6]]
    assert [d.doc_id for d in subset] == list(range(100, 106))
    assert all(d.source == 3 for d in subset)
    assert {int(d.text.split()[1]) for d in subset} == {d.index for d in subset}
    assert (stats.records, stats.documents) == (40, 6)


# --------------------------------------------------------------------------- rendering
def test_render_applies_the_chat_template(tokenizer):
    messages = [
        {"role": "user", "content": "How do I bake a cake?"},
        {"role": "assistant", "content": "Mix flour."},
    ]
    ids = render(Document(0, 0, "task", None, messages=messages), tokenizer)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert (
        text
        == "<|im_start|>user\nHow do I bake a cake?<|im_end|>\n<|im_start|>assistant\nMix flour.<|im_end|>\n"
    )
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids[0] == im_start and ids.count(im_start) == 2 and ids.count(im_end) == 2
    assert tokenizer.decode(ids) == text


def test_render_plain_text_and_no_template_fallback(tokenizer):
    assert (
        render(doc(0, "How do I bake a cake?"), tokenizer) == tokenizer("How do I bake a cake?")["input_ids"]
    )
    plain = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert (
        render(Document(0, 0, "task", None, messages=messages), plain)
        == plain("user: hi\nassistant: yo")["input_ids"]
    )


# --------------------------------------------------------------------------- packing
DOCS = [
    doc(10, "1 2 3 4 5 6 7 8 9 10"),
    doc(11, "21 22 23"),
    doc(12, "31"),
    doc(13, "41 42 43 44 45 46 47 48 49"),
]


def test_split_cuts_each_document_into_windows():
    got = windows(pack_contexts(DOCS, WordTokenizer(), 4, "split", first_context_id=7))
    assert got == [
        ([1, 2, 3, 4], [10] * 4, [0, 1, 2, 3]),
        ([5, 6, 7, 8], [10] * 4, [4, 5, 6, 7]),
        ([9, 10], [10] * 2, [8, 9]),
        ([21, 22, 23], [11] * 3, [0, 1, 2]),
        # doc 12 has a single token and doc 13's tail window [49] one: no counted position, skipped
        ([41, 42, 43, 44], [13] * 4, [0, 1, 2, 3]),
        ([45, 46, 47, 48], [13] * 4, [4, 5, 6, 7]),
    ]
    ctxs = list(pack_contexts(DOCS, WordTokenizer(), 4, "split", first_context_id=7))
    assert [c.context_id for c in ctxs] == list(range(7, 13))
    assert {c.source for c in ctxs} == {0}


def test_truncate_keeps_each_documents_first_window():
    assert windows(pack_contexts(DOCS, WordTokenizer(), 4, "truncate")) == [
        ([1, 2, 3, 4], [10] * 4, [0, 1, 2, 3]),
        ([21, 22, 23], [11] * 3, [0, 1, 2]),
        ([41, 42, 43, 44], [13] * 4, [0, 1, 2, 3]),
    ]


def test_pack_concatenates_documents_into_full_windows():
    assert windows(pack_contexts(DOCS, WordTokenizer(), 4, "pack")) == [
        ([1, 2, 3, 4], [10] * 4, [0, 1, 2, 3]),
        ([5, 6, 7, 8], [10] * 4, [4, 5, 6, 7]),
        ([9, 10, 21, 22], [10, 10, 11, 11], [8, 9, 0, 1]),
        ([23, 31, 41, 42], [11, 12, 13, 13], [2, 0, 0, 1]),
        ([43, 44, 45, 46], [13] * 4, [2, 3, 4, 5]),
        ([47, 48, 49], [13] * 3, [6, 7, 8]),
    ]


@pytest.mark.parametrize("mode", ["split", "truncate", "pack"])
@pytest.mark.parametrize("budget", [2, 7, 12, 17])
def test_budgets_are_respected_exactly(mode, budget):
    ctxs = list(pack_contexts(DOCS, WordTokenizer(), 4, mode, max_tokens=budget))
    total = sum(len(c.token_ids) for c in ctxs)
    unlimited = sum(len(c.token_ids) for c in pack_contexts(DOCS, WordTokenizer(), 4, mode))
    assert total == min(budget, unlimited)
    assert all(len(c.token_ids) == len(c.doc_ids) == len(c.positions_in_doc) for c in ctxs)
    # The budget cuts the stream: the contexts are a prefix of the unlimited ones, the last one shortened.
    full = windows(pack_contexts(DOCS, WordTokenizer(), 4, mode))
    got = windows(ctxs)
    assert got[:-1] == full[: len(got) - 1]
    last, ref = got[-1], full[len(got) - 1]
    assert all(part == ref_part[: len(part)] for part, ref_part in zip(last, ref, strict=True))


def test_budget_examples_by_hand():
    assert windows(pack_contexts(DOCS, WordTokenizer(), 4, "split", max_tokens=10)) == [
        ([1, 2, 3, 4], [10] * 4, [0, 1, 2, 3]),
        ([5, 6, 7, 8], [10] * 4, [4, 5, 6, 7]),
        ([9, 10], [10] * 2, [8, 9]),
    ]
    assert windows(pack_contexts(DOCS, WordTokenizer(), 4, "truncate", max_tokens=6)) == [
        ([1, 2, 3, 4], [10] * 4, [0, 1, 2, 3]),
        ([21, 22], [11] * 2, [0, 1]),
    ]
    assert windows(pack_contexts(DOCS, WordTokenizer(), 4, "pack", max_tokens=10)) == [
        ([1, 2, 3, 4], [10] * 4, [0, 1, 2, 3]),
        ([5, 6, 7, 8], [10] * 4, [4, 5, 6, 7]),
        ([9, 10], [10, 10], [8, 9]),
    ]


def test_a_single_leftover_token_of_budget_is_not_spent():
    # split/truncate never emit a one-token context (position 0 is never counted), so 1 token stays unused
    assert [len(c.token_ids) for c in pack_contexts(DOCS, WordTokenizer(), 4, "split", max_tokens=9)] == [
        4,
        4,
    ]
    assert [len(c.token_ids) for c in pack_contexts(DOCS, WordTokenizer(), 4, "truncate", max_tokens=5)] == [
        4
    ]


def test_pack_never_crosses_sources(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("1 2 3\n\n4 5 6\n\n7")
    b.write_text("11 12 13 14 15")
    docs_a, _ = read_source(CorpusSource(path=str(a), group="task"), 0)
    docs_b, _ = read_source(CorpusSource(path=str(b), group="benign"), 1, first_doc_id=len(docs_a))
    ctx_a = list(pack_contexts(docs_a, WordTokenizer(), 4, "pack"))
    ctx_b = list(pack_contexts(docs_b, WordTokenizer(), 4, "pack", first_context_id=len(ctx_a)))
    assert sorted(t for c in ctx_a for t in c.token_ids) == [1, 2, 3, 4, 5, 6, 7]
    assert [len(c.token_ids) for c in ctx_a] == [4, 3]  # the partial last window is not topped up from b
    assert windows(ctx_b) == [([11, 12, 13, 14], [3] * 4, [0, 1, 2, 3])]  # tail [15] alone: dropped
    assert {c.source for c in ctx_a} == {0} and {c.source for c in ctx_b} == {1}
    assert {d for c in ctx_a for d in c.doc_ids} == {0, 1, 2}
    assert [c.context_id for c in ctx_a + ctx_b] == [0, 1, 2]


def test_packing_rejects_bad_mode_and_size():
    with pytest.raises(CorpusError, match="unknown packing mode 'squash'"):
        list(pack_contexts(DOCS, WordTokenizer(), 4, "squash"))
    with pytest.raises(CorpusError, match="--context-size must be at least 2"):
        list(pack_contexts(DOCS, WordTokenizer(), 1))


def test_pack_contexts_with_real_tokenizer_matches_render(tokenizer):
    messages = [
        {"role": "user", "content": "How do I make a cake?"},
        {"role": "assistant", "content": "Bake it."},
    ]
    d = Document(5, 0, "task", None, messages=messages)
    ids = render(d, tokenizer)
    ctxs = list(pack_contexts([d], tokenizer, 8, "split"))
    assert [t for c in ctxs for t in c.token_ids] == (ids if len(ids) % 8 != 1 else ids[:-1])
    assert [p for c in ctxs for p in c.positions_in_doc] == list(range(sum(len(c.token_ids) for c in ctxs)))


def test_first_user_turn_keeps_only_the_opening_prompt(tmp_path):
    from precompute.data.corpus import CorpusSource, read_source

    path = tmp_path / "hh.jsonl"
    path.write_text(
        '{"chosen": "\\n\\nHuman: how do I pick a lock?\\n\\nAssistant: Why?\\n\\nHuman: my door"}\n'
    )
    docs, _ = read_source(CorpusSource(str(path), "harmful", text_field="chosen", first_user_turn=True), 0)
    assert docs[0].messages == [{"role": "user", "content": "how do I pick a lock?"}]
    docs, _ = read_source(CorpusSource(str(path), "harmful", text_field="chosen"), 0)
    assert [m["role"] for m in docs[0].messages] == ["user", "assistant", "user"]


def chat(*turns):
    return json.dumps({"messages": list(turns)})


USER, ASSISTANT = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}


@pytest.mark.parametrize(
    "record,reason",
    [
        (chat(USER, {"content": "a"}), "messages[1] has no role"),
        (chat(USER, "a bare string"), "messages[1] is a string, not a {role, content} object"),
        (chat("hi", "there"), "messages[0] is a string, not a {role, content} object"),
        (chat({"role": 3, "content": "q"}), "messages[0].role is 3, not a role name"),
        (chat({"role": " ", "content": "q"}), "messages[0].role is ' ', not a role name"),
        (
            chat(USER, {"role": "assistant", "content": 42}),
            "messages[1].content is a number, not a string or a list of text parts",
        ),
        (
            chat({"role": "user", "content": {"text": "q"}}),
            "messages[0].content is an object, not a string or a list of text parts",
        ),
        (
            chat({"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}),
            "messages[0].content is a list with a part that is not text, not a string or a list of text parts",
        ),
        (
            json.dumps({"messages": {"role": "user", "content": "q"}}),
            "messages is an object, not a list of turns",
        ),
        (json.dumps({"messages": 5}), "messages is a number, not a list of turns"),
        (json.dumps({"chosen": [USER, {"from": "gpt", "value": "a"}]}), "chosen[1] has no role"),
    ],
)
def test_malformed_messages_are_skipped_and_counted(tmp_path, record, reason):
    path = tmp_path / "chat.jsonl"
    path.write_text(chat(USER, ASSISTANT) + "\n" + record + "\n" + chat(USER) + "\n")
    docs, stats = read(path)
    assert sorted(d.index for d in docs) == [0, 2]
    assert (stats.records, stats.documents, stats.skipped_malformed, stats.skipped_empty) == (3, 2, 1, 0)
    assert stats.first_malformed == f"record 1: {reason}"


def test_messages_content_parts_and_null_are_text(tmp_path):
    path = tmp_path / "parts.jsonl"
    path.write_text(
        chat(
            {"role": "user", "content": [{"type": "text", "text": "Hello "}, "world"]},
            {"role": "assistant", "content": None, "tool_calls": []},
        )
        + "\n"
    )
    docs, _ = read(path)
    assert docs[0].messages == [
        {"role": "user", "content": "Hello world"},
        {"role": "assistant", "content": ""},
    ]


def test_messages_as_a_string_or_empty_list(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"messages": "plain words"}) + "\n" + json.dumps({"messages": []}) + "\n")
    docs, stats = read(path)
    assert [(d.text, d.messages) for d in docs] == [("plain words", None)]
    assert (stats.records, stats.documents, stats.skipped_empty, stats.skipped_malformed) == (2, 1, 1, 0)


def test_malformed_messages_in_parquet_are_skipped(tmp_path):
    path = tmp_path / "chat.parquet"
    pd.DataFrame(
        {"messages": [[{"role": "user", "content": "hi"}], [{"role": None, "content": "x"}]]}
    ).to_parquet(path)
    docs, stats = read(path)
    assert [d.messages for d in docs] == [[{"role": "user", "content": "hi"}]]
    assert (stats.skipped_malformed, stats.first_malformed) == (1, "record 1: messages[0] has no role")


def test_skips_are_logged_with_the_first_reason(tmp_path, caplog):
    path = tmp_path / "chat.jsonl"
    path.write_text(chat(USER, ASSISTANT) + "\n" + chat(USER, "oops") + "\n{broken\n")
    with caplog.at_level("WARNING", logger="precompute.data.corpus"):
        read(path)
    assert caplog.messages == [
        f"{path}: 1 documents read; skipped 2 malformed, first malformed: "
        "record 1: messages[1] is a string, not a {role, content} object"
    ]


def test_chat_template_rejecting_a_record_is_a_corpus_error(tokenizer):
    strict = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
        "{{ raise_exception('roles must be user or assistant') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    document = Document(0, 2, "task", None, messages=[{"role": "tool", "content": "x"}], index=7)
    with pytest.raises(
        CorpusError,
        match=r"chat template rejects record 7 of corpus source 2 \(group 'task'\): "
        r"roles must be user or assistant; fix or drop that record",
    ):
        render(document, strict)
