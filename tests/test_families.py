"""The family registry: every registered family is complete, consistent both ways, and tested end to end."""

from __future__ import annotations

import ast
import collections
import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from jaxprune import families
from jaxprune.errors import ConfigError
from jaxprune.families.base import ConfigLayout, Positions
from jaxprune.io.gguf_export import gguf_name
from jaxprune.io.hf_config import spec_from_hf_config
from jaxprune.io.hf_target import hf_target
from jaxprune.io.mapping import params_to_tensors, tensors_to_params
from jaxprune.spec import ACTIVATIONS, LayerSpec, _flatten, param_shapes
from tests import tiny
from tests.badinput import assert_intact, assert_one_line_error, run_cli, snapshot

FAMILIES = families.names()


def _tiny_kinds() -> dict[str, list[str]]:
  """Family -> the tiny-model kinds (tests/tiny.py) built with its transformers config class."""
  transformers = pytest.importorskip("transformers")
  out = collections.defaultdict(list)
  for kind, (cls_name, _) in tiny.KINDS.items():
    out[families.for_model_type(getattr(transformers, cls_name).model_type).name].append(kind)
  return out


def _kind(name: str) -> str:
  return _tiny_kinds()[name][0]


def _spec(tiny_dir, name: str):
  with open(os.path.join(tiny_dir(_kind(name)), "config.json")) as f:
    return spec_from_hf_config(json.load(f))


def _pruned(spec):
  """`spec` with layer 0 at half its heads (whole KV groups, or within the one group) and fewer MLP channels."""
  l = spec.layers[0]
  return spec.with_layers([LayerSpec(l.num_heads // 2, max(1, l.num_kv_heads // 2), l.head_dim, l.ffn_dim - 8),
                           *spec.layers[1:]])


def test_every_family_has_a_tiny_model_in_the_parity_tests():
  # tests/test_export.py's parity and round-trip tests run over every kind of tests/tiny.py.
  assert set(_tiny_kinds()) == set(FAMILIES)


@pytest.mark.parametrize("name", FAMILIES)
def test_registry_lookups_agree(name):
  fam = families.get(name)
  assert fam.name == name and families.for_model_type(fam.model_type) is fam
  assert fam.table is not None and fam.architectures and name in families.exportable()
  assert fam.act in ACTIVATIONS and (fam.positions == Positions.ROPE) == (fam.config_layout == ConfigLayout.LLAMA)
  if fam.fallback is not None:
    assert families.get(fam.fallback).fallback is None  # one step: a fallback is written as itself


@pytest.mark.parametrize("name", FAMILIES)
def test_activation_names_round_trip(name):
  fam = families.get(name)
  assert set(fam.act_to_hf) == set(ACTIVATIONS)
  assert all(fam.act_from_hf[fam.act_to_hf[a]] == a for a in ACTIVATIONS)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("layout", ["dense", "per_layer"])
def test_hf_config_round_trips(tiny_dir, name, layout):
  spec = _spec(tiny_dir, name)
  spec = _pruned(spec) if layout == "per_layer" else spec
  target = hf_target(spec)
  assert target.model_type == families.get(name).model_type and target.per_layer == (layout == "per_layer")
  assert spec_from_hf_config(json.loads(json.dumps(target.config))) == spec


@pytest.mark.parametrize("name", FAMILIES)
def test_per_layer_keys_name_config_attributes(name):
  """Every per-layer key the PyTorch loader applies, and every alias the reader accepts, is a key of the
  family's config class."""
  transformers = pytest.importorskip("transformers")
  fam = families.get(name)
  config = transformers.CONFIG_MAPPING[fam.model_type]()
  for key, attr in fam.layer_keys.items():
    assert hasattr(config, attr), (key, attr)
  assert set(fam.layer_aliases) <= set(fam.layer_keys)


@pytest.mark.parametrize("name", FAMILIES)
def test_tensor_table_is_a_bijection(tiny_dir, name):
  """With every optional tensor present, each parameter leaf is named by exactly one rule, and the
  tensors map back to the same parameters bit for bit."""
  spec = dataclasses.replace(_spec(tiny_dir, name), qkv_bias=True, o_bias=True, mlp_bias=True,
                             tie_embeddings=False)
  table = families.get(name).table
  for rules in (table.top, table.block):
    names = [r.hf for r in rules]
    assert len(names) == len(set(names))
  leaves = [p for r in table.top for p in r.paths] + [p for r in table.block for p in r.paths]
  assert len(leaves) == len(set(leaves))

  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s).astype(np.float32), param_shapes(spec),
                        is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x))
  tensors = params_to_tensors(spec, params)
  n_rules = len(table.top) + spec.num_layers * len(table.block)
  assert len(tensors) == n_rules
  back = _flatten(tensors_to_params(spec, tensors))
  flat = _flatten(params)
  assert set(back) == set(flat)
  assert all(np.array_equal(back[k], flat[k]) for k in flat)


@pytest.mark.parametrize("name", [n for n in FAMILIES if families.get(n).gguf_arch is not None])
def test_gguf_names_are_a_bijection(name):
  fam = families.get(name)
  block_hf = {r.hf for r in fam.table.block}
  top_hf = {r.hf for r in fam.table.top}
  assert set(fam.gguf_block.values()) <= block_hf and set(fam.gguf_top.values()) <= top_hf
  for table in (fam.gguf_top, fam.gguf_block):
    assert len(set(table.values())) == len(table)
  # Every block tensor the table can write has a GGUF name, and the names come back to it.
  prefix = fam.table.block_prefix.format(i=3)
  written = {hf: gguf_name(prefix + hf, name) for hf in block_hf}
  assert len(set(written.values())) == len(written)
  assert all(fam.gguf_block.get(g.removeprefix("blk.3."), hf) == hf for hf, g in written.items())


def test_every_remote_class_is_in_the_shipped_modeling_file():
  # Parsed, not imported: the file is copied into exports and imports transformers' model classes.
  path = os.path.join(os.path.dirname(os.path.dirname(families.__file__)), "io", "modeling_per_layer.py")
  with open(path) as f:
    classes = {n.name for n in ast.parse(f.read()).body if isinstance(n, ast.ClassDef)}
  assert {families.get(n).remote_class for n in FAMILIES} <= classes


def test_every_architecture_is_a_transformers_class():
  transformers = pytest.importorskip("transformers")
  for name in FAMILIES:
    assert all(hasattr(transformers, a) for a in families.get(name).architectures), name


@pytest.mark.parametrize("lookup,needle", [
    (lambda: families.get("bert"), "model family 'bert' is not supported; supported families: gemma3, gpt2, llama"),
    (lambda: families.for_model_type("bert"), "model_type 'bert' is not supported; supported: llama, mistral"),
])
def test_unknown_family_is_one_line(lookup, needle):
  with pytest.raises(ConfigError) as e:
    lookup()
  assert needle in str(e.value) and "\n" not in str(e.value)


def test_unknown_model_type_in_the_cli_is_one_line(tiny_dir, tmp_path):
  src = tiny_dir("llama_gqa")
  d = tmp_path / "bert"
  d.mkdir()
  with open(os.path.join(src, "config.json")) as f:
    cfg = {**json.load(f), "model_type": "bert"}
  (d / "config.json").write_text(json.dumps(cfg))
  before = snapshot(str(d))
  r = run_cli("inspect", str(d))
  assert_one_line_error(r, "model_type 'bert' is not supported", "llama, mistral, qwen2, gpt2")
  assert_intact(before)


def test_families_import_only_errors_and_each_other():
  """The registry sits below everything that reads it (spec, models, io), so it can never close an import
  cycle: its files import nothing of jaxprune but `errors` and one another, at any depth of a function."""
  root = os.path.dirname(families.__file__)
  for name in sorted(os.listdir(root)):
    if not name.endswith(".py"):
      continue
    with open(os.path.join(root, name)) as f:
      tree = ast.parse(f.read())
    mods = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    mods += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    inner = [m for m in mods if m.split(".")[0] == "jaxprune"]
    assert all(m == "jaxprune.errors" or m.startswith("jaxprune.families") for m in inner), (name, inner)
