"""A Flax NNX bridge: pruned (or dense) jaxprune models as `flax.nnx` modules.

`LM(spec, rngs=...)` is a LLaMA / Mistral / Qwen2 / Qwen3 / Gemma 3 / GPT-2 decoder
written with stock NNX layers (`nnx.Embed`, `nnx.RMSNorm` / `nnx.LayerNorm`,
`nnx.Einsum`, `nnx.Linear`; Gemma's `(1 + w)` RMSNorm is `OffsetRMSNorm` here) and
`jax.nn.dot_product_attention`. Every block is built at its own size from
`ModelSpec.layers` (query heads, KV heads, head dim, MLP width), so a model whose
layers were pruned differently needs no padding.

The module's attribute tree is named like jaxprune's parameter tree
(`layers[i].attn.q.kernel [D,N,H]`, `layers[i].mlp.down.kernel [F,D]`, ...),
so `to_flax` is a checked copy of the leaves into the module state and
`from_flax` the inverse:

    model = jaxprune.load("smollm2-135m")
    pruned = prune(model, calib, PruneConfig(sparsity=0.2)).model
    lm = to_flax(pruned)            # an nnx.Module holding the pruned weights
    logits = lm(tokens)             # [B,T,V] f32, as jaxprune.logits(pruned.spec, pruned.params, tokens)
    graphdef, state = nnx.split(lm) # for nnx.jit / optax / Orbax as usual

The forward pass here is a second implementation written from the same
equations (it shares only `RopeSpec.inv_freq`), so `tests/test_flax_bridge.py`
comparing the two checks the layout of every leaf.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from jaxprune.errors import ConfigError, ShapeError
from jaxprune.model import Model
from jaxprune.spec import LayerSpec, ModelSpec, Params, check_params

F32 = jnp.float32

_ACTS = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
         "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


class OffsetRMSNorm(nnx.Module):
  """Gemma's RMSNorm: x / rms(x) * (offset + scale), its weights stored around 0."""

  def __init__(self, dim: int, epsilon: float, offset: float):
    self.scale = nnx.Param(jnp.zeros((dim,), F32))
    self.epsilon, self.offset = epsilon, offset

  def __call__(self, x):
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.epsilon)
    return x * (self.offset + self.scale[...])


def _norm(spec: ModelSpec, rngs: nnx.Rngs, dim: int | None = None) -> nnx.Module:
  D = dim or spec.hidden_size
  if spec.fam.norm_offset:
    return OffsetRMSNorm(D, spec.norm_eps, spec.fam.norm_offset)
  if spec.fam.norm == "rms":
    return nnx.RMSNorm(D, epsilon=spec.norm_eps, rngs=rngs)
  # Two-pass variance, as PyTorch's LayerNorm computes it.
  return nnx.LayerNorm(D, epsilon=spec.norm_eps, use_fast_variance=False, rngs=rngs)


def _rotate(x, cos, sin):
  """Rotate-half RoPE of x [B,T,n,H] with cos, sin [T,H] (Hugging Face layout)."""
  h = x.shape[-1] // 2
  rot = jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)
  return x * cos[:, None, :] + rot * sin[:, None, :]


class Attention(nnx.Module):
  """Grouped-query self-attention with heads as an axis: q [D,N,H], k, v [D,K,H], o [N,H,D]."""

  def __init__(self, spec: ModelSpec, layer: LayerSpec, *, rngs: nnx.Rngs, index: int = 0):
    D, N, K, H = spec.hidden_size, layer.num_heads, layer.num_kv_heads, layer.head_dim
    qkv_bias = spec.qkv_bias
    self.q = nnx.Einsum("btd,dnh->btnh", (D, N, H), (N, H) if qkv_bias else None, rngs=rngs)
    self.k = nnx.Einsum("btd,dkh->btkh", (D, K, H), (K, H) if qkv_bias else None, rngs=rngs)
    self.v = nnx.Einsum("btd,dkh->btkh", (D, K, H), (K, H) if qkv_bias else None, rngs=rngs)
    self.o = nnx.Einsum("btnh,nhd->btd", (N, H, D), (D,) if spec.o_bias else None, rngs=rngs)
    # Qwen3, Gemma 3: one RMSNorm over head_dim, shared by every query (and every key) head, before RoPE.
    self.q_norm = _norm(spec, rngs, H) if spec.fam.qk_norm else None
    self.k_norm = _norm(spec, rngs, H) if spec.fam.qk_norm else None
    # Gemma 3's sliding layers have their own RoPE base; only they have the window (Mistral: every layer).
    local = spec.rope_local is not None and index in (spec.sliding_layers or ())
    self.rope = spec.rope_local if local else spec.rope
    self.sliding_window = spec.sliding_window if spec.sliding(index) else None
    self.scale = None if spec.query_pre_attn_scalar is None else float(spec.query_pre_attn_scalar)**-0.5
    kv_map = layer.canonical().kv_map
    self.kv_map = None if kv_map is None else tuple(kv_map)

  def __call__(self, x):
    """x [B,T,D] (normalized) -> [B,T,D]."""
    q, k, v = self.q(x), self.k(x), self.v(x)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    T, H = x.shape[1], q.shape[-1]
    if self.rope is not None:
      freqs = jnp.arange(T, dtype=F32)[:, None] * jnp.asarray(self.rope.inv_freq(H))
      angles = jnp.concatenate([freqs, freqs], axis=-1)
      cos, sin = jnp.cos(angles), jnp.sin(angles)
      q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    if self.kv_map is not None:  # uneven groups: each query head gets its own copy of its KV head
      idx = np.asarray(self.kv_map)
      k, v = k[:, :, idx], v[:, :, idx]
    # The window covers the query and the `sliding_window - 1` keys before it (Mistral's convention).
    window = None if self.sliding_window is None else (self.sliding_window - 1, 0)
    heads = jax.nn.dot_product_attention(q, k, v, scale=self.scale, is_causal=True, local_window_size=window,
                                         implementation="xla")
    return self.o(heads)


class MLP(nnx.Module):
  """`act(x W_up) W_down` (GPT-2) or `(act(x W_gate) * x W_up) W_down` (LLaMA family)."""

  def __init__(self, spec: ModelSpec, layer: LayerSpec, *, rngs: nnx.Rngs):
    D, F, bias = spec.hidden_size, layer.ffn_dim, spec.mlp_bias
    self.up = nnx.Linear(D, F, use_bias=bias, rngs=rngs)
    self.gate = nnx.Linear(D, F, use_bias=bias, rngs=rngs) if spec.fam.gated_mlp else None
    self.down = nnx.Linear(F, D, use_bias=bias, rngs=rngs)
    self.act = spec.act

  def __call__(self, x):
    act = _ACTS[self.act]
    h = act(self.up(x)) if self.gate is None else act(self.gate(x)) * self.up(x)
    return self.down(h)


class Block(nnx.Module):
  """Pre-norm transformer block at the sizes of one `LayerSpec` (block `index` of the model); Gemma's
  also normalizes each module's output before the residual add."""

  def __init__(self, spec: ModelSpec, layer: LayerSpec, *, rngs: nnx.Rngs, index: int = 0):
    post = spec.fam.post_norms
    self.attn_norm = _norm(spec, rngs)
    self.attn = Attention(spec, layer, rngs=rngs, index=index)
    self.attn_post_norm = _norm(spec, rngs) if post else None
    self.mlp_norm = _norm(spec, rngs)
    self.mlp = MLP(spec, layer, rngs=rngs)
    self.mlp_post_norm = _norm(spec, rngs) if post else None

  def __call__(self, x):
    keep = lambda y: y  # noqa: E731
    x = x + (self.attn_post_norm or keep)(self.attn(self.attn_norm(x)))
    return x + (self.mlp_post_norm or keep)(self.mlp(self.mlp_norm(x)))


class LM(nnx.Module):
  """A decoder-only language model whose blocks each have their own sizes.

  Args:
    spec: the model description; `spec.layers[i]` sizes block i.
    rngs: initialisers' randomness (the weights are replaced by `to_flax`).
  """

  def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
    D, V = spec.hidden_size, spec.vocab_size
    self.embed = nnx.Embed(V, D, rngs=rngs)
    self.pos_embed = nnx.Embed(spec.max_positions, D, rngs=rngs) if spec.fam.positions == "learned" else None
    self.layers = nnx.List([Block(spec, layer, rngs=rngs, index=i) for i, layer in enumerate(spec.layers)])
    self.final_norm = _norm(spec, rngs)
    self.lm_head = None if spec.tie_embeddings else nnx.Linear(D, V, use_bias=False, rngs=rngs)
    self.embed_scale = float(D)**0.5 if spec.fam.embed_scale else None  # Gemma
    self.final_softcap = spec.final_softcap

  def __call__(self, tokens):
    """Next-token logits [B,T,V] (f32) for token ids [B,T]."""
    tokens = jnp.asarray(tokens, jnp.int32)
    x = self.embed(tokens)
    if self.embed_scale is not None:
      x = x * jnp.asarray(self.embed_scale, x.dtype)
    if self.pos_embed is not None:
      x = x + self.pos_embed(jnp.arange(tokens.shape[1]))[None]
    for block in self.layers:
      x = block(x)
    h = self.final_norm(x)
    logits = (self.embed.attend(h) if self.lm_head is None else self.lm_head(h)).astype(F32)
    if self.final_softcap is not None:
      logits = jnp.tanh(logits / self.final_softcap) * self.final_softcap
    return logits


def _pure(params: Params) -> dict:
  """jaxprune's parameter tree as NNX's pure state dict: the block tuple becomes {i: block}."""
  return {**params, "layers": dict(enumerate(params["layers"]))}


def to_flax(model: Model) -> LM:
  """An `LM` holding `model`'s parameters (jax arrays are shared, numpy arrays moved to the device).

  The module is first built abstractly (`nnx.eval_shape`, nothing allocated),
  then every `nnx.Param` is filled from `model.params`.

  Raises:
    ShapeError: the parameters disagree with `model.spec`, or with the module
      built from it (every mismatching leaf is named).
  """
  if model.spec.attn_softcap is not None:
    raise ConfigError(f"attention-score soft-capping ({model.spec.attn_softcap:g}, Gemma 2's) is not in the Flax "
                      "bridge, whose attention is jax.nn.dot_product_attention; run the model with jaxprune.logits "
                      "or jaxprune.generate instead")
  check_params(model.spec, model.params)
  abstract = nnx.eval_shape(lambda: LM(model.spec, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  want = traverse_util.flatten_dict(nnx.to_pure_dict(state))  # {("layers", 0, "attn", "q", "kernel"): leaf}
  have = traverse_util.flatten_dict(_pure(model.params))
  name = lambda path: ".".join(map(str, path))  # noqa: E731
  problems = [f"{name(k)}: missing" for k in want if k not in have]
  problems += [f"{name(k)}: no such parameter in the Flax module" for k in have if k not in want]
  problems += [f"{name(k)}: shape {tuple(np.shape(have[k]))}, but the Flax module has {tuple(want[k].shape)}"
               for k in want if k in have and tuple(np.shape(have[k])) != tuple(want[k].shape)]
  if problems:
    raise ShapeError("jaxprune.flax_bridge.LM does not fit these parameters:\n  " + "\n  ".join(problems) +
                     "\nThis is a bug in jaxprune.flax_bridge; please report it with the model's spec.")
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, _pure(model.params)))
  return nnx.merge(graphdef, state)


def from_flax(lm: LM, spec: ModelSpec, source: str | None = None) -> Model:
  """The jaxprune `Model` of an `LM`'s parameters (e.g. after training it with optax)."""
  pure = nnx.to_pure_dict(nnx.state(lm, nnx.Param))
  params = {k: v for k, v in pure.items() if k != "layers"}
  params["layers"] = tuple(pure["layers"][i] for i in range(len(pure["layers"])))
  return Model.checked(spec, params, source)


__all__ = ["Attention", "Block", "LM", "MLP", "OffsetRMSNorm", "from_flax", "to_flax"]
