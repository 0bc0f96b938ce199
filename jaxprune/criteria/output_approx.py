"""Greedy output approximation with refit-aware removal costs (beyond the paper).

The second level of a module is refit by least squares on the kept channels
(docs/method.md section 4, "refit"). The exact increase of that refit error when a
unit S (a channel, or the H channels of a head) is removed is the
Optimal-Brain-Surgeon cost

    dE_S = tr(W_S^T (G^-1_SS)^-1 W_S),      G = X2^T X2 + lam I,  W = G^-1 X2^T Y,

and after removing S the solution and the inverse update in closed form:
W <- W - G^-1_{:,S} (G^-1_SS)^-1 W_S,  G^-1 <- G^-1 - G^-1_{:,S} (G^-1_SS)^-1 G^-1_{S,:}.
Removing the cheapest unit, updating, and repeating gives a removal order;
the score of a unit is the step at which it goes (later = more important), so
the criterion keeps the one signature `score(kind, params, stats)`. It needs
the full Gram matrix of X2 and its cross moment with the dense output, which
the pipeline accumulates anyway.

The sweep itself, on one system, is `obs_sweep` (factored: G^-1 is never rewritten). When
the caller removes only `stats.n_remove` units (the layer loop knows how many channels go;
the adaptive plan, how many min_keep allows), it stops there: the removed units, their order
and costs are the full sweep's.

Cost, for U2 channels of which r go: the inverse (U2^3 / 3 flops in float64 by
Cholesky, 8 U2^2 bytes) and about U2 r^2 + 2 U2 r D for the sweep (D outputs): a cube of
the width, where the module's forward grows with the width alone. Modules wider than
OBS_BLOCK channels therefore run the blocked form: the sweep runs on diagonal blocks
of the Gram matrix (channels of different blocks taken as uncorrelated), where the
refit error is a sum over blocks, and the blocks' removals are merged by the cost
each unit had when it went (made non-decreasing within a block). That is about
3 U2 b^2 flops and 8 b^2 bytes for blocks of b channels: linear in the width. With
`n_remove`, each block sweeps about its share of the removals (`_blocked`), not n_remove.
(With fewer tokens N than channels, G is its diagonal plus a rank-N term and Woodbury
gives G^-1 through an N x N system, but the sweep still updates W and reads G^-1's
columns for every unit that goes: N U2^2 in all, quadratic in the width.)

The adaptive plan scores the dense model, where the target is the module's own
output. There `refit_aware_stream` forms only the diagonal blocks (of PLAN_BLOCK
channels) of X2's Gram matrix, from X2 itself (2 N U2 b flops over N tokens, not the 2 N U2^2 of the whole
matrix), and each block's share of the target is its own output X2_b W_b, so the
plan's sweep and its statistics both grow linearly with the width
(benchmarks/preset_cost.py; the quality of each block size on SmolLM2:
benchmarks/obs_options.py).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import placement
from jaxprune.criteria import obs_split, obs_sweep
from jaxprune.criteria.stats import ModuleStats
from jaxprune.models import adapter as A
from jaxprune.placement import float64_solves, local_copy, to_solve
from jaxprune.spec import Params
from jaxprune.stats import moments, split


OBS_BLOCK = 4096  # channels; modules with more units' channels use the blocked sweep
# Steps a block's first sweep goes past its share of the removals. FFN channels are
# exchangeable between blocks, so the shares hold to a few percent (within 2.6% on the
# synthetic FFN-8192 model of benchmarks/preset_cost.py: 16 of a 4096-channel block's 32
# channels a step); every step of margin costs sweep time, and a block swept again pays for
# its first sweep in vain.
BLOCK_DEPTH_MARGIN = 1
# Channels per block of the adaptive plan's sweep on the dense model (`refit_aware_stream`):
# the plan only sizes the modules, each module's own ranking is the layer loop's sweep.
PLAN_BLOCK = 512


def _blocks(n_units: int, width: int, block: int) -> list[np.ndarray]:
  """Units split into near-equal contiguous blocks of at most `block` channels."""
  k = max(1, -(-n_units * width // block))
  return [np.asarray(b) for b in np.array_split(np.arange(n_units), k)]


def _increasing_along(order: np.ndarray, costs: np.ndarray) -> np.ndarray:
  """`costs` made strictly increasing along the removal `order` (a running maximum, then
  the next float64 up where it ties), so ranking them gives back `order`."""
  by_order = np.argsort(order, kind="stable")
  c = np.maximum.accumulate(np.asarray(costs, np.float64)[by_order])
  for k in range(1, len(c)):
    if c[k] <= c[k - 1]:
      c[k] = np.nextafter(c[k - 1], np.inf)
  out = np.empty_like(c)
  out[by_order] = c
  return out


def refit_aware(kind: A.ModuleKind, p: Params, stats: ModuleStats, block: int | None = None):
  """The refit error a unit's removal adds (summed over calibration tokens) when the
  greedy sweep removes it, made increasing along the sweep's order: later-removed
  units score higher, and the scores are on the scale of the module's output, so
  adaptive allocation can compare them across modules ([units], float64).

  `block`: channels per block of the blocked sweep (default OBS_BLOCK; modules
  with at most that many channels run the exact sweep).
  """
  width = A.unit_width(kind, p)
  block = OBS_BLOCK if block is None else block
  if split.is_split(stats.hidden):
    return _refit_aware_split(stats, width, block)
  d = stats.hidden.xx.shape[0] - 1
  n = d // width
  with float64_solves():
    if d <= block:
      # The Gram matrix goes straight to where its inverse is taken (the host, for LAPACK).
      xx = stats.hidden.xx if placement.lapack_solves() else to_solve(stats.hidden.xx)
      # With `stats.n_remove` the sweep stops there: the units it removes, their order and
      # costs are those of the full sweep, and every other unit scores above them.
      ginv = obs_sweep.ridge_inverse(xx, stats.damping, stats.intercept)
      xy = to_solve(stats.hidden.xy, keep_dtype=True)
      order, paid = obs_sweep.removal_order(ginv, xy, width, stats.intercept, obs_sweep.step_size(n), stats.n_remove)
      return _increasing_along(np.asarray(order), np.asarray(paid, np.float64))
    # float32 on the host: each block is taken to float64 alone, never the whole Gram matrix.
    xx, xy = np.asarray(local_copy(stats.hidden.xx)), np.asarray(local_copy(stats.hidden.xy))

    def system(units, ch):
      return _augmented_block(xx, ch), xy[np.append(ch, d)]  # the block's channels and the ones column

    return _blocked(n, width, _blocks(n, width, block), np.diagonal(xx)[:d], _system_sweep(system, width, stats),
                    stats)


def _refit_aware_split(stats: ModuleStats, width: int, block: int) -> np.ndarray:
  """`refit_aware` on statistics split by rows over the mesh (`obs_split`): the exact sweep, or
  for modules wider than `block` the blocked one, each block cut from the split statistics."""
  rs = stats.hidden
  d = rs.dim
  n = d // width
  if d <= block:
    order, paid = obs_split.removal_order(rs, width, stats.damping, stats.intercept, obs_sweep.step_size(n),
                                          stats.n_remove)
    return _increasing_along(order, paid)
  mesh = split.mesh_of(rs)

  def sweep_block(units, ch, delta, depth, device=None):  # on the whole mesh: `device` is None
    sub = split.cut(rs, ch, split.padded_width(len(ch), mesh, width))
    return obs_split.removal_order(sub, width, delta, stats.intercept, obs_sweep.step_size(len(units)), depth,
                                   rows=len(ch))

  return _blocked(n, width, _blocks(n, width, block), split.diagonal(rs), sweep_block, stats, devices=False)


def _augmented_block(xx: np.ndarray, ch: np.ndarray) -> np.ndarray:
  """The rows and columns `ch` (one run of channels, as `_blocks` makes them) of the augmented
  Gram matrix `xx` and its ones column (the last), by slices: a 4097-wide block of an 8193-wide
  matrix in a tenth of the time of indexing it by `ch` twice."""
  d = xx.shape[0] - 1
  lo, hi = int(ch[0]), int(ch[-1]) + 1
  k = hi - lo
  g = np.empty((k + 1, k + 1), xx.dtype)
  g[:k, :k] = xx[lo:hi, lo:hi]
  g[:k, k] = xx[lo:hi, d]
  g[k, :k] = xx[d, lo:hi]
  g[k, k] = xx[d, d]
  return g


def refit_aware_stream(kind: A.ModuleKind, p: Params, stats: ModuleStats, x2, w2a, shrink: float, skip: int = 0,
                       block: int | None = None):
  """`refit_aware`'s blocked sweep on the dense model, from the module's second-level input
  stream `x2` [C, B, T, U2] instead of its full Gram matrix (the adaptive plan's costs).

  Only the diagonal blocks of the Gram matrix are formed (2 N U2 b flops for N tokens
  and blocks of b channels, against 2 N U2^2 for the whole matrix), each shrunk toward
  its diagonal by `shrink` as `moments.shrink` does the whole one. On the dense model the
  target is the module's own output X2 W + b, and with the blocks taken as uncorrelated
  each block's share of it is X2_b W_b: the cross moment of a block is its shrunk
  Gram times [W_b; 0] (the bias is the ones column's, which every block refits), so
  every block's sweep starts from the dense weights, as the exact sweep does.
  `w2a` is [W2; b2] ((U2+1, D)); `skip`: each window's first positions left out;
  `block`: channels per block (default PLAN_BLOCK).
  """
  width = A.unit_width(kind, p)
  block = PLAN_BLOCK if block is None else block
  d = x2.shape[-1]
  n = d // width
  blocks = _blocks(n, width, block)
  x2 = x2[:, :, skip:] if skip else x2
  grams = {}
  for units in blocks:
    lo, size = int(units[0]) * width, len(units) * width
    grams[lo] = np.asarray(local_copy(_augmented_gram(x2, jnp.int32(lo), size)))
  diag = np.concatenate([np.diagonal(grams[lo])[:-1] for lo in sorted(grams)])
  w2a = np.asarray(local_copy(w2a), np.float32)

  def system(units, ch):
    g = grams[int(ch[0])]
    wa = np.concatenate([w2a[ch], np.zeros((1, w2a.shape[1]), np.float32)])
    m = moments.shrink(moments.Moments(g, g @ wa), shrink, wa)
    return m.xx, m.xy

  with float64_solves():
    return _blocked(n, width, blocks, diag, _system_sweep(system, width, stats), stats)


@functools.partial(jax.jit, static_argnames=("size",))
def _augmented_gram(x2, lo, size: int):
  """[X 1]^T [X 1] of the channels lo..lo+size-1 of `x2` [..., U2] over all its tokens."""
  x = jax.lax.dynamic_slice_in_dim(x2, lo, size, axis=x2.ndim - 1).reshape(-1, size).astype(jnp.float32)
  return moments.gram(jnp.concatenate([x, jnp.ones((x.shape[0], 1), jnp.float32)], axis=1))


def _system_sweep(system, width: int, stats: ModuleStats):
  """`_blocked`'s `sweep_block` for blocks given as `system(units, channels)` = (the block's
  augmented Gram, its cross moment), float32 on the host: the inverse and sweep where the
  solves run (LAPACK's inverse takes its one float64 copy itself), or on `device`."""

  def sweep_block(units, ch, delta, depth, device=None):
    sub_xx, sub_xy = system(units, ch)
    if not placement.lapack_solves():
      sub_xx, sub_xy = (jax.device_put(np.asarray(a, np.float64), device) for a in (sub_xx, sub_xy))
    ginv = obs_sweep.ridge_inverse(sub_xx, delta, stats.intercept)
    return obs_sweep.removal_order(ginv, to_solve(sub_xy, keep_dtype=True), width, stats.intercept,
                                   obs_sweep.step_size(len(units)), depth)

  return sweep_block


def _blocked(n: int, width: int, blocks, diag: np.ndarray, sweep_block, stats: ModuleStats,
             devices: bool = True) -> np.ndarray:
  """The blocked sweep's scores ([n], float64): each block's exact sweep by `sweep_block(units,
  channels, delta, depth[, device])` (its removal order and costs), merged by the cost each unit
  had when it went. `diag`: the diagonal of the module's whole Gram matrix (its ridge);
  `devices`: whether blocks may run one a device side by side (not for split blocks, which
  take the whole mesh each).

  With `stats.n_remove` a block's sweep first stops a little past its share of the removals
  (`_first_depth`) instead of at n_remove: a block whose last swept cost is still at or below
  the n_remove-th lowest merged score could have given more, so it is swept again, a quarter
  further (`_further`), until none could. The n_remove lowest scores then belong to the same
  units, with the same scores, as with every block swept to n_remove (stopping early changes
  nothing before it), and the blocks' sweeps add up to about the module's removals, not
  n_remove each.
  """

  def sweep(job, device=None):
    units, depth = job
    ch = (units[:, None] * width + np.arange(width)[None]).reshape(-1)
    # The module's ridge lam = delta * mean(diag G) in every block, not the block's own mean.
    delta = stats.damping * float(np.mean(diag)) / max(float(np.mean(diag[ch])), 1e-300)
    # Host blocks run one after another (`_sweep_blocks`), so the process-wide BLAS limit is theirs.
    with placement.serial_blas(len(ch) + 1) if device is None else contextlib.nullcontext():
      order, paid = sweep_block(units, ch, delta, depth, device)
    # Non-decreasing within a block, so that merging the blocks by cost keeps each block's own order.
    return _increasing_along(np.asarray(order), np.asarray(paid, np.float64)), np.asarray(order)

  n_remove = stats.n_remove
  deepest = [len(u) - 1 if n_remove is None else min(len(u) - 1, n_remove) for u in blocks]
  depth = [d if n_remove is None else min(d, _first_depth(len(u), n, n_remove)) for u, d in zip(blocks, deepest)]
  swept = _sweep_blocks(sweep, list(zip(blocks, depth)), devices)
  while True:
    scores = np.zeros(n, np.float64)
    for units, (s, _) in zip(blocks, swept):
      scores[units] = s
    if not n_remove:
      break
    tau = np.partition(scores, n_remove - 1)[n_remove - 1]
    short = [b for b, (s, order) in enumerate(swept) if depth[b] < deepest[b] and s[order == depth[b] - 1][0] <= tau]
    if not short:
      break
    for b in short:
      depth[b] = min(deepest[b], _further(len(blocks[b]), depth[b]))
    for b, out in zip(short, _sweep_blocks(sweep, [(blocks[b], depth[b]) for b in short], devices)):
      swept[b] = out
  # Ties between blocks: the lower index goes first.
  return _increasing_along(np.argsort(np.argsort(scores, kind="stable"), kind="stable"), scores)


def _further(n_block: int, depth: int) -> int:
  """Where a block's sweep that stopped at `depth` stops when it is run again: a quarter
  further, in whole steps."""
  step = obs_sweep.step_size(n_block)
  return -(-(depth + max(depth // 4, 1)) // step) * step


def _first_depth(n_block: int, n: int, n_remove: int) -> int:
  """Where the sweep of a block of `n_block` of the module's `n` units first stops: its share of
  the `n_remove` removals in whole steps, and BLOCK_DEPTH_MARGIN steps more."""
  step = obs_sweep.step_size(n_block)
  return (-(-(n_remove * n_block) // (n * step)) + BLOCK_DEPTH_MARGIN) * step


def _sweep_blocks(sweep, jobs, devices: bool = True):
  """`sweep(job[, device])` of every job (a block's units and how far to sweep them), in order.
  The blocks' sweeps are independent: where they run on the devices (GPUs) they go one a
  device, each from its own thread, so a wide module's sweeps run side by side instead of on
  one chip while the others wait. With LAPACK (CPU and TPU hosts) they run here, one after
  another, on the threaded BLAS (and so do split blocks, `devices` False, each on the whole mesh)."""
  if not devices:
    return [sweep(job) for job in jobs]
  devices = jax.local_devices()
  if placement.lapack_solves() or len(devices) == 1 or len(jobs) == 1:
    return [sweep(job) for job in jobs]
  import concurrent.futures

  def run(k):
    with float64_solves():  # JAX's x64 switch is per thread
      return sweep(jobs[k], devices[k % len(devices)])

  with concurrent.futures.ThreadPoolExecutor(min(len(jobs), len(devices))) as pool:
    return list(pool.map(run, range(len(jobs))))
