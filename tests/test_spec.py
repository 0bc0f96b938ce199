"""ModelSpec: per-layer sizes, validation, JSON round trip, shape trees and checks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.errors import ConfigError, ShapeError
from jaxprune.spec import LayerSpec, ModelSpec, RopeSpec, check_params, count_params, param_shapes, \
    spec_from_params


def llama_spec(D, layers, V=32000, tie=False, **kw) -> ModelSpec:
  return ModelSpec(family="llama", vocab_size=V, hidden_size=D, layers=tuple(layers), norm_eps=1e-5,
                   max_positions=4096, tie_embeddings=tie, rope=RopeSpec(theta=10000.0), **kw)


LLAMA_7B = llama_spec(4096, [LayerSpec(32, 32, 128, 11008)] * 32)
LLAMA_70B = llama_spec(8192, [LayerSpec(64, 8, 128, 28672)] * 80)


def shape_structs(spec: ModelSpec, dtype=jnp.bfloat16):
  """A ShapeDtypeStruct tree of the model's parameters (nothing allocated)."""
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), param_shapes(spec),
                      is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x))


def random_params(spec: ModelSpec, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), param_shapes(spec),
                      is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x))


@pytest.mark.parametrize("spec,expected", [(LLAMA_7B, 6_738_415_616), (LLAMA_70B, 68_976_648_192)])
def test_big_specs_parameter_counts(spec, expected):
  # Llama-2-7B and Llama-2-70B (vocab 32000) have exactly these many parameters.
  structs = shape_structs(spec)
  assert count_params(structs) == expected


def test_eval_shape_of_a_forward_pass_on_a_7b_spec_allocates_nothing():
  from jaxprune.models import logits

  structs = shape_structs(LLAMA_7B)
  out = jax.eval_shape(lambda p, t: logits(LLAMA_7B, p, t), structs, jax.ShapeDtypeStruct((2, 16), jnp.int32))
  assert out.shape == (2, 16, 32000) and out.dtype == jnp.float32


def test_eval_shape_of_a_70b_block():
  from jaxprune.models import block_config, block_step

  structs = shape_structs(LLAMA_70B)
  x = jax.ShapeDtypeStruct((1, 8, 8192), jnp.bfloat16)
  pos = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  y, caps = jax.eval_shape(lambda b, x, p: block_step(block_config(LLAMA_70B, 0), b, x, p, ("heads", "hidden")),
                           structs["layers"][0], x, pos)
  assert y.shape == (1, 8, 8192)
  assert caps["heads"].shape == (1, 8, 64, 128) and caps["hidden"].shape == (1, 8, 28672)


def test_param_shapes_follow_per_layer_sizes():
  spec = llama_spec(64, [LayerSpec(4, 2, 16, 96), LayerSpec(3, 1, 16, 40)], V=100)
  shapes = param_shapes(spec)
  a0, a1 = shapes["layers"][0]["attn"], shapes["layers"][1]["attn"]
  assert (a0["q"]["kernel"], a0["k"]["kernel"], a0["o"]["kernel"]) == ((64, 4, 16), (64, 2, 16), (4, 16, 64))
  assert (a1["q"]["kernel"], a1["v"]["kernel"]) == ((64, 3, 16), (64, 1, 16))
  assert shapes["layers"][1]["mlp"]["gate"]["kernel"] == (64, 40)
  assert shapes["lm_head"]["kernel"] == (64, 100)
  assert "lm_head" not in param_shapes(dataclasses.replace(spec, tie_embeddings=True))


def test_spec_from_params_rederives_sizes_from_arrays():
  spec = llama_spec(32, [LayerSpec(4, 2, 8, 48)] * 2, V=50)
  small = llama_spec(32, [LayerSpec(4, 2, 8, 48), LayerSpec(2, 1, 8, 20)], V=50)
  derived = spec_from_params(spec, random_params(small))
  assert derived.layers == small.layers
  assert not derived.uniform and spec.uniform


def test_check_params_names_every_problem_and_the_fix():
  spec = llama_spec(32, [LayerSpec(4, 2, 8, 48)] * 2, V=50)
  params = random_params(spec)
  check_params(spec, params)  # consistent: no error
  bad = jax.tree.map(lambda x: x, params)
  bad["layers"] = (bad["layers"][0], {**bad["layers"][1], "mlp": {**bad["layers"][1]["mlp"]}})
  bad["layers"][1]["mlp"]["up"] = {"kernel": np.zeros((32, 47), np.float32)}
  del bad["final_norm"]
  bad["extra"] = {"w": np.zeros(3, np.float32)}
  with pytest.raises(ShapeError) as e:
    check_params(spec, bad)
  msg = str(e.value)
  assert "3 problems" in msg
  assert "layers[1].mlp.up.kernel: shape (32, 47), but the config implies (32, 48)" in msg
  assert "final_norm.scale: missing (expected shape (32,))" in msg
  assert "extra.w: unexpected leaf of shape (3,)" in msg
  assert "Check that config.json belongs to these weights" in msg


@pytest.mark.parametrize("kw,needle", [
    (dict(num_heads=0, num_kv_heads=1, head_dim=8, ffn_dim=8), "num_heads must be a positive integer, got 0"),
    (dict(num_heads=4, num_kv_heads=3, head_dim=8, ffn_dim=8), "pass an explicit kv_map"),
    (dict(num_heads=3, num_kv_heads=2, head_dim=8, ffn_dim=8, kv_map=(0, 0)), "kv_map has 2 entries but"),
    (dict(num_heads=3, num_kv_heads=2, head_dim=8, ffn_dim=8, kv_map=(0, 0, 0)), "must use every KV head 0..1"),
])
def test_layer_spec_errors(kw, needle):
  with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
    LayerSpec(**kw)


def test_uneven_groups_and_canonical_form():
  l = LayerSpec(3, 2, 8, 16, kv_map=(0, 1, 1))
  assert not l.uniform_groups and l.kv_index == (0, 1, 1)
  assert LayerSpec(4, 2, 8, 16, kv_map=(0, 0, 1, 1)).canonical().kv_map is None
  assert LayerSpec(4, 2, 8, 16).kv_index == (0, 0, 1, 1)


def test_model_spec_errors():
  with pytest.raises(ConfigError, match="model family 'bert' is not supported; supported families: gemma3, gpt2, llama"):
    llama_spec(8, [LayerSpec(1, 1, 8, 8)]).__class__(
        family="bert", vocab_size=4, hidden_size=8, layers=(LayerSpec(1, 1, 8, 8),), norm_eps=1e-5,
        max_positions=8, tie_embeddings=True)
  with pytest.raises(ConfigError, match="activation 'relu' is not supported; supported: silu"):
    llama_spec(8, [LayerSpec(1, 1, 8, 8)], act="relu")
  with pytest.raises(ConfigError, match="at least one layer"):
    llama_spec(8, [])
  with pytest.raises(ConfigError, match="uses rope positions"):
    dataclasses.replace(llama_spec(8, [LayerSpec(1, 1, 8, 8)]), rope=None)


def test_json_round_trip_keeps_per_layer_sizes_and_kv_maps():
  spec = llama_spec(32, [LayerSpec(4, 2, 8, 48), LayerSpec(3, 2, 8, 20, kv_map=(0, 1, 1))], V=50,
                    sliding_window=16, qkv_bias=True)
  spec = dataclasses.replace(spec, rope=RopeSpec(theta=5e5, kind="llama3", factor=8.0))
  again = ModelSpec.from_json(spec.to_json())
  assert again == spec and hash(again) == hash(spec)
  with pytest.raises(ConfigError, match=r"unknown ModelSpec fields \['colour'\]"):
    ModelSpec.from_json({**spec.to_json(), "colour": "red"})


def test_rope_inv_freq_matches_transformers():
  import torch
  from transformers import LlamaConfig
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  for params, rope in [
      ({"rope_type": "linear", "rope_theta": 500.0, "factor": 4.0}, RopeSpec(500.0, "linear", 4.0)),
      ({"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
       RopeSpec(10000.0, "llama3", 8.0, 1.0, 4.0, 16)),
  ]:
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters=params)
    want, _ = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, torch.device("cpu"))
    np.testing.assert_allclose(rope.inv_freq(16), want.numpy(), rtol=1e-6)
