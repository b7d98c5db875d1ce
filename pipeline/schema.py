"""Typed, validated settings from YAML: the helpers every config in Blinkflow is built with.

A settings class is a dataclass whose fields come from :func:`setting` (a docstring, an optional
range, an optional must-exist path). :func:`structure_dataclass` turns a YAML mapping into it:
unknown keys, wrong types and out-of-range values are one-line :class:`ConfigError` s that
start with the YAML path, e.g. ``stages.detect.batch: 0 is out of range (1..1024)``. The
pipeline config (:mod:`blinkflow.config`) and the training config
(:mod:`blinkflow.models.training.config`) both use these; this module imports nothing of either.
"""

from __future__ import annotations

import copy
import dataclasses
import numbers
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Callable, Literal

from blinkflow.errors import ConfigError
from blinkflow.files import VIDEO_SUFFIXES


def _field(default: Any = dataclasses.MISSING, doc: str = "", *, lo=None, hi=None, path_kind=None, factory=None):
    """A dataclass field with a docstring, an optional range and an optional must-exist path check."""
    meta = {"doc": doc, "range": (lo, hi), "path_kind": path_kind}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


setting = _field  # the public name


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _yaml_switch(value: Any, choices: tuple) -> Any:
    """YAML 1.1 reads a bare ``off``/``on`` (and no/yes) as a boolean; a choice spelled so means the word."""
    if isinstance(value, bool):
        word = "on" if value else "off"
        if word in choices:
            return word
    return value


def _structure(tp: Any, value: Any, path: str) -> Any:
    """Turn plain YAML data into ``tp``, raising a ConfigError that names ``path``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _structure(arg, value, path)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {shown(value)}{_quote_hint(tp, value)}")
    if origin is Literal:
        value = _yaml_switch(value, typing.get_args(tp))
        if value not in typing.get_args(tp):
            text = f"{str(value).lower()} (YAML reads a bare yes/no/on/off as a boolean)" if isinstance(value, bool) else shown(value)
            raise ConfigError(f"{path}: {text} is not one of {_type_name(tp)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {shown(value)}")
        (item,) = typing.get_args(tp)
        return [_structure(item, v, f"{path}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {shown(value)}")
        _, item = typing.get_args(tp)
        return {str(k): _structure(item, v, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return structure_dataclass(tp, value, path)
    return _structure_scalar(tp, value, path)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"  # numpy's bool is no bool subclass


def _structure_scalar(tp: type, value: Any, path: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, numbers.Integral) and not _is_bool(value):  # numpy's too (a notebook's sweep)
            return int(value)
    elif tp is float:
        if isinstance(value, numbers.Real) and not _is_bool(value):
            try:
                return float(value)
            except OverflowError:  # an integer of hundreds of digits
                raise ConfigError(f"{path}: {shown(value)} is too large a number") from None
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config type {tp!r} at {path}")
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {shown(value)}{_quote_hint(tp, value)}")


def _quote_hint(tp: Any, value: Any) -> str:
    """Where a string was meant: YAML reads a bare 1, 1.5, yes or no as a number or a boolean."""
    wants_text = tp is str or str in typing.get_args(tp)
    if wants_text and isinstance(value, (bool, int, float)):
        written = str(value).lower() if isinstance(value, bool) else str(value)
        return f" (YAML reads a bare {written} as a {'boolean' if isinstance(value, bool) else 'number'}: quote it, '{written}')"
    return ""


def structure_dataclass(cls: type, data: Any, path: str) -> Any:
    """Build dataclass ``cls`` from a mapping: unknown keys, types and ranges are checked. A class
    with a ``from_mapping(data, path)`` classmethod structures itself (a source splits its settings
    between the common ones and its type's own)."""
    label = path or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a mapping, got {shown(data)}")
    if hasattr(cls, "from_mapping"):
        return cls.from_mapping(data, path)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        valid = ", ".join(fields)
        raise ConfigError(f"{_join(path, unknown[0])}: unknown key; valid keys here: {valid}")
    return cls(**structure_fields(cls, data, path))


def whole_number(least: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``least`` (argparse names the option in its one-line error)."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give {least} or more") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{text} is below {least}; give {least} or more")
        return value

    parse.__name__ = f"whole number of at least {least}"
    return parse


def check_kind(raw: Any, own: type, others: set[str], said: str) -> None:
    """A mapping with none of ``own``'s keys and some of ``others`` (another kind of config's) is that kind (a
    training config given to ``run``): said so, where the first unknown key named neither the mix-up nor the fix."""
    keys = set(map(str, raw)) if isinstance(raw, dict) else set()
    theirs = keys & others
    if theirs and not keys & {f.name for f in dataclasses.fields(own)}:
        raise ConfigError(f"{said} (it has {', '.join(sorted(theirs)[:3])})")


def structure_fields(cls: type, data: dict, path: str) -> dict[str, Any]:
    """The values of ``data`` (keys that are fields of dataclass ``cls``) typed and range-checked."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        sub = _join(path, name)
        kwargs[name] = _structure(hints[name], value, sub)
        _check_range(fields[name], kwargs[name], sub)
        _check_path(fields[name], kwargs[name], sub)
    return kwargs


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _check_range(f: dataclasses.Field, value: Any, path: str) -> None:
    lo, hi = f.metadata.get("range", (None, None))
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or (lo is None and hi is None):
        return
    if value != value:  # NaN passes every comparison (a NaN backoff retried a dead camera without a pause)
        raise ConfigError(f"{path}: NaN is not a number in range ({lo}..{hi})")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(f"{path}: {value} is out of range ({lo}..{hi})")


def _check_path(f: dataclasses.Field, value: Any, path: str) -> None:
    kind = f.metadata.get("path_kind")
    if kind and value is not None and not Path(value).exists():
        raise ConfigError(f"{path}: {kind} {value!r} does not exist")


# --------------------------------------------------------------------------- loading


#: a config is a few kB; this bounds what a hostile file can make the loader hold
MAX_CONFIG_BYTES = 1 << 20
#: file names that are media, not configs (a video passed where the config goes: "not UTF-8" misled)
MEDIA_SUFFIXES = VIDEO_SUFFIXES | {".gif", ".jpg", ".jpeg", ".png", ".bmp", ".webp"}
#: YAML aliases (``*name``) a config may use: a few are handy, thousands are an expansion bomb
MAX_ALIASES = 64


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: a folder, not a config; pass the path of a YAML file such as configs/demo.yaml")
    if path.exists() and not path.is_file():  # /dev/null, a pipe: "not found" misled
        raise ConfigError(f"{path}: not a regular file (a device, pipe or socket); pass the path of a YAML file "
                          "such as configs/demo.yaml")
    if not path.is_file():
        from blinkflow.resources import configs_dir

        raise ConfigError(f"{path}: config file not found; pass the path of a YAML file such as configs/demo.yaml "
                          f"(the shipped configs are in {configs_dir()})")
    media = path.suffix.lower() in MEDIA_SUFFIXES  # said when it does not read as text: demo.ts may be YAML
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(_media_message(path) if media else f"{path}: {path.stat().st_size} bytes is not a config "
                          f"(the limit is {MAX_CONFIG_BYTES}); pass the YAML file, not a video or an archive")
    try:
        text = path.read_bytes().decode("utf-8")
    except PermissionError:  # the CLI's generic OSError line speaks of writing
        raise ConfigError(f"{path}: cannot read it (permission denied); make it readable by this user") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(_media_message(path) if media else f"{path}: not UTF-8 text (byte {exc.start}); save the "
                          "config as UTF-8") from None
    return parse_yaml(text, str(path))


def _media_message(path: Path) -> str:
    return (f"{path}: a video or image, not a config; name it in a config's sources (e.g. blinkflow run "
            f"configs/demo.yaml --set sources.0.path={path}), or label it with blinkflow label")


def parse_yaml(text: str, origin: str) -> dict:
    """A YAML mapping from ``text`` with the safe loader and a bound on aliases; errors name ``origin``."""
    import yaml

    try:
        data = yaml.load(text, Loader=_bounded_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())  # PyYAML's messages span lines
        raise ConfigError(f"{origin}: invalid YAML{where}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{origin}: nested too deeply to be a config; write the sections out") from None
    except ValueError:  # an integer over Python's 4300-digit limit for reading numbers
        raise ConfigError(f"{origin}: a number of thousands of digits; no setting takes one") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping of sections")
    return unshared(data, origin)


#: values (mappings, lists, scalars) a config may hold once its aliases are written out
MAX_CONFIG_VALUES = 100_000


def unshared(data: Any, origin: str) -> Any:
    """``data`` with every alias written out as a copy of its own: an override of ``stages.detect.batch`` must
    not also change ``stages.segment`` when one was written as ``*detect``. Bounded: an alias bomb under the
    alias limit still multiplies."""
    count = 0

    def copy(value: Any, depth: int) -> Any:
        nonlocal count
        count += 1
        if count > MAX_CONFIG_VALUES or depth > MAX_CONFIG_DEPTH:
            raise ConfigError(f"{origin}: over {MAX_CONFIG_VALUES} values or {MAX_CONFIG_DEPTH} levels once its "
                              "aliases are written out; an alias expansion bomb? write the values out")
        if isinstance(value, dict):
            return {k: copy(v, depth + 1) for k, v in value.items()}
        if isinstance(value, list):
            return [copy(v, depth + 1) for v in value]
        return value

    return copy(data, 0)


#: how deep a config nests (its real sections are a few levels)
MAX_CONFIG_DEPTH = 64


def shown(value: Any) -> str:
    """A value for an error message, cut short and on one line: an alias bomb's expanded value would make a
    5 GB line, and a numpy frame's repr spans dozens (an array is named by its dtype and shape)."""
    import reprlib

    class Short(reprlib.Repr):
        def repr_ndarray(self, array: Any, level: int) -> str:  # reprlib dispatches on the type's name
            return f"<{array.dtype} array {tuple(array.shape)}>"

    short = Short()
    short.maxlevel, short.maxdict, short.maxlist, short.maxstring, short.maxother = 3, 8, 8, 80, 80
    short.maxlong = 40
    return " ".join(short.repr(value).split())


def _bounded_loader() -> type:
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        """yaml.SafeLoader that refuses more than MAX_ALIASES aliases (expansion bombs)."""

        aliases = 0

        def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
            if self.check_event(yaml.AliasEvent):
                self.aliases += 1
                if self.aliases > MAX_ALIASES:
                    mark = self.peek_event().start_mark
                    raise yaml.YAMLError(f"more than {MAX_ALIASES} aliases (line {mark.line + 1}): an alias expansion "
                                         "bomb? write the values out")
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):  # noqa: ANN001, ANN201 - PyYAML's signature
            seen: set[str] = set()
            for key_node, _ in node.value:  # as written: a merge (<<) may be overridden, a key written twice not
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    if key_node.value in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"{key_node.value!r} is written twice in one mapping; keep one",
                            key_node.start_mark)
                    seen.add(key_node.value)
            return super().construct_mapping(node, deep)

    return BoundedLoader


def apply_override(raw: dict, override: str, default_of: Callable[[list[str]], Any] | None = None) -> None:
    """Apply ``a.b.0.c=value`` (value parsed as YAML) to the raw mapping in place; ``default_of`` as in
    :func:`set_value`."""
    import yaml

    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {override!r}: expected key=value, e.g. --set stages.detect.batch=8")
    try:
        value = yaml.load(text, Loader=_bounded_loader()) if text else None  # noqa: S506 - a SafeLoader
    except yaml.YAMLError:
        value = text
    except (RecursionError, ValueError):  # nested too deeply, an integer over 4300 digits
        raise ConfigError(f"--set {key}: the value is not a config value; write it plainly") from None
    set_value(raw, key, unshared(value, f"--set {key}"), default_of)


def set_value(raw: dict, key: str, value: Any, default_of: Callable[[list[str]], Any] | None = None) -> None:
    """Set the dotted YAML path ``key`` (``a.b.0.c``) of the raw mapping to ``value`` in place. An index into a
    list the mapping leaves out starts from ``default_of(path parts)``, the field's default (``gate.tiles.1=4``
    changes one side of the default grid: from an empty list it was no index at all)."""
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, dict) and part not in node and _is_index(parts[i + 1]) and default_of is not None:
            default = default_of(parts[: i + 1])
            if isinstance(default, list):
                node[part] = default
        node = _descend(node, part, parts[i + 1], key, ".".join(parts[:i]))
    _assign(node, parts[-1], value, key, ".".join(parts[:-1]))


def field_default(cls: Any, parts: list[str]) -> Any:
    """A fresh copy of the default of the field at YAML path ``parts`` inside dataclass ``cls``; None where the
    path leaves the typed fields (an ``Any``, an unknown key) or the field has no default."""
    tp = cls
    for n, part in enumerate(parts):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
            tp = args[0]  # X | None
        if typing.get_origin(tp) in (list, dict):
            tp = typing.get_args(tp)[-1]  # an item's (a list index or a mapping key)
            continue
        fields = {f.name: f for f in dataclasses.fields(tp)} if dataclasses.is_dataclass(tp) else {}
        if part not in fields:
            return None
        if n == len(parts) - 1:
            f = fields[part]
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            return copy.deepcopy(f.default) if f.default is not dataclasses.MISSING else None
        tp = typing.get_type_hints(tp)[part]
    return None


def _descend(node: Any, part: str, next_part: str, key: str, where: str) -> Any:
    if isinstance(node, list):
        return node[_list_index(node, part, key, where)]
    if not isinstance(node, dict):
        raise ConfigError(f"--set {key}: {part!r} is inside a value that is not a mapping")
    if node.get(part) is None:
        node[part] = [] if _is_index(next_part) else {}
    return node[part]


def _assign(node: Any, part: str, value: Any, key: str, where: str) -> None:
    if isinstance(node, list):
        index = int(part) if _is_index(part) else -1
        if index == len(node):
            node.append(value)
        else:
            node[_list_index(node, part, key, where)] = value
    elif isinstance(node, dict):
        node[part] = value
    else:
        raise ConfigError(f"--set {key}: cannot set {part!r} inside a scalar")


def _is_index(part: str) -> bool:
    return part.isascii() and part.isdigit()  # str.isdigit() alone takes '²', which int() refuses


def _list_index(node: list, part: str, key: str, where: str) -> int:
    """``part`` as an index of ``node``, the list at YAML path ``where``."""
    if not _is_index(part) or int(part) >= len(node):
        raise ConfigError(f"--set {key}: {part!r} is not an index of a list of {len(node)}; set the whole list, "
                          f"e.g. --set {where}=[...]")
    return int(part)


def resolve_path(value: str, base_dir: Path) -> Path:
    """Paths in a config are relative to the working directory, then to the config's folder; a shipped config's
    to its folder first (a ``media/bikes.mp4`` in the working directory must not stand in for the demo's clip)."""
    from blinkflow.resources import is_shipped

    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    beside = base_dir / path
    if beside.exists() and is_shipped(base_dir):
        return beside
    if path.exists():
        return path
    return beside if beside.exists() else path
