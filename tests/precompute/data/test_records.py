"""Reading corpus files: every format, skipped and counted records, hostile input (corrupt gzip, bad JSON/YAML)."""

from __future__ import annotations

import gzip
import json

import pandas as pd
import pytest
import yaml

from precompute.data.corpus import CorpusSource, read_source
from precompute.errors import CorpusError
from tests.precompute.data.helpers import BAD, read, texts


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
