"""Run options: defaults < TOML file < command-line flags."""

from __future__ import annotations

import pytest

from precompute.cli import build_parser
from precompute.data.corpus import CorpusSource
from precompute.errors import CorpusError, FeatureGeomError
from precompute.pipeline.config import RunConfig

TOML = """
model = "smollm2"
hook = "blocks.15.hook_resid_post"
out = "caches/demo"
context_size = 64
max_tokens = 5000
overwrite = true
null_fpr = 0.05

[[corpus]]
path = "data/task.jsonl"
group = "task"

[[corpus]]
path = "data/harmful.csv"
group = "harmful"
category_field = "category"
text_field = "prompt"
where = { label = "1" }
max_tokens = 800

[[corpus]]
path = "data/benign.txt"
group = "benign"
format = "user"
max_docs = 10
"""


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(TOML)
    return path


def test_defaults():
    cfg = RunConfig.load(None, {})
    assert (cfg.model, cfg.corpus, cfg.context_size, cfg.packing, cfg.batch_size, cfg.device, cfg.seed) == (
        None,
        [],
        128,
        "split",
        16,
        "auto",
        0,
    )
    assert cfg.progress is True and cfg.overwrite is False


def test_toml_file(config_file):
    cfg = RunConfig.load(config_file, {})
    assert (cfg.model, cfg.hook, cfg.out) == ("smollm2", "blocks.15.hook_resid_post", "caches/demo")
    assert (cfg.context_size, cfg.max_tokens, cfg.overwrite, cfg.null_fpr) == (64, 5000, True, 0.05)
    assert cfg.batch_size == 16  # default kept
    assert cfg.corpus == [
        CorpusSource(path="data/task.jsonl", group="task"),
        CorpusSource(
            path="data/harmful.csv",
            group="harmful",
            category_field="category",
            text_field="prompt",
            where={"label": "1"},
            max_tokens=800,
        ),
        CorpusSource(path="data/benign.txt", group="benign", format="user", max_docs=10),
    ]


def test_cli_overrides_beat_the_file(config_file):
    cfg = RunConfig.load(
        config_file,
        {
            "model": "other-model",
            "context_size": 32,
            "batch_size": None,
            "overwrite": None,
            "not_an_option": 5,
            "corpus": ["x.jsonl:harmful:@cat", "y.txt"],
        },
    )
    assert (cfg.model, cfg.context_size) == ("other-model", 32)
    assert cfg.batch_size == 16 and cfg.overwrite is True  # None means "flag not given"
    assert cfg.corpus == [
        CorpusSource(path="x.jsonl", group="harmful", category_field="cat"),
        CorpusSource(path="y.txt"),
    ]
    assert not hasattr(cfg, "not_an_option")


def test_empty_corpus_override_keeps_the_files_corpus(config_file):
    assert len(RunConfig.load(config_file, {"corpus": []}).corpus) == 3
    assert len(RunConfig.load(config_file, {"corpus": None}).corpus) == 3


def test_parsed_flags_override_the_file(config_file):
    args = build_parser().parse_args(
        [
            "precompute",
            "--config",
            str(config_file),
            "--context-size",
            "16",
            "--no-progress",
            "--corpus",
            "a.jsonl:task",
            "--corpus",
            "b.csv:benign",
        ]
    )
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "command", "steps")}
    cfg = RunConfig.load(args.config, overrides)
    assert (cfg.context_size, cfg.progress, cfg.model, cfg.overwrite) == (16, False, "smollm2", True)
    assert [(c.path, c.group) for c in cfg.corpus] == [("a.jsonl", "task"), ("b.csv", "benign")]


def test_unknown_keys(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('model = "m"\ncontext_sise = 64\nbatchsize = 2\n')
    with pytest.raises(
        FeatureGeomError, match=r"unknown option\(s\) in .*bad.toml: \['batchsize', 'context_sise'\]"
    ):
        RunConfig.load(path, {})


def test_unknown_corpus_key_and_bad_group(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[[corpus]]\npath = "a.jsonl"\ncolumn = "text"\n')
    with pytest.raises(CorpusError, match=r"unknown corpus option\(s\) \['column'\]"):
        RunConfig.load(path, {})
    path.write_text('[[corpus]]\npath = "a.jsonl"\ngroup = "evil"\n')
    with pytest.raises(CorpusError, match="unknown corpus group 'evil' for a.jsonl"):
        RunConfig.load(path, {})


def test_missing_and_invalid_file(tmp_path):
    with pytest.raises(FeatureGeomError, match="config file not found: .*nope.toml"):
        RunConfig.load(tmp_path / "nope.toml", {})
    path = tmp_path / "broken.toml"
    path.write_text("model = \n")
    with pytest.raises(FeatureGeomError, match="broken.toml is not valid TOML"):
        RunConfig.load(path, {})


def test_require_names_the_flags():
    cfg = RunConfig.load(None, {"model": "m"})
    cfg.require("model", step="harvest")
    with pytest.raises(FeatureGeomError) as err:
        cfg.require("model", "sae_format", "out", step="geometry")
    assert (
        str(err.value)
        == "`featuregeom geometry` needs --sae-format, --out (on the command line or in --config)"
    )


def test_to_dict_round_trips_through_toml_shaped_data(config_file):
    cfg = RunConfig.load(config_file, {})
    data = cfg.to_dict()
    assert data["corpus"][1] == {
        "path": "data/harmful.csv",
        "group": "harmful",
        "category_field": "category",
        "text_field": "prompt",
        "where": {"label": "1"},
        "max_tokens": 800,
    }
    assert data["context_size"] == 64 and data["model"] == "smollm2"
    rebuilt = RunConfig(**{**data, "corpus": [CorpusSource.from_dict(c) for c in data["corpus"]]})
    assert rebuilt == cfg
