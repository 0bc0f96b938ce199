"""Pure parameter surgery: identity when keeping everything, zeroing-equivalence otherwise."""

import jax
import numpy as np
import pytest

import jaxprune
from jaxprune import surgery
from jaxprune.errors import UsageError
from jaxprune.models import logits
from tests.numerics import forward_bound

KINDS = ["llama_mha", "llama_gqa", "llama_mqa", "qwen2", "mistral", "gpt2"]


def _tokens(n=2, t=20):
  return np.random.default_rng(0).integers(0, 128, size=(n, t)).astype(np.int32)


@pytest.mark.parametrize("kind", KINDS)
def test_keeping_everything_changes_nothing(tiny_dir, kind):
  m = jaxprune.load(tiny_dir(kind))
  keep = {i: np.arange(l.num_heads) for i, l in enumerate(m.spec.layers)}
  chans = {i: np.arange(l.ffn_dim) for i, l in enumerate(m.spec.layers)}
  p = surgery.prune_model(m, keep, chans)
  assert p.spec == m.spec
  np.testing.assert_array_equal(np.asarray(logits(p.spec, p.params, _tokens())),
                                np.asarray(logits(m.spec, m.params, _tokens())))


@pytest.mark.parametrize("kind", KINDS)
def test_removing_equals_zeroing(tiny_dir, kind):
  m = jaxprune.load(tiny_dir(kind))
  layer = m.spec.layers[0]
  G = layer.num_heads // layer.num_kv_heads
  heads = np.arange(0, layer.num_heads, 2) if G == 1 else np.asarray([g * G for g in range(layer.num_kv_heads)])
  chans = np.arange(0, layer.ffn_dim, 3)
  pruned = surgery.prune_model(m, {0: heads}, {0: chans})
  blk = surgery.zero_channels(surgery.zero_heads(m.params["layers"][0], layer, heads), layer, chans)
  zeroed = {**m.params, "layers": (blk,) + tuple(m.params["layers"][1:])}
  # Removing and zeroing compute the same function; as two float32 forwards they may round
  # differently, each within forward_bound of the exact logits (tests/numerics.py).
  np.testing.assert_allclose(np.asarray(logits(pruned.spec, pruned.params, _tokens())),
                             np.asarray(logits(m.spec, zeroed, _tokens())), rtol=0,
                             atol=2 * forward_bound(tiny_dir(kind), _tokens()))
  assert pruned.spec.layers[0].num_heads == len(heads) and pruned.spec.layers[0].ffn_dim == len(chans)
  assert pruned.num_params < m.num_params
  # The input model is untouched (surgery is pure).
  assert jax.tree.map(np.shape, m.params) == jax.tree.map(np.shape, jaxprune.load(tiny_dir(kind)).params)


def test_kv_head_goes_only_with_its_whole_group(tiny_dir):
  m = jaxprune.load(tiny_dir("llama_gqa"))  # 4 query heads, 2 KV heads (groups {0,1}, {2,3})
  one_each = surgery.prune_model(m, {0: [0, 2]})
  assert (one_each.spec.layers[0].num_heads, one_each.spec.layers[0].num_kv_heads) == (2, 2)
  whole = surgery.prune_model(m, {0: [2, 3]})
  assert (whole.spec.layers[0].num_heads, whole.spec.layers[0].num_kv_heads) == (2, 1)
  with pytest.raises(UsageError, match="uneven KV groups"):
    surgery.prune_model(m, {0: [0, 1, 2]})
  free = surgery.prune_model(m, {0: [0, 1, 2]}, free_groups=True)
  assert free.spec.layers[0].kv_map == (0, 0, 1)
  zeroed = surgery.zero_heads(m.params["layers"][0], m.spec.layers[0], [0, 1, 2])
  ref = {**m.params, "layers": (zeroed,) + tuple(m.params["layers"][1:])}
  np.testing.assert_allclose(np.asarray(logits(free.spec, free.params, _tokens())),
                             np.asarray(logits(m.spec, ref, _tokens())), rtol=0,
                             atol=2 * forward_bound(tiny_dir("llama_gqa"), _tokens()))  # as above


@pytest.mark.parametrize("idx,msg", [([], "at least one"), ([1, 1], "more than once"), ([2, 1], "sorted"),
                                     ([0, 9], r"\[9\] are out of range"), ([0.5], "integer")])
def test_bad_indices_are_named(tiny_dir, idx, msg):
  m = jaxprune.load(tiny_dir("llama_mha"))
  with pytest.raises(UsageError, match=msg):
    surgery.prune_model(m, {0: np.asarray(idx)})


def test_bad_layer_is_refused(tiny_dir):
  m = jaxprune.load(tiny_dir("llama_mha"))
  with pytest.raises(UsageError, match="layer 5 is out of range"):
    surgery.prune_model(m, {5: [0]})
