"""One module's step: measure -> (reconstruct) -> score and select -> cut -> (refit) -> advance.

`step(ctx, m) -> StepResult(out, metrics)` is a function of its arguments and changes
none of them: `out` (the new block, its sizes and the streams entering the next module)
is what the loop carries on, `metrics` (the report row, kernel calls, seconds by phase) is
what it records. See docs/engine.md.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import placement, surgery
from jaxprune.models import adapter as A
from jaxprune.models import layers as L
from jaxprune.prune import measure, solve
from jaxprune.prune.config import DAMPING_GRID
from jaxprune.prune.context import StepContext
from jaxprune.prune.metrics import Meter, ModuleRow
from jaxprune.prune.select import select
from jaxprune.prune.streams import Group, positions
from jaxprune.stats import moments, passes, split
from jaxprune.stats import needs as needs_lib


class ModuleInput(NamedTuple):
  """One module and what enters it.

  Attributes:
    kind, i: the module (attention or MLP) of block i.
    block, layer: the block's parameters and sizes entering the step.
    cfg: the block's config as the module sees it (`L.part_config`).
    groups, xs: the calibration groups' streams and the random-token scoring stream (or None).
    shape: (units to keep, KV heads to keep or None), from the budget (`allocate.Budget`).
    tau: the similarity threshold of heads="similarity", or None.
  """

  kind: A.ModuleKind
  i: int
  block: Any
  layer: Any
  cfg: L.BlockConfig
  groups: list
  xs: Any
  shape: tuple[int, int | None]
  tau: float | None


class ModuleOut(NamedTuple):
  """What the loop carries on: the block with the module pruned (biases filled in), its
  sizes, and the streams entering the next module."""

  block: Any
  layer: Any
  groups: list
  xs: Any


class StepMetrics(NamedTuple):
  """What the loop records: the report row, kernel calls by kind, wall seconds by phase."""

  row: ModuleRow
  passes: dict
  seconds: dict


class StepResult(NamedTuple):
  """What `step` returns: the state the loop carries on, apart from what it records."""

  out: ModuleOut
  metrics: StepMetrics


def step(ctx: StepContext, m: ModuleInput) -> StepResult:
  """Prunes module `m` (see the module docstring)."""
  c = ctx.config
  meter = Meter()
  t0 = time.perf_counter()
  p0 = m.block[m.kind.key]
  # How many units stay is known before the statistics (the budget and plan
  # decide it); a module that keeps them all is not scored.
  n_units = A.num_units(m.kind, p0)
  scored = m.shape[0] < n_units or (m.kind is A.ATTN and c.heads == "similarity" and m.tau is not None)
  nd = ctx.needs(m.kind, scored)
  if not scored and ctx.with_dense and all(g.xd is g.xp for g in m.groups):
    return _unchanged(ctx, m, meter, t0)
  grid = DAMPING_GRID if c.auto_damping else None
  solves: dict[str, dict] = {}

  douts = measure.dense_outputs(ctx, m.kind, m.i, m.block, m.cfg, m.groups, nd, meter)
  p1 = p0
  if c.reconstruct:
    p1, solves["first_level"] = _reconstruct_first(c, m, p0, douts, grid, meter)
  st = measure.statistics(ctx, m.kind, m.block, m.cfg, p1, m.groups, m.xs, douts, nd, meter)
  p2 = p1
  if c.reconstruct:
    p2, solves["second_level"] = _reconstruct_second(c, m, p1, st, grid, meter)
  keep, selection, score_seconds = np.arange(n_units, dtype=np.int32), {}, None
  if scored:
    keep, selection, score_seconds = _score_select(ctx, m, p2, st, nd, n_units, meter)
  blk2, layer2, idx = _cut(c, m, p2, keep, st.m2, meter)
  if c.refit:
    subs, on_host = _kept_sums(idx, st, ctx.mesh)
    # The kept channels' sums are all the refit needs of the statistics: the whole Gram
    # matrices (67 MB each at a 4096-wide MLP) go before its solve; the X2 streams stay to advance.
    st = _without_sums(st)
    blk2, solves["refit"] = _refit(ctx, m, blk2, subs, on_host, grid, meter)
  with meter.phase("surgery"):
    blk2 = ctx.fill_biases(blk2)
    w2f, b2f = solve.full_width_second(m.kind, blk2[m.kind.key], idx, st.hids[0].x2.shape[-1])
  groups, xs, err_out = _advance(ctx, m, douts, st, w2f, b2f, meter)

  row = ModuleRow(m.i, m.kind.name, int(n_units), tuple(int(k) for k in keep), bool(scored),
                  time.perf_counter() - t0, solves, selection, score_seconds,
                  _errors(ctx, nd, douts, solves, err_out))
  return StepResult(ModuleOut(blk2, layer2, groups, xs), StepMetrics(row, meter.passes, meter.seconds))


def _unchanged(ctx: StepContext, m: ModuleInput, meter: Meter, t0: float) -> StepResult:
  """A module that keeps all its units while its input is still the dense model's: no
  statistics, no solves. A refit or reconstruction there would fit the module's own
  output Y = X W + b on its own input, whose least-squares answer is W itself (up to the
  ridge); the pruned model keeps the original weights and both streams stay one. The
  stream advances by the module's output from the plan's store when there is one (the
  plan ran this module on this very stream), else by running the module."""
  kind, blk = m.kind, m.block
  norm_p, p = blk[kind.norm_key], blk[kind.key]
  pos = positions(m.groups[0].xp.shape[2])
  w2, b2 = A.second_level(kind, p)
  post = passes.post_kw(kind, m.cfg, blk)

  def advance(x):
    h = passes.hidden_pass(kind, m.cfg, norm_p, p, x, None, pos, needs_lib.StreamNeeds(), mesh=ctx.mesh)
    return passes.second_apply(h.x2, w2, b2, x, None, mesh=ctx.mesh, **post)[0]

  # The plan's store has this module's output on the dense stream, which the pruned one still is.
  stored = ctx.stored_dense(kind, m.i, m.groups, ctx.needs(kind, False), m.cfg, norm_p, p)
  with meter.phase("advance"):
    if stored is None:
      nxt = jax.block_until_ready([advance(g.xp) for g in m.groups])
      meter.count("forward", len(m.groups))
    else:
      nxt = jax.block_until_ready([passes.add(g.xp, d.yd, **post) for g, d in zip(m.groups, stored[0])])
      meter.count(stored[1], len(m.groups))
    nxt = [Group(x, x) for x in nxt]
    xs_next = None if m.xs is None else jax.block_until_ready(advance(m.xs))
  if m.xs is not None:
    meter.count("forward")
  c = ctx.config
  errors = {**({"error_inherited": 0.0} if c.inherited_error else {}),
            **({"error_reconstructed": 0.0} if c.reconstruct else {}),
            **({"error_after": 0.0} if ctx.with_dense else {})}
  n_units = A.num_units(kind, p)
  row = ModuleRow(m.i, kind.name, int(n_units), tuple(range(n_units)), False, time.perf_counter() - t0,
                  errors=errors, from_store=stored is not None and stored[1] == "dense_read")
  return StepResult(ModuleOut(ctx.fill_biases(blk), m.layer, nxt, xs_next),
                    StepMetrics(row, meter.passes, meter.seconds))


def _timed_solve(meter: Meter, parts, w_aug, delta, grid, intercept, what):
  """`solve.solve_level`, timed as the "solves" phase and counted."""
  with meter.phase("solves"):
    out = solve.solve_level(parts, w_aug, delta, grid, intercept, what)
  meter.count("solve", 1 + len(grid or ()))
  return out


def _reconstruct_first(c, m: ModuleInput, p0, douts, grid, meter: Meter):
  """(the module with its first level refit to the dense first-level outputs, the solve's entry)."""
  parts = []
  for d in douts:
    w1a, xty = solve.first_level_targets(m.kind, p0, d.m_in)
    parts.append(solve.Part(d.m_in, xty, d.yy1))
  icpt = c.intercept or solve.has_bias(m.kind, p0, "first")
  sol, entry = _timed_solve(meter, parts, w1a, c.damping, grid, icpt, f"layer {m.i} {m.kind.name} W1")
  return (p0 if sol is None else A.with_first_level(m.kind, p0, *sol)), entry


def _reconstruct_second(c, m: ModuleInput, p1, st: measure.Stats, grid, meter: Meter):
  """(the module with its second level refit to the targets on all its units, the solve's entry)."""
  parts = [solve.Part(h.hidden, h.hidden.xy, yy) for h, yy in zip(st.hids, st.target_yy)]
  w2, b2 = A.second_level(m.kind, p1)
  w2a = jnp.concatenate([w2, b2[None]], axis=0).astype(jnp.float32)
  icpt = c.intercept or solve.has_bias(m.kind, p1, "second")
  sol, entry = _timed_solve(meter, parts, w2a, c.damping, grid, icpt, f"layer {m.i} {m.kind.name} W2")
  return (p1 if sol is None else A.with_second_level(m.kind, p1, *sol)), entry


def _score_select(ctx: StepContext, m: ModuleInput, p2, st: measure.Stats, nd, n_units: int, meter: Meter):
  """(kept units, the similarity rule's decisions, seconds spent) from the criterion's scores."""
  t1 = time.perf_counter()
  with meter.phase("scoring"):
    # MLP channels are kept by plain ranking, so the criterion need rank only the ones that go.
    n_remove = n_units - m.shape[0] if m.kind is A.MLP else None
    stats = ctx.score_stats(m.kind, m.i, m.layer, p2, st.hids, st.m2, st.js, st.hs if nd.score is not None else None,
                            n_remove)
    scores = placement.to_host(ctx.crit.score(m.kind, p2, stats)).astype(np.float64)
    keep, selection = select(ctx.config, m.kind, m.layer, scores, st.js, m.shape, m.tau)
  return keep, selection, time.perf_counter() - t1


def _cut(c, m: ModuleInput, p2, keep, m2, meter: Meter):
  """(the block with only the kept units, its sizes, the kept channels of X2); with
  `compensate`, FLAP's bias shift for the removed channels."""
  kind = m.kind
  t = time.perf_counter()
  blk2 = {**m.block, kind.key: p2}
  if kind is A.ATTN:
    blk2, layer2 = surgery.prune_heads(blk2, m.layer, keep, free_groups=c.free_groups)
  else:
    blk2, layer2 = surgery.prune_channels(blk2, m.layer, keep)
  idx = solve.x2_index(kind, p2, keep)
  if c.compensate:
    # FLAP's compensation, on the host in float64: on the device each count of removed
    # channels would compile its own gather and product.
    w2, b2 = A.second_level(kind, p2)
    gone = np.setdiff1d(np.arange(w2.shape[0]), idx)
    shift = placement.to_host(m2.mean).astype(np.float64)[gone] @ placement.to_host(w2).astype(np.float64)[gone]
    b2 = (placement.to_host(b2).astype(np.float64) + shift).astype(np.float32)
    blk2 = {**blk2, kind.key: A.with_second_level(kind, blk2[kind.key], A.second_level(kind, blk2[kind.key])[0], b2)}
  meter.add("surgery", time.perf_counter() - t)
  return blk2, layer2, idx


def _kept_sums(idx, st: measure.Stats, mesh):
  """(the least-squares sums of the kept channels `idx` per group, whether they are on the host).

  Each kept width would compile its own cut and solve on a device: where the solves run on the
  host the sums are cut there with numpy, and on the devices they are padded to the kept width's
  bucket (`placement.bucket_width`), which every width up to it shares.
  """
  if split.is_split(st.hids[0].hidden):  # kept split over the mesh's `model` axis to the solve
    width = placement.bucket_width(len(idx), st.hids[0].hidden.dim, mesh)
    return [solve.Part(s, s.xy, yy, len(idx)) for s, yy in
            zip((split.cut(h.hidden, idx, width) for h in st.hids), st.target_yy)], False
  on_host = placement.lapack_solves() and all(placement.on_host(h.hidden.xx) for h in st.hids)
  if on_host:
    subs = [moments.subset(h.hidden, idx) for h in st.hids]
    return [solve.Part(sub, sub.xy, yy) for sub, yy in zip(subs, st.target_yy)], on_host
  width = placement.bucket_width(len(idx), st.hids[0].hidden.dim, mesh)
  subs = [moments.subset_padded(h.hidden, idx, width) for h in st.hids]
  return [solve.Part(sub, sub.xy, yy, len(idx)) for sub, yy in zip(subs, st.target_yy)], on_host


def _without_sums(st: measure.Stats) -> measure.Stats:
  """`st` with only what advancing the streams reads: the X2 streams."""
  def bare(h):
    return None if h is None else h._replace(hidden=None, first=None, inputs=None)

  return st._replace(hids=[bare(h) for h in st.hids], hs=bare(st.hs), m2=None)


def _refit(ctx: StepContext, m: ModuleInput, blk2, subs, on_host: bool, grid, meter: Meter):
  """(the block with the kept units' second level refit to the targets, the solve's entry)."""
  c, kind, host = ctx.config, m.kind, placement.to_host
  icpt = ctx.second_intercept(kind, blk2[kind.key])
  w2, b2 = A.second_level(kind, blk2[kind.key])
  if on_host:
    w2a = np.concatenate([host(w2), host(b2)[None]], axis=0).astype(np.float32)
  else:  # padded like the sums, on the host (on the device each kept width would compile a concatenate)
    width = subs[0].m.dim
    w2a = np.zeros((width + 1, w2.shape[1]), np.float32)
    w2a[:w2.shape[0]], w2a[width] = host(w2), host(b2)
  sol, entry = _timed_solve(meter, subs, w2a, c.damping, grid, icpt, f"layer {m.i} {kind.name} refit")
  if sol is not None:
    blk2 = {**blk2, kind.key: A.with_second_level(kind, blk2[kind.key], *sol)}
  return blk2, entry


def _advance(ctx: StepContext, m: ModuleInput, douts, st: measure.Stats, w2f, b2f, meter: Meter):
  """Both streams advance: the dense one by the dense outputs already computed, the
  pruned one by the final second level on the X2 its statistics pass kept. Returns
  (next groups, next scoring stream, the pruned outputs' squared error against the dense)."""
  post = passes.post_kw(m.kind, m.cfg, m.block)
  with meter.phase("advance"):
    nxt, err_out = [], 0.0
    for g, d, h in zip(m.groups, douts, st.hids):
      xp_next, e = passes.second_apply(h.x2, w2f, b2f, g.xp, None if d is None else d.yd, mesh=ctx.mesh, **post)
      nxt.append(Group(None if d is None else passes.add(g.xd, d.yd, **post), xp_next))
      err_out += float(e)
    xs_next = None if st.hs is None else jax.block_until_ready(
        passes.second_apply(st.hs.x2, w2f, b2f, m.xs, None, mesh=ctx.mesh, **post)[0])
  meter.count("second_apply", len(m.groups) + (st.hs is not None))
  return nxt, xs_next, err_out


def _errors(ctx: StepContext, nd, douts, solves: dict, err_out: float) -> dict:
  """The module's errors relative to the dense outputs' energy (none without a dense stream)."""
  if not ctx.with_dense:
    return {}
  # Errors are over every position, also where the fits' statistics leave some out.
  yy = max(sum(float(passes.energy(d.yd) if nd.calib.skip else d.yy) for d in douts), 1e-30)
  out = {}
  if nd.inherited_error:
    out["error_inherited"] = sum(float(d.err) for d in douts) / yy
  if ctx.config.reconstruct:
    lvl = solves["second_level"]
    out["error_reconstructed"] = lvl["residual_before"] if lvl["kept_original"] else lvl["residual_after"]
  out["error_after"] = err_out / yy
  return out
