"""A frozen dataclass's fields as command-line options, and text (an option, a YAML scalar) as their values.

Everything comes from the dataclass itself: the type from the field's
annotation (`typing.get_type_hints`: bool, int, float, an enum, a pair of ints,
str, each possibly `| None`), the help and allowed names from its `metadata`
(`help`; `choices`: a callable giving a registry's names; `words`: text that
stands for other field values, e.g. damping `auto`). One parser serves the
options and the YAML files, so both accept and refuse the same values with
the same one-line message.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import functools
import types
import typing
from typing import Any, Callable, Mapping

from jaxprune.errors import UsageError

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def flag(name: str) -> str:
  return "--" + name.replace("_", "-")


def show(value) -> str:
  """A default as the help text shows it."""
  if isinstance(value, bool):
    return "on" if value else "off"
  return "unset" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


@functools.cache
def _types(cls) -> dict[str, tuple[Any, bool]]:
  """Each field's type without `| None`, and whether None is allowed."""
  out = {}
  for name, hint in typing.get_type_hints(cls).items():
    args = typing.get_args(hint)
    optional = isinstance(hint, types.UnionType) and type(None) in args
    out[name] = (next(a for a in args if a is not type(None)) if optional else hint, optional)
  return out


def _field(cls, name: str) -> dataclasses.Field:
  return {f.name: f for f in dataclasses.fields(cls)}[name]


def choices(cls, name: str) -> tuple[str, ...] | None:
  """The text values field `name` allows, or None when any value of its type goes."""
  kind, _ = _types(cls)[name]
  if isinstance(kind, type) and issubclass(kind, enum.Enum):
    return tuple(m.value for m in kind)
  given = _field(cls, name).metadata.get("choices")
  return tuple(given()) if given is not None else None


def describe(cls, name: str) -> str:
  """What field `name` takes, in words (for an error's fix)."""
  allowed = choices(cls, name)
  if allowed is not None:
    return "one of " + ", ".join(allowed)
  kind, _ = _types(cls)[name]
  what = {bool: "true or false", int: "an integer", float: "a number"}.get(kind)
  if typing.get_origin(kind) is tuple:
    what = "a block range A:B"
  words = _field(cls, name).metadata.get("words", {})
  return " or ".join([what or "a string", *map(repr, words)])


def parse(cls, name: str, value: Any, where: str) -> Any:
  """`value` (a command-line string or a YAML scalar) as field `name` of `cls`, checked.

  Raises UsageError naming where it came from, the key, the bad value and what is allowed.
  """
  kind, optional = _types(cls)[name]
  bad = f"{where}: {name}={value!r}"
  if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
    if optional:
      return None
    raise UsageError(f"{bad} is not allowed; {name} needs a value ({describe(cls, name)})")
  if kind is bool:
    return _bool(value, bad)
  if kind in (int, float):
    return _number(kind, value, bad, f"{name} takes {describe(cls, name)}")
  if typing.get_origin(kind) is tuple:
    return _range(value, bad)
  if not isinstance(value, str):
    raise UsageError(f"{bad} is not a string; {name} takes {describe(cls, name)}")
  allowed = choices(cls, name)
  if allowed is not None and value not in allowed:
    raise UsageError(f"{bad} is not one of {', '.join(allowed)}")
  return kind(value) if isinstance(kind, type) and issubclass(kind, enum.Enum) else value


def _bool(value, bad: str) -> bool:
  if isinstance(value, bool):
    return value
  if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
    return value.lower() in _TRUE
  raise UsageError(f"{bad} is not a boolean; use true or false")


def _number(kind: type, value, bad: str, takes: str):
  if isinstance(value, bool):
    raise UsageError(f"{bad} is not a number; {takes}")
  try:
    out = kind(value)
  except (TypeError, ValueError):
    raise UsageError(f"{bad} is not a number; {takes}") from None
  if kind is int and isinstance(value, float) and out != value:
    raise UsageError(f"{bad} is not an integer")
  return out


def _range(value, bad: str) -> tuple[int, int]:
  if isinstance(value, str):
    try:
      a, b = value.split(":")
      return int(a), int(b)
    except ValueError:
      pass
  elif isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
    return int(value[0]), int(value[1])
  raise UsageError(f"{bad} is not a block range; use A:B (a half-open range such as 4:28) or [A, B]")


def parse_all(cls, given: Mapping[str, Any], where: Callable[[str], str]) -> dict[str, Any]:
  """Field values of `cls` from text values keyed by field name (the names checked by the
  caller); a field's `words` put the values they stand for in its place. `where(name)`
  says where a value came from, for the errors."""
  out = {}
  for name, value in given.items():
    words = _field(cls, name).metadata.get("words", {})
    if isinstance(value, str) and value in words:
      out.update(words[value])
    else:
      out[name] = parse(cls, name, value, where(name))
  return out


def default_note(f: dataclasses.Field) -> str:
  return f" (default: {show(f.default)})" if f.default is not None else ""


def add_options(group, cls, note: Callable[[dataclasses.Field], str] = default_note, skip=()) -> None:
  """One option per field of `cls` (but `skip`), with the field's help and `note(field)`.

  Every option's default is None, so that the caller sees what was given and the
  dataclass (or a preset, or a file) decides the rest; values stay text until `parse_all`.
  """
  for f in dataclasses.fields(cls):
    if f.name in skip:
      continue
    help = f.metadata["help"] + note(f)
    if _types(cls)[f.name][0] is bool:
      group.add_argument(flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help)
      continue
    allowed = choices(cls, f.name)
    pair = typing.get_origin(_types(cls)[f.name][0]) is tuple
    metavar = None if allowed is not None else "A:B" if pair else f.name.upper()
    group.add_argument(flag(f.name), dest=f.name, default=None, choices=allowed, metavar=metavar, help=help)


def given(args, cls, skip=()) -> dict[str, Any]:
  """The options of `add_options` that the command line set."""
  return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
          if f.name not in skip and getattr(args, f.name, None) is not None}
