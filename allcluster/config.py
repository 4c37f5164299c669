"""Frozen-dataclass configs loaded from commented YAML.

Every stage (index, train, sweep, score, report) has one frozen dataclass whose fields are the YAML
keys; nested sections are nested dataclasses. Loading validates everything up front: an unknown key,
a wrong type or an out-of-range value raises :class:`ConfigError` naming the file, the key path and
what is allowed. ``--set a.b=c`` overrides go through the same validation.

Range limits live in field metadata (``field(default=..., metadata=bounds(ge=0))``); choices come
from ``Literal[...]`` annotations.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from allcluster.atomic import atomic_write_text

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and the key path."""


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with two changes users expect from config files: ``1e-4`` is a number
    (YAML 1.1, PyYAML's dialect, reads a float only with a dot: ``1.0e-4``) and a key given twice in
    one mapping is an error naming the key and both lines (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{key_node.start_mark.name}: key {key!r} given twice (lines {seen[key]} "
                                  f"and {line}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def parse_yaml(text: str, name: str = "<string>") -> Any:
    """YAML text as plain data, read the way config files are (see :class:`_ConfigLoader`)."""
    loader = _ConfigLoader(text)
    loader.name = name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def bounds(ge: float | None = None, le: float | None = None, gt: float | None = None,
           lt: float | None = None) -> dict[str, float]:
    """Field metadata for numeric ranges, e.g. ``field(default=0.1, metadata=bounds(ge=0, lt=1))``."""
    return {k: v for k, v in dict(ge=ge, le=le, gt=gt, lt=lt).items() if v is not None}


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin in (tuple, list):
        return f"a list of {_describe(get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a section with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    return getattr(tp, "__name__", str(tp))


def _range_error(value: float, meta: dict) -> str | None:
    checks = {"ge": (lambda v, b: v >= b, ">="), "le": (lambda v, b: v <= b, "<="),
              "gt": (lambda v, b: v > b, ">"), "lt": (lambda v, b: v < b, "<")}
    failed = [f"{sym} {meta[k]}" for k, (ok, sym) in checks.items() if k in meta and not ok(value, meta[k])]
    if failed:
        allowed = " and ".join(f"{sym} {meta[k]}" for k, (_, sym) in checks.items() if k in meta)
        return f"value {value!r} is out of range; allowed: {allowed}"
    return None


class _Builder:
    """Builds a dataclass tree from plain data, collecting the key path for error messages."""

    def __init__(self, source: str, spell: typing.Callable[[str], str] | None = None):
        self.source = source
        self.spell = spell          # how the user wrote a top-level key (a command-line option)

    def fail(self, path: str, message: str) -> typing.NoReturn:
        raise ConfigError(f"{self.source}: {path or '<top level>'}: {message}")

    def build(self, cls: type[T], data: Any, path: str = "") -> T:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.fail(path, f"expected {_describe(cls)}, got {type(data).__name__} {data!r}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            key = f"{path}.{unknown[0]}" if path else str(unknown[0])
            self.fail(key, f"unknown key; allowed keys here: {', '.join(fields)}")
        values = {}
        for name, value in data.items():
            key = f"{path}.{name}" if path else (self.spell or str)(name)
            values[name] = self.coerce(hints[name], value, key, fields[name].metadata)
        try:
            return cls(**values)
        except ConfigError as err:      # a cross-field check of the class ("field: why"), named as given
            name, colon, why = str(err).partition(":")
            if self.spell and not path and colon and name in fields:
                raise ConfigError(f"{self.spell(name)}:{why}") from None
            raise
        except (TypeError, ValueError) as err:
            self.fail(path, str(err))

    def coerce(self, tp: Any, value: Any, path: str, meta: Any = None) -> Any:
        origin = get_origin(tp)
        if dataclasses.is_dataclass(tp):
            return self.build(tp, value, path)
        if origin is Literal:
            choices = get_args(tp)
            if value not in choices or isinstance(value, bool) != isinstance(choices[0], bool):
                self.fail(path, f"{value!r} is not allowed; allowed values: {', '.join(map(repr, choices))}")
            return value
        if origin in (Union, types.UnionType):
            options = get_args(tp)
            if value is None and type(None) in options:
                return None
            errors = []
            for option in (o for o in options if o is not type(None)):
                try:
                    return self.coerce(option, value, path, meta)
                except ConfigError as err:
                    errors.append(err)
            if len(errors) == 1:        # "X or null": X's own error says what is allowed (its range)
                raise ConfigError(f"{errors[0]} (or null)") from None
            self.fail(path, f"expected {_describe(tp)}, got {value!r}")
        if origin in (tuple, list):
            if not isinstance(value, (list, tuple)):
                self.fail(path, f"expected {_describe(tp)}, got {value!r}")
            (item_tp, *_rest) = get_args(tp)
            return tuple(self.coerce(item_tp, v, f"{path}[{i}]", meta) for i, v in enumerate(value))
        if origin is dict:
            if not isinstance(value, dict):
                self.fail(path, f"expected a mapping, got {value!r}")
            return dict(value)
        if tp is Any:
            return value
        return self.scalar(tp, value, path, meta or {})

    def scalar(self, tp: type, value: Any, path: str, meta: dict) -> Any:
        if tp is bool:
            if not isinstance(value, bool):
                self.fail(path, f"expected true or false, got {value!r}")
            return value
        if tp in (int, float):
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not numeric or (tp is int and isinstance(value, float) and not value.is_integer()):
                self.fail(path, f"expected {tp.__name__}, got {value!r}")
            value = tp(value)
            if not math.isfinite(value):
                self.fail(path, f"expected a finite number, got {value!r}")
            problem = _range_error(value, meta)
            if problem:
                self.fail(path, problem)
            return value
        if tp is str:
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                self.fail(path, f"expected a string, got {value!r}")
            return str(value)
        self.fail(path, f"unsupported config type {tp}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=c`` into ``(['a', 'b'], c)`` with ``c`` parsed as a YAML scalar or list."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set optim.lr=1e-4")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"--set {text!r}: empty key")
    return key.strip().split("."), parse_yaml(raw, f"--set {text}") if raw.strip() else ""


def set_path(data: dict, keys: list[str], value: Any, what: str) -> None:
    """Set ``data[k0][k1]...= value`` in place, creating sections; ``what`` names it in errors."""
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{what}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def apply_overrides(data: dict, overrides: typing.Iterable[str], cls: type | None = None) -> dict:
    """Return a copy of ``data`` with each ``a.b=c`` override applied. With the config dataclass
    ``cls``, a field whose keys are themselves dotted names (metadata ``dotted_keys``: a sweep's
    ``grid`` and ``sample``) takes the rest of the key whole: ``grid.optim.name=[adam]`` sets
    ``grid["optim.name"]``."""
    data = json.loads(json.dumps(data or {}))
    for text in overrides:
        keys, value = parse_override(text)
        set_path(data, _sections(cls, keys), value, f"--set {text!r}")
    return data


def _sections(cls: type | None, keys: list[str]) -> list[str]:
    """``keys`` as the sections they walk through in ``cls`` (see :func:`apply_overrides`)."""
    node = cls
    for depth, key in enumerate(keys[:-1]):
        if not (isinstance(node, type) and dataclasses.is_dataclass(node)):
            break
        field_ = {f.name: f for f in dataclasses.fields(node)}.get(key)
        if field_ is None:
            break
        if field_.metadata.get("dotted_keys"):
            return [*keys[:depth + 1], ".".join(keys[depth + 1:])]
        node = typing.get_type_hints(node).get(key)
    return keys


def deep_merge(base: dict, top: dict) -> dict:
    """A copy of ``base`` with ``top`` laid over it, section by section."""
    merged = json.loads(json.dumps(base or {}))
    for key, value in (top or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = json.loads(json.dumps(value))
    return merged


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """``{"fit": {"epochs": 2}}`` -> ``{"fit.epochs": 2}`` (lists and tuples stay values, as lists)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.loads(json.dumps(value))   # tuples -> lists, as YAML reads them
    return flat


def config_diff(stored: dict[str, Any], current: dict[str, Any], skip: typing.Iterable[str] = (),
                prefix: str = "") -> list[str]:
    """``"KEY: OLD -> NEW"`` for every dotted key whose value differs, sorted; keys under a prefix in
    ``skip`` (``"resources"`` skips ``resources.cpus_per_worker``) are left out."""
    skip = tuple(skip)

    def skipped(key: str) -> bool:
        return any(key == s or key.startswith(s + ".") for s in skip)

    missing = object()
    lines = []
    for key in sorted(set(stored) | set(current)):
        old, new = stored.get(key, missing), current.get(key, missing)
        if old != new and not skipped(key):
            shown = ["(absent)" if v is missing else json.dumps(v) for v in (old, new)]
            lines.append(f"{prefix}{key}: {shown[0]} -> {shown[1]}")
    return lines


def from_dict(cls: type[T], data: dict | None, source: str = "<dict>",
              spell: typing.Callable[[str], str] | None = None) -> T:
    """Validate plain data into the config dataclass ``cls``; ``spell`` names a top-level key in
    errors as the user gave it (:func:`as_option`, where the keys came from command-line options)."""
    return _Builder(source, spell).build(cls, data or {})


def as_option(key: str) -> str:
    """A config key as the command-line option that set it: ``min_side`` -> ``--min-side``."""
    return "--" + key.replace("_", "-")


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, turning syntax errors into :class:`ConfigError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = parse_yaml(path.read_text(), str(path))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return data


def load(cls: type[T], path: str | Path | None = None, overrides: typing.Iterable[str] = (),
         base: dict | None = None) -> T:
    """Load ``cls`` from a YAML file (or ``base`` data) with ``--set`` overrides applied."""
    data = read_yaml(path) if path is not None else dict(base or {})
    overrides = list(overrides)
    return from_dict(cls, apply_overrides(data, overrides, cls), config_source(path, overrides))


def config_source(path: str | Path | None, overrides: typing.Iterable[str] = ()) -> str:
    """How errors name a config: its file (or ``<defaults>``) and its ``--set`` overrides."""
    overrides = list(overrides)
    return (str(path) if path is not None else "<defaults>") + (
        " (with --set " + " ".join(overrides) + ")" if overrides else "")


def to_dict(cfg: Any) -> dict:
    """Plain (YAML/JSON-able) data of a config dataclass; tuples become lists."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_hash(cfg: Any) -> str:
    """Stable short hash of the resolved config, used as provenance in every output row."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_resolved(cfg: Any, path: str | Path, header: str = "") -> Path:
    """Write the fully resolved config (all defaults filled) as YAML next to an output."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    comment = f"# {header}\n" if header else ""
    return atomic_write_text(path, f"{comment}# resolved config, hash {config_hash(cfg)}\n{text}")


def replace(cfg: T, **changes: Any) -> T:
    """``dataclasses.replace`` re-exported for callers that fill defaults."""
    return dataclasses.replace(cfg, **changes)
