"""The pruning options: a preset, a YAML file of PruneConfig fields, and one option per field.

Precedence: preset < `--config FILE.yaml` < options on the command line. The
options and the file's keys are PruneConfig's fields, parsed by one reader
(`jaxprune.cli.fields`), so both take the same values and give the same errors.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from jaxprune.cli import fields
from jaxprune.errors import UsageError
from jaxprune.prune import presets
from jaxprune.prune.config import PruneConfig, check_names

# Fields some preset changes: their help names the recommended value, since the preset decides.
_PRESET_FIELDS = {k for overrides in presets.PRESETS.values() for k in overrides}


def _note(f: dataclasses.Field) -> str:
  if f.name == "sparsity":
    return " (required, here or in --config)"
  if f.name in _PRESET_FIELDS:
    return f" (recommended: {fields.show(f.default)})"
  return fields.default_note(f)


def add_config_options(p) -> None:
  """One option per PruneConfig field, with the field's help; unset options stay None so
  that the preset and the --config file decide (precedence: preset < file < flags)."""
  g = p.add_argument_group("pruning options (PruneConfig fields; defaults from the preset)")
  fields.add_options(g, PruneConfig, note=_note)


def config_values(given: Mapping[str, Any], where: str) -> dict[str, Any]:
  """PruneConfig field values from text (or YAML scalars) keyed by field name, all from `where`."""
  check_names(given, where)
  return fields.parse_all(PruneConfig, given, lambda name: where)


def _yaml_problem(e, text: str) -> str:
  """PyYAML's problem on one line, with the byte offset and line of the place it names."""
  what = " ".join(str(getattr(e, "problem", None) or e).split())
  mark = getattr(e, "problem_mark", None)
  if mark is None:
    return what
  offset = len(text[:mark.index].encode("utf-8"))
  return f"{what} at byte offset {offset} (line {mark.line + 1}, column {mark.column + 1})"


def _read_yaml(path: str):
  import yaml

  from jaxprune.data.stream import decode

  try:
    with open(path, "rb") as f:
      raw = f.read()
  except FileNotFoundError:
    raise UsageError(f"config file {path} does not exist; pass a YAML file of PruneConfig fields") from None
  except IsADirectoryError:
    raise UsageError(f"config file {path} is a directory; pass a YAML file of PruneConfig fields") from None
  text = decode(raw, path, what="config file")
  try:
    return yaml.safe_load(text)
  except yaml.YAMLError as e:
    raise UsageError(f"config file {path} is not valid YAML: {_yaml_problem(e, text)}; fix the file (one "
                     "'field: value' per line, e.g. 'sparsity: 0.2')") from None


def from_yaml(path: str) -> dict[str, Any]:
  """PruneConfig field values from a YAML mapping of field names (checked and typed)."""
  data = _read_yaml(path)
  if data is None:
    return {}
  if not isinstance(data, dict):
    raise UsageError(f"config file {path} must hold a mapping of PruneConfig fields (e.g. 'sparsity: 0.2'), "
                     f"got a {type(data).__name__}")
  return config_values(data, f"config file {path}")


def resolve_config(args) -> tuple[PruneConfig, str]:
  """(PruneConfig, preset name) from the preset, the --config file and the options given.

  Without --preset, the preset follows from the method (a baseline runs as its
  tool does) and the calibration source.
  """
  from_file = from_yaml(args.config) if args.config else {}
  flags = fields.parse_all(PruneConfig, fields.given(args, PruneConfig), lambda name: f"option {fields.flag(name)}")
  given = {**from_file, **flags}
  if "sparsity" not in given:
    raise UsageError("no sparsity given; pass --sparsity R (the fraction of block parameters to remove, e.g. 0.2) "
                     "or set 'sparsity' in the --config file")
  # Self-generated text alone is the data-free preset's; mixed with a text, the text's.
  calib = args.calib if args.calib is None or isinstance(args.calib, str) else "+".join(args.calib)
  name = args.preset or presets.default_preset(given.get("method"), calib)
  return PruneConfig.preset(name, **given), name
