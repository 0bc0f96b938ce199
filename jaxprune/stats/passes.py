"""Jitted passes over whole activation streams, one module at a time.

A stream is an array [C, B, T, D] of C chunks of B calibration windows, with
the batch axis sharded over the mesh's `data` axis. Each pass scans the chunks
with `lax.scan`, so only one chunk's intermediates (e.g. attention maps) are
alive at a time, and returns f32 sums. Every kernel is jitted with the module
kind, the module's view of the block config (`layers.part_config`: an MLP's has no
attention settings) and what to accumulate static: one compile per distinct
module shape, view and set of needs.

A module is visited by at most three passes, each doing only its share of the
work (see `jaxprune.stats.needs`):

  dense_pass   the dense stream through the original module (targets of the
               solves), with the first level's input moments and target energy
               when reconstructing;
  hidden_pass  the pruned stream up to the second level's input X2, accumulating
               what the criterion and the solves read; X2 is returned and kept;
  second_apply the (pruned, refit) second level on the kept X2, which advances
               the pruned stream without recomputing the first level.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxprune import placement, sharding
from jaxprune.models import adapter as A
from jaxprune.models import layers as L
from jaxprune.models.forward import block_step
from jaxprune.stats import heads as js_stats
from jaxprune.stats import moments
from jaxprune.stats.needs import StreamNeeds

F32 = jnp.float32


def _sq(x):
  return jnp.sum(jnp.square(x.astype(F32)))


class DenseOut(NamedTuple):
  """What `dense_pass` returns.

  Attributes:
    yd: dense module outputs f(hd), a stream [C,B,T,D].
    yy: sum ||f(hd)||^2 (from position `skip` of each window on, as the moments).
    m_in: Moments of the pruned-stream input hp with cross moment hp^T hd (or None).
    yy1: sum ||[hd 1] [W1; b1]||^2, the first level's target energy (with m_in, else None).
    err: sum ||f(hp) - f(hd)||^2 with the original weights, the inherited error (or None).
  """

  yd: jax.Array
  yy: jax.Array
  m_in: moments.Moments | None
  yy1: jax.Array | None
  err: jax.Array | None


def _by_shard(fn, mesh):
  """`fn` (chunk arrays, batch first -> sums) as the sums of each `data` shard's windows,
  stacked on a leading axis (`sharding.split_batch`): each device adds only its own tokens,
  its running sums stay on it (`sharding.laid_out_shards`), and `sharding.sum_shards`
  reduces the totals once per module. `fn` itself when the mesh has
  one data shard, so a single-device run adds exactly what it always did."""
  if sharding.data_shards(mesh) == 1:
    return fn
  return lambda *xs: jax.vmap(fn)(*jax.tree.map(lambda x: sharding.split_batch(x, mesh), xs))


def _energy(pre):
  return sum(_sq(v) for v in pre.values())


def _after(skip: int, tree):
  """Every [B, T, ...] array of `tree` from position `skip` of its windows on."""
  return tree if not skip else jax.tree.map(lambda a: a[:, skip:], tree)


@functools.partial(jax.jit, static_argnames=("kind", "cfg", "first_moments", "inherited_error", "mesh", "skip"))
def dense_pass(kind: A.ModuleKind, cfg: L.BlockConfig, norm_p, p, xd, xp, positions, first_moments: bool,
               inherited_error: bool, mesh=None, skip: int = 0) -> DenseOut:
  """The dense stream through the original module, with the first level's statistics if asked
  (from position `skip` of each window on, as `StreamNeeds.skip`)."""
  D = xd.shape[-1]

  def body(carry, chunk):
    (m_in, m_c), yy1, err, yy = carry
    xd_c, xp_c = chunk
    hd = L.norm(cfg, norm_p, xd_c)
    if first_moments:
      yd, pre = A.apply_with_first(kind, cfg, p, hd, positions)
      yy1 = yy1 + _by_shard(_energy, mesh)(_after(skip, pre))
    else:
      yd = A.apply(kind, cfg, p, hd, positions)
    yy = yy + _by_shard(_sq, mesh)(_after(skip, yd))
    if first_moments or inherited_error:
      hp = L.norm(cfg, norm_p, xp_c)
    if first_moments:
      m_in, m_c = moments.compensated_add(m_in, m_c, _by_shard(moments.sums, mesh)(*_after(skip, (hp, hd))))
    if inherited_error:
      err = err + _by_shard(_sq, mesh)(A.apply(kind, cfg, p, hp, positions) - yd)
    return sharding.laid_out_shards(((m_in, m_c), yy1, err, yy), mesh), yd

  zero = jnp.zeros((), F32)
  m0 = moments.init(D, D) if first_moments else None
  init = sharding.stack_shards(((m0, m0), zero if first_moments else None, zero if inherited_error else None, zero),
                               mesh)
  ((m_in, _), yy1, err, yy), yd = jax.lax.scan(body, init, (xd, xp))
  sums = sharding.sum_shards((yy, m_in, yy1, err), mesh)
  return DenseOut(sharding.laid_out_stream(yd, mesh), *sharding.laid_out_replicated(sums, mesh))


class HiddenOut(NamedTuple):
  """What `hidden_pass` returns.

  Attributes:
    x2: the second level's input X2, a stream [C,B,T,U2], kept for `second_apply`.
    hidden: Diag or Moments of X2 (with cross moment X2^T yd when asked), or None; split over
      a mesh's `model` axis, a `moments.RowSplit` (`gather_hidden` joins it).
    first: {first-level kernel name: Diag of its pre-activations} (MLP, when asked), or None.
    inputs: Moments of the normalized input (when asked), or None.
    js: [N, N] sums of Jensen-Shannon divergences between heads (or None), over `rows` rows.
  """

  x2: jax.Array
  hidden: moments.Moments | moments.Diag | None
  first: dict | None
  inputs: moments.Moments | None
  js: jax.Array | None
  rows: jax.Array


@functools.partial(jax.jit, static_argnames=("kind", "cfg", "needs", "mesh"))
def hidden_pass(kind: A.ModuleKind, cfg: L.BlockConfig, norm_p, p, xp, yd, positions, needs: StreamNeeds,
                mesh=None) -> HiddenOut:
  """X2 of the pruned stream and the statistics `needs` lists.

  `yd` (dense outputs) is read only for the cross moment, and may be None. On a
  `mesh` with a `model` axis, a Gram matrix's sums are split by rows over that
  axis (`sharding.gram_rows`): per device, a 1/M share of the sums, of their
  compensation and of each chunk's term; `hidden` is then a `moments.RowSplit`,
  which `gather_hidden` brings to where the solves run. With several `data` shards,
  each keeps its own sums through the scan (`_by_shard`), reduced once at the end.
  """
  cross = needs.hidden == "gram" and needs.cross

  def chunk_sums(x2, y, pre, h, probs):
    # One chunk's (or one data shard's) terms.
    x2, y, pre, h = _after(needs.skip, (x2, y, pre, h))
    terms = {}
    if needs.hidden == "gram":
      terms["hidden"] = moments.sums(x2, y) if split is None else moments.split_sums(x2, y, None)
    elif needs.hidden == "diag":
      terms["hidden"] = moments.diag_sums(x2)
    if needs.first_sq:
      terms["first"] = {k: moments.diag_sums(pre[k]) for k in pre}
    if needs.inputs:
      terms["inputs"] = moments.sums(h)
    return terms, js_stats.js_sums(probs) if needs.js else None

  def laid_out(t):
    # Gram rows over `model` (per data shard where there are several).
    t = sharding.laid_out_shards(t, mesh)
    return t if split is None else {**t, "hidden": moments.constrain_split(t["hidden"], split_acc)}

  def body(carry, chunk):
    (total, comp), js, n_rows = carry
    xp_c, yd_c = chunk
    h = L.norm(cfg, norm_p, xp_c)
    x2, probs, pre = A.inner_parts(kind, cfg, p, h, positions, needs.js, needs.first_sq)
    terms, js_c = _by_shard(chunk_sums, mesh)(x2, yd_c if cross else None, pre, h, probs if needs.js else None)
    # Each chunk's sums join the totals by compensated summation (`moments.compensated_add`).
    total, comp = map(laid_out, moments.compensated_add(total, comp, laid_out(terms)))
    if needs.js:
      js, n_rows = sharding.laid_out_shards(js + js_c, mesh), n_rows + js_stats.js_rows(probs)
    return ((total, comp), js, n_rows), x2

  h0 = L.norm(cfg, norm_p, xp[0])
  shapes = jax.eval_shape(lambda h: A.inner_parts(kind, cfg, p, h, positions, False, needs.first_sq), h0)
  U2, D = shapes[0].shape[-1], xp.shape[-1]
  split = sharding.gram_rows(mesh, U2) if needs.hidden == "gram" else None
  split_acc = sharding.gram_rows(mesh, U2, shards=True) if split is not None else None  # while accumulating
  zeros = {}
  if needs.hidden == "diag":
    zeros["hidden"] = moments.init_diag(U2)
  elif needs.hidden == "gram":
    zeros["hidden"] = moments.init(U2, D if cross else None) if split is None else moments.init_split(
        U2, D if cross else None, None)
  if needs.first_sq:
    zeros["first"] = {k: moments.init_diag(v.shape[-1]) for k, v in shapes[2].items()}
  if needs.inputs:
    zeros["inputs"] = moments.init(D)
  N = A.num_units(kind, p) if kind is A.ATTN else 1
  zeros = laid_out(sharding.stack_shards(zeros, mesh))
  init = ((zeros, zeros), sharding.stack_shards(jnp.zeros((N, N), F32), mesh), jnp.zeros((), F32))
  ((total, _), js, n_rows), x2 = jax.lax.scan(body, init, (xp, yd if cross else None))
  total, js = sharding.sum_shards((total, js), mesh)
  hidden = total.get("hidden")
  if split is None:
    hidden = sharding.laid_out_replicated(hidden, mesh)
  else:
    hidden = moments.constrain_split(hidden, split)
  first, inputs, js, n_rows = sharding.laid_out_replicated(
      (total.get("first"), total.get("inputs"), js if needs.js else None, n_rows), mesh)
  return HiddenOut(sharding.laid_out_stream(x2, mesh, features=True), hidden, first, inputs, js, n_rows)


def gather_hidden(h: HiddenOut, mesh) -> HiddenOut:
  """`h` with Gram statistics split over `model` (`moments.RowSplit`) joined where the solves
  and the `goa-obs` sweep run: on the host where they use LAPACK (CPU, and TPU hosts: no
  device then holds a whole Gram matrix), else replicated over the mesh. Where the solves
  run split over this mesh (`placement.split_solves`), they stay split (`jaxprune.stats.split`)."""
  if not isinstance(h.hidden, moments.RowSplit) or (mesh is not None and placement.split_solve_mesh() == mesh):
    return h
  if placement.lapack_solves():
    return h._replace(hidden=moments.join(jax.tree.map(placement.to_host, h.hidden)))
  return h._replace(hidden=jax.device_put(moments.join(h.hidden), sharding.replicated(mesh)))


def _joined(cfg, post_p, y):
  """A module's output as it joins the residual stream: through the module's post-norm
  (Gemma; `post_p` its parameters) if it has one. Fits and errors stay on y itself."""
  return y if post_p is None else L.norm(cfg, post_p, y)


def post_kw(kind: A.ModuleKind, cfg: L.BlockConfig, block) -> dict:
  """`second_apply`'s and `add`'s keywords for a module of `block`: its post-norm, if it has one."""
  post_p = kind.post_norm(block)
  return {} if post_p is None else {"cfg": L.part_config(cfg, "norm"), "post_p": post_p}


@functools.partial(jax.jit, static_argnames=("mesh", "cfg"))
def second_apply(x2, w2, b2, xp, yd, mesh=None, cfg=None, post_p=None):
  """Advances the pruned stream by the second level on X2: xp + X2 W2 + b2 (through the
  post-norm `post_p` if given, with `cfg`); also sum ||y - yd||^2, before any post-norm.

  `w2` [U2, D] has the full width of X2 with the removed units' rows zero, so
  every module of one shape shares one compile whatever it keeps. `yd` may be None.
  """

  def body(err, chunk):
    x2_c, xp_c, yd_c = chunk
    y = jnp.einsum("btu,ud->btd", x2_c, w2.astype(x2_c.dtype), preferred_element_type=F32) + b2.astype(F32)
    y = y.astype(jnp.result_type(x2_c, w2))
    if yd_c is not None:
      err = sharding.laid_out_shards(err + _by_shard(_sq, mesh)(y - yd_c), mesh)
    return err, xp_c + _joined(cfg, post_p, y).astype(xp_c.dtype)

  err, xp_next = jax.lax.scan(body, sharding.stack_shards(jnp.zeros((), F32), mesh), (x2, xp, yd))
  return sharding.laid_out_stream(xp_next, mesh), sharding.laid_out_replicated(sharding.sum_shards(err, mesh), mesh)


@functools.partial(jax.jit, static_argnames=("mesh",))
def second_out(x2, w2, b2, mesh=None):
  """The second level's output X2 W2 + b2 of every chunk, a stream [C,B,T,D] (what
  `second_apply` adds to the stream, computed the same way)."""

  def body(_, x2_c):
    y = jnp.einsum("btu,ud->btd", x2_c, w2.astype(x2_c.dtype), preferred_element_type=F32) + b2.astype(F32)
    return None, y.astype(jnp.result_type(x2_c, w2))

  return sharding.laid_out_stream(jax.lax.scan(body, None, x2)[1], mesh)


@jax.jit
def energy(y):
  """sum ||y||^2 in float32."""
  return _sq(y)


@jax.jit
def dense_cross(xx, w2a):
  """X2^T Y for Y = [X2 1] [W2; b2] from the augmented Gram: [X2 1]^T [X2 1] [W2; b2], (U2+1, D)."""
  return jnp.matmul(xx, w2a.astype(F32), precision="highest")


@functools.partial(jax.jit, static_argnames=("cfg", "mesh"))
def block_pass(cfg: L.BlockConfig, blk, x, positions, mesh=None):
  """Advances a stream through a whole block (blocks outside the pruned range)."""

  def body(_, x_c):
    return None, block_step(cfg, blk, x_c, positions)[0]

  _, out = jax.lax.scan(body, None, x)
  return sharding.laid_out_stream(out, mesh)


@functools.partial(jax.jit, static_argnames=("cfg",))
def add(x, y, cfg=None, post_p=None):
  """x + y, y through the post-norm `post_p` (with `cfg`) if given."""
  return x + _joined(cfg, post_p, y).astype(x.dtype)


@jax.jit
def absorbing_target(yd, xd, xp, share):
  """yd + share * (xd - xp), fused: one stream-sized result, no temporaries of that size."""
  return yd + share * (xd - xp)
