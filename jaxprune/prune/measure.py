"""What a module's step measures before it cuts: the dense module's outputs (the targets)
and one statistics pass over the pruned stream (`jaxprune.stats.passes`)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxprune.models import adapter as A
from jaxprune.prune import solve
from jaxprune.prune.context import StepContext
from jaxprune.prune.metrics import Meter
from jaxprune.prune.streams import positions
from jaxprune.stats import moments, passes, split
from jaxprune.stats import needs as needs_lib


class Stats(NamedTuple):
  """The pruned stream's statistics of one module (`passes.hidden_pass` per group, gathered)."""

  hids: list  # per calibration group
  hs: Any  # of the scoring stream, or None
  m2: Any  # the second level's input moments, summed over the groups
  js: Any  # the heads' JS sums over rows, or None
  target_yy: list  # ||target||^2 per group (None without a dense stream)


def dense_outputs(ctx: StepContext, kind, i: int, block, cfg, groups: list, nd, meter: Meter) -> list:
  """The dense module's outputs and moments per group (`passes.DenseOut`), from the plan's
  store or a dense pass; Nones when the run carries no dense stream."""
  if not ctx.with_dense:
    return [None] * len(groups)
  norm_p, p0 = block[kind.norm_key], block[kind.key]
  pos = positions(groups[0].xp.shape[2])
  with meter.phase("statistics"):
    stored = ctx.stored_dense(kind, i, groups, nd, cfg, norm_p, p0)
    if stored is not None:
      meter.count(stored[1], len(groups))
      return stored[0]
    douts = jax.block_until_ready([
        passes.dense_pass(kind, cfg, norm_p, p0, g.xd, g.xp, pos, nd.first_moments, nd.inherited_error,
                          mesh=ctx.mesh, skip=nd.calib.skip)
        for g in groups])
    meter.count("dense_pass", len(groups))
  return douts


def statistics(ctx: StepContext, kind, block, cfg, p1, groups: list, xs, douts, nd, meter: Meter) -> Stats:
  """The statistics pass over the pruned stream (and the scoring stream)."""
  c = ctx.config
  norm_p = block[kind.norm_key]
  pos = positions(groups[0].xp.shape[2])
  with meter.phase("statistics"):
    # What the second level's solves fit: the dense outputs, and with `absorb` a share of the
    # error the residual stream carries in (x_p + y ~ x_d + y_d wants y ~ y_d + (x_d - x_p)).
    # The dense stream still advances by the dense outputs. Where the output passes a post-norm
    # (Gemma) the stream's error is in the norm's units, not y's: no absorb there (docs/method.md).
    absorb = 0.0 if kind.post_norm(block) is not None else c.absorb
    targets = [None if d is None else d.yd if not absorb else passes.absorbing_target(d.yd, g.xd, g.xp, absorb)
               for g, d in zip(groups, douts)]
    target_yy = [None if d is None else d.yy if not absorb else passes.energy(t[:, :, nd.calib.skip:])
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
    shrink = split.shrink if split.is_split(hids[0].hidden) else moments.shrink
    hids = [h._replace(hidden=shrink(h.hidden, c.shrink, w2a)) for h in hids]
  js = None
  if nd.calib.js:
    js = sum(h.js for h in hids) / max(sum(float(h.rows) for h in hids), 1.0)
  return Stats(hids, hs, solve.sum_stats([h.hidden for h in hids]), js, target_yy)
