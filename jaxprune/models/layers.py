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
  act: str | None
  gated: bool
  rope: RopeSpec | None
  sliding_window: int | None
  kv_map: tuple[int, ...] | None
  norm_offset: float = 0.0
  qk_norm: bool = False
  post_norms: bool = False
  query_scale: float | None = None  # None: head_dim ** -0.5
  attn_softcap: float | None = None
  final_softcap: float | None = None  # read by the head only


def block_config(spec: ModelSpec, layer: int) -> BlockConfig:
  fam = spec.fam
  local = spec.sliding_layers is not None and layer in spec.sliding_layers
  return BlockConfig(
      norm=fam.norm,
      eps=float(spec.norm_eps),
      act=spec.act,
      gated=fam.gated_mlp,
      rope=spec.rope_local if local and spec.rope_local is not None else spec.rope,
      sliding_window=spec.sliding_window if spec.sliding(layer) else None,
      kv_map=spec.layers[layer].canonical().kv_map,
      norm_offset=fam.norm_offset,
      qk_norm=fam.qk_norm,
      post_norms=fam.post_norms,
      query_scale=None if spec.query_pre_attn_scalar is None else float(spec.query_pre_attn_scalar)**-0.5,
      attn_softcap=spec.attn_softcap,
      final_softcap=spec.final_softcap,
  )


# What each part of a block reads of its config. A kernel of one part is jitted on that part's
# view (`part_config`), so layers that differ only elsewhere share its compile: Gemma 3's sliding
# and full-attention layers (window, RoPE base) share every MLP kernel, and a block's MLP
# compiles nothing new when its attention was cut to uneven KV groups (`kv_map`).
_NORM_FIELDS = ("norm", "eps", "norm_offset")
PART_FIELDS = {
    "norm": _NORM_FIELDS,
    "mlp": _NORM_FIELDS + ("act", "gated"),
    "attn": _NORM_FIELDS + ("rope", "sliding_window", "kv_map", "qk_norm", "query_scale", "attn_softcap"),
}
# The values a view gives the fields its part does not read: what a block without them has.
_UNREAD = dict(act=None, gated=False, rope=None, sliding_window=None, kv_map=None, qk_norm=False, post_norms=False,
               query_scale=None, attn_softcap=None, final_softcap=None)


def part_config(cfg: BlockConfig, part: str) -> BlockConfig:
  """`cfg` as seen by `part` ("norm", "mlp" or "attn", a module's name): the fields that part
  does not read set to `_UNREAD`'s values. Its kernels then compute exactly what they did on
  `cfg` (they never read the others) and compile once per distinct view."""
  return dataclasses.replace(cfg, **{k: v for k, v in _UNREAD.items() if k not in PART_FIELDS[part]})


def softcap(cap: float | None, x):
  """cap * tanh(x / cap) (Gemma 2's soft capping), or x when there is no cap."""
  return x if cap is None else jnp.tanh(x / cap) * cap


def norm(cfg: BlockConfig, p, x):
  """RMSNorm (LLaMA family) or LayerNorm (GPT-2), statistics in f32."""
  xf = x.astype(F32)
  if cfg.norm == "rms":
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + cfg.eps)
    if cfg.norm_offset:
      # Gemma scales in f32 and casts once, by (1 + w): its weights are stored around 0.
      return (xf * (cfg.norm_offset + p["scale"].astype(F32))).astype(x.dtype)
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
  if name == "gelu":
    return jax.nn.gelu(x, approximate=False)
  # Also what a view without the MLP's fields (`part_config`) gets, were it ever to read them.
  raise ValueError(f"activation {name!r} is not one of silu, gelu_tanh, gelu")


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


def post_norm(cfg: BlockConfig, blk, kind: str, y):
  """A module's output as it joins the residual stream: through its post-norm (Gemma) if any."""
  return norm(cfg, blk[f"{kind}_post_norm"], y) if cfg.post_norms else y


def qkv_linear(p, x):
  """The projections [h 1] [W1; b1] alone: q [B,T,N,H], k and v [B,T,K,H]."""
  # One matmul against [D, N+2K, H] instead of three narrow ones: same dot products, better CPU use.
  N, K = p["q"]["kernel"].shape[1], p["k"]["kernel"].shape[1]
  qkv = dense({"kernel": jnp.concatenate([p["q"]["kernel"], p["k"]["kernel"], p["v"]["kernel"]], axis=1)}, x,
              "btd,dnh->btnh")
  q = _add_bias(p["q"], qkv[:, :, :N])
  k = _add_bias(p["k"], qkv[:, :, N:N + K])
  v = _add_bias(p["v"], qkv[:, :, N + K:])
  return q, k, v


def project_qkv(cfg: BlockConfig, p, x, positions):
  """q [B,T,N,H], k and v [B,T,K,H], with the q/k norms (if any) and RoPE applied to q and k."""
  q, k, v = qkv_linear(p, x)
  if cfg.qk_norm:
    q, k = norm(cfg, p["q_norm"], q), norm(cfg, p["k_norm"], k)
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
  return _attend(cfg, q, k, v, q_pos, k_pos, "bskh")


def attend_cached(cfg: BlockConfig, q, k, v, q_pos, k_pos):
  """`attend` on k, v laid out [B,K,S,H], the KV cache's layout (`models.decode`): the matmuls
  take each (batch, KV head) pair's keys as they lie, where [B,S,K,H] made XLA transpose the
  whole cache again at every decoded token."""
  return _attend(cfg, q, k, v, q_pos, k_pos, "bksh")


def _attend(cfg: BlockConfig, q, k, v, q_pos, k_pos, kv: str):
  B, T, N, H = q.shape
  if cfg.kv_map is not None:
    # Uneven groups: give every query head its own copy of its KV head.
    idx = jnp.asarray(cfg.kv_map)
    k, v = jnp.take(k, idx, axis=kv.index("k")), jnp.take(v, idx, axis=kv.index("k"))
  K, S = k.shape[kv.index("k")], k.shape[kv.index("s")]
  G = N // K
  # The G query heads of a KV head are stacked along the query axis, [B,K,G*T,H], so each
  # (batch, KV head) pair is one larger matmul: about twice as fast on CPU as a [B,K,G] batch.
  qg = q.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
  scale = H**-0.5 if cfg.query_scale is None else cfg.query_scale
  scores = softcap(cfg.attn_softcap, jnp.einsum(f"bkqh,{kv}->bkqs", qg, k, preferred_element_type=F32) * scale)
  scores = scores.reshape(B, K, G, T, S)
  mask = attention_mask(cfg, q_pos, k_pos)[:, None, None]
  scores = jnp.where(mask, scores, jnp.finfo(F32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  heads = jnp.einsum(f"bkqs,{kv}->bkqh", probs.reshape(B, K, G * T, S).astype(v.dtype), v,
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
