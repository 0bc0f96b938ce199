"""The engine's module kernels are jitted on the module's view of the block config
(`layers.part_config`): layers that differ only in what a module does not read (Gemma 3's
sliding and full-attention layers) share its compiles, and every result keeps its bits."""

import collections
import dataclasses
import inspect

import chex
import jax
import numpy as np
import pytest

import jaxprune
from jaxprune.models import adapter as A
from jaxprune.models import layers as L
from jaxprune.prune import PruneConfig, prune
from jaxprune.stats import passes

# The kernels jitted with a (module view of the) block config among their static arguments.
KERNELS = ("dense_pass", "hidden_pass", "second_apply", "add")


def _calib(n=16, t=16, seed=0):
  return np.random.default_rng(seed).integers(0, 128, size=(n, t)).astype(np.int32)


def _config():
  return PruneConfig.preset("recommended", sparsity=0.4, batch_size=8)


def _whole_block_configs(mp):
  """The code before views: every kernel jitted on the whole block config."""
  mp.setattr(L, "part_config", lambda cfg, part: cfg)


@pytest.mark.parametrize("kind", ["gemma3", "llama_gqa"])
def test_views_give_the_bits_of_whole_block_configs(tiny_dir, kind, monkeypatch):
  """A view leaves out only fields its kernels never read: the same computations, so the
  same kept units and the same parameters, bit for bit, as kernels on the whole config."""
  m = jaxprune.load(tiny_dir(kind))
  viewed = prune(m, _calib(), _config())
  with monkeypatch.context() as mp:
    _whole_block_configs(mp)
    whole = prune(m, _calib(), _config())
  assert [mod["kept"] for mod in viewed.report["modules"]] == [mod["kept"] for mod in whole.report["modules"]]
  assert viewed.model.spec == whole.model.spec
  chex.assert_trees_all_equal(viewed.model.params, whole.model.params, strict=True)


def _one_attention_setting(m):
  """`m` with every layer a full-attention one: the same weights, MLPs and norms."""
  spec = dataclasses.replace(m.spec, sliding_window=None, sliding_layers=None, rope_local=None)
  return dataclasses.replace(m, spec=spec)


def _cache_key(sig, static, args, kwargs):
  """What `jax.jit` keys its cache on (single device): the static values, and the tree
  structure, shapes and dtypes of the rest."""
  bound = sig.bind(*args, **kwargs)
  bound.apply_defaults()
  dyn = {k: v for k, v in bound.arguments.items() if k not in static}
  leaves, tree = jax.tree.flatten(dyn)
  return (tuple((k, bound.arguments[k]) for k in static), tree,
          tuple((np.shape(x), np.dtype(x.dtype)) for x in leaves))


def _kernel_compiles(monkeypatch, model):
  """{(kernel, module kind or None): distinct cache keys} of pruning `model` with cold caches,
  each kernel's count checked against its jit cache."""
  keys = collections.defaultdict(set)
  jitted = {name: getattr(passes, name) for name in KERNELS}
  with monkeypatch.context() as mp:
    for name in KERNELS:
      fn = getattr(passes, name)
      sig = inspect.signature(fn.__wrapped__)
      static = tuple(n for n in ("kind", "cfg", "first_moments", "inherited_error", "needs", "mesh", "skip")
                     if n in sig.parameters)

      def call(*args, _fn=fn, _name=name, _sig=sig, _static=static, **kwargs):
        key = _cache_key(_sig, _static, args, kwargs)
        keys[_name].add(key)
        return _fn(*args, **kwargs)

      mp.setattr(passes, name, call)
    jax.clear_caches()
    r = prune(model, _calib(), _config())
    sizes = {name: jitted[name]._cache_size() for name in KERNELS}
  by_kind = collections.Counter()
  for name, ks in keys.items():
    for key in ks:
      kind = dict(key[0]).get("kind")
      by_kind[name, None if kind is None else kind.name] += 1
  assert {n: len(keys[n]) for n in KERNELS} == sizes, "the recorded keys are not jit's cache entries"
  return by_kind, [(mod["module"], bool(mod.get("unchanged")), len(mod["kept"])) for mod in r.report["modules"]]


def test_gemma3_compiles_module_kernels_once_per_attention_setting(tiny_dir, monkeypatch):
  """Tiny Gemma 3 (a sliding-window layer with a local RoPE base, then a full-attention one)
  compiles what the same model with one attention setting compiles, plus the attention
  kernels once more: its MLP passes and post-norm adds are shared by both layers. With the
  whole block config as the key, its 4 MLP statistics kernels (plan and loop, per layer)
  and 2 post-norm adds were each compiled per layer type: 2 and 1 with the views."""
  m = jaxprune.load(tiny_dir("gemma3"))
  assert len({L.block_config(m.spec, i) for i in range(m.spec.num_layers)}) == 2
  two, path2 = _kernel_compiles(monkeypatch, m)
  one, path1 = _kernel_compiles(monkeypatch, _one_attention_setting(m))
  # The same modules cut to the same sizes, so both runs call the same kernels.
  assert path2 == path1
  for (name, kind), n in one.items():
    if kind != "attn":
      assert two[name, kind] == n, (name, kind, two, one)
    else:
      assert two[name, kind] <= 2 * n, (name, two, one)
  assert set(two) == set(one)
  attn = sum(n for (_, kind), n in one.items() if kind == "attn")
  assert sum(two.values()) <= sum(one.values()) + attn, (two, one)
  assert two["hidden_pass", "mlp"] == 2 and two["add", None] == 1, two


def test_mlp_view_reads_no_attention_field(tiny_dir):
  """The MLP's view of both Gemma 3 layer types is one config, and the attention's keeps what
  tells them apart; a view of a view is itself."""
  spec = jaxprune.load(tiny_dir("gemma3")).spec
  cfgs = [L.block_config(spec, i) for i in range(spec.num_layers)]
  assert len({L.part_config(c, A.MLP.name) for c in cfgs}) == 1
  assert len({L.part_config(c, "norm") for c in cfgs}) == 1
  attn = [L.part_config(c, A.ATTN.name) for c in cfgs]
  assert len(set(attn)) == 2 and [a.sliding_window for a in attn] == [c.sliding_window for c in cfgs]
  for c in cfgs:
    for part in L.PART_FIELDS:
      view = L.part_config(c, part)
      assert L.part_config(view, part) == view
      assert all(getattr(view, f) == getattr(c, f) for f in L.PART_FIELDS[part])
