"""Plans that need the whole dense model first: adaptive allocation (how many units each
module keeps, from dense-model scores and a global budget) and the similarity threshold
tau that meets its head budget.

With a store (`jaxprune.stats.dense_outputs`), the plan keeps every pruned module's dense
output so that the layer loop does not run the dense model again.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import allocate, criteria, placement
from jaxprune.criteria import output_approx
from jaxprune.criteria.stats import ModuleStats
from jaxprune.models import adapter as A
from jaxprune.models import layers as L
from jaxprune.prune import budget as budget_lib
from jaxprune.prune.context import module_needs, stats_kw
from jaxprune.prune.metrics import Meter
from jaxprune.prune.streams import embed_stream, positions
from jaxprune.stats import moments, passes, split
from jaxprune.stats import needs as needs_lib


class PlanInputs(NamedTuple):
  """What the plan reads: the dense model, the checked config, the criterion and its
  prepared extras, the mesh, the run's block store (`state.Blocks`), the biases the pruned
  blocks end with, and the progress callback (a "plan" event after each block)."""

  model: Any
  config: Any
  crit: Any
  extra: dict | None
  mesh: Any
  blocks: Any
  bias_after: dict
  progress: Callable[[dict], None]


class DenseScores(NamedTuple):
  """Per block index: head scores, channel scores and head JS matrices of the dense model."""

  heads: dict
  channels: dict
  js: dict


class Plan(NamedTuple):
  """The plan a run follows: per block its LayerPlan ({} for uniform allocation), tau,
  the plan's wall seconds in all and by phase, and the store of dense outputs (or None)."""

  layers: dict
  tau: float | None
  seconds: float
  phase_seconds: dict
  dense_outputs: Any = None


def plan_standardizes(crit) -> bool:
  """Whether adaptive allocation standardizes the criterion's scores over all units."""
  return not (crit.prescaled or crit.stream_costs)


def make(inp: PlanInputs, tokens: list[np.ndarray], s_tokens, need_tau: bool, open_store) -> Plan:
  """The adaptive plan (and tau when `need_tau`); `open_store(calib_tokens)` gives the store
  of dense outputs, or None."""
  c, spec = inp.config, inp.model.spec
  meter = Meter()
  t0 = time.perf_counter()
  calib_tokens = np.concatenate(tokens)
  # The plan scores the windows the criterion scores in the layer loop.
  score_tokens = s_tokens if module_needs(c, inp.crit, A.MLP, True).score is not None else calib_tokens
  js_here = need_tau and score_tokens is calib_tokens
  store = open_store(calib_tokens) if score_tokens is calib_tokens else None
  scores = dense_scores(inp, meter, score_tokens, want_js=js_here, store=store)
  js = scores.js
  if need_tau and not js_here:  # head similarity is measured on the calibration windows
    js = dense_scores(inp, meter, calib_tokens, want_js=True, want_scores=False).js
  start, stop = c.block_range(spec)
  idx = list(range(start, stop))
  plans = _allocate(inp, idx, scores)
  tau = c.tau
  if need_tau:
    n_drop = sum(spec.layers[i].num_heads - plans[i].heads for i in idx)
    tau = criteria.search_tau([js[i] for i in idx], n_drop)
  return Plan(plans, tau, time.perf_counter() - t0, meter.seconds, store)


def _allocate(inp: PlanInputs, idx: list[int], scores: DenseScores) -> dict[int, allocate.LayerPlan]:
  """`allocate.adaptive` on the blocks `idx`, with the budget the config's sparsity leaves.
  Added biases count against the budget."""
  c, spec = inp.config, inp.model.spec
  costs = {i: budget_lib.costs(spec, spec.layers[i], inp.bias_after) for i in idx}
  dense = {i: budget_lib.dense_block_params(spec, i) for i in idx}
  budget = c.sparsity * sum(dense[i] for i in idx)
  budget += sum(costs[i].attn(spec.layers[i].num_heads, spec.layers[i].num_kv_heads) +
                costs[i].mlp(spec.layers[i].ffn_dim) - dense[i] for i in idx)
  layers = [allocate.LayerScores(i, spec.layers[i], costs[i], scores.heads[i], scores.channels[i]) for i in idx]
  return allocate.adaptive(layers, budget, c.free_groups, standardize=plan_standardizes(inp.crit),
                           per_param=inp.crit.stream_costs, min_keep=c.min_keep)


def dense_scores(inp: PlanInputs, meter: Meter, tokens, want_js: bool, want_scores: bool = True,
                 store=None) -> DenseScores:
  """Per-layer head and channel scores (and JS matrices) of the dense model on `tokens` [C, B, T].

  The criterion sees what it sees in the layer loop (`context.stats_kw`: the
  block index, the seed, gradients, the intercept), only with the dense model's
  statistics of `tokens`. One pass per module: on the dense model the module's
  output is X2 W2 + b2, so the cross moment with it comes from X2's Gram.
  With a `store` (DenseOutputs) every pruned module's output is kept there for the
  layer loop, which then does not run the dense model again.
  """
  c, spec, mesh = inp.config, inp.model.spec, inp.mesh
  start, stop = c.block_range(spec)
  x = embed_stream(spec, inp.model.params, tokens, mesh)
  pos = positions(x.shape[2])
  out = DenseScores({}, {}, {})
  for i in range(stop):
    blk, cfg = inp.blocks.placed(i, mesh), L.block_config(spec, i)
    inp.blocks.prefetch(i + 1 if i + 1 < stop else start, mesh)  # after the last, the layer loop's first
    if i < start:
      x = passes.block_pass(cfg, blk, x, pos, mesh=mesh)
      continue
    for kind in (A.ATTN, A.MLP):
      x = _module(inp, meter, kind, i, blk, cfg, x, pos, want_js, want_scores, store, out)
    inp.progress({"event": "plan", "layer": i})
  return out


def _module(inp: PlanInputs, meter: Meter, kind, i, blk, cfg, x, pos, want_js, want_scores, store, out):
  """One dense module of the plan: its scores (and JS matrix) into `out`; returns the stream after it."""
  c, mesh, layer = inp.config, inp.mesh, inp.model.spec.layers[i]
  p = blk[kind.key]
  js_here = want_js and kind is A.ATTN
  st = needs_lib.StreamNeeds()
  if want_scores and c.score_data != "identity":
    st = needs_lib.criterion_stats(inp.crit.needs, kind, c.skip_positions)
  # goa-obs plans an MLP from its blocked sweep on X2 itself: no Gram matrix of all its channels.
  from_stream = want_scores and kind is A.MLP and inp.crit.stream_costs and st.hidden == "gram"
  if from_stream:
    st = dataclasses.replace(st, hidden="none", cross=False)
  with meter.phase("statistics"):
    h = jax.block_until_ready(passes.hidden_pass(kind, L.part_config(cfg, kind.name), blk[kind.norm_key], p, x,
                                                 None, pos, dataclasses.replace(st, cross=False, js=js_here),
                                                 mesh=mesh))
    h = passes.gather_hidden(h, mesh)
  w2, b2 = A.second_level(kind, p)
  if js_here:
    out.js[i] = placement.to_host(h.js / h.rows).astype(np.float64)
  if want_scores:
    hidden = h.hidden
    w2a = jnp.concatenate([w2, b2[None]], axis=0)
    if st.cross and split.is_split(hidden):
      hidden = split.shrink(split.with_cross(hidden, w2a), c.shrink, w2a)
    elif st.cross:
      hidden = moments.shrink(moments.Moments(hidden.xx, passes.dense_cross(hidden.xx, w2a)), c.shrink, w2a)
    kw = dict(stats_kw(c, inp.extra, kind, i, layer, p), js=None if h.js is None else h.js / h.rows)
    if kind is A.MLP and not plan_standardizes(inp.crit):
      # Costs on one scale (not standardized over all units): the plan can remove at most
      # the channels above min_keep, so the criterion need rank only those.
      kw["n_remove"] = layer.ffn_dim - allocate.min_units(c.min_keep, layer.ffn_dim)
    if c.score_data == "identity":
      stats = ModuleStats(identity=True, **kw)
    else:
      stats = ModuleStats(inputs=h.inputs, hidden=hidden, first=h.first, **kw)
    with meter.phase("scoring"):
      if from_stream:
        s = output_approx.refit_aware_stream(kind, p, stats, h.x2, w2a, c.shrink, c.skip_positions)
      else:
        s = placement.to_host(inp.crit.score(kind, p, stats)).astype(np.float64)
      if inp.crit.stream_costs:  # errors relative to the residual stream they are added to
        s = s / max(float(passes.energy(x)), 1e-30)
    (out.heads if kind is A.ATTN else out.channels)[i] = s
  post = passes.post_kw(kind, cfg, blk)
  with meter.phase("advance"):
    if store is not None:
      y = passes.second_out(h.x2, w2, b2, mesh=mesh)
      store.put(i, kind.name, y)
      return jax.block_until_ready(passes.add(x, y, **post))
    return jax.block_until_ready(passes.second_apply(h.x2, w2, b2, x, None, mesh=mesh, **post)[0])
