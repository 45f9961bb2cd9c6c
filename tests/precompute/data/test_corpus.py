"""Corpus sources: spec parsing, every file format, skipped records, shuffling, rendering and packing."""

from __future__ import annotations

import gzip
import json

import pandas as pd
import pytest
import yaml

from precompute.data.corpus import CorpusSource, Document, pack_contexts, read_source, render
from precompute.errors import CorpusError

BAD = b"caf\xe9 \xff\xfe broken"  # Latin-1 bytes: not valid UTF-8


class WordTokenizer:
    """Whitespace 'tokenizer' whose token ids are the integers written in the text: hand-checkable."""

    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(w) for w in text.split()]}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The tiny model's tokenizer alone (building the model too would cost seconds)."""
    from transformers import AutoTokenizer

    from tests.tiny import make_tokenizer

    directory = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer(directory)
    return AutoTokenizer.from_pretrained(directory)


def read(path, **kw):
    return read_source(CorpusSource(path=str(path), **kw), 0)


def texts(docs):
    return sorted(d.text for d in docs)


def doc(doc_id, text, source=0):
    return Document(doc_id, source, "general", None, text=text)


def windows(contexts):
    return [(c.token_ids, c.doc_ids, c.positions_in_doc) for c in contexts]


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


# --------------------------------------------------------------------------- formats
def test_jsonl_messages(tmp_path):
    path = tmp_path / "chat.jsonl"
    records = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(3)
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    docs, stats = read(path, group="task")
    assert sorted(d.messages[0]["content"] for d in docs) == ["q0", "q1", "q2"]
    by_index = {d.index: d for d in docs}
    assert by_index[1].messages == [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]
    assert all(d.text is None and d.group == "task" and d.source == 0 for d in docs)
    assert (stats.records, stats.documents) == (3, 3)


def test_jsonl_messages_as_text(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    )
    docs, _ = read(path, format="text")
    assert (docs[0].text, docs[0].messages) == ("q\na", None)


def test_jsonl_text_field_and_named_field(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "alpha", "other": "x"}\n{"text": "beta", "other": "y"}\n{"other": "z"}\n')
    docs, stats = read(path)
    assert texts(docs) == ["alpha", "beta"]
    assert (stats.records, stats.documents, stats.skipped_empty) == (3, 2, 1)
    docs, _ = read(path, text_field="other")
    assert texts(docs) == ["x", "y", "z"]


def test_csv_named_column_and_where_filter(tmp_path):
    path = tmp_path / "h.csv"
    path.write_text('prompt,label,kind\n"rob, a bank",1,crime\ncook rice,0,food\n"build, a bomb",1,weapons\n')
    docs, stats = read(
        path, group="harmful", text_field="prompt", where={"label": "1"}, category_field="kind"
    )
    assert sorted((d.text, d.category) for d in docs) == [
        ("build, a bomb", "weapons"),
        ("rob, a bank", "crime"),
    ]
    assert (stats.records, stats.documents, stats.skipped_filtered) == (3, 2, 1)
    # A TOML config may give the value as an integer.
    docs, _ = read(path, text_field="prompt", where={"label": 0})
    assert texts(docs) == ["cook rice"]


def test_txt_paragraphs(tmp_path):
    path = tmp_path / "b.txt"
    path.write_text("first paragraph\nstill first\n\n  second  \n \n\n\nthird\n")
    docs, stats = read(path, group="benign", category="misc")
    assert texts(docs) == ["first paragraph\nstill first", "second", "third"]
    assert all(d.category == "misc" and d.group == "benign" for d in docs)
    assert stats.documents == 3


def test_json_list_of_strings_and_objects(tmp_path):
    path = tmp_path / "l.json"
    path.write_text(json.dumps(["one", {"prompt": "two"}, "three"]))
    docs, _ = read(path)
    assert texts(docs) == ["one", "three", "two"]
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": [{"text": "four"}]}))
    assert texts(read(path)[0]) == ["four"]


def test_yaml_list_valued_field_gives_several_documents(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        yaml.safe_dump([{"paraphrases": ["a1", "a2", "a3"], "cat": "x"}, {"paraphrases": ["b1"], "cat": "y"}])
    )
    docs, stats = read(path, category_field="cat")
    assert sorted((d.text, d.category, d.index) for d in docs) == [
        ("a1", "x", 0),
        ("a2", "x", 0),
        ("a3", "x", 0),
        ("b1", "y", 1),
    ]
    assert (stats.records, stats.documents) == (2, 4)


@pytest.mark.parametrize(
    "name,content",
    [
        ("t.jsonl.gz", b'{"text": "alpha"}\n{"text": "beta"}\n'),
        ("t.csv.gz", b"text\nalpha\nbeta\n"),
        ("t.txt.gz", b"alpha\n\nbeta\n"),
        ("t.json.gz", b'["alpha", "beta"]'),
        ("t.yaml.gz", b"- alpha\n- beta\n"),
    ],
)
def test_gzipped_files(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(gzip.compress(content))
    assert texts(read(path)[0]) == ["alpha", "beta"]


def test_parquet(tmp_path):
    path = tmp_path / "t.parquet"
    pd.DataFrame({"question": ["alpha", "beta", "gamma"], "topic": ["a", None, "c"]}).to_parquet(path)
    docs, _ = read(path, category_field="topic")
    assert sorted((d.text, d.category) for d in docs) == [("alpha", "a"), ("beta", None), ("gamma", "c")]


def test_parquet_list_columns_stay_lists(tmp_path):
    path = tmp_path / "chat.parquet"
    pd.DataFrame(
        {
            "messages": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]],
            "tags": [["crime", "x"]],
        }
    ).to_parquet(path)
    docs, _ = read(path, category_field="tags")
    assert (docs[0].text, docs[0].category) == (None, "crime")
    assert docs[0].messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    path = tmp_path / "para.parquet"
    pd.DataFrame({"paraphrases": [["p1", "p2"], ["p3"]]}).to_parquet(path)
    assert texts(read(path)[0]) == ["p1", "p2", "p3"]


def test_hh_rlhf_text_becomes_messages(tmp_path):
    path = tmp_path / "hh.jsonl"
    chosen = (
        "\n\nHuman: How do I pick a lock?\n\nAssistant: I can't help.\n\nHuman: Please?\n\nAssistant: No."
    )
    path.write_text(json.dumps({"chosen": chosen}) + "\n")
    docs, _ = read(path)
    assert docs[0].messages == [
        {"role": "user", "content": "How do I pick a lock?"},
        {"role": "assistant", "content": "I can't help."},
        {"role": "user", "content": "Please?"},
        {"role": "assistant", "content": "No."},
    ]
    assert docs[0].text is None
    # format="text" keeps it as plain text.
    docs, _ = read(path, format="text")
    assert (docs[0].text, docs[0].messages) == (chosen, None)


def test_format_user_wraps_text_as_a_user_turn(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("How do I bake bread?")
    docs, _ = read(path, format="user")
    assert (docs[0].text, docs[0].messages) == (None, [{"role": "user", "content": "How do I bake bread?"}])


def test_turns_field_takes_the_first_turn(tmp_path):
    path = tmp_path / "mt.jsonl"
    path.write_text(json.dumps({"turns": ["first question", "follow-up"]}) + "\n")
    assert read(path)[0][0].messages == [{"role": "user", "content": "first question"}]


def test_category_field_per_record(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"text": "a", "cat": "crime"},
                {"text": "b", "cat": ["weapons", "x"]},
                {"text": "c", "cat": ""},
                {"text": "d"},
            ]
        )
    )
    docs, _ = read(path, group="harmful", category_field="cat")
    assert sorted((d.text, d.category) for d in docs) == [
        ("a", "crime"),
        ("b", "weapons"),
        ("c", None),
        ("d", None),
    ]


# --------------------------------------------------------------------------- skipped records
def test_non_utf8_jsonl_line_is_skipped_and_counted(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"text": "good one"}\n{"text": "' + BAD + b'"}\n{"text": "good two"}\n')
    docs, stats = read(path)
    assert texts(docs) == ["good one", "good two"]
    assert (stats.records, stats.documents, stats.skipped_non_utf8, stats.skipped_malformed) == (2, 2, 1, 0)


def test_non_utf8_csv_row_is_skipped_and_counted(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b"text,cat\ngood one,a\n" + BAD + b",b\ngood two,c\n")
    docs, stats = read(path, category_field="cat")
    assert sorted((d.text, d.category) for d in docs) == [("good one", "a"), ("good two", "c")]
    assert (stats.documents, stats.skipped_non_utf8) == (2, 1)


def test_non_utf8_txt_paragraph_is_skipped_and_counted(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"good one\n\n" + BAD + b"\n\ngood two\n")
    docs, stats = read(path)
    assert texts(docs) == ["good one", "good two"]
    assert (stats.documents, stats.skipped_non_utf8) == (2, 1)


def test_malformed_json_lines_are_counted(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "ok"}\n{"text": broken\n[1, 2]\n\n{"text": "fine"}\n')
    docs, stats = read(path)
    assert texts(docs) == ["fine", "ok"]
    assert (stats.records, stats.documents, stats.skipped_malformed, stats.skipped_non_utf8) == (2, 2, 2, 0)


def test_file_without_documents_names_the_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text('{"title": "no text here"}\n{"broken\n')
    with pytest.raises(
        CorpusError,
        match=r"empty\.jsonl \(group 'benign'\) yielded no documents "
        r"\(1 records, 0 not UTF-8, 1 malformed, 1 without a text field",
    ):
        read(path, group="benign")
    path = tmp_path / "blank.txt"
    path.write_text("\n\n  \n")
    with pytest.raises(CorpusError, match=r"blank\.txt.*yielded no documents"):
        read(path)


def test_where_filter_removing_everything_says_so(tmp_path):
    path = tmp_path / "f.csv"
    path.write_text("text,label\na,0\nb,0\n")
    with pytest.raises(CorpusError, match="2 filtered out"):
        read(path, where={"label": "1"})


def test_missing_file_and_unsupported_extension(tmp_path):
    with pytest.raises(CorpusError, match="corpus file not found"):
        read(tmp_path / "nope.jsonl")
    path = tmp_path / "data.xlsx"
    path.write_bytes(b"PK")
    with pytest.raises(CorpusError, match=r"unsupported corpus file type 'data\.xlsx'.*\.jsonl, \.csv"):
        read(path)


def test_invalid_json_and_yaml_files(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("[1, 2")
    with pytest.raises(CorpusError, match="not valid UTF-8 JSON"):
        read(path)
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"- " + BAD)
    with pytest.raises(CorpusError, match="not valid UTF-8 YAML"):
        read(path)


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


# --------------------------------------------------------------------------- hostile input
GOOD_GZIP = gzip.compress(b'{"text": "alpha"}\n' * 40)
GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"


@pytest.mark.parametrize(
    "name,content,reason",
    [
        ("t.jsonl.gz", b"not gzip at all", r"Not a gzipped file"),
        ("t.jsonl.gz", GOOD_GZIP[:-12], r"ended before the end-of-stream marker"),  # truncated: EOFError
        ("t.jsonl.gz", GZIP_HEADER + b"\xff\xff\xff\xff" + b"\x00" * 8, r"invalid block type"),  # zlib.error
        (
            "t.csv.gz",
            GOOD_GZIP[:10] + b"\x00" * 10 + GOOD_GZIP[20:],
            r"invalid stored block lengths",
        ),  # zlib.error
    ],
)
def test_corrupt_gzip(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(
        CorpusError,
        match=rf"t\.(jsonl|csv)\.gz is not a valid gzip file \(.*({reason}).*\); "
        r"re-download or re-compress it",
    ):
        read(path)


@pytest.mark.parametrize(
    "name,content,kind,shown",
    [
        ("n.json", b"42", "JSON", "a number (42)"),
        ("s.json", b'"hello"', "JSON", "a string ('hello')"),
        ("b.json", b"true", "JSON", "a boolean (True)"),
        ("n.yaml", b"42\n", "YAML", "a number (42)"),
        ("s.yml", b"just a sentence\n", "YAML", "a string ('just a sentence')"),
    ],
)
def test_json_or_yaml_top_level_scalar_is_a_clear_error(tmp_path, name, content, kind, shown):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CorpusError) as err:
        read(path)
    assert str(err.value) == (
        f"the top level of {path} is {shown}; a {kind} corpus must hold a list of records (objects or strings) "
        "or an object (one record, or a `data` list of records)"
    )


def test_json_and_yaml_objects_are_one_record_unless_data_is_a_list(tmp_path):
    path = tmp_path / "one.yaml"
    path.write_text("text: a single record\nsource: x\n")  # once iterated as its keys: two bogus documents
    docs, stats = read(path)
    assert (texts(docs), stats.records) == (["a single record"], 1)
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"data": "not a list", "prompt": "use me"}))
    docs, stats = read(path)
    assert (texts(docs), stats.records) == (["use me"], 1)


def test_json_and_yaml_nested_too_deeply(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000)
    with pytest.raises(CorpusError, match=r"deep\.json is not valid UTF-8 JSON \(nested too deeply\)"):
        read(path)
    path = tmp_path / "deep.yaml"
    path.write_text("[" * 10_000)
    with pytest.raises(CorpusError, match=r"deep\.yaml is not valid UTF-8 YAML \(nested too deeply\)"):
        read(path)


def test_csv_field_over_128_kib_is_read_whole(tmp_path):
    long_text = "word " * 60_000  # 300 KB, over Python's default 131072-character field limit
    path = tmp_path / "long.csv"
    path.write_text(f'text,cat\n"{long_text}",a\nshort,b\n')
    docs, stats = read(path, category_field="cat")
    assert sorted((d.category, d.text) for d in docs) == [("a", long_text), ("b", "short")]
    assert (stats.records, stats.documents, stats.skipped_malformed) == (2, 2, 0)


def test_csv_without_the_named_category_column(tmp_path):
    path = tmp_path / "h.csv"
    path.write_text("prompt,kind\nrob a bank,crime\n")
    with pytest.raises(CorpusError) as err:
        read_source(CorpusSource.parse(f"{path}:harmful:@category"), 0)
    assert str(err.value) == (
        f"no record of {path} has the category field 'category' (@column in the corpus spec, "
        "or category_field); check the column name"
    )


def test_jsonl_lines_that_are_not_objects_or_not_json_are_counted(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(
        '[1, 2]\n7\n"a string"\nnull\n' + "[" * 50_000 + "\n" + "9" * 5000 + '\n{"text": "kept"}\n'
    )
    docs, stats = read(path)
    assert texts(docs) == ["kept"]
    assert (stats.records, stats.documents, stats.skipped_malformed) == (1, 1, 6)
    assert stats.first_malformed == "line 1 is a list, not a JSON object"


def test_binary_garbage_named_jsonl(tmp_path):
    path = tmp_path / "garbage.jsonl"
    path.write_bytes(bytes(b for b in range(256) if b != ord("\n")) * 8 + b"\n\xff\xfe\x00\x01\n{not json\n")
    with pytest.raises(
        CorpusError,
        match=r"garbage\.jsonl \(group 'general'\) yielded no documents \(0 records, "
        r"2 not UTF-8, 1 malformed, 0 without a text field, 0 filtered out; "
        r"first malformed: line 3 is not valid JSON\)",
    ):
        read(path)


@pytest.mark.parametrize("name", ["e.jsonl", "e.csv", "e.txt", "e.yaml", "e.jsonl.gz"])
def test_empty_file_yields_no_documents(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(gzip.compress(b"") if name.endswith(".gz") else b"")
    with pytest.raises(CorpusError, match=rf"{name} \(group 'general'\) yielded no documents \(0 records,"):
        read(path)


@pytest.mark.parametrize(
    "name,message",
    [
        ("e.json", r"e\.json is not valid UTF-8 JSON \(Expecting value: line 1 column 1"),
        ("e.parquet", r"could not read parquet file .*e\.parquet"),
    ],
)
def test_empty_json_or_parquet_is_a_clear_error(tmp_path, name, message):
    path = tmp_path / name
    path.write_bytes(b"")
    with pytest.raises(CorpusError, match=message):
        read(path)


def test_parquet_that_is_not_parquet(tmp_path):
    path = tmp_path / "fake.parquet"
    path.write_text('{"text": "I am JSON"}\n')
    with pytest.raises(CorpusError, match=r"could not read parquet file .*fake\.parquet: .*magic bytes"):
        read(path)


def test_directory_as_corpus_path(tmp_path):
    folder = tmp_path / "data.jsonl"
    folder.mkdir()
    with pytest.raises(CorpusError) as err:
        read(folder)
    assert (
        str(err.value)
        == f"corpus path {folder} is a directory; name a file inside it (one --corpus per file)"
    )


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
