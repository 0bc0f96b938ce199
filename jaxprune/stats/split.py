"""Statistics that stay split over the mesh's `model` axis from accumulation to the solve (issue 31).

A second level's Gram matrix X^T X and cross moment X^T Y accumulate split by rows over
`model` (`moments.RowSplit`, `sharding.gram_rows`). Where the solves run split too
(`placement.split_solves`), nothing joins them: the operations a module's step needs are here,
each an explicit `jax.shard_map` whose arrays are, per device, its own rows of the statistics
(b x d for b = d / m), a panel of at most b' rows of the result, or small vectors:

  cut       the kept features (or a relayout of all of them), padded with zero features to a
            width the axis divides: each device cuts its rows' columns, then the result's row
            blocks are formed one at a time (a psum of the rows each device owns, kept by the
            block's device);
  shrink    the covariance shrunk toward its diagonal (`moments.shrink`'s formula, row by row);
  with_cross  X^T Y for Y = [X 1] [W; b], a module's own output (the plan's dense targets);
  diagonal  diag(X^T X), for the ridge;
  residual  ||[X 1] [W; b] - Y||^2 and tr(W^T X^T Y) (float64 where the backend has it), for the
            solves' reports, from partial sums reduced over the axis.

Padding features have zero rows and columns: a ridge solve told the real count
(`reconstruct.ridge_lam`'s `rows`) gives them zero weight.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxprune import sharded_solve
from jaxprune.sharded_solve import HIGHEST
from jaxprune.sharding import MODEL, shard_map
from jaxprune.stats.moments import F32, RowSplit

ROWS = P(MODEL, None)


def mesh_of(rs: RowSplit) -> Mesh:
  """The mesh whose `model` axis splits `rs`'s rows."""
  return rs.gram.sharding.mesh


def is_split(m) -> bool:
  """Whether `m` is statistics split by rows over a mesh (a `RowSplit` of JAX arrays)."""
  return isinstance(m, RowSplit) and isinstance(m.gram, jax.Array) and isinstance(m.gram.sharding, NamedSharding)


def padded_width(d: int, mesh: Mesh, unit: int = 1) -> int:
  """d rounded up to a multiple of the `model` axis times `unit` (a unit's channels then never
  straddle two devices' rows)."""
  q = mesh.shape.get(MODEL, 1) * unit
  return -(-d // q) * q


def _spec(x):
  return None if x is None else ROWS


def cut(rs: RowSplit, idx, width: int) -> RowSplit:
  """The features `idx` of `rs`, then width - len(idx) zero features (`width`: a multiple of the
  `model` axis), still split by rows: `moments.subset_padded` without any device holding more
  than its rows of the input and one block of rows of the result."""
  mesh = mesh_of(rs)
  m, k = mesh.shape[MODEL], len(idx)
  if width % m or not 0 < k <= width:
    raise ValueError(f"{k} features do not fit a split system of {width} rows on a model axis of {m}")
  full = np.full(width, -1, np.int32)
  full[:k] = np.asarray(idx)
  return _cut(rs, full, mesh=mesh)  # numpy: the same on every process


@functools.partial(jax.jit, static_argnames=("mesh",))
def _cut(rs: RowSplit, idx, *, mesh: Mesh) -> RowSplit:
  m = mesh.shape[MODEL]
  cross = rs.xy is not None

  def local(g, xy, idx):
    i, b, w = jax.lax.axis_index(MODEL), g.shape[0], idx.shape[0]
    bo = w // m
    valid = idx >= 0
    safe = jnp.where(valid, idx, 0)
    cols = jnp.where(valid[None], jnp.take(g, safe, axis=1), 0)  # [b, w]: this device's rows, kept columns

    def rows_of(src):
      def block(j, out):  # row block j of the result: each device's own rows of it, summed
        want = jax.lax.dynamic_slice_in_dim(safe, j * bo, bo)
        mine = jax.lax.dynamic_slice_in_dim(valid, j * bo, bo) & (want // b == i)
        part = jnp.where(mine[:, None], jnp.take(src, jnp.where(mine, want - i * b, 0), axis=0), 0)
        return jnp.where(i == j, jax.lax.psum(part, MODEL), out)

      return jax.lax.fori_loop(0, m, block, jnp.zeros((bo, src.shape[1]), src.dtype))

    return rows_of(cols), rows_of(xy) if cross else None

  g, xy = shard_map(local, mesh=mesh, in_specs=(ROWS, _spec(rs.xy), P()), out_specs=(ROWS, _spec(rs.xy)),
                     check_vma=False)(rs.gram, rs.xy, idx)
  valid = idx >= 0
  xsum = jnp.where(valid, rs.xsum[jnp.where(valid, idx, 0)], 0)
  return RowSplit(g, xsum, rs.count, xy, rs.ysum)


@functools.partial(jax.jit, static_argnames=("alpha", "mesh"))
def _shrink(rs: RowSplit, alpha: float, w_aug, *, mesh: Mesh) -> RowSplit:
  n = rs.count
  w, bias = w_aug[:-1].astype(F32), w_aug[-1].astype(F32)
  cross = rs.xy is not None

  def local(g, xy, s, w, bias, n):
    i, b = jax.lax.axis_index(MODEL), g.shape[0]
    own = jax.lax.dynamic_slice_in_dim(s, i * b, b)
    diag = jnp.diagonal(jax.lax.dynamic_slice_in_dim(g, i * b, b, axis=1))
    cov = g - own[:, None] * s[None] / n
    var = diag - own * own / n
    off = cov - jax.lax.dynamic_update_slice_in_dim(jnp.zeros_like(g), jnp.diag(var), i * b, axis=1)
    g2 = g - alpha * off
    if not cross:
      return g2, None
    # Rows of [G - off, s] [W; b] = var W_i + s_i (s^T W) / n + s_i b^T: the covariance's diagonal alone.
    wi = jax.lax.dynamic_slice_in_dim(w, i * b, b)
    sw = jnp.matmul(s, w, precision=HIGHEST)
    unc = var[:, None] * wi + own[:, None] * (sw / n + bias)[None]
    return g2, (1 - alpha) * xy + alpha * unc

  g, xy = shard_map(local, mesh=mesh, in_specs=(ROWS, _spec(rs.xy), P(), P(), P(), P()),
                     out_specs=(ROWS, _spec(rs.xy)), check_vma=False)(rs.gram, rs.xy, rs.xsum, w, bias, n)
  ysum = None
  if cross:  # the ones row: [s^T, n] [W; b] is untouched by the shrink
    ysum = (1 - alpha) * rs.ysum + alpha * (jnp.matmul(rs.xsum, w, precision=HIGHEST) + n * bias)
  return RowSplit(g, rs.xsum, rs.count, xy, ysum)


def shrink(rs: RowSplit, alpha: float, w_aug) -> RowSplit:
  """`moments.shrink` of split statistics (`w_aug` = [W; b], (d+1, e), the module's own second
  level), each device shrinking its own rows."""
  if alpha == 0:
    return rs
  return _shrink(rs, float(alpha), _replicated(w_aug, mesh_of(rs)), mesh=mesh_of(rs))


@functools.partial(jax.jit, static_argnames=("mesh",))
def _with_cross(rs: RowSplit, w_aug, *, mesh: Mesh) -> RowSplit:
  w, bias = w_aug[:-1].astype(F32), w_aug[-1].astype(F32)

  def local(g, s, w, bias):
    own = jax.lax.dynamic_slice_in_dim(s, jax.lax.axis_index(MODEL) * g.shape[0], g.shape[0])
    return jnp.matmul(g, w, precision=HIGHEST) + own[:, None] * bias[None]

  xy = shard_map(local, mesh=mesh, in_specs=(ROWS, P(), P(), P()), out_specs=ROWS, check_vma=False)(
      rs.gram, rs.xsum, w, bias)
  return RowSplit(rs.gram, rs.xsum, rs.count, xy, jnp.matmul(rs.xsum, w, precision=HIGHEST) + rs.count * bias)


def with_cross(rs: RowSplit, w_aug) -> RowSplit:
  """`rs` with the cross moment to Y = [X 1] [W; b] (`passes.dense_cross` on the split Gram)."""
  return _with_cross(rs, _replicated(w_aug, mesh_of(rs)), mesh=mesh_of(rs))


def diagonal(rs: RowSplit) -> np.ndarray:
  """diag(X^T X) [d] on the host (each device reads its own diagonal block)."""
  from jaxprune import placement
  from jaxprune.sharded_solve import diagonal as split_diagonal

  return placement.to_host(split_diagonal(rs.gram, mesh_of(rs)))


def residual(rs: RowSplit, yy, w_aug) -> float:
  """||[X 1] [W; b] - Y||^2 = tr(W^T G W) + 2 b.(s^T W) + n |b|^2 - 2 (tr(W^T X^T Y) + b.y) + yy, in
  float64 where the backend has it; `w_aug` [d'+1, e] (bias last) or [d', e] (none), d' at most
  the split rows (the rest read as zero weight)."""
  quad, lin = _products(rs, w_aug, quad=True)
  return max(quad - 2 * lin + float(np.asarray(yy, np.float64)), 0.0)


def inner(rs: RowSplit, w_aug) -> float:
  """tr([W; b]^T [X 1]^T Y), float64 where the backend has it."""
  return _products(rs, w_aug, quad=False)[1]


def _products(rs: RowSplit, w_aug, quad: bool) -> tuple[float, float]:
  """(tr([W; b]^T [X 1]^T [X 1] [W; b]) if `quad` else 0, tr([W; b]^T [X 1]^T Y))."""
  from jaxprune import placement

  mesh = mesh_of(rs)
  d, (k, e) = rs.gram.shape[0], np.shape(w_aug)
  x64 = placement.lapack_solves() or jax.default_backend() == "gpu"
  dt = np.float64 if x64 else np.float32
  w = np.asarray(placement.to_host(w_aug), dt)
  bias = w[d] if k == d + 1 else np.zeros((e,), dt)
  w = np.concatenate([w[:min(k, d)], np.zeros((max(0, d - k), e), dt)])
  with jax.enable_x64(x64):
    q, lin = _products_kernel(rs, _replicated(w, mesh), _replicated(bias, mesh), mesh=mesh, quad=quad)
    return float(q), float(lin)


@functools.partial(jax.jit, static_argnames=("mesh", "quad"))
def _products_kernel(rs: RowSplit, w, bias, *, mesh: Mesh, quad: bool):
  dt = w.dtype
  cross = rs.xy is not None

  def local(g, xy, s, w, bias):
    i, b = jax.lax.axis_index(MODEL), g.shape[0]
    wi = jax.lax.dynamic_slice_in_dim(w, i * b, b)
    q = jnp.zeros((), dt)
    if quad:  # this device's rows of G W [b, e]: the one product with G, skipped for tr(W^T X^T Y) alone
      q = jnp.sum(wi * jnp.matmul(g.astype(dt), w, precision=HIGHEST))
    lin = jnp.sum(wi * xy.astype(dt)) if cross else jnp.zeros((), dt)
    return jax.lax.psum(q, MODEL), jax.lax.psum(lin, MODEL)

  q, lin = shard_map(local, mesh=mesh, in_specs=(ROWS, _spec(rs.xy), P(), P(), P()), out_specs=(P(), P()),
                         check_vma=False)(rs.gram, rs.xy, rs.xsum, w, bias)
  s, n = rs.xsum.astype(dt), rs.count.astype(dt)
  sw = jnp.matmul(s, w, precision=HIGHEST)
  q = q + 2 * jnp.sum(bias * sw) + n * jnp.sum(bias * bias)
  if cross:
    lin = lin + jnp.sum(bias * rs.ysum.astype(dt))
  return q, lin


def _replicated(x, mesh: Mesh):
  """`x` (small: weights) on every device of `mesh`; an array on the mesh is laid out again by
  a compiled copy (`sharded_solve.placed`), one elsewhere goes through the host."""
  if isinstance(x, jax.Array) and x.sharding.device_set == set(mesh.devices.flat):
    return sharded_solve.placed(x, mesh, P())
  return jax.device_put(np.asarray(x), NamedSharding(mesh, P()))

