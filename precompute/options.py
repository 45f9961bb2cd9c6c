"""One options system for every command: a dataclass per command whose fields carry type, default,
help, choices and range once; argparse flags and TOML keys are built from it.

Precedence: field default < `--config FILE.toml` < command-line flag. Every value, from either
source, is type-checked against the field's annotation and range-checked from its metadata, so a
bad value is one ConfigError line (exit 2), never a TypeError deep in a run.

    @dataclass
    class SteerOptions:
        alpha: float = option(4.0, help="steering strength", low=0, bounds="(]")
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tomllib
import types
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Protocol, TypeVar, Union, get_args, get_origin, get_type_hints

from precompute.errors import ConfigError

T = TypeVar("T")


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _scalar_problem(value: Any, annotation: Any) -> str | None:
    """What is wrong with `value` as a bool/int/float/str (None when it fits)."""
    if annotation is bool:
        return None if isinstance(value, bool) else "must be true or false"  # "no" or 0 must not mean false
    if isinstance(value, bool) and annotation in (int, float):
        return "must be an integer" if annotation is int else "must be a number"
    if annotation is int:
        return None if isinstance(value, int) else "must be an integer"
    if annotation is float:
        if not isinstance(value, int | float):
            return "must be a number"
        return None if math.isfinite(value) else "must be a finite number"
    if annotation is str:
        return None if isinstance(value, str) else "must be a string"
    if isinstance(annotation, type) and isinstance(value, annotation):
        return None
    return f"must be {_type_name(annotation)}"


def _coerce_union(name: str, value: Any, args: tuple[Any, ...], where: str) -> Any:
    if value is None and type(None) in args:
        return None
    errors = []
    for option in (a for a in args if a is not type(None)):
        try:
            return coerce_value(name, value, option, where)
        except ConfigError as exc:
            errors.append(exc)
    raise errors[0]


def coerce_value(name: str, value: Any, annotation: Any, where: str) -> Any:
    """`value` checked against a dataclass field's annotation (str, int, float, bool, X | None,
    list[X], dict[str, str]); an int is accepted for a float. A mismatch is a ConfigError naming
    the option, the value and the expected type, never a TypeError later in the run."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        return _coerce_union(name, value, args, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"option {name!r}{where} must be a list, got {value!r}")
        return [coerce_value(name, v, args[0], where) for v in value] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"option {name!r}{where} must be a table of key = value, got {value!r}")
        return {str(k): coerce_value(name, v, args[1], where) for k, v in value.items()} if args else value
    problem = _scalar_problem(value, annotation)
    if problem:
        raise ConfigError(f"option {name!r}{where} {problem}, got {value!r}")
    return float(value) if annotation is float else value


def feature_ids(text: str) -> list[int]:
    """`--features 3,17 42` -> [3, 17, 42]: a comma- or space-separated list of feature ids (a `parse=`)."""
    try:
        return [int(v) for v in text.replace(" ", ",").split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated feature ids, got {text!r}") from exc


def option(
    default: Any = MISSING,
    *,
    help: str,
    default_factory: Callable[[], Any] | Any = MISSING,
    choices: Sequence[str] | None = None,
    low: float | None = None,
    high: float | None = None,
    bounds: str = "[]",
    metavar: str | None = None,
    positional: bool = False,
    item: type | None = None,
    cli: bool = True,
    show_default: bool = True,
    nargs: str | None = None,
    parse: Callable[[str], Any] | None = None,
) -> Any:
    """A dataclass field that is also a flag `--name-with-dashes` and a TOML key `name`.

    `help` is the flag's help; the default is appended to it, so it is written once. `low`/`high`
    bound a number (`bounds`: '[]' closed, '()' open, '[)' / '(]' half-open). `item` is a class with
    `parse(str)` (a flag value) and `from_dict(table)` (a TOML `[[name]]` table) for list fields such
    as `corpus`. `cli=False` keeps an option TOML-only; `positional` makes it a positional argument.
    A list option's flag is repeated (`--x A --x B`), or takes several values with `nargs="+"`
    (`--x A B`), or one value that `parse` turns into the list (`--x A,B`); `low`/`high` then bound
    each element."""
    metadata = {
        "help": help,
        "choices": tuple(choices) if choices else None,
        "range": (low, high, bounds) if low is not None or high is not None else None,
        "metavar": metavar,
        "positional": positional,
        "item": item,
        "cli": cli,
        "show_default": show_default,
        "nargs": nargs,
        "parse": parse,
    }
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class ListItem(Protocol):
    """The `item` of a list option (e.g. `CorpusSource`): built from a flag value or a TOML table."""

    @classmethod
    def parse(cls, spec: str) -> Any: ...

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any: ...


def _item_class(f: dataclasses.Field, annotation: Any) -> type[ListItem] | None:
    """The `item` of a list option: declared in its metadata, or a list[X] whose X has parse/from_dict."""
    if f.metadata.get("item"):
        return f.metadata["item"]
    args = get_args(_plain(annotation)) if get_origin(_plain(annotation)) is list else ()
    if args and hasattr(args[0], "parse") and hasattr(args[0], "from_dict"):
        return args[0]
    return None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _plain(annotation: Any) -> Any:
    """`X | None` -> X; anything else unchanged."""
    if get_origin(annotation) in (Union, types.UnionType):
        options = [a for a in get_args(annotation) if a is not type(None)]
        return options[0] if len(options) == 1 else annotation
    return annotation


def _help_text(f: dataclasses.Field, meta: dict[str, Any]) -> str:
    text = meta.get("help") or ""
    if (
        meta.get("show_default", True)
        and f.default is not MISSING
        and f.default is not None
        and not isinstance(f.default, bool)
    ):
        text += f" (default {f.default})"
    return text.replace("%", "%%")  # argparse formats help with %


def add_options(parser: argparse.ArgumentParser, cls: type, only: Sequence[str] | None = None) -> None:
    """Add one flag per field of the dataclass `cls` (or of the fields named in `only`), plus
    `--config`. Every flag defaults to None so an unset flag never overrides the TOML file."""
    if not any(a.dest == "config" for a in parser._actions):
        parser.add_argument(
            "--config", metavar="FILE.toml", help="TOML file with these options (flags override it)"
        )
    hints = get_type_hints(cls)
    for f in fields(cls):
        meta = dict(f.metadata)
        if (only is not None and f.name not in only) or not meta.get("cli", True):
            continue
        annotation = _plain(hints[f.name])
        help_text = _help_text(f, meta)
        if meta.get("positional"):
            parser.add_argument(f.name, metavar=meta.get("metavar") or f.name.upper(), help=help_text)
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        if annotation is bool:
            if f.default is True:  # on by default: the flag turns it off
                parser.add_argument("--no-" + f.name.replace("_", "-"), action="store_false", **kwargs)
            else:
                parser.add_argument(_flag(f.name), action="store_true", **kwargs)
            continue
        if get_origin(annotation) is list:
            item = _item_class(f, annotation)
            element = get_args(annotation)[0] if get_args(annotation) else str
            if meta.get("nargs"):
                kwargs.update(nargs=meta["nargs"], type=element)
            elif meta.get("parse"):
                kwargs["type"] = meta["parse"]
            else:
                kwargs.update(action="append", type=str if item else element)
        elif annotation in (int, float, str):
            kwargs["type"] = annotation
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        parser.add_argument(_flag(f.name), **kwargs)


def _items(name: str, raw: Any, item: type[ListItem], where: str) -> list[Any]:
    """A TOML list of `[[name]]` tables -> `item` objects, each value type-checked."""
    if not isinstance(raw, list) or not all(isinstance(c, dict) for c in raw):
        raise ConfigError(f"{name!r}{where} must be a list of [[{name}]] tables, got {raw!r}")
    hints = get_type_hints(item)
    out = []
    for i, table in enumerate(raw):
        if "path" in hints and "path" not in table:
            raise ConfigError(
                f"[[{name}]] table {i + 1}{where} has no 'path'; each {name} needs path = \"FILE\""
            )
        # unknown keys are left for from_dict, which names the known ones
        checked = {
            k: coerce_value(f"{name}.{k}", v, hints[k], where) if k in hints else v for k, v in table.items()
        }
        out.append(item.from_dict(checked))
    return out


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file not found: {path}" if not path.exists() else f"config {path} is not a file"
        )
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}); save the config as UTF-8") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc


EXTENDS = "extends"


def read_config(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A TOML config with its `extends = "base.toml"` chain resolved (the base's path is relative to the
    file naming it): the base's keys first, then this file's, key by key, so a `[[corpus]]` list given
    here replaces the base's whole list. Why: a GPU config is the demo's corpus with another model and
    SAE, and should not copy 200 lines that then drift apart."""
    where = Path(path).resolve()
    if where in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, where))
        raise ConfigError(f"config files extend each other in a loop: {chain}; remove one `extends`")
    data = read_toml(path)
    base = data.pop(EXTENDS, None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f'{path}: `extends` must name a TOML file, e.g. extends = "demo.toml"')
    base_path = Path(path).parent / base
    if not base_path.is_file():
        raise ConfigError(f"{path} extends {base!r}, but {base_path} is not a file")
    return {**read_config(base_path, (*_seen, where)), **data}


def load_options(cls: type[T], path: str | Path | None, overrides: dict[str, Any] | None = None) -> T:
    """Build the options dataclass `cls` from a TOML file (keys = option names, dashes allowed, plus
    `[[name]]` tables for `item` lists, and `extends` naming a base file), then apply non-None `overrides` (flags); a list flag replaces
    the file's list.

    Every value is checked against the field's type and its metadata's range and choices; then the
    class's `validate()` (when it has one) checks what depends on several options."""
    data: dict[str, Any] = read_config(path) if path else {}
    where = f" in {path}" if path else ""
    data = {k.replace("-", "_"): v for k, v in data.items()}
    hints = get_type_hints(cls)
    by_name = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - set(by_name)
    if unknown:
        raise ConfigError(f"unknown option(s){where}: {sorted(unknown)}; known: {sorted(by_name)}")
    checked = {}
    for key, value in data.items():
        item = _item_class(by_name[key], hints[key])
        checked[key] = (
            _items(key, value, item, where) if item else coerce_value(key, value, hints[key], where)
        )
    for f in by_name.values():  # a field without a default (a positional) must be given before construction
        if f.default is MISSING and f.default_factory is MISSING and f.name not in checked:
            given = (overrides or {}).get(f.name)
            if given is None:
                raise ConfigError(f"missing required option {f.name!r}")
            checked[f.name] = coerce_value(f.name, given, hints[f.name], " (command line)")
    cfg = cls(**checked)
    for key, value in (overrides or {}).items():
        if value is None or key not in by_name:
            continue
        item = _item_class(by_name[key], hints[key])
        if item is not None:
            if value:
                # a recorded config (`options_dict`) gives items back as dicts
                setattr(
                    cfg,
                    key,
                    [
                        item.parse(v)
                        if isinstance(v, str)
                        else item.from_dict(v)
                        if isinstance(v, dict)
                        else v
                        for v in value
                    ],
                )
            continue
        setattr(cfg, key, coerce_value(key, value, hints[key], " (command line)"))
    check_field_metadata(cfg)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


def options_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The options of a parsed command line: its `--config` file, then its flags."""
    overrides = {f.name: getattr(args, f.name, None) for f in fields(cls)}  # type: ignore[arg-type]
    return load_options(cls, getattr(args, "config", None), overrides)


def check_field_metadata(cfg: Any) -> None:
    """Range and choices declared by `option(...)` on each field of the dataclass `cfg`."""
    ranges, choices = {}, {}
    for f in fields(cfg):
        if f.metadata.get("range"):
            ranges[f.name] = f.metadata["range"]
        if f.metadata.get("choices"):
            choices[f.name] = f.metadata["choices"]
    check_ranges(cfg, ranges, choices)


def options_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-able dict of an options dataclass (list items through their `to_dict`)."""
    out = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, list):
            value = [v.to_dict() if hasattr(v, "to_dict") else v for v in value]
        out[f.name] = value
    return out


def require(cfg: Any, *names: str, command: str) -> None:
    """Options a command cannot run without (they may come from the flags or the TOML file)."""
    missing = [n for n in names if not getattr(cfg, n)]
    if missing:
        flags = ", ".join(_flag(n) for n in missing)
        raise ConfigError(f"`featuregeom {command}` needs {flags} (on the command line or in --config)")


def check_ranges(
    cfg: Any,
    ranges: dict[str, tuple[float | None, float | None, str]],
    choices: dict[str, tuple[str, ...]] | None = None,
) -> None:
    """`ranges[name] = (low, high, kind)`: kind '[]' closed, '()' open, '[)' / '(]' half-open; None
    bounds are unbounded; a list is checked element by element. A None value (an optional option
    left unset) is fine."""
    for name, (low, high, kind) in ranges.items():
        value = getattr(cfg, name)
        for element in value if isinstance(value, list | tuple) else [value]:
            _check_range(name, element, low, high, kind)
    for name, allowed in (choices or {}).items():
        value = getattr(cfg, name)
        if value is not None and value not in allowed:
            raise ConfigError(
                f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {value!r}"
            )


def _check_range(name: str, value: Any, low: float | None, high: float | None, kind: str) -> None:
    if value is None:
        return
    ok_low = low is None or (value >= low if kind[0] == "[" else value > low)
    ok_high = high is None or (value <= high if kind[1] == "]" else value < high)
    if not (ok_low and ok_high):
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ConfigError(
            f"--{name.replace('_', '-')} must be in {kind[0]}{lo}, {hi}{kind[1]}, got {value!r}"
        )


@dataclass(frozen=True)
class Command:
    """One `featuregeom` subcommand: its options dataclass and the function that runs it.

    `run(options)` returns an exit code (None means 0) and raises FeatureGeomError for the user's
    mistakes; the CLI turns those into one line and exit 2. `flags` limits the flags shown to a
    subset of the dataclass's fields (a TOML file may still set any of them)."""

    name: str
    help: str
    options: type
    run: Callable[[Any], int | None]
    description: str = ""
    flags: tuple[str, ...] | None = None
    default_config: str | None = None  # the TOML file read when --config is not given
