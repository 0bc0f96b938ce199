"""Cached decoding: the forward pass over new tokens only, with a per-layer KV cache.

The cache of layer l is a pair (k, v) of [B,K_l,L,H_l] arrays (K_l, H_l from the
layer's own spec, so pruned layers of different widths each keep their own
shape), laid out as attention's matmuls read them (`layers.attend_cached`).
`extend` runs T new tokens at positions start..start+T-1: it writes their keys
and values into the cache and attends over all L cache slots under the causal
(and sliding-window) mask, so slots not yet written are never seen.
A prompt is one `extend` (prefill) and each sampled token one more (T = 1).
The block code is the full forward's (`layers.project_qkv`, `layers.attend`,
`layers.mlp`), so the cached logits equal `forward.logits` up to float
rounding; tests/test_generate.py checks this for every family.

Axis letters as in layers.py; L is the cache length (the longest sequence).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxprune.models import layers as L
from jaxprune.models.forward import embed_scale, head, head_params, token_embeddings
from jaxprune.spec import ModelSpec, Params

Cache = tuple  # tuple over layers of (k [B,K,L,H], v [B,K,L,H])


def init_cache(spec: ModelSpec, batch: int, length: int, dtype) -> Cache:
  """Zeroed caches for `batch` rows of up to `length` tokens."""
  return tuple((jnp.zeros((batch, l.num_kv_heads, length, l.head_dim), dtype),
                jnp.zeros((batch, l.num_kv_heads, length, l.head_dim), dtype)) for l in spec.layers)


def extend(spec: ModelSpec, params: Params, caches: Cache, tokens, start):
  """Runs tokens [B,T] at positions start.. (start may be traced); returns logits [B,T,V] f32 and new caches."""
  T = tokens.shape[1]
  q_pos = (start + jnp.arange(T, dtype=jnp.int32))[None]  # [1,T]
  x = token_embeddings(params, tokens, embed_scale(spec))
  if spec.fam.positions == "learned":
    x = x + jnp.take(params["pos_embed"]["embedding"], q_pos, axis=0)
  new = []
  for i, (blk, (kc, vc)) in enumerate(zip(params["layers"], caches)):
    cfg = L.block_config(spec, i)
    h = L.norm(cfg, blk["attn_norm"], x)
    q, k, v = L.project_qkv(cfg, blk["attn"], h, q_pos)
    kc = jax.lax.dynamic_update_slice_in_dim(kc, k.transpose(0, 2, 1, 3).astype(kc.dtype), start, axis=2)
    vc = jax.lax.dynamic_update_slice_in_dim(vc, v.transpose(0, 2, 1, 3).astype(vc.dtype), start, axis=2)
    k_pos = jnp.arange(kc.shape[2], dtype=jnp.int32)[None]
    heads, _ = L.attend_cached(cfg, q, kc, vc, q_pos, k_pos)
    x = x + L.post_norm(cfg, blk, "attn", L.dense(blk["attn"]["o"], heads, "btnh,nhd->btd"))
    x = x + L.post_norm(cfg, blk, "mlp", L.mlp(cfg, blk["mlp"], L.norm(cfg, blk["mlp_norm"], x))[0])
    new.append((kc, vc))
  return head(L.block_config(spec, 0), head_params(params), x), tuple(new)


def decode_step(spec: ModelSpec, params: Params, caches: Cache, token, pos):
  """One token per row: token [B] at position pos -> logits [B,V] f32, updated caches."""
  logits, caches = extend(spec, params, caches, token[:, None], pos)
  return logits[:, 0], caches


# Jitted forms for Python-driven loops; the caches are donated so XLA updates them in place.
prefill_jit = jax.jit(extend, static_argnames=("spec",), donate_argnames=("caches",))
step_jit = jax.jit(decode_step, static_argnames=("spec",), donate_argnames=("caches",))


def cached_logits(spec: ModelSpec, params: Params, tokens, prefix: int, length: int | None = None) -> jax.Array:
  """Logits [B,T,V] of tokens [B,T] computed the generation way (for tests and checks).

  The first `prefix` tokens go in as one prefill, the rest one decode step at
  a time, all through one cache of `length` (default T) slots; 1 <= prefix <= T.
  The same two jitted functions as `generate.generate` run, so this checks
  what generation uses.
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  B, T = tokens.shape
  caches = init_cache(spec, B, length or T, params["embed"]["embedding"].dtype)
  first, caches = prefill_jit(spec, params, caches, tokens[:, :prefix], 0)
  rest = []
  for pos in range(prefix, T):
    lg, caches = step_jit(spec, params, caches, tokens[:, pos], pos)
    rest.append(lg[:, None])
  return jnp.concatenate([first, *rest], axis=1)
