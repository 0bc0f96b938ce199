"""Forward passes: logit parity with transformers on tiny random models, captures, compile counts."""

import importlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from jaxprune.models import CAPTURES, block_config, block_step, forward, hidden_states, logits
from jaxprune.spec import LayerSpec, ModelSpec, RopeSpec, param_shapes
from tests import tiny
from tests.numerics import forward_bound, gamma, sensitivity

# `jaxprune.models.forward` is also the name of a function re-exported by jaxprune.models.
F = importlib.import_module("jaxprune.models.forward")

ALL_KINDS = tuple(tiny.KINDS)
T = 24  # longer than Mistral's sliding window (8), so the window matters


def tokens(batch=2, length=T, seed=0):
  return np.random.default_rng(seed).integers(0, tiny.VOCAB, size=(batch, length)).astype(np.int32)


def torch_logits(path, ids):
  import torch
  import transformers

  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
  with torch.no_grad():
    return model(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()


def assert_parity(path, got, ids, what):
  """jaxprune's float32 logits against transformers, with a float64 run as the reference.

  Both engines must lie within the bound the model's own sensitivity gives
  (tests/numerics.py, point 2), and so within twice it of each other.
  """
  want = torch_logits(path, ids)
  assert got.shape == want.shape and got.dtype == np.float32
  sensitivity(path, ids).check_engines(got, want, what)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_logit_parity_with_transformers(tiny_dir, kind):
  path = tiny_dir(kind)
  ids = tokens()
  got = np.asarray(logits(*_spec_params(path), ids))
  chex.assert_shape(got, (2, T, tiny.VOCAB))
  assert_parity(path, got, ids, f"tiny {kind}")


def _spec_params(path):
  m = jaxprune.load(path)
  return m.spec, m.params


def sharpen(model, factor=8.0):
  """Scales W_Q and W_K so attention is far from uniform (random init leaves it nearly flat)."""
  import torch

  with torch.no_grad():
    if model.config.model_type == "gpt2":
      for blk in model.transformer.h:
        blk.attn.c_attn.weight[:, :2 * model.config.n_embd].mul_(factor)
    else:
      for layer in model.model.layers:
        a = layer.self_attn
        layer.self_attn.q_proj.weight.mul_(factor)
        layer.self_attn.k_proj.weight.mul_(factor)
        if hasattr(a, "q_norm"):  # the q/k norms undo a scale of W_Q, W_K: scale theirs ((1 + w) in Gemma)
          offset = 1.0 if model.config.model_type.startswith("gemma") else 0.0
          for n in (a.q_norm, a.k_norm):
            n.weight.copy_((n.weight + offset) * factor - offset)
  return model


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_logit_parity_with_sharp_attention(tmp_path, kind):
  # Peaked attention makes RoPE, masking and GQA grouping errors show up strongly in the logits.
  sharpen(tiny.build(kind, seed=1)).save_pretrained(tmp_path)
  ids = tokens(seed=1)
  spec, params = _spec_params(str(tmp_path))
  _, caps = forward(spec, params, ids, capture=("probs",))
  assert float(np.max(caps[0]["probs"][:, :, -1])) > 0.5  # really peaked
  assert_parity(str(tmp_path), np.asarray(logits(spec, params, ids)), ids, f"tiny {kind} sharp")


@pytest.mark.parametrize("kind", ["mistral", "gemma3"])
def test_sliding_window_changes_logits(tiny_dir, kind):
  # The same weights without the window must give different logits after position 8,
  # so the parity test above really exercises the window (Gemma: on its sliding layer).
  import dataclasses

  spec, params = _spec_params(tiny_dir(kind))
  ids = tokens()
  windowed = np.asarray(logits(spec, params, ids))
  full = np.asarray(logits(dataclasses.replace(spec, sliding_window=None), params, ids))
  # Before position 8 the two masks differ only in entries that softmax turns into exact
  # zeros, so the logits agree within two float32 forwards' bound (tests/numerics.py) ...
  bound = 2 * forward_bound(tiny_dir(kind), ids)
  np.testing.assert_allclose(windowed[:, :8], full[:, :8], atol=bound, rtol=0)
  # ... and after it they differ by far more than that.
  assert np.max(np.abs(windowed[:, 8:] - full[:, 8:])) > 100 * bound


def test_bf16_forward_is_close_to_f32(tiny_dir):
  m = jaxprune.load(tiny_dir("llama_gqa"))
  ids = tokens()
  f32 = np.asarray(logits(m.spec, m.params, ids))
  bf16 = logits(m.spec, m.astype(jnp.bfloat16).params, ids)
  assert bf16.dtype == jnp.float32  # logits stay f32
  # bfloat16's unit roundoff is 2^-9; two tiny blocks chain ~50 roundings into a logit
  # (norms, projections of width 64-96 accumulated in float32, softmax), so gamma_50 in
  # bfloat16 = 50 * 2^-9 / (1 - 50 * 2^-9) = 0.108 of the largest logit bounds the change.
  g = 50 * 2.0**-9 / (1 - 50 * 2.0**-9)
  assert np.max(np.abs(np.asarray(bf16) - f32)) < g * np.max(np.abs(f32))


def test_captures_have_documented_shapes(tiny_dir):
  m = jaxprune.load(tiny_dir("llama_gqa"))
  ids = tokens(batch=2, length=10)
  out, caps = forward(m.spec, m.params, ids, capture=tuple(CAPTURES))
  assert out.shape == (2, 10, tiny.VOCAB) and len(caps) == m.spec.num_layers
  c = caps[0]
  assert c["attn_in"].shape == c["attn_out"].shape == c["mlp_in"].shape == c["mlp_out"].shape == (2, 10, 64)
  assert c["probs"].shape == (2, 4, 10, 10) and c["probs"].dtype == jnp.float32
  assert c["heads"].shape == (2, 10, 4, 16) and c["hidden"].shape == (2, 10, 96)
  np.testing.assert_allclose(np.asarray(c["probs"]).sum(-1), 1.0, atol=1e-5)
  assert np.all(np.triu(np.asarray(c["probs"]), k=1) == 0)  # causal
  # The captures are the actual intermediates: attn_out = o-projection of heads.
  o = m.params["layers"][0]["attn"]["o"]["kernel"]
  np.testing.assert_allclose(np.asarray(c["attn_out"]), np.einsum("btnh,nhd->btd", c["heads"], o), atol=1e-5)
  with pytest.raises(ValueError, match=r"unknown capture names \['nope'\]; known: attn_in"):
    forward(m.spec, m.params, ids, capture=("nope",))


def test_hidden_states_can_resume_from_a_residual_stream(tiny_dir):
  m = jaxprune.load(tiny_dir("qwen2"))
  ids = tokens()
  full, _ = hidden_states(m.spec, m.params, ids)
  mid, _ = hidden_states(m.spec, m.params, ids, layers=[0])
  rest, _ = hidden_states(m.spec, m.params, ids, layers=[1], x=mid)
  np.testing.assert_array_equal(np.asarray(rest), np.asarray(full))


def _random_params(spec, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(scale=0.1, size=s).astype(np.float32)), param_shapes(spec),
                      is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x))


def test_one_compile_per_distinct_block_shape(max_traces):
  # Sizes no other test uses, so the global jit cache starts without them.
  odd, even = LayerSpec(3, 1, 8, 37), LayerSpec(2, 2, 8, 29)
  spec = ModelSpec(family="llama", vocab_size=23, hidden_size=24, layers=(odd, even, odd, odd), norm_eps=1e-6,
                   max_positions=32, tie_embeddings=True, rope=RopeSpec(theta=10000.0))
  params = _random_params(spec)
  ids = np.zeros((1, 5), np.int32)
  max_traces(F, "block_step", 2, static_argnames=("cfg", "capture"))  # four blocks, two distinct shapes
  logits(spec, params, ids)
  logits(spec, params, ids + 1)  # new values, same shapes: no retrace


def test_uneven_kv_groups_equal_explicit_copies():
  # A layer whose query heads read KV heads (0, 1, 1) computes what a plain MHA layer computes
  # with KV head 1 duplicated.
  uneven = ModelSpec(family="llama", vocab_size=17, hidden_size=16, layers=(LayerSpec(3, 2, 4, 8, (0, 1, 1)),),
                     norm_eps=1e-6, max_positions=16, tie_embeddings=True, rope=RopeSpec(theta=100.0))
  params = _random_params(uneven)
  attn = params["layers"][0]["attn"]
  mha_attn = {**attn, "k": {"kernel": attn["k"]["kernel"][:, [0, 1, 1]]},
              "v": {"kernel": attn["v"]["kernel"][:, [0, 1, 1]]}}
  mha = uneven.with_layers([LayerSpec(3, 3, 4, 8)])
  mha_params = {**params, "layers": ({**params["layers"][0], "attn": mha_attn},)}
  ids = np.arange(6, dtype=np.int32)[None]
  # The same float32 operations on the same values, reached through a gather instead of a
  # copy: at most each op's rounding differs. First order, a logit's error is gamma of the
  # longest chain of sums feeding it (norm 16, q.k 4, 6 keys, o 12, MLP 16 + 8, head 16, and
  # the norms' divisions) times the magnitudes summed (tests/numerics.py, point 1).
  a, b = np.asarray(logits(uneven, params, ids)), np.asarray(logits(mha, mha_params, ids))
  np.testing.assert_allclose(a, b, rtol=0, atol=2 * gamma(16 * 3 + 4 + 6 + 12 + 24 + 16) * 16 * np.abs(b).max())


def test_block_step_matches_attn_then_mlp(tiny_dir):
  m = jaxprune.load(tiny_dir("gpt2"))
  ids = jnp.asarray(tokens())
  pos = F.positions_for(ids)
  cfg = block_config(m.spec, 0)
  x = F.embed(m.spec, m.params, ids, pos)
  y, _ = block_step(cfg, m.params["layers"][0], x, pos)
  h, _ = F.attn_step(cfg, m.params["layers"][0], x, pos)
  z, _ = F.mlp_step(cfg, m.params["layers"][0], h)
  np.testing.assert_allclose(np.asarray(y), np.asarray(z), atol=1e-5)
