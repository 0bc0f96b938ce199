"""The greedy module-wise pruning pipeline (docs/method.md section 5).

For each block in order, attention then MLP: collect statistics on the dense
and the pruned activation streams -> (optional) two-step reconstruction ->
score -> select -> slice -> (optional) refit -> advance both streams. One
module's step is the function `prune_module(context, block, streams, shape) ->
ModuleStep(block', layer', streams', report row, ...)`, which changes none of its
arguments; the loop around it is plain Python that keeps the budget
(`allocate.Budget`) and the report, and calls the jitted passes of
`jaxprune.stats.passes`. The input model is never modified.

With adaptive allocation the plan runs the dense model over the calibration
windows first; its module outputs are kept on disk (`jaxprune.stats.dense_outputs`)
and the layer loop reads them instead of running the dense model again.

Each module costs only what the run needs (`jaxprune.stats.needs`): the dense
stream exists only when something solves against (or measures errors against)
the dense outputs; full Gram matrices only for solves and for criteria that
declare them; the second level's input X2 of the statistics pass is kept and
the pruned stream advances by the final second level on it, so no module's
activations are computed twice. A module whose units all stay is not scored.
With a `checkpoint` directory every finished block is durable and a killed run
resumes bit-identically (`jaxprune.checkpoint`, which verifies every file it reads).

Nothing non-finite goes in or out: each input block is checked for NaN and Inf on its
devices as it is read, and each module's pruned stream after it is pruned (a NaN or
Inf weight, or degenerate statistics, shows there), so a run fails with one line naming
the tensor instead of publishing NaNs. At sparsity 0 the model is returned as it is.

A model loaded with `lazy=True` (`jaxprune.io.lazy`) is streamed: each dense block
is read when the loop (or the plan) reaches it, and each finished block goes to a
file (the checkpoint's, or a temporary directory's) and leaves memory; the pruned
model's blocks are read from those files by whoever uses them (`save_hf` writes
them shard by shard). The numbers are those of the same run held in memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import logging
import math
import os
import tempfile
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import allocate, criteria, reconstruct, sharding, surgery
from jaxprune import checkpoint as run_checkpoint
from jaxprune.criteria.stats import ModuleStats
from jaxprune.errors import CheckpointError, UsageError
from jaxprune.model import Model
from jaxprune.models import adapter as A
from jaxprune.models import layers as L
from jaxprune.models.forward import embed
from jaxprune.io import lazy as lazy_io
from jaxprune.spec import ModelSpec, bias_flags, count_params, layer_param_count, spec_from_params
from jaxprune.stats import dense_outputs as dense_outputs_lib
from jaxprune.stats import moments, passes
from jaxprune.stats import needs as needs_lib

log = logging.getLogger(__name__)

from jaxprune.prune.config import ALLOCATIONS, DAMPING_GRID, HEAD_MODES, ROUNDINGS, SCORE_DATA, PruneConfig, PruneResult  # noqa: F401


# ---------------------------------------------------------------------------
# Streams


def _chunks(windows: np.ndarray, batch_size: int, mesh, what: str) -> np.ndarray:
  """[S, T] -> [S/B, B, T] after checking the sizes fit."""
  windows = np.asarray(windows, np.int32)
  if windows.ndim != 2:
    raise UsageError(f"{what} windows must be a [samples, seq_len] array, got shape {windows.shape}")
  S = windows.shape[0]
  B = check_batches(S, batch_size, mesh, what)
  return windows.reshape(S // B, B, windows.shape[1])


def check_batches(S: int, batch_size: int, mesh, what: str = "calibration") -> int:
  """The batch size `S` windows are split into, after checking that they split (callers check
  before they make the windows: self-generating them takes minutes)."""
  B = min(batch_size, S)
  n_data = mesh.shape[sharding.DATA]
  if B % n_data:
    raise UsageError(f"batch size {B} is not a multiple of the {n_data} data-parallel devices; "
                     f"pass a batch size divisible by {n_data}")
  if S % B:
    raise UsageError(f"{S} {what} windows do not split into batches of {B}; use a sample count divisible by {B}")
  return B


def _split_holdout(chunks: np.ndarray, holdout: bool) -> list[np.ndarray]:
  """[C, B, T] -> [fit chunks] or [fit chunks, last chunk held out for choosing the damping]."""
  if not holdout:
    return [chunks]
  if len(chunks) < 2:
    raise UsageError(f"automatic damping holds out one batch of calibration windows, so it needs at least two "
                     f"batches; got {len(chunks)}. Use more calibration windows or a smaller batch size")
  return [chunks[:-1], chunks[-1:]]


def _embed_stream(spec: ModelSpec, params, tokens: np.ndarray, mesh) -> jax.Array:
  C, B, T = tokens.shape
  x = embed(spec, params, jnp.asarray(tokens.reshape(C * B, T)))
  return jax.device_put(x.reshape(C, B, T, -1), sharding.stream_sharding(mesh))


def _positions(T: int):
  return jnp.arange(T, dtype=jnp.int32)[None]


# ---------------------------------------------------------------------------
# One module


def _first_level_targets(kind, p, m_in: moments.Moments):
  """[W1; b1] and X^T Y1 (D+1, U1) for Y1 = [hd 1] [W1; b1], from the cross moment."""
  w1, b1 = A.first_level(kind, p)
  w1a = jnp.concatenate([w1, b1[None]], axis=0).astype(jnp.float32)
  cross = jnp.concatenate([m_in.xy, m_in.xx[:, -1:]], axis=1)  # [hp 1]^T [hd 1]
  return w1a, jnp.matmul(cross, w1a, precision="highest")


def _has_bias(kind, p, level: str) -> bool:
  keys = kind.first_keys(p) if level == "first" else (kind.second_key,)
  return any("bias" in p[k] for k in keys)


@dataclasses.dataclass(frozen=True)
class _Part:
  """Least-squares sums of one group of windows: Moments of X, X^T Y and ||Y||^2."""

  m: moments.Moments
  xty: jax.Array
  yy: jax.Array

  def __add__(self, other: "_Part") -> "_Part":
    return _Part(self.m + other.m, self.xty + other.xty, self.yy + other.yy)


def _total(parts):
  out = parts[0]
  for p in parts[1:]:
    out = out + p
  return out


def _solve_level(parts: list[_Part], w_orig_aug, delta, grid, intercept, what):
  """Solves one level on the sums of all groups of windows.

  With a damping `grid` and a held-out group (the last of `parts`), delta is
  the grid value whose solution from the other groups best fits the held-out
  windows; the final solution then uses every group.

  Returns (W, bias or None) -- or None when the damped solution fits the
  calibration targets no better than the original weights (as when the two
  streams still agree), in which case the original weights stay -- and a
  report entry with the residuals relative to ||Y||^2.
  """
  rep = {}
  if grid and len(parts) > 1:
    fit, held = _total(parts[:-1]), parts[-1]
    errs = []
    for d in grid:
      w, _ = reconstruct.ridge_solve(fit.m, fit.xty, d, intercept, what)
      errs.append(float(reconstruct.residual(held.m, held.xty, held.yy, w)))
    delta = float(grid[int(np.argmin(errs))])
    rep["heldout_residuals"] = {f"{d:g}": e / max(float(held.yy), 1e-30) for d, e in zip(grid, errs)}
  t = _total(parts)
  w, info = reconstruct.ridge_solve(t.m, t.xty, delta, intercept, what, yy=t.yy)
  d = t.m.dim
  before = float(reconstruct.residual(t.m, t.xty, t.yy, w_orig_aug if intercept else w_orig_aug[:d]))
  after = info.residual
  scale = max(float(t.yy), 1e-30)
  # residual_after is the solve's own fit, stored raw so that a solve that fits
  # worse than the original weights shows; those weights are then kept.
  rep.update(residual_before=before / scale, residual_after=after / scale, damping=info.delta,
             retries=info.retries, kept_original=after >= before, intercept=bool(intercept))
  if after >= before:
    return None, rep
  # The solve comes back replicated on the statistics' mesh (or as numpy from host
  # statistics); the fitted weights go where the weights they replace live, so a module's
  # kernels see one placement (no retrace) and a model held on one device does not gain a
  # copy per device. They are cut on the host: slicing on the device compiles per width.
  if isinstance(w, np.ndarray) or len(w.sharding.device_set) == 1 or (
      isinstance(w_orig_aug, jax.Array) and len(w_orig_aug.sharding.device_set) == 1):
    w = np.asarray(w)  # numpy: `A.with_*_level` shapes it on the host and puts it on the device uncommitted
    return (w[:d], w[d] if intercept else None), rep
  return (w[:d], w[d] if intercept else None), rep


@dataclasses.dataclass(frozen=True)
class _Group:
  """One group of calibration windows: its dense (None when the run needs none) and pruned streams."""

  xd: jax.Array | None
  xp: jax.Array


def _x2_index(kind, p, units: np.ndarray) -> np.ndarray:
  """Channels of X2 that belong to `units` (heads span head_dim channels each)."""
  w = A.unit_width(kind, p)
  return (units[:, None] * w + np.arange(w)[None]).reshape(-1)


def _full_width_second(kind, p_pruned, idx: np.ndarray, width: int):
  """The pruned module's second level as a full-width [U2, D] kernel, zero rows for removed
  channels, and its bias: `second_apply` then advances every module of one shape with one compile."""
  w, b = A.second_level(kind, p_pruned)
  if surgery._on_host(w):  # numpy: no scatter compiled per distinct kept count
    full = np.zeros((width, w.shape[1]), w.dtype)
    full[idx] = np.asarray(w)
    return jnp.asarray(full), b
  return jnp.zeros((width, w.shape[1]), w.dtype).at[jnp.asarray(idx)].set(w), b


class _Compiles:
  """Seconds JAX spends tracing, lowering and compiling, and how many backend compiles (process-wide)."""

  EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
            "/jax/core/compile/backend_compile_duration")
  seconds = 0.0
  count = 0
  _registered = False

  @classmethod
  def start(cls) -> tuple[float, int]:
    if not cls._registered:
      jax.monitoring.register_event_duration_secs_listener(cls._on_event)
      cls._registered = True
    return cls.seconds, cls.count

  @classmethod
  def _on_event(cls, event, duration, **_):
    if event in cls.EVENTS:
      cls.seconds += duration
      cls.count += event == cls.EVENTS[-1]


def _sum(trees):
  """The sum of pytrees of statistics (Moments, Diag, dicts of them); None if there are none."""
  trees = [t for t in trees if t is not None]
  # `+`: numpy sums (host statistics) stay numpy.
  return functools.reduce(lambda a, b: jax.tree.map(lambda x, y: x + y, a, b), trees) if trees else None


def _plan_output(kind, cfg, norm_p, p, x, mesh):
  """Module output X2 W2 + b2 of the stream `x` by the kernels the plan stores it with
  (`_dense_scores`), so that an output computed again equals the stored one bit for bit."""
  h = passes.hidden_pass(kind, cfg, norm_p, p, x, None, _positions(x.shape[2]), needs_lib.StreamNeeds(), mesh=mesh)
  w2, b2 = A.second_level(kind, p)
  return passes.second_out(h.x2, w2, b2, mesh=mesh)


@dataclasses.dataclass(frozen=True)
class StepContext:
  """What one module's step reads and never changes: the run's configuration, its
  criterion, the mesh, the biases every block ends with, the criterion's prepared
  extras and the plan's stored dense outputs."""

  config: PruneConfig
  crit: Any
  mesh: Any
  bias_after: dict
  with_dense: bool = False
  extra: dict | None = None  # what the criterion's prepare() computed
  dense_outputs: dense_outputs_lib.DenseOutputs | None = None  # the plan's dense module outputs

  @classmethod
  def of(cls, model: Model, config: PruneConfig, mesh) -> "StepContext":
    # A fitted intercept adds biases. Hugging Face's LLaMA config has one flag for
    # the q, k, v and o biases and one for gate, up and down, so an added bias
    # comes with zero biases for its siblings (counted in the budget).
    adds = config.intercept and (config.reconstruct or config.refit) or config.compensate
    s = model.spec
    ctx = cls(config, criteria.get(config.method), mesh,
              dict(qkv_bias=s.qkv_bias or adds, o_bias=s.o_bias or adds, mlp_bias=s.mlp_bias or adds))
    # The dense stream is carried only when some module solves against (or measures
    # errors against) the dense model's outputs.
    return dataclasses.replace(ctx, with_dense=any(ctx.needs(kind, True).dense for kind in (A.ATTN, A.MLP)))

  def needs(self, kind, scores: bool) -> needs_lib.ModuleNeeds:
    js = kind is A.ATTN and self.config.heads == "similarity" and scores
    return needs_lib.module_needs(self.config, self.crit.needs, kind, scores, js)

  def plan_standardizes(self) -> bool:
    """Whether adaptive allocation standardizes the criterion's scores over all units."""
    return not (self.crit.prescaled or self.crit.stream_costs)

  def stored_dense(self, kind, i: int, groups, nd, cfg, norm_p, p) -> tuple[list, str] | None:
    """The module's dense outputs as the plan computed them, split like the groups: read
    from its store, or computed again by the plan's own kernels where the store has none
    (they did not fit on the disk, or a stored one is damaged), so that both give the
    same bits. Returns (DenseOut per group, "dense_read" or "dense_recompute"), or None: no
    plan store, or the module also needs what only a dense pass measures."""
    if self.dense_outputs is None or nd.first_moments or nd.inherited_error:
      return None
    y = self.dense_outputs.get(i, kind.name)
    out, start = [], 0
    for g in groups:
      n = g.xp.shape[0]
      if y is None:
        yd = _plan_output(kind, cfg, norm_p, p, g.xd, self.mesh)
      else:
        yd = jax.device_put(y[start:start + n], sharding.stream_sharding(self.mesh))
      out.append(passes.DenseOut(yd, passes.energy(yd[:, :, nd.calib.skip:]), None, None, None))
      start += n
    return jax.block_until_ready(out), "dense_read" if y is not None else "dense_recompute"

  def second_intercept(self, kind, p) -> bool:
    """Whether the second level's solves fit a bias: asked for, or the module has
    one (its own, or FLAP's compensation). The refit and `goa-obs` both use this."""
    c = self.config
    return c.intercept or c.compensate or _has_bias(kind, p, "second")

  def stats_kw(self, kind, i, layer, p) -> dict:
    """ModuleStats fields other than the moments, the same for the plan and the loop."""
    c = self.config
    kw = dict(kv_index=layer.kv_index if kind is A.ATTN else None, damping=c.damping,
              intercept=self.second_intercept(kind, p), layer=i, seed=c.seed)
    if self.extra:
      for name in ("grads", "sq_grads"):
        if self.extra.get(name) is not None:
          kw[name] = self.extra[name][i][kind.key]
    return kw

  def score_stats(self, kind, i, layer, p2, hids, m2, js, hs, n_remove=None) -> ModuleStats:
    """What the criterion sees: the calibration windows' statistics (pruned stream), the
    random-token stream's `hs` (score_data="random"), or none (identity)."""
    c = self.config
    kw = dict(self.stats_kw(kind, i, layer, p2), js=js, n_remove=n_remove)
    if c.score_data == "identity":
      return ModuleStats(identity=True, **kw)
    if hs is not None:
      return ModuleStats(inputs=hs.inputs, hidden=hs.hidden, first=hs.first, **kw)
    return ModuleStats(inputs=_sum([h.inputs for h in hids]), hidden=m2, first=_sum([h.first for h in hids]), **kw)

  def select(self, kind, layer, scores, js, shape, tau, rep) -> np.ndarray:
    c = self.config
    if kind is A.ATTN:
      n_keep, n_kv = shape
      if c.heads == "similarity":
        D = sharding.to_host(js).astype(np.float64)
        if tau is not None:
          drop = criteria.algorithm2(D, tau)
          n_keep, n_kv = layer.num_heads - len(drop), None  # tau decides the count
        else:
          drop = criteria.budgeted(D, scores, layer.num_heads - n_keep)
        priority = _rank01(scores) + 2.0 * ~np.isin(np.arange(layer.num_heads), drop)
        rep.update(tau=tau, js=D.round(6).tolist(), similar_heads=[int(h) for h in drop])
        return allocate.choose_heads(layer, priority, n_keep, c.free_groups, n_kv=n_kv)
      return allocate.choose_heads(layer, scores, n_keep, c.free_groups, n_kv=n_kv)
    return allocate.choose_channels(scores, shape[0])

  def fill_biases(self, blk):
    """Adds zero biases so every block has the biases the exported config will declare."""
    attn = dict(blk["attn"])
    # Zeros made by numpy and put on the device: jnp.zeros compiles once per kept width.
    zeros = lambda shape, dtype: jax.device_put(np.zeros(shape, dtype))
    for k in ("q", "k", "v", "o"):
      if self.bias_after["o_bias" if k == "o" else "qkv_bias"] and "bias" not in attn[k]:
        shape = attn[k]["kernel"].shape[1:] if k != "o" else attn[k]["kernel"].shape[-1:]
        attn[k] = {**attn[k], "bias": zeros(shape, attn[k]["kernel"].dtype)}
    mlp = dict(blk["mlp"])
    if self.bias_after["mlp_bias"]:
      for k in mlp:
        if "bias" not in mlp[k]:
          mlp[k] = {**mlp[k], "bias": zeros(mlp[k]["kernel"].shape[-1:], mlp[k]["kernel"].dtype)}
    return {**blk, "attn": attn, "mlp": mlp}




class ModuleStep(NamedTuple):
  """What `prune_module` returns.

  Attributes:
    block: the block with the module pruned (and refit), biases filled in.
    layer: the block's sizes after it.
    groups: the calibration groups' streams entering the next module.
    xs: the random-token scoring stream entering the next module (or None).
    report: the module's report row.
    passes: kernel calls made, by kind.
    seconds: wall seconds by phase.
  """

  block: Any
  layer: Any
  groups: list
  xs: Any
  report: dict
  passes: dict
  seconds: dict


class _Meter:
  """Wall seconds by phase and call counts of one step."""

  def __init__(self):
    self.seconds: dict[str, float] = {}
    self.passes: dict[str, int] = {}

  @contextlib.contextmanager
  def phase(self, name: str):
    """Adds the wall time of the block to phase `name` (what it computes is waited for inside)."""
    t = time.perf_counter()
    try:
      yield
    finally:
      self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

  def count(self, name: str, n: int = 1):
    self.passes[name] = self.passes.get(name, 0) + n


def _timed_solve(meter: _Meter, parts, w_aug, delta, grid, intercept, what):
  """`_solve_level`, timed as the "solves" phase and counted."""
  with meter.phase("solves"):
    out = _solve_level(parts, w_aug, delta, grid, intercept, what)
  meter.count("solve", 1 + len(grid or ()))
  return out


def _unchanged_module(ctx: StepContext, kind, i, blk, layer, cfg, groups, xs, rep, meter, t0) -> ModuleStep:
  """A module that keeps all its units while its input is still the dense model's: no
  statistics, no solves. A refit or reconstruction there would fit the module's own
  output Y = X W + b on its own input, whose least-squares answer is W itself (up to the
  ridge); the pruned model keeps the original weights and both streams stay one. The
  stream advances by the module's output from the plan's store when there is one (the
  plan ran this module on this very stream), else by running the module."""
  norm_p, p = blk[kind.norm_key], blk[kind.key]
  pos = _positions(groups[0].xp.shape[2])
  w2, b2 = A.second_level(kind, p)

  def advance(x):
    h = passes.hidden_pass(kind, cfg, norm_p, p, x, None, pos, needs_lib.StreamNeeds(), mesh=ctx.mesh)
    return passes.second_apply(h.x2, w2, b2, x, None, mesh=ctx.mesh)[0]

  # The plan's store has this module's output on the dense stream, which the pruned one still is.
  stored = ctx.stored_dense(kind, i, groups, ctx.needs(kind, False), cfg, norm_p, p)
  with meter.phase("advance"):
    if stored is None:
      nxt = jax.block_until_ready([advance(g.xp) for g in groups])
      meter.count("forward", len(groups))
    else:
      nxt = jax.block_until_ready([passes.add(g.xp, d.yd) for g, d in zip(groups, stored[0])])
      meter.count(stored[1], len(groups))
    nxt = [_Group(x, x) for x in nxt]
    xs_next = None if xs is None else jax.block_until_ready(advance(xs))
  if xs is not None:
    meter.count("forward")
  n_units = A.num_units(kind, p)
  rep.update(units_before=int(n_units), units_after=int(n_units), kept=list(range(n_units)), scored=False,
             unchanged=True, from_store=stored is not None and stored[1] == "dense_read",
             seconds=time.perf_counter() - t0)
  if ctx.config.inherited_error:
    rep["error_inherited"] = 0.0
  if ctx.config.reconstruct:
    rep["error_reconstructed"] = 0.0
  if ctx.with_dense:
    rep["error_after"] = 0.0
  return ModuleStep(ctx.fill_biases(blk), layer, nxt, xs_next, rep, meter.passes, meter.seconds)


def prune_module(ctx: StepContext, kind: A.ModuleKind, i: int, blk, layer, cfg: L.BlockConfig,
                 groups: list["_Group"], xs, shape: tuple[int, int | None], tau) -> ModuleStep:
  """One module's step: statistics -> (reconstruction) -> scores -> selection -> surgery ->
  (refit) -> both streams advanced. A function of its arguments: it changes none of them.

  Args:
    ctx: the run's fixed context.
    kind, i: the module (attention or MLP) of block i.
    blk, layer: the block's parameters and sizes entering the step.
    cfg: the block's config.
    groups, xs: the activation streams entering the module.
    shape: (units to keep, KV heads to keep or None), from the budget (`allocate.Budget`).
    tau: the similarity threshold of heads="similarity", or None.
  """
  c = ctx.config
  meter = _Meter()
  t0 = time.perf_counter()
  norm_p, p0 = blk[kind.norm_key], blk[kind.key]
  pos = _positions(groups[0].xp.shape[2])
  rep: dict[str, Any] = {"layer": i, "module": kind.name}
  grid = DAMPING_GRID if c.auto_damping else None

  # How many units stay is known before the statistics (the budget and plan
  # decide it); a module that keeps them all is not scored.
  n_units = A.num_units(kind, p0)
  scored = shape[0] < n_units or (kind is A.ATTN and c.heads == "similarity" and tau is not None)
  nd = ctx.needs(kind, scored)
  if not scored and ctx.with_dense and all(g.xd is g.xp for g in groups):
    return _unchanged_module(ctx, kind, i, blk, layer, cfg, groups, xs, rep, meter, t0)

  douts = [None] * len(groups)
  if ctx.with_dense:
    with meter.phase("statistics"):
      stored = ctx.stored_dense(kind, i, groups, nd, cfg, norm_p, p0)
      if stored is None:
        douts = jax.block_until_ready([
            passes.dense_pass(kind, cfg, norm_p, p0, g.xd, g.xp, pos, nd.first_moments, nd.inherited_error,
                              mesh=ctx.mesh, skip=nd.calib.skip)
            for g in groups])
        meter.count("dense_pass", len(groups))
      else:
        douts = stored[0]
        meter.count(stored[1], len(groups))
  p1 = p0
  if c.reconstruct:
    parts = []
    for d in douts:
      w1a, xty = _first_level_targets(kind, p0, d.m_in)
      parts.append(_Part(d.m_in, xty, d.yy1))
    icpt = c.intercept or _has_bias(kind, p0, "first")
    sol, rep["first_level"] = _timed_solve(meter, parts, w1a, c.damping, grid, icpt, f"layer {i} {kind.name} W1")
    if sol is not None:
      p1 = A.with_first_level(kind, p0, *sol)

  with meter.phase("statistics"):
    # What the second level's solves fit: the dense outputs, and with `absorb` a share of the
    # error the residual stream carries in (x_p + y ~ x_d + y_d wants y ~ y_d + (x_d - x_p)).
    # The dense stream still advances by the dense outputs.
    targets = [None if d is None else d.yd if not c.absorb else passes.absorbing_target(d.yd, g.xd, g.xp, c.absorb)
               for g, d in zip(groups, douts)]
    target_yy = [None if d is None else d.yy if not c.absorb else passes.energy(t[:, :, nd.calib.skip:])
                 for t, d in zip(targets, douts)]
    hids = [passes.hidden_pass(kind, cfg, norm_p, p1, g.xp, t, pos, nd.calib, mesh=ctx.mesh)
            for g, t in zip(groups, targets)]
    del targets
    hs = None
    if nd.score is not None:  # random-token windows: the criterion's statistics, and the stream advances
      hs = passes.hidden_pass(kind, cfg, norm_p, p1, xs, None, pos, nd.score, mesh=ctx.mesh)
    elif xs is not None:
      hs = passes.hidden_pass(kind, cfg, norm_p, p1, xs, None, pos, needs_lib.StreamNeeds(), mesh=ctx.mesh)
    hids, hs = jax.block_until_ready((hids, hs))
    hids = [passes.gather_hidden(h, ctx.mesh) for h in hids]
    hs = None if hs is None else passes.gather_hidden(hs, ctx.mesh)
  meter.count("hidden_pass", len(groups) + (hs is not None))
  if c.shrink and nd.calib.hidden == "gram":
    w2, b2 = A.second_level(kind, p1)
    w2a = jnp.concatenate([w2, b2[None]], axis=0)
    hids = [h._replace(hidden=moments.shrink(h.hidden, c.shrink, w2a)) for h in hids]
  m2 = _sum([h.hidden for h in hids])
  js = None
  if nd.calib.js:
    js = sum(h.js for h in hids) / max(sum(float(h.rows) for h in hids), 1.0)
  p2 = p1
  if c.reconstruct:
    m2_parts = [_Part(h.hidden, h.hidden.xy, yy) for h, yy in zip(hids, target_yy)]
    w2, b2 = A.second_level(kind, p1)
    w2a = jnp.concatenate([w2, b2[None]], axis=0).astype(jnp.float32)
    icpt = c.intercept or _has_bias(kind, p1, "second")
    sol, rep["second_level"] = _timed_solve(meter, m2_parts, w2a, c.damping, grid, icpt,
                                            f"layer {i} {kind.name} W2")
    if sol is not None:
      p2 = A.with_second_level(kind, p1, *sol)

  if scored:
    t1 = time.perf_counter()
    with meter.phase("scoring"):
      # MLP channels are kept by plain ranking, so the criterion need rank only the ones that go.
      n_remove = n_units - shape[0] if kind is A.MLP else None
      stats = ctx.score_stats(kind, i, layer, p2, hids, m2, js, hs if nd.score is not None else None, n_remove)
      scores = sharding.to_host(ctx.crit.score(kind, p2, stats)).astype(np.float64)
      keep = ctx.select(kind, layer, scores, js, shape, tau, rep)
    rep["score_seconds"] = time.perf_counter() - t1
  else:
    keep = np.arange(n_units, dtype=np.int32)

  t_surgery = time.perf_counter()
  blk2 = {**blk, kind.key: p2}
  if kind is A.ATTN:
    blk2, layer2 = surgery.prune_heads(blk2, layer, keep, free_groups=c.free_groups)
  else:
    blk2, layer2 = surgery.prune_channels(blk2, layer, keep)
  idx = _x2_index(kind, p2, keep)
  if c.compensate:
    # FLAP's compensation, on the host in float64: on the device each count of removed
    # channels would compile its own gather and product.
    w2, b2 = A.second_level(kind, p2)
    gone = np.setdiff1d(np.arange(w2.shape[0]), idx)
    shift = sharding.to_host(m2.mean).astype(np.float64)[gone] @ sharding.to_host(w2).astype(np.float64)[gone]
    b2 = (sharding.to_host(b2).astype(np.float64) + shift).astype(np.float32)
    blk2 = {**blk2, kind.key: A.with_second_level(kind, blk2[kind.key], A.second_level(kind, blk2[kind.key])[0], b2)}
  meter.seconds["surgery"] = meter.seconds.get("surgery", 0.0) + time.perf_counter() - t_surgery
  if c.refit:
    # The kept channels' sums are cut on the host where the solves run there (one
    # shape per kept width: no gather compiled for each).
    on_host = reconstruct.lapack_solves() and all(surgery._on_host(h.hidden.xx) for h in hids)
    host = sharding.to_host
    cut = (lambda m: moments.subset(moments.Moments(host(m.xx), host(m.xy)), idx)) if on_host else (
        lambda m: moments.subset(m, idx))
    subs = [_Part(sub, sub.xy, yy) for sub, yy in ((cut(h.hidden), yy) for h, yy in zip(hids, target_yy))]
    icpt = ctx.second_intercept(kind, blk2[kind.key])
    w2, b2 = A.second_level(kind, blk2[kind.key])
    w2a = np.concatenate([host(w2), host(b2)[None]], axis=0).astype(np.float32) if on_host else (
        jnp.concatenate([w2, b2[None]], axis=0).astype(jnp.float32))
    sol, rep["refit"] = _timed_solve(meter, subs, w2a, c.damping, grid, icpt, f"layer {i} {kind.name} refit")
    if sol is not None:
      blk2 = {**blk2, kind.key: A.with_second_level(kind, blk2[kind.key], *sol)}
  with meter.phase("surgery"):
    blk2 = ctx.fill_biases(blk2)
    w2f, b2f = _full_width_second(kind, blk2[kind.key], idx, hids[0].x2.shape[-1])

  # Both streams advance: the dense one by the dense outputs already computed, the
  # pruned one by the final second level on the X2 its statistics pass kept.
  with meter.phase("advance"):
    nxt, err_out = [], 0.0
    for g, d, h in zip(groups, douts, hids):
      xp_next, e = passes.second_apply(h.x2, w2f, b2f, g.xp, None if d is None else d.yd, mesh=ctx.mesh)
      nxt.append(_Group(None if d is None else passes.add(g.xd, d.yd), xp_next))
      err_out += float(e)
    xs_next = None if hs is None else jax.block_until_ready(
        passes.second_apply(hs.x2, w2f, b2f, xs, None, mesh=ctx.mesh)[0])
  meter.count("second_apply", len(groups) + (hs is not None))

  if ctx.with_dense:
    # Errors are over every position, also where the fits' statistics leave some out.
    yy = max(sum(float(passes.energy(d.yd) if nd.calib.skip else d.yy) for d in douts), 1e-30)
    if nd.inherited_error:
      rep["error_inherited"] = sum(float(d.err) for d in douts) / yy
    if c.reconstruct:
      lvl = rep["second_level"]
      rep["error_reconstructed"] = lvl["residual_before"] if lvl["kept_original"] else lvl["residual_after"]
    rep["error_after"] = err_out / yy
  rep["units_before"] = int(n_units)
  rep["units_after"] = int(len(keep))
  rep["kept"] = [int(k) for k in keep]
  rep["scored"] = bool(scored)
  rep["seconds"] = time.perf_counter() - t0
  return ModuleStep(blk2, layer2, nxt, xs_next, rep, meter.passes, meter.seconds)



_BAD_WEIGHTS = ("pruning needs finite weights: check the model file (a broken download or conversion) or use "
                "another checkpoint")


@jax.jit
def _all_finite(tree):
  """Whether each leaf holds only finite values (one compile per tree structure and shapes)."""
  return jax.tree.map(lambda x: jnp.isfinite(x).all(), tree)


def check_finite(tree, what: str, fix: str, error=UsageError) -> None:
  """Raises `error` naming the first leaf of `tree` that holds NaN or Inf (checked where the
  leaves live: one boolean per leaf comes back, and a leaf only when it is bad)."""
  flags = jax.tree_util.tree_flatten_with_path(_all_finite(tree))[0]
  for (path, ok), leaf in zip(flags, jax.tree_util.tree_leaves(tree)):
    if not bool(sharding.to_host(ok)):
      kind = "NaN" if np.isnan(np.asarray(sharding.to_host(leaf), np.float32)).any() else "Inf"
      name = jax.tree_util.keystr(path, simple=True, separator="/")
      raise error(f"{what} holds {kind} values in {name}; {fix}")


def _check_module(step: "ModuleStep", kind, i: int) -> None:
  """Refuses a module whose pruned stream (and so its weights or statistics) is not finite,
  naming the pruned tensor that is not, if one is: nothing of it is saved or published."""
  fix = ("its statistics are degenerate (e.g. too few or repeated calibration windows): use more or other "
         "calibration windows, or a larger --damping (nothing of this block was saved)")
  streams = {f"group_{g}": grp.xp for g, grp in enumerate(step.groups)}
  try:
    check_finite({**streams, **({"scoring": step.xs} if step.xs is not None else {})},
                 f"the pruned stream after block {i}'s {kind.name}", fix)
  except UsageError:
    check_finite(step.block, f"block {i}'s pruned {kind.name}", fix)
    raise


class _Blocks:
  """The run's blocks: the input model's (which may still be on disk, `jaxprune.io.lazy`)
  until a module changes them, then the pruned ones, in memory or, once a streamed run
  has finished and written them, in their file (read again only to assemble the output)."""

  def __init__(self, dense):
    self.dense = dense
    self.new: dict[int, Any] = {}
    self.checked: set[int] = set()  # dense blocks found finite

  def __len__(self) -> int:
    return len(self.dense)

  def __getitem__(self, i: int):
    b = self.new.get(i)
    if b is None:
      return self.dense[i]
    if isinstance(b, run_checkpoint.BlockFile):
      return b.load()
    return run_checkpoint.load_block(b) if isinstance(b, str) else b

  def __setitem__(self, i: int, block) -> None:
    self.new[i] = block

  def placed(self, i: int, mesh):
    """Block i on the mesh, split over its `model` axis: a dense block still in its checkpoint
    is read slice by slice, each process only what its devices hold (`LazyBlocks.placed`)."""
    if i not in self.new and isinstance(self.dense, lazy_io.LazyBlocks) and mesh.shape.get(sharding.MODEL, 1) > 1:
      blk = self.dense.placed(i, lambda blk: sharding.param_shardings(blk, mesh, quiet=True))
    else:
      blk = sharding.place(self[i], mesh)
    if i not in self.new and i not in self.checked:  # as each input block is read, once
      check_finite(blk, f"block {i} of the model given to prune", _BAD_WEIGHTS, CheckpointError)
      self.checked.add(i)
    return blk

  def __iter__(self):
    return (self[i] for i in range(len(self)))


class _Pruner:
  """State of one pruning run: the evolving blocks, the budget, the report rows."""

  def __init__(self, model: Model, config: PruneConfig, mesh, progress, blocks_dir: str | None = None):
    self.config = config
    self.ctx = StepContext.of(model, config, mesh)
    self.progress = progress or (lambda event: None)
    self.dense = model
    self.spec = model.spec
    self.params = dict(model.params)
    self.blocks = _Blocks(model.params["layers"])
    # A model read block by block keeps only the blocks in use: finished ones go to files.
    self.streaming = lazy_io.is_lazy(model.params)
    # A streamed run without a checkpoint writes its finished blocks to blocks_dir (every
    # process its own shards), or else gathered to a temporary directory.
    if blocks_dir is not None and glob.glob(os.path.join(blocks_dir, "block_*")):
      raise UsageError(f"{blocks_dir} already holds pruned blocks (block_*) of another run; remove them or "
                       "pass another blocks directory")
    self.blocks_dir = blocks_dir
    self.spill_dir: tempfile.TemporaryDirectory | None = None
    self.values_written = 0
    self.layer_specs = list(model.spec.layers)
    self.modules: list[dict] = []
    self.start, self.stop = config.block_range(model.spec)
    self.budget = allocate.Budget(config.sparsity, config.attn_sparsity, config.free_groups,
                                  carry_rounding=config.rounding == "carry", round_to=config.round_to)
    self.passes: dict[str, int] = {}
    self.phase_seconds: dict[str, float] = {}
    self.plan_phase_seconds: dict[str, float] = {}

  @property
  def with_dense(self) -> bool:
    return self.ctx.with_dense

  @property
  def crit(self):
    return self.ctx.crit

  @property
  def mesh(self):
    return self.ctx.mesh

  @contextlib.contextmanager
  def phase(self, name: str, plan: bool = False):
    """Adds the wall time of the block to phase `name` of the layer loop (or, with `plan`,
    of the plan); what it computes is waited for inside."""
    into = self.plan_phase_seconds if plan else self.phase_seconds
    t = time.perf_counter()
    try:
      yield
    finally:
      into[name] = into.get(name, 0.0) + time.perf_counter() - t

  # -- budget ---------------------------------------------------------------
  def costs(self, i: int) -> allocate.Costs:
    return allocate.Costs.of(self.spec, self.layer_specs[i], **self.ctx.bias_after)

  def dense_block_params(self, i: int) -> int:
    return layer_param_count(self.dense.spec, self.dense.spec.layers[i])

  def keep_shape(self, kind, i, layer, plan) -> tuple[int, int | None]:
    """(units to keep, KV heads to keep or None) of block i's module (`allocate.Budget`)."""
    dense_layer = self.dense.spec.layers[i]
    if kind is A.ATTN:
      return self.budget.heads(layer, dense_layer, self.costs(i), plan)
    attn = self.blocks[i]["attn"]
    kept = (attn["q"]["kernel"].shape[1], attn["k"]["kernel"].shape[1])
    return self.budget.channels(layer, dense_layer, self.costs(i), self.dense_block_params(i), kept, plan), None

  # -- one module -----------------------------------------------------------
  def module(self, kind: A.ModuleKind, i: int, groups: list["_Group"], xs, plan, tau):
    """Prunes one module (`prune_module`) and records its result; returns the next streams."""
    layer = self.layer_specs[i]
    cfg = L.block_config(self.spec.with_layers(self.layer_specs), i)
    shape = self.keep_shape(kind, i, layer, plan)
    # Blocks live on the mesh, sharded over its `model` axis (dense ones as they are read, pruned
    # ones as they come out of surgery), so no device holds a whole block.
    blk = self.blocks.placed(i, self.mesh)
    step = prune_module(self.ctx, kind, i, blk, layer, cfg, groups, xs, shape, tau)
    _check_module(step, kind, i)
    self.blocks[i], self.layer_specs[i] = sharding.place(step.block, self.mesh), step.layer
    for name, n in step.passes.items():
      self.passes[name] = self.passes.get(name, 0) + n
    for name, t in step.seconds.items():
      self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + t
    self.modules.append(step.report)
    self.progress({"event": "module", **step.report})
    return step.groups, step.xs


def _rank01(x) -> np.ndarray:
  """Scores mapped to [0, 1) by rank (a tie-breaker that cannot outweigh a +2 bonus)."""
  r = np.argsort(np.argsort(x, kind="stable"), kind="stable")
  return r / max(len(x), 1)


# ---------------------------------------------------------------------------
# Plans that need the whole model first (adaptive allocation, tau search)


def _dense_scores(pr: _Pruner, tokens, want_js: bool, want_scores: bool = True, store=None):
  """Per-layer head and channel scores (and JS matrices) of the dense model on `tokens` [C, B, T].

  The criterion sees what it sees in the layer loop (`_Pruner.stats_kw`: the
  block index, the seed, gradients, the intercept), only with the dense model's
  statistics of `tokens`. One pass per module: on the dense model the module's
  output is X2 W2 + b2, so the cross moment with it comes from X2's Gram.
  With a `store` (DenseOutputs) every pruned module's output is kept there for the
  layer loop, which then does not run the dense model again.
  """
  c = pr.config
  x = _embed_stream(pr.spec, pr.params, tokens, pr.mesh)
  pos = _positions(x.shape[2])
  heads, chans, Ds = {}, {}, {}
  for i in range(pr.stop):
    blk, layer = pr.blocks.placed(i, pr.mesh), pr.layer_specs[i]
    cfg = L.block_config(pr.spec, i)
    if i >= pr.start:
      for kind in (A.ATTN, A.MLP):
        p = blk[kind.key]
        js_here = want_js and kind is A.ATTN
        st = needs_lib.StreamNeeds()
        if want_scores and c.score_data != "identity":
          st = needs_lib.criterion_stats(pr.crit.needs, kind, c.skip_positions)
        with pr.phase("statistics", plan=True):
          h = jax.block_until_ready(passes.hidden_pass(kind, cfg, blk[kind.norm_key], p, x, None, pos,
                                                       dataclasses.replace(st, cross=False, js=js_here), mesh=pr.mesh))
          h = passes.gather_hidden(h, pr.mesh)
        w2, b2 = A.second_level(kind, p)
        if js_here:
          Ds[i] = sharding.to_host(h.js / h.rows).astype(np.float64)
        if want_scores:
          hidden = h.hidden
          if st.cross:
            w2a = jnp.concatenate([w2, b2[None]], axis=0)
            hidden = moments.shrink(moments.Moments(hidden.xx, passes.dense_cross(hidden.xx, w2a)), c.shrink, w2a)
          kw = dict(pr.ctx.stats_kw(kind, i, layer, p), js=None if h.js is None else h.js / h.rows)
          if kind is A.MLP and not pr.ctx.plan_standardizes():
            # Costs on one scale (not standardized over all units): the plan can remove at most
            # the channels above min_keep, so the criterion need rank only those.
            kw["n_remove"] = layer.ffn_dim - allocate.min_units(c.min_keep, layer.ffn_dim)
          if c.score_data == "identity":
            stats = ModuleStats(identity=True, **kw)
          else:
            stats = ModuleStats(inputs=h.inputs, hidden=hidden, first=h.first, **kw)
          with pr.phase("scoring", plan=True):
            s = sharding.to_host(pr.crit.score(kind, p, stats)).astype(np.float64)
            if pr.crit.stream_costs:  # errors relative to the residual stream they are added to
              s = s / max(float(passes.energy(x)), 1e-30)
          (heads if kind is A.ATTN else chans)[i] = s
        with pr.phase("advance", plan=True):
          if store is not None:
            y = passes.second_out(h.x2, w2, b2, mesh=pr.mesh)
            store.put(i, kind.name, y)
            x = jax.block_until_ready(passes.add(x, y))
          else:
            x = jax.block_until_ready(passes.second_apply(h.x2, w2, b2, x, None, mesh=pr.mesh)[0])
      pr.progress({"event": "plan", "layer": i})
    else:
      x = passes.block_pass(cfg, blk, x, pos, mesh=pr.mesh)
  return heads, chans, Ds


# ---------------------------------------------------------------------------
# Entry point


def prune(model: Model, calib: np.ndarray, config: PruneConfig = PruneConfig(), *, score_windows=None, mesh=None,
          progress: Callable[[dict], None] | None = None, checkpoint: str | None = None,
          blocks_dir: str | None = None) -> PruneResult:
  """Prunes `model` with calibration token windows `calib` [S, T].

  Args:
    score_windows: token windows [S', T] for score_data="random" (default:
      uniformly random ids with config.seed, as many as `calib`).
    mesh: a (data, model) Mesh (`sharding.make_mesh`; default: all devices on `data`). The
      activations are sharded over `data`, the blocks over `model`.
    progress: called with a dict after every module (and plan layer).
    checkpoint: a directory where every finished block's state is saved
      (`jaxprune.checkpoint`); if it already holds the state of this run (same
      model, windows and config), the run resumes after its last finished block
      and gives bit-identical results to an uninterrupted run.
    blocks_dir: where a streamed run without `checkpoint` keeps its finished blocks, as
      Orbax checkpoints that every process writes its own shards of (nothing is gathered;
      `checkpoint.save_block_shards`). With several processes it must be one directory
      that every process sees. Default: a temporary directory of this process, to which
      each finished block is gathered whole.

  Returns:
    PruneResult(model, report): the pruned Model (the input is untouched) and a JSON-able report.
  """
  with contextlib.ExitStack() as stack:  # owns the temporary store of dense outputs, if any
    return _prune(model, calib, config, score_windows, mesh, progress, checkpoint, blocks_dir, stack)


def _prune(model, calib, config, score_windows, mesh, progress, checkpoint, blocks_dir, stack) -> PruneResult:
  c = config.check(model.spec)
  mesh = mesh or sharding.make_mesh()
  t_start = time.perf_counter()
  compiles0 = _Compiles.start()
  pr = _Pruner(model, c, mesh, progress, blocks_dir)
  if c.sparsity == 0 and not c.attn_sparsity:
    # Nothing to remove: the model as it is (a refit or added biases would only change it).
    pr.passes["compiles"] = 0
    return PruneResult(model, _report(model, model, c, pr, c.tau, 0.0, time.perf_counter() - t_start, calib, mesh))
  check_finite({k: v for k, v in model.params.items() if k != "layers"}, "the model given to prune", _BAD_WEIGHTS,
               CheckpointError)
  tokens = _split_holdout(_chunks(calib, c.batch_size, mesh, "calibration"), c.auto_damping)
  if c.skip_positions >= tokens[0].shape[-1]:
    raise UsageError(f"skip_positions={c.skip_positions} leaves no position of the {tokens[0].shape[-1]}-token "
                     "calibration windows in the statistics; use fewer than the window length")
  if c.score_data == "random" and score_windows is None:
    rng = np.random.default_rng(c.seed + 1)
    score_windows = rng.integers(0, model.spec.vocab_size, size=np.asarray(calib).shape, dtype=np.int32)
  s_tokens = _chunks(score_windows, c.batch_size, mesh, "scoring") if c.score_data == "random" else None
  ckpt = resumed = None
  if checkpoint is not None:
    ckpt = run_checkpoint.RunCheckpoint(checkpoint, run_checkpoint.fingerprint(model, c, calib, score_windows))
    if ckpt.exists():
      resumed = ckpt.load()
      log.info("resuming from %s at block %d", checkpoint, resumed.next_block)

  if pr.crit.prepare is not None:
    t0 = time.perf_counter()
    # Preparations see the whole model (gradients through it): a streamed model is read in.
    pr.ctx = dataclasses.replace(pr.ctx, extra=pr.crit.prepare(lazy_io.materialize(model), np.asarray(calib), c))
    pr.phase_seconds["prepare"] = time.perf_counter() - t0
    log.info("criterion %s prepared in %.1fs", c.method, pr.phase_seconds["prepare"])

  # Plans from the dense model: adaptive allocation and the tau meeting its head budget.
  plans: dict[int, allocate.LayerPlan] = {}
  tau = c.tau
  plan_seconds = 0.0
  # With uniform allocation and no tau, each layer drops its uniform head count
  # by the budgeted similarity rule (`select`), which keeps one shape per layer.
  need_tau = c.heads == "similarity" and c.tau is None and c.allocation == "adaptive"
  if resumed is not None:  # the plan the run made before it stopped
    plans = {int(i): allocate.LayerPlan(*hc) for i, hc in resumed.state["plans"].items()}
    tau, plan_seconds = resumed.state["tau"], resumed.state["plan_seconds"]
    pr.plan_phase_seconds = dict(resumed.state.get("plan_phase_seconds", {}))
    if resumed.state.get("dense_outputs"):
      store = dense_outputs_lib.DenseOutputs(_dense_outputs_dir(checkpoint), durable=True,
                                             digests=resumed.state.get("dense_digests"))
      stack.callback(store.close)
      pr.ctx = dataclasses.replace(pr.ctx, dense_outputs=store)
  elif c.allocation == "adaptive":
    t0 = time.perf_counter()
    calib_tokens = np.concatenate(tokens)
    # The plan scores the windows the criterion scores in the layer loop.
    score_tokens = s_tokens if pr.ctx.needs(A.MLP, True).score is not None else calib_tokens
    js_here = need_tau and score_tokens is calib_tokens
    store = _open_dense_outputs(pr, calib_tokens, ckpt, stack) if score_tokens is calib_tokens else None
    head_s, chan_s, Ds = _dense_scores(pr, score_tokens, want_js=js_here, store=store)
    pr.ctx = dataclasses.replace(pr.ctx, dense_outputs=store)
    if need_tau and not js_here:  # head similarity is measured on the calibration windows
      Ds = _dense_scores(pr, calib_tokens, want_js=True, want_scores=False)[2]
    idx = list(range(pr.start, pr.stop))
    budget = c.sparsity * sum(pr.dense_block_params(i) for i in idx)
    # Added biases count against the budget.
    budget += sum(pr.costs(i).attn(pr.layer_specs[i].num_heads, pr.layer_specs[i].num_kv_heads) +
                  pr.costs(i).mlp(pr.layer_specs[i].ffn_dim) - pr.dense_block_params(i) for i in idx)
    plans = allocate.adaptive([allocate.LayerScores(i, pr.layer_specs[i], pr.costs(i), head_s[i], chan_s[i])
                               for i in idx], budget, c.free_groups,
                              standardize=pr.ctx.plan_standardizes(),
                              per_param=pr.crit.stream_costs, min_keep=c.min_keep)
    if need_tau:
      n_drop = sum(pr.layer_specs[i].num_heads - plans[i].heads for i in idx)
      tau = criteria.search_tau([Ds[i] for i in idx], n_drop)
    plan_seconds = time.perf_counter() - t0

  first = 0
  if resumed is not None and resumed.streams is None:  # a damaged file: the run starts again
    pr.progress({"event": "recompute", "next_block": 0})
  if resumed is None or resumed.streams is None:
    groups = [_Group(x if pr.with_dense else None, x)
              for x in (_embed_stream(model.spec, model.params, t, mesh) for t in tokens)]
    xs = _embed_stream(model.spec, model.params, s_tokens, mesh) if s_tokens is not None else None
  else:
    first, groups, xs = _restore(pr, resumed, len(tokens), mesh)
  pos = _positions(tokens[0].shape[2])
  for i in range(first, model.spec.num_layers):
    if pr.start <= i < pr.stop:
      plan = plans.get(i)
      groups, xs = pr.module(A.ATTN, i, groups, xs, plan, tau)
      groups, xs = pr.module(A.MLP, i, groups, xs, plan, tau)
      if ckpt is not None:
        with pr.phase("checkpoint"):
          _save(pr, ckpt, i, groups, xs, plans, tau, plan_seconds)
      if pr.streaming:
        _spill(pr, i, ckpt)
      pr.progress({"event": "block", "layer": i})
    elif i < pr.stop:
      cfg = L.block_config(pr.spec, i)
      run = functools.partial(passes.block_pass, cfg, pr.blocks.placed(i, pr.mesh), positions=pos, mesh=pr.mesh)
      # Before the first pruned block both streams are the dense model's: one pass.
      groups = [_Group(None if g.xd is None else x, x) for g, x in ((g, run(x=g.xp)) for g in groups)]
      if xs is not None:
        xs = run(x=xs)
    else:
      break  # nothing after the range changes

  if pr.streaming:
    pruned = _streamed_result(pr, model)
  else:
    blocks = [pr.ctx.fill_biases(b) for b in pr.blocks]
    params = {**model.params, "layers": tuple(blocks)}
    spec = spec_from_params(model.spec.with_layers(pr.layer_specs), params)
    pruned = Model.checked(spec, params, model.source)
  pr.phase_seconds["plan"] = plan_seconds
  pr.phase_seconds["compile"] = _Compiles.seconds - compiles0[0]
  pr.passes["compiles"] = _Compiles.count - compiles0[1]
  report = _report(model, pruned, c, pr, tau, plan_seconds, time.perf_counter() - t_start, calib, mesh)
  return PruneResult(pruned, report)


def _spill(pr: _Pruner, i: int, ckpt) -> None:
  """Block i is finished: a streamed run keeps it in a file only (the checkpoint's, blocks_dir's,
  or a temporary directory's that lives as long as the pruned model that reads it)."""
  if ckpt is not None:
    pr.blocks[i] = ckpt.block_file(i)
    return
  if pr.blocks_dir is not None:
    path = os.path.join(pr.blocks_dir, f"block_{i:04d}")
    pr.values_written += run_checkpoint.save_block_shards(path, pr.blocks[i])
    pr.blocks[i] = path
    return
  if pr.spill_dir is None:
    # Removed when the last reference goes: the pruned model's blocks read from it.
    pr.spill_dir = tempfile.TemporaryDirectory(prefix="jaxprune-blocks-")
  path = os.path.join(pr.spill_dir.name, f"block_{i:04d}.npz")
  pr.blocks[i] = run_checkpoint.BlockFile(path, run_checkpoint.save_block(path, pr.blocks[i]))


def _streamed_result(pr: _Pruner, model: Model) -> Model:
  """The pruned model of a streamed run: its blocks stay in their files and are read (with
  the biases every block ends with) one at a time by whoever uses them, e.g. `save_hf`."""
  spec = dataclasses.replace(model.spec, layers=tuple(l.canonical() for l in pr.layer_specs),
                             **bias_flags(pr.ctx.fill_biases(pr.blocks[0])))
  blocks = pr.blocks
  layers = lazy_io.LazyBlocks(lambda i: pr.ctx.fill_biases(blocks[i]), lazy_io.block_shapes(spec),
                              source="the pruned blocks")
  return Model(spec, {**model.params, "layers": layers}, model.source)


def _dense_outputs_dir(checkpoint: str) -> str:
  return os.path.join(checkpoint, "dense_outputs")


def _open_dense_outputs(pr: _Pruner, calib_tokens: np.ndarray, ckpt, stack) -> dense_outputs_lib.DenseOutputs | None:
  """A store for the plan's dense module outputs when the layer loop will need them again:
  in the checkpoint (durable, so a resumed run reads the same ones) or a temporary
  directory removed when the run ends. None when the run needs no dense stream or runs on
  several processes; a store that keeps nothing when the outputs do not fit on the disk
  (the loop then computes them again by the plan's kernels: the same numbers either way)."""
  if not pr.with_dense or jax.process_count() > 1:
    return None
  n_modules = 2 * (pr.stop - pr.start)
  nbytes = n_modules * calib_tokens.size * pr.spec.hidden_size * 4  # streams are at most float32
  directory = _dense_outputs_dir(ckpt.path) if ckpt is not None else stack.enter_context(
      tempfile.TemporaryDirectory(prefix="jaxprune-dense-"))
  fits = dense_outputs_lib.DenseOutputs.fits(directory, nbytes)
  store = dense_outputs_lib.DenseOutputs(directory if fits else None, durable=ckpt is not None)
  stack.callback(store.close)  # before a temporary directory goes (callbacks run last-in first-out)
  return store


def _save(pr: _Pruner, ckpt, i: int, groups, xs, plans, tau, plan_seconds) -> None:
  """Block i is done: its parameters and the state entering block i + 1 become durable."""
  streams = {}
  for g, grp in enumerate(groups):
    streams[f"xp_{g}"] = np.asarray(grp.xp)
    if grp.xd is grp.xp:  # nothing changed yet: one stream stands for both (`_unchanged_module`)
      streams[f"same_{g}"] = np.asarray(True)
    elif grp.xd is not None:
      streams[f"xd_{g}"] = np.asarray(grp.xd)
  if xs is not None:
    streams["xs"] = np.asarray(xs)
  state = {"carry": pr.budget.carry, "modules": pr.modules, "passes": pr.passes, "phase_seconds": pr.phase_seconds,
           "plans": {str(k): [v.heads, v.channels] for k, v in plans.items()}, "tau": tau,
           "plan_seconds": plan_seconds, "plan_phase_seconds": pr.plan_phase_seconds,
           "dense_outputs": pr.ctx.dense_outputs is not None,
           "dense_digests": pr.ctx.dense_outputs.digests if pr.ctx.dense_outputs is not None else {}}
  ckpt.save(i, pr.blocks[i], pr.layer_specs[i], streams, state)


def _restore(pr: _Pruner, resumed, n_groups: int, mesh):
  """The pruner's state and the streams entering the checkpoint's next block."""
  for i, path in resumed.blocks.items():  # read when needed: at the end, or never while streaming
    pr.blocks[i], pr.layer_specs[i] = path, resumed.layer_specs[i]
  st = resumed.state
  pr.budget.carry, pr.modules = st["carry"], list(st["modules"])
  pr.passes, pr.phase_seconds = dict(st["passes"]), dict(st["phase_seconds"])
  put = functools.partial(jax.device_put, device=sharding.stream_sharding(mesh))
  z = resumed.streams
  groups = []
  for g in range(n_groups):
    xp = put(z[f"xp_{g}"])
    groups.append(_Group(xp if f"same_{g}" in z else put(z[f"xd_{g}"]) if f"xd_{g}" in z else None, xp))
  return resumed.next_block, groups, put(z["xs"]) if "xs" in z else None


def _report(dense: Model, pruned: Model, c: PruneConfig, pr: _Pruner, tau, plan_seconds, seconds, calib, mesh):
  idx = range(pr.start, pr.stop)
  block_before = sum(layer_param_count(dense.spec, dense.spec.layers[i]) for i in idx)
  block_after = sum(layer_param_count(pruned.spec, pruned.spec.layers[i]) for i in idx)
  total_before, total_after = count_params(dense.params), count_params(pruned.params)
  # The budget keeps (1 - sparsity) of the dense blocks, added biases included.
  target_after = (1 - c.sparsity) * block_before
  return {
      "config": {**dataclasses.asdict(c), "layers": list(c.block_range(dense.spec))},
      "tau": tau,
      "calibration": {"windows": int(np.shape(calib)[0]), "seq_len": int(np.shape(calib)[1]),
                      "held_out_for_damping": c.batch_size if c.auto_damping else 0},
      "devices": {"data": int(mesh.shape[sharding.DATA]), "model": int(mesh.shape[sharding.MODEL]),
                  "platform": jax.default_backend()},
      "params": {
          "before": total_before,
          "after": total_after,
          "pruned_blocks_before": block_before,
          "pruned_blocks_after": block_after,
          "ratio_of_pruned_blocks": 1 - block_after / block_before,
          "ratio_global": 1 - total_after / total_before,
          "budget_after": target_after,
          # Parameters kept beyond the budget (negative: below), from rounding to whole units.
          "budget_error": block_after - target_after,
          "budget_error_ratio": (block_after - target_after) / block_before,
      },
      "rounding": c.rounding if c.allocation == "uniform" else "carry",
      "layers": [dataclasses.asdict(l) for l in pruned.spec.layers],
      "modules": pr.modules,
      "damping_retries": sum(m.get(k, {}).get("retries", 0) for m in pr.modules
                             for k in ("first_level", "second_level", "refit")),
      # Wall seconds by phase; "compile" (tracing and compiling, process-wide) overlaps the
      # phases whose first call compiled, and "other" is what no phase covers.
      "seconds": {"total": seconds, "plan": plan_seconds,
                  "modules": math.fsum(m["seconds"] for m in pr.modules),
                  "phases": {**pr.phase_seconds,
                             "other": seconds - math.fsum(v for k, v in pr.phase_seconds.items() if k != "compile")},
                  # The plan's own split (its total is phases["plan"]).
                  "plan_phases": dict(pr.plan_phase_seconds)},
      "streams": {"dense": pr.with_dense, "score": c.score_data == "random"},
      "passes": pr.passes,
      # What this process wrote of the finished blocks to blocks_dir (its own shards).
      **({"block_values_written": pr.values_written} if pr.blocks_dir is not None and pr.streaming else {}),
  }
