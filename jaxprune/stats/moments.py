"""Second-moment sufficient statistics as f32 sums.

`Moments` holds the augmented Gram matrix of a module input X (a ones column
appended, so the last row holds the column sums and the corner holds the token
count) and optionally the cross moment with a target Y. Everything is a sum,
so statistics of several batches or devices add exactly, and memory does not
grow with the number of calibration tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.placement import to_host

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Moments:
  """Sums over tokens: xx = [X 1]^T [X 1] (d+1, d+1); xy = [X 1]^T Y (d+1, e) or None."""

  xx: jax.Array
  xy: jax.Array | None = None

  @property
  def dim(self) -> int:
    return self.xx.shape[0] - 1

  @property
  def count(self) -> jax.Array:
    return self.xx[-1, -1]

  @property
  def gram(self) -> jax.Array:
    """X^T X (d, d)."""
    return self.xx[:-1, :-1]

  @property
  def mean(self) -> jax.Array:
    """E[x] (d,)."""
    return self.xx[-1, :-1] / self.count

  @property
  def second_moment(self) -> jax.Array:
    """S = E[x^T x] (d, d), the uncentered second moment."""
    return self.gram / self.count

  @property
  def sq_mean(self) -> jax.Array:
    """E[x_j^2] per feature (d,)."""
    return jnp.diagonal(self.gram) / self.count

  @property
  def variance(self) -> jax.Array:
    """Var[x_j] per feature (d,), over tokens."""
    return jnp.maximum(self.sq_mean - jnp.square(self.mean), 0.0)

  def __add__(self, other: "Moments") -> "Moments":
    xy = None if self.xy is None else self.xy + other.xy
    return Moments(self.xx + other.xx, xy)


jax.tree_util.register_dataclass(Moments, data_fields=["xx", "xy"], meta_fields=[])


def init(d: int, e: int | None = None) -> Moments:
  return Moments(jnp.zeros((d + 1, d + 1), F32), None if e is None else jnp.zeros((d + 1, e), F32))


def _augment(x):
  x = x.reshape(-1, x.shape[-1]).astype(F32)
  return jnp.concatenate([x, jnp.ones((x.shape[0], 1), F32)], axis=1)


SYMMETRIC_MIN = 1024  # features from which the Gram matrix is formed from its upper blocks
SYMMETRIC_BLOCKS = 3


def gram(xa) -> jax.Array:
  """xa^T xa for xa [t, d]. From SYMMETRIC_MIN features on, only the blocks on and above
  the diagonal are multiplied and the others are their transposes: 2/3 of the work with 3
  blocks, and 20% less time on a CPU at d = 1537 (the entries are the same dot products)."""
  d = xa.shape[1]
  if d < SYMMETRIC_MIN:
    return jnp.einsum("ti,tj->ij", xa, xa, precision="highest")
  nb = SYMMETRIC_BLOCKS
  cuts = [round(d * k / nb) for k in range(nb + 1)]
  cols = [xa[:, cuts[k]:cuts[k + 1]] for k in range(nb)]
  up = {(i, j): jnp.einsum("ti,tj->ij", cols[i], cols[j], precision="highest") for i in range(nb) for j in range(i, nb)}
  return jnp.block([[up[i, j] if j >= i else up[j, i].T for j in range(nb)] for i in range(nb)])


def sums(x, y=None) -> Moments:
  """The sums over the tokens of x [..., d] (and targets y [..., e]) alone."""
  xa = _augment(x)
  if y is None:
    return Moments(gram(xa), None)
  yf = y.reshape(-1, y.shape[-1]).astype(F32)
  return Moments(gram(xa), jnp.einsum("ti,tj->ij", xa, yf, precision="highest"))


def update(m: Moments, x, y=None) -> Moments:
  """Adds the tokens of x [..., d] (and targets y [..., e]) to the sums."""
  return m + sums(x, None if m.xy is None else y)


@dataclasses.dataclass(frozen=True)
class RowSplit:
  """`Moments` held as parts, so that the Gram matrix's rows can be split over a mesh axis.

  The augmented Gram (d+1, d+1) of a d-wide input is as wide as d plus one: no
  mesh axis divides it. Its parts are: gram = X^T X (d, d) and xy = X^T Y (d, e),
  whose rows split over the axis as the input's features do, and the column sums,
  token count and target sums, small and replicated. `join` puts them back together.
  """

  gram: jax.Array
  xsum: jax.Array
  count: jax.Array
  xy: jax.Array | None = None
  ysum: jax.Array | None = None

  @property
  def dim(self) -> int:
    return self.gram.shape[0]

  @property
  def mean(self) -> jax.Array:
    return self.xsum / self.count

  @property
  def sq_mean(self) -> jax.Array:
    """E[x_j^2] per feature (d,), each device reading its own diagonal block (no gather)."""
    from jaxprune.sharded_solve import diagonal  # the split kernels import this module

    return diagonal(self.gram, self.gram.sharding.mesh) / self.count

  @property
  def variance(self) -> jax.Array:
    return jnp.maximum(self.sq_mean - jnp.square(self.mean), 0.0)

  def __add__(self, other: "RowSplit") -> "RowSplit":
    return jax.tree.map(lambda a, b: a + b, self, other)


jax.tree_util.register_dataclass(RowSplit, data_fields=["gram", "xsum", "count", "xy", "ysum"], meta_fields=[])


def _constrain(x, sharding):
  return x if x is None or sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def init_split(d: int, e: int | None, rows) -> RowSplit:
  """Zero `RowSplit` sums with gram and xy split by `rows` (a sharding of their first axis)."""
  return RowSplit(_constrain(jnp.zeros((d, d), F32), rows), jnp.zeros((d,), F32), jnp.zeros((), F32),
                  None if e is None else _constrain(jnp.zeros((d, e), F32), rows),
                  None if e is None else jnp.zeros((e,), F32))


def split_sums(x, y, rows) -> RowSplit:
  """`sums(x, y)` as `RowSplit` parts, each device forming its own rows of X^T X and X^T Y."""
  xf = x.reshape(-1, x.shape[-1]).astype(F32)
  g = _constrain(jnp.einsum("ti,tj->ij", xf, xf, precision="highest"), rows)
  xy = ysum = None
  if y is not None:
    yf = y.reshape(-1, y.shape[-1]).astype(F32)
    xy = _constrain(jnp.einsum("ti,tj->ij", xf, yf, precision="highest"), rows)
    ysum = jnp.sum(yf, axis=0)
  return RowSplit(g, jnp.sum(xf, axis=0), jnp.asarray(xf.shape[0], F32), xy, ysum)


def constrain_split(s: RowSplit, rows) -> RowSplit:
  return dataclasses.replace(s, gram=_constrain(s.gram, rows), xy=_constrain(s.xy, rows))


def join(s: RowSplit) -> Moments:
  """The augmented `Moments` of `RowSplit` parts (numpy parts give numpy Moments)."""
  xp = np if isinstance(s.gram, np.ndarray) else jnp
  top = xp.concatenate([s.gram, s.xsum[:, None]], axis=1)
  xx = xp.concatenate([top, xp.append(s.xsum, s.count)[None]], axis=0)
  xy = None if s.xy is None else xp.concatenate([s.xy, s.ysum[None]], axis=0)
  return Moments(xx, xy)


def compensated_add(total, comp, term):
  """`total + term` by Kahan's compensated summation, for pytrees of float sums (Moments, Diag).

  `comp` carries the low-order bits each addition rounded away, and the next
  term is corrected by it, so a sum over many chunks is as accurate as one
  rounding of the exact sum (a plain float32 running sum over C chunks can be off
  by C roundings, which swamps small directions of a Gram matrix when a
  calibration set spans thousands of chunks). Works where float64 does not
  (TPU). Returns (new total, new compensation).
  """
  y = jax.tree.map(jnp.subtract, term, comp)
  t = jax.tree.map(jnp.add, total, y)
  return t, jax.tree.map(lambda t, s, y: (t - s) - y, t, total, y)


def subset(m: Moments, idx) -> Moments:
  """Moments of the features `idx` only (the ones column is kept), cut on the host with numpy:
  on a device each kept count would compile its own gather (`subset_padded` is the device form)."""
  idx = np.append(np.asarray(idx, np.int64), m.dim)
  xx = to_host(m.xx)
  return Moments(xx[np.ix_(idx, idx)], None if m.xy is None else to_host(m.xy)[idx])


def subset_padded(m: Moments, idx, width: int) -> Moments:
  """Moments of the features `idx` as a system `width` features wide: the features, then
  width - len(idx) padding features whose rows and columns are zero, then the ones column.

  For statistics on the devices, where a cut to each kept count compiles its own gather and
  every solve after it compiles again: all the counts up to `width` share one compile. A
  ridge solve told `rows=len(idx)` (`reconstruct.ridge_solve`) takes its ridge from the real
  features and gives the padding zero weight, so it solves the unpadded system.
  """
  k = len(idx)
  if not 0 < k <= width:
    raise ValueError(f"{k} features do not fit a padded system of {width}")
  full = np.full(width + 1, m.dim, np.int32)  # the padding reads the ones column, then is zeroed
  full[:k] = np.asarray(idx)
  xx, xy = _padded(m.xx, m.xy, full, np.int32(k))
  return Moments(xx, xy)


@jax.jit
def _padded(xx, xy, full, k):
  n = full.shape[0]
  real = (jnp.arange(n) < k) | (jnp.arange(n) == n - 1)
  g = jnp.where(real[:, None] & real[None, :], xx[full][:, full], 0)
  return g, None if xy is None else jnp.where(real[:, None], xy[full], 0)


@dataclasses.dataclass(frozen=True)
class Diag:
  """Per-feature sums over tokens: s1 = sum x_j, s2 = sum x_j^2, and the token count.

  What criteria that read only a diagonal, a mean or a variance need (FLAP,
  wanda-sp, the output energy): O(d) memory and work per token where `Moments`
  costs O(d^2). Exposes the same `mean`, `sq_mean` and `variance` as `Moments`.
  """

  s1: jax.Array
  s2: jax.Array
  n: jax.Array

  @property
  def dim(self) -> int:
    return self.s1.shape[0]

  @property
  def count(self) -> jax.Array:
    return self.n

  @property
  def mean(self) -> jax.Array:
    return self.s1 / self.n

  @property
  def sq_mean(self) -> jax.Array:
    return self.s2 / self.n

  @property
  def variance(self) -> jax.Array:
    return jnp.maximum(self.sq_mean - jnp.square(self.mean), 0.0)

  def __add__(self, other: "Diag") -> "Diag":
    return Diag(self.s1 + other.s1, self.s2 + other.s2, self.n + other.n)


jax.tree_util.register_dataclass(Diag, data_fields=["s1", "s2", "n"], meta_fields=[])


def init_diag(d: int) -> Diag:
  return Diag(jnp.zeros((d,), F32), jnp.zeros((d,), F32), jnp.zeros((), F32))


def diag_sums(x) -> Diag:
  """Per-feature sums over the tokens of x [..., d] alone."""
  xf = x.reshape(-1, x.shape[-1]).astype(F32)
  return Diag(jnp.sum(xf, axis=0), jnp.sum(jnp.square(xf), axis=0), jnp.asarray(xf.shape[0], F32))


def diag_of(m: Moments) -> Diag:
  """The diagonal part of full Moments."""
  return Diag(m.xx[-1, :-1], jnp.diagonal(m.gram), m.count)


def shrink(m: Moments, alpha: float, w_aug) -> Moments:
  """Moments whose centered covariance is shrunk toward its diagonal by `alpha` in [0, 1].

  Cov' = (1 - alpha) Cov + alpha diag(Cov); the means and the token count stay.
  The cross moment becomes (1 - alpha) X^T Y + alpha D W for the module's own
  second level `w_aug` ([W; b], (d+1, e)) and D the statistics with the
  covariance's off-diagonal removed, so a least-squares solve on the result is
  a ridge toward W whose penalty is each channel's variance, of weight
  alpha / (1 - alpha): the solve of all channels stays W plus a damped
  correction of the error inherited from earlier modules,
  and a refit of the kept ones moves the removed channels' output onto them only
  as far as their correlations are trusted. alpha = 0 is the measured
  statistics; alpha = 1 treats channels as uncorrelated: a refit keeps the kept
  channels' weights and puts the removed ones' mean output in the bias (FLAP's
  compensation), and the greedy output-approximation cost of a channel is its
  variance times ||w_j||^2 (FLAP's fluctuation). A fit on one domain's windows
  then relies less on correlations that text of another domain does not share.
  """
  if alpha == 0:
    return m
  if isinstance(m.xx, np.ndarray):  # host statistics (`stats.passes.gather_hidden`) stay on the host
    return _shrink_host(m, alpha, to_host(w_aug).astype(np.float32))
  d = m.dim
  s = m.xx[-1, :d]
  cov = m.xx[:d, :d] - jnp.outer(s, s) / m.count
  off = cov - jnp.diag(jnp.diagonal(cov))
  xy = None
  if m.xy is not None:
    # (G + l D) V = X^T Y + l D W with l = alpha / (1 - alpha), divided by 1 + l.
    uncorrelated = m.xx.at[:d, :d].add(-off)
    xy = (1 - alpha) * m.xy + alpha * jnp.matmul(uncorrelated, jnp.asarray(w_aug, F32), precision="highest")
  return Moments(m.xx.at[:d, :d].add(-alpha * off), xy)


def _shrink_host(m: Moments, alpha: float, w_aug: np.ndarray) -> Moments:
  """`shrink` of numpy Moments, in numpy (float32, as on the device)."""
  d = m.dim
  s = m.xx[-1, :d]
  off = m.xx[:d, :d] - np.outer(s, s) / m.xx[-1, -1]
  off[np.diag_indices(d)] = 0
  xy = None
  if m.xy is not None:
    uncorrelated = m.xx.copy()
    uncorrelated[:d, :d] -= off
    xy = (1 - alpha) * m.xy + alpha * (uncorrelated @ w_aug)
  xx = m.xx.copy()
  xx[:d, :d] -= np.float32(alpha) * off
  return Moments(xx, xy)
