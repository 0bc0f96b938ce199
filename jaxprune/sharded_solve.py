"""Ridge solves that stay split over the mesh's `model` axis, on the devices (issue 31).

    (G + lam I) W = C,   G [d, d] split by row blocks over `model`, C [d, e] likewise
                         (its columns over `data` where that axis divides e).

Layout. With m devices on `model` and b = d / m, device (j, i) of the (data, model) mesh holds
row block i of G (the layout the statistics accumulate in, `sharding.gram_rows`), the (i, j)
block of C and, while it works, a copy of its row block in the solve's dtype that becomes its
rows of the Cholesky factor L, plus one panel (d x b) of L. No device ever holds G, or the
iterate X, whole: every array of the kernel is a row block, a panel, a b x b block or a
b x e' block (e' = e / data); products G X pass X's blocks round a ring.

Algorithm. A right-looking blocked Cholesky with panel broadcasts, m steps: at step k device k
factors its diagonal block, L_kk goes to every device (a psum of one nonzero term, exact), each
device i > k forms its block L_ik = A_ik L_kk^-T, the column of blocks (the panel) is gathered,
and each device updates its own rows of the trailing matrix. Forward and back substitution then
run block by block (m steps each, b x e blocks broadcast). The arithmetic is that of an
ordinary Cholesky solve in another summation order, so Higham's bound holds
(Accuracy and Stability of Numerical Algorithms, 2nd ed., Thm 10.4): the computed W solves
(A + dA) W = C with |dA| <= gamma(3d + 1) |L| |L^T|. With the columns split over `data`, each
`data` row of the mesh factors the same matrix (repeated work, no extra memory per device).

Precision. `dtype` is the arithmetic: float64 where the backend has it (CPU, GPU), float32 where
it has not (TPU). After the direct solve, iterative refinement in the same precision (Higham
Ch. 12, "fixed precision") recomputes the residual C - A W at `Precision.HIGHEST` and solves
for a correction with the factor already made, until the componentwise backward error
    omega = max |C - A W| / (|A| |W| + |C|)
is at most `target_omega` (2u), stops shrinking by half, or `refine` steps are spent; the best
iterate is kept. Higham's Thm 12.3 puts the limit of omega at about gamma(d + 1) whatever the
condition number, provided the factor's backward error times cond(A) is below 1, so a float32
solve ends componentwise backward stable even from a weak factor; its forward error is
then |dW| <= |A^-1| omega (|A| |W| + |C|), which grows with cond(A), as for any float32 solve.

Intercept. The ones column of the augmented system [[G + lam I, s], [s^T, n]] [W; b] = [C; y]
(s = X^T 1, n the token count, y = Y^T 1) is eliminated first:
(G + lam I - s s^T / n) W = C - s y^T / n and b = (y - s^T W) / n, a rank-one change each
device makes to its own rows, so the bias is the exact least-squares bias as in
`reconstruct.ridge_solve`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxprune.sharding import DATA, MODEL, shard_map as _shard_map

HIGHEST = jax.lax.Precision.HIGHEST
REFINE_STEPS = 10  # refinements at most: each at least halves omega, so 10 cover 2^10 of lost accuracy



@dataclasses.dataclass(frozen=True)
class Intercept:
  """The ones column of an augmented system, eliminated before the solve.

  Attributes:
    xsum: s = X^T 1 [d], the column sums of the input.
    count: n, the number of tokens.
    ysum: y = Y^T 1 [e], the column sums of the target.
  """

  xsum: jax.Array
  count: jax.Array
  ysum: jax.Array


@dataclasses.dataclass(frozen=True)
class Solution:
  """A sharded solve's result.

  Attributes:
    w: W [d, e] in the solve's dtype, rows over `model`, columns over `data` where it divides e.
    bias: b [e] with an intercept, else None.
    refinements: refinement steps taken.
    omega: the componentwise backward error of `w` as computed in the solve's precision
      (NaN when no refinement was asked for: then it is not computed).
  """

  w: jax.Array
  bias: jax.Array | None
  refinements: int
  omega: float


def unit_roundoff(dtype) -> float:
  return float(jnp.finfo(dtype).eps) / 2


def target_omega(dtype) -> float:
  """The backward error at which refinement stops: two roundings, about the best a residual
  computed in `dtype` can show."""
  return 2 * unit_roundoff(dtype)


def row_spec(mesh: Mesh, e: int | None = None) -> P:
  """The layout of G (e None) or of C, W [d, e]: rows over `model`, C's columns over `data` where it divides e."""
  return P(MODEL, None if e is None else _columns(mesh, e))


def _columns(mesh: Mesh, e: int) -> str | None:
  n = mesh.shape.get(DATA, 1)
  return DATA if n > 1 and e % n == 0 else None


def diagonal(gram: jax.Array, mesh: Mesh) -> jax.Array:
  """diag(G) [d] of a row-split G, each device reading its own diagonal block: the ridge
  (`reconstruct.ridge_lam`) of statistics that stay split, without gathering G."""

  return _diagonal(placed(gram, mesh, P(MODEL, None)), mesh=mesh)


@functools.partial(jax.jit, static_argnames=("mesh",))
def _diagonal(gram, *, mesh: Mesh):
  def local(g):
    b = g.shape[0]
    i = jax.lax.axis_index(MODEL)
    return jnp.diagonal(jax.lax.dynamic_slice_in_dim(g, i * b, b, axis=1))

  return _shard_map(local, mesh=mesh, in_specs=P(MODEL, None), out_specs=P(MODEL), check_vma=False)(gram)


def solve(gram, rhs, lam: float, mesh: Mesh, dtype=jnp.float64, intercept: Intercept | None = None,
          refine: int | None = None) -> Solution | None:
  """Solves (G + lam I) W = C (with `intercept`: the augmented system, see the module doc).

  Args:
    gram: G [d, d], a JAX array laid out as `row_spec(mesh)` (others are placed so; a numpy
      array goes to each device as its row block only).
    rhs: C [d, e], laid out as `row_spec(mesh, e)` (likewise).
    lam: the ridge, from `reconstruct.ridge_lam` (computed in float64 by the caller).
    mesh: a mesh whose `model` axis divides d.
    dtype: the arithmetic, float64 or float32.
    refine: refinement steps at most; default 0 in float64 (a Cholesky solve, as on the host)
      and REFINE_STEPS in float32.

  Returns:
    A Solution, or None when the factorisation failed (a non-finite W: the caller damps more).
  """
  d, e = rhs.shape
  m = mesh.shape.get(MODEL, 1)
  if gram.shape != (d, d) or d % m:
    raise ValueError(f"a row-split solve needs G [d, d] and C [d, e] with d divisible by the model axis {m}; got "
                     f"G {gram.shape}, C {rhs.shape}")
  dtype = jnp.dtype(dtype)
  steps = (REFINE_STEPS if dtype == jnp.float32 else 0) if refine is None else refine
  with jax.enable_x64(dtype == jnp.float64):
    args = (placed(gram, mesh, row_spec(mesh)), placed(rhs, mesh, row_spec(mesh, e)),
            jnp.asarray(lam, dtype))
    if intercept is not None:
      args += (placed(intercept.xsum, mesh, P()), jnp.asarray(intercept.count, dtype),
               placed(intercept.ysum, mesh, P(_columns(mesh, e))))
    w, bias, taken, omega = _solve(*args, mesh=mesh, dtype=dtype, steps=steps)
    if not bool(jnp.all(jnp.isfinite(w))) or (bias is not None and not bool(jnp.all(jnp.isfinite(bias)))):
      return None
    return Solution(w, bias if intercept is not None else None, int(taken), float(omega) if steps else math.nan)


def placed(x, mesh: Mesh, spec: P):
  """`x` laid out as `spec` on `mesh` (no copy when it already is). A JAX array is laid out
  again by a compiled copy, whose collectives every process runs: `device_put` of an array
  that spans processes to another layout waited forever in a two-process run."""
  sh = NamedSharding(mesh, spec)
  if isinstance(x, jax.Array):
    return x if x.sharding.is_equivalent_to(sh, x.ndim) else _relaid(x, sh)
  return jax.device_put(x, sh)


@functools.partial(jax.jit, static_argnums=1)
def _relaid(x, sharding):
  return jax.lax.with_sharding_constraint(x, sharding)


@functools.partial(jax.jit, static_argnames=("mesh", "dtype", "steps"))
def _solve(g, c, lam, s=None, n=None, ysum=None, *, mesh: Mesh, dtype, steps: int):
  cols = _columns(mesh, c.shape[1])
  icpt = s is not None
  kernel = functools.partial(_local, m=mesh.shape.get(MODEL, 1), dtype=dtype, steps=steps, data=cols is not None)
  in_specs = (P(MODEL, None), P(MODEL, cols), P()) + ((P(), P(), P(cols)) if icpt else ())
  return _shard_map(kernel, mesh=mesh, in_specs=in_specs, out_specs=(P(MODEL, cols), P(cols) if icpt else P(),
                                                                      P(), P()), check_vma=False)(
                        g, c, lam, *((s, n, ysum) if icpt else ()))


def _mm(a, b):
  return jnp.matmul(a, b, precision=HIGHEST)


def _local(g, c, lam, s=None, n=None, ysum=None, *, m: int, dtype, steps: int, data: bool):
  """One device's part: g [b, d] its rows of G, c [b, e'] its block of C."""
  i = jax.lax.axis_index(MODEL)
  b = g.shape[0]
  own = jax.lax.dynamic_slice_in_dim(s, i * b, b) if s is not None else None
  a = g.astype(dtype)
  a = jax.lax.dynamic_update_slice_in_dim(a, jax.lax.dynamic_slice_in_dim(a, i * b, b, axis=1) +
                                          lam * jnp.eye(b, dtype=dtype), i * b, axis=1)
  rhs = c.astype(dtype)
  if s is not None:  # the ones column's Schur complement (module doc)
    s, ysum = s.astype(dtype), ysum.astype(dtype)
    a = a - own.astype(dtype)[:, None] * (s / n)[None]
    rhs = rhs - own.astype(dtype)[:, None] * (ysum / n)[None]
  lf = _factor(a, i, m)
  del a
  w = _substitute(lf, rhs, i, m)

  def bias(x):  # s^T X summed over the row blocks: nothing [d, e'] is gathered
    return None if s is None else (ysum - jax.lax.psum(_mm(own.astype(dtype), x), MODEL)) / n

  if not steps:
    bias_w = bias(w)
    return w, (jnp.zeros((), dtype) if bias_w is None else bias_w), jnp.zeros((), jnp.int32), jnp.zeros((), dtype)
  axes = (MODEL, DATA) if data else (MODEL,)

  def residual(x):
    """C - A x on this device's rows, and omega over the whole mesh."""
    r = c.astype(dtype) - _rows_times(g, x, i, m, dtype) - lam * x
    scale = _rows_times(g, jnp.abs(x), i, m, dtype, jnp.abs) + lam * jnp.abs(x) + jnp.abs(c.astype(dtype))
    if s is not None:
      ownd = own.astype(dtype)
      r = r - ownd[:, None] * bias(x)[None]
      scale = scale + jnp.abs(ownd)[:, None] * ((jax.lax.psum(_mm(jnp.abs(ownd), jnp.abs(x)), MODEL) +
                                                 jnp.abs(ysum)) / n)[None]
    ratio = jnp.where(scale > 0, jnp.abs(r) / jnp.where(scale > 0, scale, 1), jnp.where(r == 0, 0, jnp.inf))
    return r, jax.lax.pmax(jnp.max(ratio), axes)

  r, omega = residual(w)
  target = target_omega(dtype)

  def more(state):
    k, _, _, _, _, best_om, stalled = state
    return (k < steps) & (best_om > target) & ~stalled

  def step(state):
    k, x, r, om, best, best_om, _ = state
    x = x + _substitute(lf, r, i, m)
    r, om_next = residual(x)
    better = om_next < best_om
    # Higham's stopping rule: a step that does not halve omega has reached the limiting accuracy.
    return (k + 1, x, r, om_next, jnp.where(better, x, best), jnp.where(better, om_next, best_om),
            om_next > om / 2)

  k, _, _, _, w, omega, _ = jax.lax.while_loop(more, step, (jnp.zeros((), jnp.int32), w, r, omega, w, omega,
                                                            jnp.zeros((), bool)))
  bias_w = bias(w)
  return w, (jnp.zeros((), dtype) if bias_w is None else bias_w), k, omega


def _block(x, k, b: int):
  """Column block k (b wide) of x."""
  return jax.lax.dynamic_slice_in_dim(x, k * b, b, axis=1)


def _own(blk, mine):
  """`blk` [b, b] on the device whose diagonal block it is, I elsewhere (see `_factor`)."""
  return jnp.where(mine, blk, jnp.eye(blk.shape[0], dtype=blk.dtype))


def _factor(a, i, m: int):
  """This device's rows of L (b x d) from its rows of A, by a right-looking blocked Cholesky.

  Loops, not Python unrolling: one compile whatever m is, and the trailing update goes one
  b x b block at a time, so no temporary is larger than a block beside the panel.
  """
  b, d = a.shape

  def step(k, a):
    blk = _block(a, k, b)
    # Only device k's block is its diagonal block. The others factor I instead: a factorisation or
    # solve that meets inf or NaN runs many times slower on a CPU, and its result is masked anyway.
    lkk = jax.lax.psum(jnp.where(i == k, jnp.tril(jax.lax.linalg.cholesky(_own(blk, i == k), symmetrize_input=False)),
                                 0), MODEL)
    lik = jax.lax.linalg.triangular_solve(lkk, blk, left_side=False, lower=True, transpose_a=True)
    lik = jnp.where(i == k, lkk, jnp.where(i > k, lik, 0))  # rows above block k: L is zero there
    a = jax.lax.dynamic_update_slice_in_dim(a, lik, k * b, axis=1)
    panel = jax.lax.all_gather(lik, MODEL, tiled=True)  # column block k of L [d, b]

    def update(j, a):
      return jax.lax.dynamic_update_slice_in_dim(
          a, _block(a, j, b) - _mm(lik, jax.lax.dynamic_slice_in_dim(panel, j * b, b).T), j * b, axis=1)

    return jax.lax.fori_loop(k + 1, m, update, a)

  return jax.lax.fori_loop(0, m, step, a)


def _substitute(lf, rhs, i, m: int):
  """X with L L^T X = rhs, all row-split: forward, then back substitution, one block a step."""
  b = lf.shape[0]

  def forward(k, y):
    lk = _block(lf, k, b)  # device k: L_kk; below: L_ik
    yk = jax.lax.psum(jnp.where(i == k, jax.lax.linalg.triangular_solve(_own(lk, i == k), y, left_side=True,
                                                                         lower=True), 0), MODEL)
    return jnp.where(i == k, yk, jnp.where(i > k, y - _mm(lk, yk), y))

  def back(j, x):
    k = m - 1 - j
    lk = _block(lf, k, b)
    later = jax.lax.psum(jnp.where(i > k, _mm(lk.T, x), 0), MODEL)  # sum over i > k of L_ik^T X_i
    xk = jax.lax.linalg.triangular_solve(_own(lk, i == k), x - later, left_side=True, lower=True, transpose_a=True)
    return jnp.where(i == k, xk, x)

  return jax.lax.fori_loop(0, m, back, jax.lax.fori_loop(0, m, forward, rhs))


def _rows_times(g, x, i, m: int, dtype, f=lambda blk: blk):
  """f(G_i) X [b, e'] for this device's rows g [b, d] of G and its block x [b, e'] of X, by a
  ring: each step multiplies the block of X it holds and passes it to the previous device, so
  no device ever holds X whole (at e near d that would be another row block or two) nor a
  temporary the size of its row block, whatever f and the cast."""
  b = g.shape[0]
  ring = [(src, (src - 1) % m) for src in range(m)]

  def step(k, carry):
    acc, blk = carry
    j = (i + k) % m  # the block of X this device holds at step k
    acc = acc + _mm(f(_block(g, j, b).astype(dtype)), blk)
    return acc, jax.lax.ppermute(blk, MODEL, ring)

  return jax.lax.fori_loop(0, m, step, (jnp.zeros(x.shape, dtype), x))[0]
