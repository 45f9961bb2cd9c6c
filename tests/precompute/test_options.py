"""The one options system: a dataclass field carries type, default, help, range and choices once;
flags and TOML keys are built from it, and every value is checked the same way from either source."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from precompute.errors import ConfigError
from precompute.options import add_options, load_options, option, options_dict, options_from_args


@dataclass
class Item:
    path: str
    group: str = "task"

    @classmethod
    def parse(cls, text: str) -> Item:
        path, _, group = text.partition(":")
        return cls(path, group or "task")

    @classmethod
    def from_dict(cls, table: dict) -> Item:
        return cls(**table)

    def to_dict(self) -> dict:
        return {"path": self.path, "group": self.group}


@dataclass
class Example:
    name: str | None = option(None, metavar="NAME", help="a name")
    steps: int = option(10, low=1, bounds="[)", help="how many steps")
    rate: float = option(0.5, low=0, high=1, bounds="()", help="a rate in (0, 1)")
    mode: str = option("fast", choices=("fast", "exact"), help="how to run")
    seed: int = option(0, low=0, help="a seed")
    progress: bool = option(True, help="hide progress bars")
    overwrite: bool = option(False, help="replace the output")
    items: list[Item] = option(default_factory=list, metavar="PATH[:GROUP]", help="inputs; repeatable")
    secret: int = option(3, cli=False, help="TOML only")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_options(parser, Example)
    return parser.parse_args(argv)


def test_flags_are_built_from_the_fields_with_each_default_written_once():
    parser = argparse.ArgumentParser()
    add_options(parser, Example)
    by_dest = {a.dest: a for a in parser._actions}
    assert by_dest["steps"].option_strings == ["--steps"] and by_dest["steps"].type is int
    assert by_dest["steps"].help == "how many steps (default 10)"
    assert by_dest["seed"].help == "a seed (default 0)"  # a falsy default is still shown
    assert by_dest["mode"].choices == ("fast", "exact")
    assert by_dest["progress"].option_strings == ["--no-progress"]  # on by default: the flag turns it off
    assert by_dest["overwrite"].option_strings == ["--overwrite"]
    assert by_dest["items"].option_strings == ["--items"]
    assert "secret" not in by_dest  # cli=False: TOML only
    assert "config" in by_dest  # every command takes --config
    assert all(a.default is None for a in parser._actions if a.dest not in ("help",))


def test_only_limits_the_flags():
    parser = argparse.ArgumentParser()
    add_options(parser, Example, only=("steps",))
    assert {a.dest for a in parser._actions} == {"help", "config", "steps"}


def test_precedence_default_then_file_then_flag(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('steps = 20\nmode = "exact"\nsecret = 7\n[[items]]\npath = "a"\ngroup = "harmful"\n')
    cfg = options_from_args(Example, parse(["--config", str(config), "--steps", "30"]))
    assert (cfg.steps, cfg.mode, cfg.secret, cfg.rate) == (30, "exact", 7, 0.5)
    assert cfg.items == [Item("a", "harmful")]
    cfg = options_from_args(Example, parse(["--config", str(config), "--items", "b:benign", "--no-progress"]))
    assert cfg.items == [Item("b", "benign")] and cfg.progress is False  # a list flag replaces the file's
    assert options_dict(cfg)["items"] == [{"path": "b", "group": "benign"}]


def test_extends_reads_the_base_then_the_file_key_by_key(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "b.toml").write_text(
        'steps = 20\nmode = "exact"\nseed = 4\n[[items]]\npath = "a"\n[[items]]\npath = "b"\n'
    )
    (tmp_path / "mid.toml").write_text('extends = "base/b.toml"\nseed = 5\nname = "mid"\n')
    (tmp_path / "top.toml").write_text(
        'extends = "mid.toml"\nsteps = 30\n[[items]]\npath = "c"\ngroup = "benign"\n'
    )
    cfg = load_options(Example, tmp_path / "top.toml", {"seed": 9})
    # a key in the file beats its base, a [[list]] replaces the base's whole list, a flag beats both
    assert (cfg.steps, cfg.mode, cfg.seed, cfg.name) == (30, "exact", 9, "mid")
    assert cfg.items == [Item("c", "benign")]
    assert load_options(Example, tmp_path / "mid.toml").items == [Item("a"), Item("b")]


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"a.toml": 'extends = "b.toml"', "b.toml": 'extends = "a.toml"'}, "extend each other in a loop"),
        ({"a.toml": 'extends = "a.toml"'}, "extend each other in a loop"),
        ({"a.toml": 'extends = "gone.toml"'}, "extends 'gone.toml', but"),
        ({"a.toml": "extends = 3"}, "`extends` must name a TOML file"),
        ({"a.toml": 'extends = "b.toml"', "b.toml": "steps = 0"}, "--steps must be in [1, inf)"),
    ],
)
def test_bad_extends_is_one_clear_error(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text + "\n")
    with pytest.raises(ConfigError) as exc:
        load_options(Example, tmp_path / "a.toml")
    assert message in str(exc.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("steps = 0", "--steps must be in [1, inf), got 0"),
        ("rate = 1", "--rate must be in (0, 1), got 1.0"),
        ("rate = 0", "--rate must be in (0, 1), got 0.0"),
        ('mode = "slow"', "--mode must be one of fast, exact, got 'slow'"),
        ('steps = "ten"', "option 'steps' in"),
        ("progress = 1", "must be true or false"),
        ("rate = nan", "must be a finite number"),
        ("nope = 1", "unknown option(s)"),
        ("[[items]]\ngroup = 'x'", "has no 'path'"),
    ],
)
def test_bad_values_from_the_file_are_one_clear_error(tmp_path, text, message):
    config = tmp_path / "c.toml"
    config.write_text(text + "\n")
    with pytest.raises(ConfigError) as exc:
        load_options(Example, config)
    assert message in str(exc.value)


def test_bad_values_from_flags_are_checked_like_the_file():
    with pytest.raises(ConfigError, match=r"--rate must be in \(0, 1\), got 2.0"):
        options_from_args(Example, parse(["--rate", "2"]))
    with pytest.raises(ConfigError, match="must be a finite number"):
        options_from_args(Example, parse(["--rate", "inf"]))
    assert options_from_args(Example, parse(["--steps", "1"])).steps == 1  # the bound itself is allowed
