"""jaxprune.flax_bridge: pruned models as Flax NNX modules give jaxprune's logits."""

import jax
import numpy as np
import pytest
from flax import nnx

import jaxprune
from jaxprune.flax_bridge import LM, from_flax, to_flax
from jaxprune.surgery import prune_model

EPS32 = float(np.finfo(np.float32).eps)
T = 16  # longer than the tiny Mistral's sliding window (8), so the window matters

# Per kind, a keep plan whose sizes differ by layer: {layer: heads}, {layer: channels}, free_groups.
# The tiny LLaMA-like models have 4 query heads, 96 MLP channels and 2 layers; GPT-2 has 4 heads and 256.
PLANS = {
    "llama_gqa": ({0: [0, 1]}, {0: list(range(0, 96, 2)), 1: list(range(5, 90))}, False),
    "llama_mha": ({0: [0, 1, 3]}, {1: list(range(30))}, False),
    "llama_mqa": ({1: [2]}, {0: list(range(1, 96, 3))}, False),
    "llama_bias": ({0: [2, 3], 1: [0, 1, 2, 3]}, {0: [3, 7, 50], 1: list(range(60))}, False),
    "qwen2": ({0: [0, 1, 3]}, {0: list(range(40))}, True),  # uneven GQA groups: kv_map (0, 0, 1)
    "mistral": ({1: [0, 1]}, {1: list(range(10, 80))}, False),
    "qwen3": ({0: [0, 1]}, {1: list(range(0, 96, 3))}, False),  # q/k norms over head_dim 16
    # (1 + w) norms, q/k and post-norms, scaled embeddings, query_pre_attn_scalar, a window on layer 0
    # only with its own RoPE base, the logit soft-cap; one KV head, head_dim 32.
    "gemma3": ({0: [0, 2]}, {1: list(range(0, 96, 3))}, False),
    "gpt2": ({0: [1, 3]}, {0: list(range(0, 256, 4)), 1: list(range(100))}, False),
}


def _tokens(seed=0):
  return np.random.default_rng(seed).integers(0, 128, size=(2, T))


def _bound(model, logits):
  """Largest |logit difference| two correct float32 implementations can show.

  Both sides compute the same function in float32 with different operation
  orders (fused q/k/v matmul, XLA's attention, flax's norms). A length-n float32
  dot product is off by at most n * eps relative to the sum of its terms'
  magnitudes (Higham's gamma_n), here of the order of the logits' magnitude;
  each of the L blocks adds two modules' errors to the residual stream and the
  head one more, and the factor 4 covers the element-wise steps (norm,
  softmax, RoPE, activation) between them. This does not depend on the CPU's
  summation order; a wrong leaf layout (permuted channels or heads) moves the
  tiny models' logits by 1e-2 or more, over 40 times the bound.
  """
  spec = model.spec
  n = max([spec.hidden_size, T] + [max(l.ffn_dim, l.num_heads * l.head_dim) for l in spec.layers])
  return 4 * (2 * spec.num_layers + 1) * n * EPS32 * float(np.abs(logits).max())


@pytest.mark.parametrize("kind", sorted(PLANS))
def test_flax_module_matches_jaxprune_logits_dense_and_pruned(tiny_dir, kind):
  dense = jaxprune.load(tiny_dir(kind))
  heads, channels, free = PLANS[kind]
  pruned = prune_model(dense, heads, channels, free_groups=free)
  assert len(set(pruned.spec.layers)) == 2  # the two blocks really have different sizes
  tokens = _tokens()
  for model in (dense, pruned):
    lm = to_flax(model)
    assert isinstance(lm, LM)
    want = np.asarray(jaxprune.logits(model.spec, model.params, tokens))
    got = np.asarray(lm(tokens))
    assert got.dtype == np.float32 and got.shape == want.shape == (2, T, model.spec.vocab_size)
    err, bound = float(np.abs(got - want).max()), _bound(model, want)
    assert err <= bound, f"{kind}: max |flax - jaxprune| = {err:.3g} > bound {bound:.3g}"
    # Each Flax block has the pruned sizes, read from its own parameters.
    for block, layer in zip(lm.layers, model.spec.layers, strict=True):
      assert block.attn.q.kernel.shape[1:] == (layer.num_heads, layer.head_dim)
      assert block.attn.k.kernel.shape[1] == layer.num_kv_heads
      assert block.mlp.down.kernel.shape[0] == layer.ffn_dim


def test_round_trip_through_flax_is_exact_and_the_bound_catches_a_layout_error(tiny_dir):
  dense = jaxprune.load(tiny_dir("llama_gqa"))
  pruned = prune_model(dense, *PLANS["llama_gqa"][:2])
  lm = to_flax(pruned)
  back = from_flax(lm, pruned.spec)
  assert back.spec == pruned.spec
  assert jax.tree.structure(back.params) == jax.tree.structure(pruned.params)
  for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(pruned.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # The comparison above can fail: reversing the order of block 0's MLP channels in the down projection
  # only (the kind of mistake a layout bug makes) moves the logits far beyond the bound.
  tokens = _tokens(1)
  want = np.asarray(jaxprune.logits(pruned.spec, pruned.params, tokens))
  down = lm.layers[0].mlp.down.kernel
  down[...] = down[...][::-1]
  assert np.abs(np.asarray(lm(tokens)) - want).max() > 10 * _bound(pruned, want)


def test_flax_module_trains_with_nnx_split_and_merge(tiny_dir):
  # The module is an ordinary NNX module: split/merge and jit work on its state.
  model = jaxprune.load(tiny_dir("gpt2"))
  graphdef, state = nnx.split(to_flax(model))
  tokens = _tokens(2)

  @jax.jit
  def run(state):
    return nnx.merge(graphdef, state)(tokens)

  want = np.asarray(jaxprune.logits(model.spec, model.params, tokens))
  assert np.abs(np.asarray(run(state)) - want).max() <= _bound(model, want)


def test_attention_soft_capping_is_refused_in_one_line(tiny_dir):
  """Gemma 2's score capping (a spec field no family's reader sets today) has no place in
  jax.nn.dot_product_attention: refused rather than computed without it."""
  import dataclasses

  from jaxprune.errors import ConfigError
  from jaxprune.model import Model

  model = jaxprune.load(tiny_dir("gemma3"))
  capped = Model(dataclasses.replace(model.spec, attn_softcap=50.0), model.params, model.source)
  with pytest.raises(ConfigError, match="attention-score soft-capping .50.*jaxprune.logits") as e:
    to_flax(capped)
  assert "\n" not in str(e.value)
