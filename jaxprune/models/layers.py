"""Pure building blocks: norms, rotary embeddings, GQA attention, MLPs.

Every function takes the parameters of one module as a Flax-style dict
(`kernel`, `bias`, `scale`) and reads sizes from the array shapes. Axis letters:
B batch, T query positions, S key positions, D model width, N query heads,
K KV heads, G query heads per KV head, H head dim, F MLP width.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxprune.spec import ModelSpec, RopeSpec

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """The static (non-array) part of one block, hashable for `jax.jit`."""

  norm: str
  eps: float
  act: str
  gated: bool
  rope: RopeSpec | None
  sliding_window: int | None
  kv_map: tuple[int, ...] | None


def block_config(spec: ModelSpec, layer: int) -> BlockConfig:
  return BlockConfig(
      norm=spec.fam.norm,
      eps=float(spec.norm_eps),
      act=spec.act,
      gated=spec.fam.gated_mlp,
      rope=spec.rope,
      sliding_window=spec.sliding_window,
      kv_map=spec.layers[layer].canonical().kv_map,
  )


def norm(cfg: BlockConfig, p, x):
  """RMSNorm (LLaMA family) or LayerNorm (GPT-2), statistics in f32."""
  xf = x.astype(F32)
  if cfg.norm == "rms":
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + cfg.eps)
    # Explicit casts: a streamed model's final norm keeps the checkpoint's dtype (jaxprune.io.lazy).
    return p["scale"].astype(x.dtype) * xf.astype(x.dtype)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
  y = (xf - mean) * jax.lax.rsqrt(var + cfg.eps)
  return (y * p["scale"].astype(F32) + p["bias"].astype(F32)).astype(x.dtype)


def activation(name: str, x):
  if name == "silu":
    return jax.nn.silu(x)
  if name == "gelu_tanh":
    return jax.nn.gelu(x, approximate=True)
  return jax.nn.gelu(x, approximate=False)


def rope_tables(rope: RopeSpec, head_dim: int, positions):
  """cos, sin of shape [..., T, H] for integer `positions` [..., T]."""
  inv = jnp.asarray(rope.inv_freq(head_dim))
  freqs = positions.astype(F32)[..., None] * inv
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
  """Rotate-half RoPE (Hugging Face layout). x [B,T,n,H]; cos/sin [B|1,T,H]."""
  h = x.shape[-1] // 2
  rot = jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  return (x.astype(F32) * cos + rot.astype(F32) * sin).astype(x.dtype)


def _add_bias(p, y):
  return y + p["bias"] if "bias" in p else y


def dense(p, x, spec: str):
  """`x @ kernel (+ bias)` written as an einsum over named axes.

  The product accumulates in f32 and is then cast to the operands' dtype: for
  f32 nothing changes, and for bf16 this is the form XLA's CPU backend hands
  to its fast (AMX) matmul kernels; with bf16-output dots a SmolLM2 block ran
  2.6x slower.
  """
  dtype = jnp.result_type(x, p["kernel"])
  return _add_bias(p, jnp.einsum(spec, x, p["kernel"], preferred_element_type=F32).astype(dtype))


def project_qkv(cfg: BlockConfig, p, x, positions):
  """q [B,T,N,H], k and v [B,T,K,H], with RoPE applied to q and k."""
  # One matmul against [D, N+2K, H] instead of three narrow ones: same dot products, better CPU use.
  N, K = p["q"]["kernel"].shape[1], p["k"]["kernel"].shape[1]
  qkv = dense({"kernel": jnp.concatenate([p["q"]["kernel"], p["k"]["kernel"], p["v"]["kernel"]], axis=1)}, x,
              "btd,dnh->btnh")
  q = _add_bias(p["q"], qkv[:, :, :N])
  k = _add_bias(p["k"], qkv[:, :, N:N + K])
  v = _add_bias(p["v"], qkv[:, :, N + K:])
  if cfg.rope is not None:
    cos, sin = rope_tables(cfg.rope, q.shape[-1], positions)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
  return q, k, v


def attention_mask(cfg: BlockConfig, q_pos, k_pos):
  """Boolean [B|1, T, S]: causal, and within the sliding window if any."""
  allowed = k_pos[..., None, :] <= q_pos[..., :, None]
  if cfg.sliding_window is not None:
    allowed &= k_pos[..., None, :] > q_pos[..., :, None] - cfg.sliding_window
  return allowed


def attend(cfg: BlockConfig, q, k, v, q_pos, k_pos):
  """Softmax attention with grouped KV heads.

  Args:
    q: [B,T,N,H]; k, v: [B,S,K,H]; q_pos [B|1,T], k_pos [B|1,S] integer positions.

  Returns:
    heads [B,T,N,H] (each head's A_i V_i, the input of the output projection)
    and probs [B,N,T,S] in f32.
  """
  B, T, N, H = q.shape
  if cfg.kv_map is not None:
    # Uneven groups: give every query head its own copy of its KV head.
    idx = jnp.asarray(cfg.kv_map)
    k, v = jnp.take(k, idx, axis=2), jnp.take(v, idx, axis=2)
  K, S = k.shape[2], k.shape[1]
  G = N // K
  # The G query heads of a KV head are stacked along the query axis, [B,K,G*T,H], so each
  # (batch, KV head) pair is one larger matmul: about twice as fast on CPU as a [B,K,G] batch.
  qg = q.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
  scores = jnp.einsum("bkqh,bskh->bkqs", qg, k, preferred_element_type=F32) * (H**-0.5)
  scores = scores.reshape(B, K, G, T, S)
  mask = attention_mask(cfg, q_pos, k_pos)[:, None, None]
  scores = jnp.where(mask, scores, jnp.finfo(F32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  heads = jnp.einsum("bkqs,bskh->bkqh", probs.reshape(B, K, G * T, S).astype(v.dtype), v,
                     preferred_element_type=F32)
  heads = heads.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)
  return heads.astype(q.dtype), probs.reshape(B, N, T, S)


def attention(cfg: BlockConfig, p, x, positions, capture=()):
  """Self-attention of normalized input x [B,T,D]; positions [B|1,T]."""
  q, k, v = project_qkv(cfg, p, x, positions)
  heads, probs = attend(cfg, q, k, v, positions, positions)
  y = dense(p["o"], heads, "btnh,nhd->btd")
  caps = {}
  if "probs" in capture:
    caps["probs"] = probs
  if "heads" in capture:
    caps["heads"] = heads
  return y, caps


def mlp(cfg: BlockConfig, p, x, capture=()):
  """GPT-2 MLP `act(x W_up) W_down` or gated `(act(x W_gate) * x W_up) W_down`."""
  up = dense(p["up"], x, "btd,df->btf")
  if cfg.gated:
    h = activation(cfg.act, dense(p["gate"], x, "btd,df->btf")) * up
  else:
    h = activation(cfg.act, up)
  y = dense(p["down"], h, "btf,fd->btd")
  return y, ({"hidden": h} if "hidden" in capture else {})
