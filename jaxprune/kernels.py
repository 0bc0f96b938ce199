"""Jitted passes over whole activation streams, one module at a time.

A stream is an array [C, B, T, D] of C chunks of B calibration windows, with
the batch axis sharded over the mesh's `data` axis. Each pass scans the chunks
with `lax.scan`, so only one chunk's intermediates (e.g. attention maps) are
alive at a time, and returns f32 sums. Every kernel is jitted with the module
kind and the block config static: one compile per distinct module shape.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxprune.models import adapter as A
from jaxprune.models import layers as L
from jaxprune.models.forward import block_step
from jaxprune.stats import heads as js_stats
from jaxprune.stats import moments

F32 = jnp.float32


def _sq(x):
  return jnp.sum(jnp.square(x.astype(F32)))


@functools.partial(jax.jit, static_argnames=("kind", "cfg"))
def first_pass(kind: A.ModuleKind, cfg: L.BlockConfig, norm_p, p, xd, xp, positions):
  """Dense outputs and first-level statistics of one module.

  Returns:
    m_in: Moments of the pruned-stream input hp with cross moment hp^T hd.
    m_dense: Moments of the dense-stream input hd.
    err: sum ||f(hp) - f(hd)||^2 (original weights: the error inherited from earlier pruning).
    yy: sum ||f(hd)||^2.
    yd: dense module outputs f(hd), a stream [C,B,T,D].
  """
  D = xd.shape[-1]

  def body(carry, chunk):
    m_in, m_d, err, yy = carry
    xd_c, xp_c = chunk
    hd, hp = L.norm(cfg, norm_p, xd_c), L.norm(cfg, norm_p, xp_c)
    yd = A.apply(kind, cfg, p, hd, positions)
    yo = A.apply(kind, cfg, p, hp, positions)
    carry = (moments.update(m_in, hp, hd), moments.update(m_d, hd), err + _sq(yo - yd), yy + _sq(yd))
    return carry, yd

  init = (moments.init(D, D), moments.init(D), jnp.zeros((), F32), jnp.zeros((), F32))
  (m_in, m_d, err, yy), yd = jax.lax.scan(body, init, (xd, xp))
  return m_in, m_d, err, yy, yd


@functools.partial(jax.jit, static_argnames=("kind", "cfg", "want_js"))
def second_pass(kind: A.ModuleKind, cfg: L.BlockConfig, norm_p, p, xp, yd, positions, want_js: bool):
  """Second-level statistics: Moments of X2 with cross moment X2^T yd, JS sums and their row count.

  `yd` may be None (a stream without dense targets, e.g. random-token scoring).
  """

  def body(carry, chunk):
    m2, js, rows = carry
    xp_c, yd_c = chunk
    x2, probs = A.inner(kind, cfg, p, L.norm(cfg, norm_p, xp_c), positions, want_js)
    m2 = moments.update(m2, x2, yd_c) if yd_c is not None else moments.update(m2, x2)
    if want_js:
      js, rows = js + js_stats.js_sums(probs), rows + js_stats.js_rows(probs)
    return (m2, js, rows), None

  x2_shape = jax.eval_shape(lambda h: A.inner(kind, cfg, p, h, positions)[0], xp[0]).shape
  U2, D = x2_shape[-1], xp.shape[-1]
  N = p["q"]["kernel"].shape[1] if kind is A.ATTN else 1
  init = (moments.init(U2, None if yd is None else D), jnp.zeros((N, N), F32), jnp.zeros((), F32))
  (m2, js, rows), _ = jax.lax.scan(body, init, (xp, yd))
  return m2, (js if want_js else None), rows


@functools.partial(jax.jit, static_argnames=("kind", "cfg"))
def input_moments(kind: A.ModuleKind, cfg: L.BlockConfig, norm_p, x):
  """Moments of the normalized module input of one stream (no targets)."""

  def body(m, x_c):
    return moments.update(m, L.norm(cfg, norm_p, x_c)), None

  m, _ = jax.lax.scan(body, moments.init(x.shape[-1]), x)
  return m


@functools.partial(jax.jit, static_argnames=("kind", "cfg"))
def final_pass(kind: A.ModuleKind, cfg: L.BlockConfig, norm_p, p, xp, yd, positions):
  """Advances the pruned stream through the (pruned) module; also the error against yd."""

  def body(err, chunk):
    xp_c, yd_c = chunk
    y = A.apply(kind, cfg, p, L.norm(cfg, norm_p, xp_c), positions)
    if yd_c is not None:
      err = err + _sq(y - yd_c)
    return err, xp_c + y.astype(xp_c.dtype)

  err, xp_next = jax.lax.scan(body, jnp.zeros((), F32), (xp, yd))
  return xp_next, err


@functools.partial(jax.jit, static_argnames=("cfg",))
def block_pass(cfg: L.BlockConfig, blk, x, positions):
  """Advances a stream through a whole block (blocks outside the pruned range)."""

  def body(_, x_c):
    return None, block_step(cfg, blk, x_c, positions)[0]

  _, out = jax.lax.scan(body, None, x)
  return out


@jax.jit
def add(x, y):
  return x + y.astype(x.dtype)
