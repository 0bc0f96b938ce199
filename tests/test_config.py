"""PruneConfig: its written defaults are the recommended recipe, presets are overrides of them,
modes are enums, and text becomes field values in one place (issue 28)."""

import ast
import dataclasses
import json
import os

import pytest

from jaxprune.cli import fields
from jaxprune.cli.prune_options import config_values
from jaxprune.errors import UsageError
from jaxprune.prune import config as config_module
from jaxprune.prune import presets
from jaxprune.prune.config import Allocation, HeadMode, PruneConfig, Rounding, ScoreData
from tests.badinput import assert_intact, assert_one_line_error, run_cli, snapshot

# Every field's value from `PruneConfig.preset(...)` at 0f155af, before the refactor, in the order of COLUMNS;
# since issue 32, the recommended recipe's self-generated share and the sampling it draws that text with.
COLUMNS = [("recommended", {}), ("recommended-uniform", {}), ("recommended-datafree", {}), ("paper", {}),
           ("paper-datafree", {}), ("baseline", {"method": "flap"}), ("baseline", {"method": "wanda-sp"})]
TODAY = {
    "sparsity": (0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2),
    "method": ("goa-obs", "goa-obs", "goa-obs", "goa", "goa", "flap", "wanda-sp"),
    "heads": ("second-moment",) * 7,
    "tau": (None, None, None, None, None, None, None),
    "reconstruct": (False, False, False, True, True, False, False),
    "refit": (True, True, True, False, False, False, False),
    "intercept": (True, True, True, False, False, False, False),
    "damping": (1e-05, 1e-05, 1e-05, 0.001, 0.001, 0.001, 0.001),
    "auto_damping": (False, False, False, False, False, False, False),
    "layers": (None, None, None, None, None, None, None),
    "allocation": ("adaptive", "uniform", "adaptive", "uniform", "uniform", "uniform", "uniform"),
    "min_keep": (0.25, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0),
    "attn_sparsity": (0.0, 0.0, 0.0, None, None, None, None),
    "score_data": ("calib", "calib", "calib", "calib", "random", "calib", "calib"),
    "free_groups": (False, False, False, False, False, False, False),
    "shrink": (0.25, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0),
    "absorb": (0.5, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0),
    "compensate": (False, False, False, False, False, True, False),
    "rounding": ("once", "once", "once", "once", "once", "once", "once"),
    "round_to": (1, 1, 1, 1, 1, 1, 1),
    "inherited_error": (False, False, False, False, False, False, False),
    "skip_positions": (0, 0, 0, 0, 0, 0, 0),
    "selfgen_share": (0.5, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0),
    "selfgen_windows_per_text": (4, 4, 4, 1, 1, 4, 4),
    "selfgen_samples": (128, 128, 1024, 128, 128, 128, 128),
    "selfgen_top_k": (0, 0, 0, 50, 50, 0, 0),
    "selfgen_temperature": (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0),
    "batch_size": (16, 16, 16, 16, 16, 16, 16),
    "seed": (0, 0, 0, 0, 0, 0, 0),
    "matmul_precision": ("highest",) * 7,
}


@pytest.mark.parametrize("column", range(len(COLUMNS)), ids=[n + (f"-{o['method']}" if o else "") for n, o in COLUMNS])
def test_every_preset_gives_the_values_it_gave_before_the_refactor(column):
  name, overrides = COLUMNS[column]
  want = {field: values[column] for field, values in TODAY.items()}
  got = dataclasses.asdict(PruneConfig.preset(name, **overrides))
  assert got == want
  # Same types too (1 is not 1.0 in a report or a checkpoint's fingerprint).
  assert {k: type(v) for k, v in json.loads(json.dumps(got)).items()} == {k: type(v) for k, v in want.items()}


def test_the_defaults_are_the_recommended_preset_field_by_field():
  default, rec = PruneConfig(), PruneConfig.preset("recommended")
  for f in dataclasses.fields(PruneConfig):
    assert getattr(default, f.name) == getattr(rec, f.name), f.name
  assert presets.PRESETS["recommended"] == {}


def _written_defaults() -> dict[str, object]:
  """Each PruneConfig field's default as written in the class body of config.py: a literal
  or an enum member, the first argument of `_field(...)`; anything else fails here."""
  path = config_module.__file__
  with open(path) as f:
    tree = ast.parse(f.read())
  cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "PruneConfig")
  out = {}
  for st in cls.body:
    if not isinstance(st, ast.AnnAssign):
      continue
    call = st.value
    assert isinstance(call, ast.Call) and call.func.id == "_field", ast.unparse(st)
    node = call.args[0]
    if isinstance(node, ast.Attribute):  # Allocation.ADAPTIVE
      out[st.target.id] = getattr(getattr(config_module, node.value.id), node.attr)
    else:
      out[st.target.id] = ast.literal_eval(node)  # refuses a name, a call, a lookup: an indirection
  return out


def test_every_default_is_written_once_in_the_class_body():
  written = _written_defaults()
  assert list(written) == [f.name for f in dataclasses.fields(PruneConfig)]
  for f in dataclasses.fields(PruneConfig):
    assert f.default is not dataclasses.MISSING and type(f.default) is type(written[f.name]), f.name
    assert f.default == written[f.name], f.name
  # The recipe's own values, so that a default moved back to the paper's shows here.
  assert (written["method"], written["allocation"], written["reconstruct"], written["damping"]) == (
      "goa-obs", Allocation.ADAPTIVE, False, 1e-5)


@pytest.mark.parametrize("name", presets.names())
def test_presets_name_only_fields_that_differ_from_the_defaults(name):
  defaults = PruneConfig()
  for key, value in presets.PRESETS[name].items():
    assert key in PruneConfig.__dataclass_fields__, key
    assert getattr(defaults, key) != value, (name, key)


def test_presets_module_imports_no_config():
  """presets holds plain data; config imports it, never the other way (not even in a function)."""
  with open(presets.__file__) as f:
    tree = ast.parse(f.read())
  imported = {a.name if isinstance(n, ast.Import) else n.module for n in ast.walk(tree)
              if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
  assert not any(m and m.startswith("jaxprune.prune") for m in imported), imported


@pytest.mark.parametrize("field,text,member", [("heads", "similarity", HeadMode.SIMILARITY),
                                               ("allocation", "uniform", Allocation.UNIFORM),
                                               ("score_data", "identity", ScoreData.IDENTITY),
                                               ("rounding", "carry", Rounding.CARRY)])
def test_modes_given_as_strings_become_their_enum_members(field, text, member):
  c = PruneConfig(**{field: text})
  assert getattr(c, field) is member and getattr(c, field) == text
  assert c == PruneConfig(**{field: member}) and hash(c) == hash(PruneConfig(**{field: member}))
  assert getattr(dataclasses.replace(PruneConfig(), **{field: text}), field) is member
  # The report and the checkpoint's fingerprint see the plain string.
  loaded = json.loads(json.dumps(dataclasses.asdict(c)))
  assert loaded[field] == text and type(loaded[field]) is str


@pytest.mark.parametrize("field,allowed", [("heads", "second-moment, similarity"), ("allocation", "uniform, adaptive"),
                                           ("score_data", "calib, random, identity"), ("rounding", "once, carry")])
def test_a_bad_mode_is_a_one_line_usage_error_naming_field_value_and_choices(field, allowed):
  with pytest.raises(UsageError) as e:
    PruneConfig(**{field: "global"})
  assert str(e.value) == f"{field}='global' is not one of {allowed}"


@pytest.mark.parametrize("name,text,want", [
    ("sparsity", "0.5", 0.5), ("tau", "none", None), ("tau", "0.3", 0.3), ("refit", "off", False),
    ("refit", True, True), ("round_to", "8", 8), ("round_to", 8.0, 8), ("layers", "2:6", (2, 6)),
    ("layers", [2, 6], (2, 6)), ("heads", "similarity", HeadMode.SIMILARITY), ("method", "flap", "flap"),
])
def test_text_becomes_the_fields_type(name, text, want):
  got = fields.parse(PruneConfig, name, text, "here")
  assert got == want and type(got) is type(want)


@pytest.mark.parametrize("name,text,msg", [
    ("sparsity", "none", "here: sparsity='none' is not allowed; sparsity needs a value (a number)"),
    ("round_to", 2.5, "here: round_to=2.5 is not an integer"),
    ("round_to", True, "here: round_to=True is not a number; round_to takes an integer"),
    ("refit", "maybe", "here: refit='maybe' is not a boolean; use true or false"),
    ("layers", "2-6", "here: layers='2-6' is not a block range; use A:B"),
    ("method", "goa-obss", "here: method='goa-obss' is not one of flap, goa, goa-energy, goa-obs"),
    ("heads", 3, "here: heads=3 is not a string; heads takes one of second-moment, similarity"),
    ("damping", "lots", "here: damping='lots' is not a number; damping takes a number or 'auto'"),
])
def test_bad_text_names_the_key_the_value_and_what_is_allowed(name, text, msg):
  with pytest.raises(UsageError) as e:
    fields.parse(PruneConfig, name, text, "here")
  assert str(e.value).startswith(msg) and "\n" not in str(e.value)


def test_damping_auto_is_read_in_one_place_for_files_options_and_sets():
  assert config_values({"damping": "auto", "sparsity": "0.3"}, "x") == {"auto_damping": True, "sparsity": 0.3}
  assert config_values({"damping": "1e-4"}, "x") == {"damping": 1e-4}
  with pytest.raises(UsageError, match=r"x: unknown key 'dampng'; allowed: sparsity"):
    config_values({"dampng": "auto"}, "x")


@pytest.mark.parametrize("argv,needles", [
    (("--min-keep", "lots"), ("option --min-keep", "min_keep='lots' is not a number", "a number")),
    (("--layers", "3"), ("option --layers", "layers='3' is not a block range", "A:B")),
    (("--damping", "lots"), ("option --damping", "damping='lots'", "a number or 'auto'")),
    (("--round-to", "2.5"), ("option --round-to", "round_to='2.5' is not a number", "an integer")),
    (("--config", "CFG"), ("config file", "score_data='calibration' is not one of calib, random, identity")),
])
def test_bad_options_are_one_line_errors_and_leave_every_file_intact(tmp_path, argv, needles):
  cfg = tmp_path / "c.yaml"
  cfg.write_text("sparsity: 0.2\nscore_data: calibration\n")
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep.txt").write_text("mine")
  before = snapshot(str(tmp_path))
  argv = [str(cfg) if a == "CFG" else a for a in argv]
  r = run_cli("prune", "smollm2-135m", "--sparsity", "0.2", *argv, "--calib", "random", "--out",
              str(tmp_path / "new"), cwd=str(tmp_path))
  assert_one_line_error(r, *needles)
  assert_intact(before)
  assert sorted(os.listdir(tmp_path)) == ["c.yaml", "out"]
