"""The run's fixed context: what every module's step reads and none changes.

It is built once, complete, after the criterion's preparation and the plan (whose stored
dense outputs it holds). The plan itself runs before it exists, so what both need (the
modules' statistics needs, the criterion's extra fields) are functions of the config,
the criterion and its extras here, which the context's methods call too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from jaxprune import sharding
from jaxprune.criteria.stats import ModuleStats
from jaxprune.model import Model
from jaxprune.models import adapter as A
from jaxprune.prune import solve
from jaxprune.prune.config import PruneConfig
from jaxprune.prune.streams import positions
from jaxprune.stats import dense_outputs as dense_outputs_lib
from jaxprune.stats import needs as needs_lib
from jaxprune.stats import passes


def module_needs(c: PruneConfig, crit, kind, scores: bool) -> needs_lib.ModuleNeeds:
  js = kind is A.ATTN and c.heads == "similarity" and scores
  return needs_lib.module_needs(c, crit.needs, kind, scores, js)


def uses_dense(c: PruneConfig, crit) -> bool:
  """Whether the dense stream is carried: some module solves against (or measures errors
  against) the dense model's outputs."""
  return any(module_needs(c, crit, kind, True).dense for kind in (A.ATTN, A.MLP))


def second_intercept(c: PruneConfig, kind, p) -> bool:
  """Whether the second level's solves fit a bias: asked for, or the module has
  one (its own, or FLAP's compensation). The refit and `goa-obs` both use this."""
  return c.intercept or c.compensate or solve.has_bias(kind, p, "second")


def stats_kw(c: PruneConfig, extra: dict | None, kind, i, layer, p) -> dict:
  """ModuleStats fields other than the moments, the same for the plan and the loop."""
  kw = dict(kv_index=layer.kv_index if kind is A.ATTN else None, damping=c.damping,
            intercept=second_intercept(c, kind, p), layer=i, seed=c.seed)
  if extra:
    for name in ("grads", "sq_grads"):
      if extra.get(name) is not None:
        kw[name] = extra[name][i][kind.key]
  return kw


def bias_after(spec, c: PruneConfig) -> dict[str, bool]:
  """The biases every pruned block ends with. A fitted intercept adds biases. Hugging Face's
  LLaMA config has one flag for the q, k, v and o biases and one for gate, up and down, so
  an added bias comes with zero biases for its siblings (counted in the budget)."""
  adds = c.intercept and (c.reconstruct or c.refit) or c.compensate
  return dict(qkv_bias=spec.qkv_bias or adds, o_bias=spec.o_bias or adds, mlp_bias=spec.mlp_bias or adds)


def plan_output(kind, cfg, norm_p, p, x, mesh):
  """Module output X2 W2 + b2 of the stream `x` by the kernels the plan stores it with
  (`plan.dense_scores`), so that an output computed again equals the stored one bit for bit."""
  h = passes.hidden_pass(kind, cfg, norm_p, p, x, None, positions(x.shape[2]), needs_lib.StreamNeeds(), mesh=mesh)
  w2, b2 = A.second_level(kind, p)
  return passes.second_out(h.x2, w2, b2, mesh=mesh)


@dataclasses.dataclass(frozen=True)
class StepContext:
  """What one module's step reads and never changes: the run's configuration, its
  criterion, the mesh, the biases every block ends with, whether the dense stream is
  carried, the criterion's prepared extras and the plan's stored dense outputs."""

  config: PruneConfig
  crit: Any
  mesh: Any
  bias_after: dict
  with_dense: bool
  extra: dict | None = None  # what the criterion's prepare() computed
  dense_outputs: dense_outputs_lib.DenseOutputs | None = None  # the plan's dense module outputs

  @classmethod
  def build(cls, model: Model, config: PruneConfig, mesh, crit, extra=None, dense_outputs=None) -> "StepContext":
    return cls(config, crit, mesh, bias_after(model.spec, config), uses_dense(config, crit), extra, dense_outputs)

  def needs(self, kind, scores: bool) -> needs_lib.ModuleNeeds:
    return module_needs(self.config, self.crit, kind, scores)

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
        yd = plan_output(kind, cfg, norm_p, p, g.xd, self.mesh)
      else:
        yd = jax.device_put(y[start:start + n], sharding.stream_sharding(self.mesh))
      out.append(passes.DenseOut(yd, passes.energy(yd[:, :, nd.calib.skip:]), None, None, None))
      start += n
    return jax.block_until_ready(out), "dense_read" if y is not None else "dense_recompute"

  def second_intercept(self, kind, p) -> bool:
    return second_intercept(self.config, kind, p)

  def score_stats(self, kind, i, layer, p2, hids, m2, js, hs, n_remove=None) -> ModuleStats:
    """What the criterion sees: the calibration windows' statistics (pruned stream), the
    random-token stream's `hs` (score_data="random"), or none (identity)."""
    c = self.config
    kw = dict(stats_kw(c, self.extra, kind, i, layer, p2), js=js, n_remove=n_remove)
    if c.score_data == "identity":
      return ModuleStats(identity=True, **kw)
    if hs is not None:
      return ModuleStats(inputs=hs.inputs, hidden=hs.hidden, first=hs.first, **kw)
    return ModuleStats(inputs=solve.sum_stats([h.inputs for h in hids]), hidden=m2,
                       first=solve.sum_stats([h.first for h in hids]), **kw)

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
