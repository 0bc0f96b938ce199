"""Whole-model forward passes: embed -> blocks -> logits.

The loop over blocks is plain Python around jitted block functions, so blocks
of different shapes each compile once and pruned models need no padding.
Intermediates come back through `capture=`, never through hooks.
"""

from __future__ import annotations

import functools
from typing import Iterable

import jax
import jax.numpy as jnp

from jaxprune.models import layers as L
from jaxprune.spec import ModelSpec, Params

F32 = jnp.float32

#: Names `capture=` accepts, with what each holds (axis letters as in layers.py).
CAPTURES = {
    "attn_in": "normalized attention input [B,T,D]",
    "probs": "attention probabilities [B,N,T,T] (f32)",
    "heads": "per-head value outputs A_i V_i, the o-projection input [B,T,N,H]",
    "attn_out": "attention module output (the o-projection's, before any post-norm) [B,T,D]",
    "mlp_in": "normalized MLP input [B,T,D]",
    "hidden": "MLP down-projection input [B,T,F]",
    "mlp_out": "MLP module output (the down-projection's, before any post-norm) [B,T,D]",
}


def _check_capture(capture: Iterable[str]) -> tuple[str, ...]:
  capture = tuple(sorted(set(capture)))
  bad = [c for c in capture if c not in CAPTURES]
  if bad:
    raise ValueError(f"unknown capture names {bad}; known: {', '.join(CAPTURES)}")
  return capture


def positions_for(tokens) -> jax.Array:
  """Positions [1,T] of a window that starts at 0."""
  return jnp.arange(tokens.shape[-1], dtype=jnp.int32)[None]


def attn_step(cfg: L.BlockConfig, blk: Params, x, positions, capture=()):
  """Residual stream x -> x + attention(norm(x))."""
  h = L.norm(cfg, blk["attn_norm"], x)
  y, caps = L.attention(cfg, blk["attn"], h, positions, capture)
  if "attn_in" in capture:
    caps["attn_in"] = h
  if "attn_out" in capture:
    caps["attn_out"] = y
  return x + L.post_norm(cfg, blk, "attn", y), caps


def mlp_step(cfg: L.BlockConfig, blk: Params, x, capture=()):
  """Residual stream x -> x + mlp(norm(x))."""
  h = L.norm(cfg, blk["mlp_norm"], x)
  y, caps = L.mlp(cfg, blk["mlp"], h, capture)
  if "mlp_in" in capture:
    caps["mlp_in"] = h
  if "mlp_out" in capture:
    caps["mlp_out"] = y
  return x + L.post_norm(cfg, blk, "mlp", y), caps


@functools.partial(jax.jit, static_argnames=("cfg", "capture"))
def block_step(cfg: L.BlockConfig, blk: Params, x, positions, capture=()):
  """One transformer block: (block, x) -> (x_next, captures)."""
  x, c1 = attn_step(cfg, blk, x, positions, capture)
  x, c2 = mlp_step(cfg, blk, x, capture)
  return x, {**c1, **c2}


def token_embeddings(params: Params, tokens, scale: float | None):
  """Rows of the embedding table, times `scale` (Gemma's sqrt(hidden)) in the table's dtype, as transformers does."""
  table = params["embed"]["embedding"]
  x = jnp.take(table, tokens, axis=0)
  return x if scale is None else x * jnp.asarray(scale, F32).astype(table.dtype)


def embed_scale(spec: ModelSpec) -> float | None:
  return float(spec.hidden_size)**0.5 if spec.fam.embed_scale else None


@functools.partial(jax.jit, static_argnames=("learned_positions", "dtype", "scale"))
def _embed(params: Params, tokens, positions, learned_positions: bool, dtype, scale=None):
  x = token_embeddings(params, tokens, scale).astype(dtype)
  if learned_positions:
    x = x + jnp.take(params["pos_embed"]["embedding"], positions, axis=0).astype(dtype)
  return x


def embed(spec: ModelSpec, params: Params, tokens, positions=None):
  """Token (and learned position) embeddings [B,T,D].

  Blocks read from disk (jaxprune.io.lazy) compute in their own dtype while the
  embeddings stay in the checkpoint's: the rows taken are cast, never the tables.
  """
  if positions is None:
    positions = positions_for(tokens)
  dtype = getattr(params.get("layers"), "dtype", None) or params["embed"]["embedding"].dtype
  return _embed({k: params[k] for k in ("embed", "pos_embed") if k in params}, tokens, positions,
                spec.fam.positions == "learned", jnp.dtype(dtype), embed_scale(spec))


def head_params(params: Params) -> Params:
  """The parameters the output head reads: final norm and the unembedding."""
  out = {"final_norm": params["final_norm"]}
  if "lm_head" in params:
    out["lm_head"] = params["lm_head"]
  else:
    out["embed"] = params["embed"]
  return out


def head(cfg: L.BlockConfig, hp: Params, x):
  """Final norm and unembedding: [B,T,D] -> logits [B,T,V]."""
  h = L.norm(cfg, hp["final_norm"], x)
  # A streamed model's head keeps the checkpoint's dtype (jaxprune.io.lazy): it is cast to the stream's.
  if "lm_head" in hp:
    z = jnp.einsum("btd,dv->btv", h, hp["lm_head"]["kernel"].astype(h.dtype), preferred_element_type=F32)
  else:
    z = jnp.einsum("btd,vd->btv", h, hp["embed"]["embedding"].astype(h.dtype), preferred_element_type=F32)
  return L.softcap(cfg.final_softcap, z)


_head = jax.jit(head, static_argnames=("cfg",))


def hidden_states(spec: ModelSpec, params: Params, tokens, *, layers=None, capture=(), x=None):
  """Runs blocks over tokens [B,T]; returns the residual stream and captures.

  Args:
    layers: an iterable of block indices to run (default: all).
    capture: names from `CAPTURES`; the result holds one dict per block run.
    x: a residual stream to start from instead of embedding `tokens`.
  """
  capture = _check_capture(capture)
  positions = positions_for(tokens)
  if x is None:
    x = embed(spec, params, tokens, positions)
  caps = []
  for i in (range(spec.num_layers) if layers is None else layers):
    x, c = block_step(L.block_config(spec, i), params["layers"][i], x, positions, capture)
    caps.append(c)
  return x, caps


def logits(spec: ModelSpec, params: Params, tokens) -> jax.Array:
  """Next-token logits [B,T,V] in f32 for token ids [B,T]."""
  tokens = jnp.asarray(tokens, jnp.int32)
  x, _ = hidden_states(spec, params, tokens)
  return _head(L.block_config(spec, 0), head_params(params), x)


def forward(spec: ModelSpec, params: Params, tokens, capture=()):
  """Logits [B,T,V] and per-block captures for token ids [B,T]."""
  tokens = jnp.asarray(tokens, jnp.int32)
  x, caps = hidden_states(spec, params, tokens, capture=capture)
  return _head(L.block_config(spec, 0), head_params(params), x), caps
