"""Settings defined once. A dataclass field carries its default, help, choices and bounds, and the command-line
flags, YAML/dict loading and validation are all derived from it:

    top_k: int = setting(64, "stored top-k entries per position", min=0)

Supported field types: bool, int, float, str, their `| None` forms, list[int], list[str], tuple[float, ...],
dict, list, and `float | dict` (a number or a schedule). Every float setting must be finite.

It lives in `formats` because every package's settings use it and `formats` is the layer they all stand on.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any

from formats.errors import KdError

REQUIRED = dataclasses.MISSING


def setting(default: Any = REQUIRED, help: str = "", *, choices: Iterable | None = None, min: float | None = None,
            max: float | None = None, above: float | None = None, below: float | None = None,
            flag: str | None = None, cli: bool = True, parse: Callable[[str], Any] | None = None,
            nargs: str | None = None, const: Any = None, metavar: str | None = None, content: bool = True,
            required: bool = False, positional: bool = False) -> Any:
    """A dataclass field with its help and rules.

    min/max: inclusive bounds; above/below: exclusive ones. `flag`: the command-line flag when it is not
    `--name-with-dashes`; `cli=False`: no flag (YAML or API only). `parse`: turns the flag's text into the value
    (e.g. '-1,12' -> [-1, 12]). `nargs="?"` with `const`: a flag whose value may be left out (`--ray` means
    `--ray local`). `content=False`: the setting does not change what is built (left out of a
    cache's resume check). `required`: the command line must give it (its dataclass default is then a blank);
    `positional`: it is given without a flag (`kdcache verify CACHE`). `nargs="append"`: a repeatable flag (a list).
    A mutable default (list, dict) is given as its type or a callable and becomes a default_factory.
    """
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "min": min, "max": max,
            "above": above, "below": below, "flag": flag, "cli": cli, "parse": parse, "nargs": nargs,
            "const": const, "metavar": metavar, "content": content, "required": required,
            "positional": positional}
    if callable(default) and not isinstance(default, (bool, int, float, str)):
        return dataclasses.field(default_factory=default, metadata=meta)
    if isinstance(default, (list, dict, set)):
        raise TypeError("give a mutable default as a callable, e.g. setting(list, ...)")
    return dataclasses.field(default=default, metadata=meta)


def flag_of(f: dataclasses.Field, prefix: str = "") -> str:
    """`--top-k` for `top_k`; with prefix 'vllm': `--vllm-max-num-seqs` for `max_num_seqs`."""
    return f.metadata.get("flag") or "--" + (prefix + "-" if prefix else "") + f.name.replace("_", "-")


def dest_of(f: dataclasses.Field, prefix: str = "") -> str:
    return (prefix + "_" if prefix else "") + f.name


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def setting_fields(cls) -> list[dataclasses.Field]:
    """The dataclass fields of `cls` that are settings (made with `setting`)."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base(tp: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        rest = [a for a in args if a is not type(None)]
        optional = len(rest) < len(args)
        if len(rest) == 1:
            return rest[0], optional
        return tp if not optional else typing.Union[tuple(rest)], optional
    return tp, False


def _type_name(tp: Any) -> str:
    base, optional = _base(tp)
    origin = typing.get_origin(base)
    if origin in (types.UnionType, typing.Union):
        name = " or ".join(_type_name(a) for a in typing.get_args(base))
    elif origin in (list, tuple):
        inner = typing.get_args(base)
        what = "numbers" if inner and inner[0] is float else f"{inner[0].__name__}s" if inner else "items"
        name = f"a list of {what}"
    elif base is float:
        name = "a number"
    elif base is int:
        name = "an integer"
    elif base is bool:
        name = "true or false"
    elif base is dict:
        name = "a mapping"
    else:
        name = getattr(base, "__name__", str(base))
    return name + (" or null" if optional else "")


# -------------------------------------------------------------------------------- command-line flags

def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls, *, skip: Iterable[str] = (),
                  only: Iterable[str] | None = None, prefix: str = "") -> None:
    """One flag per setting of `cls` (not in `skip`, and in `only` when given), help with the default shown.

    Every flag defaults to None, so `given(args, cls)` tells which ones the command line set; the dataclass
    default (or a YAML file) applies to the rest.
    """
    hints = _hints(cls)
    only = set(only) if only is not None else None
    for f in setting_fields(cls):
        if not f.metadata["cli"] or f.name in skip or (only is not None and f.name not in only):
            continue
        kwargs = _argparse_kwargs(f, hints[f.name])
        if f.metadata["positional"]:
            kwargs["help"] = kwargs["help"].replace(" (required)", "")
            parser.add_argument(dest_of(f, prefix), metavar=f.metadata["metavar"] or f.name.upper(),
                                **{k: v for k, v in kwargs.items() if k != "metavar"})
        else:
            parser.add_argument(flag_of(f, prefix), dest=dest_of(f, prefix), default=None,
                                required=f.metadata["required"], **kwargs)


def _argparse_kwargs(f: dataclasses.Field, tp: Any) -> dict:
    meta = f.metadata
    base, _ = _base(tp)
    text = meta["help"]
    default = default_of(f)
    if meta["required"]:
        text += " (required)"
    elif default not in (None, "", [], {}) and not isinstance(default, bool):
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        text += f" (default: {shown})"
    kwargs: dict[str, Any] = {"help": text.replace("%", "%%")}
    if meta["metavar"]:
        kwargs["metavar"] = meta["metavar"]
    if meta["choices"]:
        kwargs["choices"] = meta["choices"]
    if base is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
        if isinstance(default, bool):
            kwargs["help"] += f" (default: {'on' if default else 'off'})"
        return kwargs
    if meta["nargs"] == "append":  # a repeatable flag: each use adds one value
        kwargs["action"] = "append"
        kwargs["type"] = _parser(meta["parse"]) if meta["parse"] else str
    elif meta["parse"]:
        kwargs["type"] = _parser(meta["parse"])
    elif meta["nargs"]:
        kwargs["nargs"] = meta["nargs"]
        if meta["const"] is not None:
            kwargs["const"] = meta["const"]
        inner = typing.get_args(base)
        kwargs["type"] = inner[0] if inner and inner[0] in (int, float, str) else str
    elif base in (int, float, str):
        kwargs["type"] = base
    elif typing.get_origin(base) in (types.UnionType, typing.Union):
        kwargs["type"] = float  # `float | dict`: a number on the command line, a schedule in YAML
    else:
        raise TypeError(f"setting {f.name}: no command-line form for {tp}; give parse= or cli=False")
    return kwargs


def _parser(fn: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return fn(text)
        except (ValueError, SettingError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = getattr(fn, "__name__", "value")
    return parse


def given(args: argparse.Namespace, cls, prefix: str = "") -> dict[str, Any]:
    """The settings of `cls` the command line set (flags left at None were not given)."""
    return {f.name: getattr(args, dest_of(f, prefix)) for f in setting_fields(cls)
            if getattr(args, dest_of(f, prefix), None) is not None}


def int_list(text: str) -> list[int]:
    """'-1,12' -> [-1, 12]."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SettingError(f"expected comma-separated integers like '-1,12', got {text!r}") from None


# ------------------------------------------------------------------------------------ loading, checks

class SettingError(KdError):
    """A setting with an unknown name, a wrong type or a value out of its range."""


def coerce(cls, values: dict[str, Any], where: str = "settings", aliases: dict[str, str] | None = None,
           error: type[KdError] = SettingError) -> dict[str, Any]:
    """`values` (from YAML, JSON or the command line) checked against the fields of `cls`: unknown keys (with a
    did-you-mean), wrong types (YAML 1.1 pitfalls named). Lists become tuples where the field is a tuple."""
    hints = _hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for key, value in values.items():
        if key not in known:
            raise error(f"{where}: unknown key {key!r}{_did_you_mean(key, list(known), aliases or {})}")
        out[key] = _coerce_value(key, value, hints[key], where, error)
    return out


def _did_you_mean(key: str, known: list[str], aliases: dict[str, str]) -> str:
    close = [k for k in known if k.replace("_", "") == key.replace("_", "").replace("-", "")]
    close = close or difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    if not close and key in aliases:
        close = [aliases[key]]
    return f" (did you mean {close[0]!r}?)" if close else ""


def _yaml_hint(value: Any) -> str:
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return " (YAML 1.1 reads a number like 1e-3 without a dot as text: write 1.0e-3)"
    return ""


def _coerce_value(key: str, value: Any, tp: Any, where: str, error: type[KdError]) -> Any:
    base, optional = _base(tp)
    bad = error(f"{where}: {key} must be {_type_name(tp)}, got {value!r}{_yaml_hint(value)}")
    if value is None:
        if optional:
            return None
        raise bad
    origin = typing.get_origin(base)
    if origin in (types.UnionType, typing.Union):  # float | dict: a number or a schedule
        for option in typing.get_args(base):
            try:
                return _coerce_value(key, value, option, where, error)
            except KdError:
                continue
        raise bad
    if base is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if base is str:
        if isinstance(value, str):
            return value
        raise bad
    if base in (dict, list) or origin in (dict,):
        if isinstance(value, base if base in (dict, list) else dict):
            return value
        raise bad
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        inner = typing.get_args(base)
        if origin is tuple and inner and inner[-1] is not Ellipsis and len(value) != len(inner):
            raise error(f"{where}: {key} must be a list of {len(inner)} values, got {value!r}")
        item = inner[0] if inner else Any
        items = [_coerce_value(key, v, item, where, error) if item is not Any else v for v in value]
        return tuple(items) if origin is tuple else items
    return value


def check(obj: Any, error: type[KdError] = SettingError, flags: bool = True, prefix: str = "") -> None:
    """Every setting of `obj` against its rules: choices, bounds, finite floats. Errors name the setting by its
    flag (`--top-k`), or by its key when `flags` is False (settings read mostly from YAML)."""
    for f in setting_fields(type(obj)):
        value = getattr(obj, f.name)
        name = flag_of(f, prefix) if flags else f.name
        check_value(name, value, f.metadata, error)


def check_value(name: str, value: Any, meta: typing.Mapping[str, Any], error: type[KdError] = SettingError) -> None:
    """One value against the rules in `meta` (a field's metadata)."""
    if value is None:
        return
    choices = meta.get("choices")
    if choices and value not in choices:
        raise error(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    numbers = value if isinstance(value, (list, tuple)) else [value]
    for v in numbers:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise error(f"{name} must be a finite number, got {v}")
        lo, hi, above, below = meta.get("min"), meta.get("max"), meta.get("above"), meta.get("below")
        if above is not None and not v > above:
            raise error(f"{name} must be {'positive' if above == 0 else f'greater than {above}'}, got {v}")
        if lo is not None and v < lo:
            raise error(f"{name} must be {'non-negative' if lo == 0 else f'at least {lo}'}, got {v}")
        if below is not None and not v < below:
            raise error(f"{name} must be less than {below}, got {v}")
        if hi is not None and v > hi:
            raise error(f"{name} must be at most {hi}, got {v}")


def content_settings(obj: Any) -> dict[str, Any]:
    """The settings of `obj` that change what it produces (fields made with content=True), as plain data."""
    d = dataclasses.asdict(obj)
    return {f.name: d[f.name] for f in dataclasses.fields(obj) if f.metadata.get("content", True)}


def markdown_options(cls, prefix: str = "") -> str:
    """The settings of `cls` that have flags, as a Markdown table (flag, default, meaning): README's option tables
    are these, checked by a test."""
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for f in setting_fields(cls):
        if not f.metadata["cli"] or f.metadata["positional"]:
            continue
        default = default_of(f)
        if f.metadata["required"]:
            shown = "required"
        elif isinstance(default, bool):
            shown = "on" if default else "off"
        elif default in (None, "", [], {}):
            shown = "-"
        else:
            shown = f"`{','.join(map(str, default)) if isinstance(default, (list, tuple)) else default}`"
        flag = flag_of(f, prefix)
        choices = f.metadata["choices"]
        meaning = f.metadata["help"] + (f" ({' / '.join(map(str, choices))})" if choices else "")
        rows.append(f"| `{flag}` | {shown} | {meaning.replace('|', '/')} |")
    return "\n".join(rows)
