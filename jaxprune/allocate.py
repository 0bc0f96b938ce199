"""How many heads and channels each pruned block keeps (docs/method.md section 6).

Parameter costs are counted from the actual structure (kernels and biases, with
KV heads removed only with their whole group), so a ratio means the same
thing for every family. Head choices always respect the GQA rule: by default
every kept KV head keeps the same number of query heads.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import NamedTuple, Sequence

import numpy as np

from jaxprune.errors import UsageError
from jaxprune.spec import LayerSpec, ModelSpec


@dataclasses.dataclass(frozen=True)
class Costs:
  """Parameter counts of one block's prunable parts, bias flags as they will be after pruning."""

  D: int
  H: int
  qkv_bias: bool
  o_bias: bool
  mlp_bias: bool
  gated: bool

  @classmethod
  def of(cls, spec: ModelSpec, layer: LayerSpec, qkv_bias=None, o_bias=None, mlp_bias=None) -> "Costs":
    return cls(spec.hidden_size, layer.head_dim, spec.qkv_bias if qkv_bias is None else qkv_bias,
               spec.o_bias if o_bias is None else o_bias, spec.mlp_bias if mlp_bias is None else mlp_bias,
               spec.fam.gated_mlp)

  def attn(self, n_heads: int, n_kv: int) -> int:
    D, H = self.D, self.H
    p = D * H * (2 * n_heads + 2 * n_kv)
    if self.qkv_bias:
      p += H * (n_heads + 2 * n_kv)
    return p + (D if self.o_bias else 0)

  def mlp(self, channels: int) -> int:
    n_first = 2 if self.gated else 1
    p = self.D * channels * (n_first + 1)
    if self.mlp_bias:
      p += n_first * channels + self.D
    return p

  @property
  def per_channel(self) -> int:
    n_first = 2 if self.gated else 1
    return self.D * (n_first + 1) + (n_first if self.mlp_bias else 0)


def feasible_heads(layer: LayerSpec, free_groups: bool = False) -> list[tuple[int, int]]:
  """(query heads kept, KV heads kept) pairs reachable under the GQA rule, ascending."""
  K, G = layer.num_kv_heads, layer.num_heads // layer.num_kv_heads
  if free_groups or layer.kv_map is not None:
    sizes = np.bincount(np.asarray(layer.kv_index), minlength=K)
    out = set()
    for n in range(1, layer.num_heads + 1):
      # Fewest KV heads that can hold n query heads: fill the largest groups first.
      out.add((n, int(np.searchsorted(np.cumsum(np.sort(sizes)[::-1]), n) + 1)))
    return sorted(out)
  return sorted({(k * g, k) for k in range(1, K + 1) for g in range(1, G + 1)})


def choose_heads(layer: LayerSpec, priority: np.ndarray, n_keep: int, free_groups: bool = False,
                 n_kv: int | None = None) -> np.ndarray:
  """The feasible set of query heads with `n_keep` members (or the nearest feasible size)
  that maximises the summed priority. Returns sorted head indices.

  `n_kv` fixes how many KV groups the set spans, as the parameter budget was
  costed: under GQA one head count can be reachable with different numbers of
  groups (6 of 9 heads as 3 groups of 2 or 2 groups of 3), and the groups that
  go free their K and V weights. It is ignored with free groups.
  """
  priority = np.asarray(priority, np.float64)
  N = layer.num_heads
  n_keep = int(min(max(n_keep, 1), N))
  if free_groups or layer.kv_map is not None:
    return np.sort(np.argsort(-priority, kind="stable")[:n_keep]).astype(np.int32)
  K, G = layer.num_kv_heads, N // layer.num_kv_heads
  pairs = [(k * g, k) for k in range(1, K + 1) for g in range(1, G + 1) if n_kv is None or k == n_kv]
  if not pairs:
    raise ValueError(f"{n_kv} KV heads is not possible in a layer with {K} KV heads; expected 1..{K}")
  size = min(sorted({n for n, _ in pairs}), key=lambda s: (abs(s - n_keep), -s))
  groups = np.asarray(layer.kv_index)
  best, best_val = None, -np.inf
  for k in range(1, K + 1):
    if size % k or size // k > G or (n_kv is not None and k != n_kv):
      continue
    g = size // k
    # Best g heads inside each group, then the best k groups.
    picks = []
    for grp in range(K):
      members = np.flatnonzero(groups == grp)
      top = members[np.argsort(-priority[members], kind="stable")[:g]]
      picks.append((priority[top].sum(), top))
    order = sorted(range(K), key=lambda i: -picks[i][0])[:k]
    val = sum(picks[i][0] for i in order)
    if val > best_val:
      best_val, best = val, np.concatenate([picks[i][1] for i in order])
  return np.sort(best).astype(np.int32)


def choose_channels(scores: np.ndarray, n_keep: int) -> np.ndarray:
  """Indices of the `n_keep` highest scores, sorted."""
  scores = np.asarray(scores)
  n_keep = int(min(max(n_keep, 1), scores.shape[0]))
  return np.sort(np.argsort(-scores, kind="stable")[:n_keep]).astype(np.int32)


def uniform_head_pair(layer: LayerSpec, costs: Costs, ratio: float, free_groups: bool = False) -> tuple[int, int]:
  """(query heads, KV heads) to keep so the attention module loses the fraction closest
  to `ratio` (ties: keep more heads)."""
  dense = costs.attn(layer.num_heads, layer.num_kv_heads)
  target = (1 - ratio) * dense
  return min(feasible_heads(layer, free_groups), key=lambda nk: (abs(costs.attn(*nk) - target), -nk[0]))


def uniform_heads(layer: LayerSpec, costs: Costs, ratio: float, free_groups: bool = False) -> int:
  """Query heads to keep so the attention module loses the fraction closest to `ratio`."""
  return uniform_head_pair(layer, costs, ratio, free_groups)[0]


def channels_for_budget(costs: Costs, budget: float, ffn_dim: int) -> int:
  """MLP channels to keep so the MLP uses at most about `budget` parameters (at least 1)."""
  fixed = costs.mlp(0)
  n = int(round((budget - fixed) / costs.per_channel))
  return int(min(max(n, 1), ffn_dim))


def kv_heads_after(layer: LayerSpec, n_keep: int, free_groups: bool = False) -> int:
  return dict(feasible_heads(layer, free_groups)).get(n_keep, layer.num_kv_heads)


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  heads: int  # query heads to keep
  channels: int  # MLP channels to keep


@dataclasses.dataclass
class Budget:
  """The parameter budget of a layer-by-layer run: how many units each module keeps.

  Attention keeps query heads and KV heads: the plan's (adaptive) or the uniform
  pair closest to its ratio; under GQA the same number of query heads may sit in
  fewer, fuller groups, which frees different parameters, so the KV count is
  part of the shape (None: uneven groups, no constraint). The MLP keeps the
  channels that take the rest of the block's target. Adaptive plans and
  `carry=True` (rounding="carry") carry what earlier blocks kept beyond (or
  below) theirs, so the total lands on the budget; otherwise every block rounds
  alike and every pruned block has one shape (the budget error is reported).
  """

  sparsity: float
  attn_sparsity: float | None = None
  free_groups: bool = False
  carry_rounding: bool = False
  round_to: int = 1  # MLP channels kept in multiples of this (where the layer has that many)
  carry: float = 0.0  # parameters kept beyond the running budget

  def heads(self, layer: LayerSpec, dense_layer: LayerSpec, costs: Costs, plan=None) -> tuple[int, int | None]:
    """(query heads, KV heads or None) the attention module of `layer` keeps."""
    free = self.free_groups or layer.kv_map is not None
    if plan is not None:
      return plan.heads, None if free else kv_heads_after(dense_layer, plan.heads, self.free_groups)
    ratio = self.sparsity if self.attn_sparsity is None else self.attn_sparsity
    n, k = uniform_head_pair(layer, costs, ratio, self.free_groups)
    return n, None if free else k

  def channels(self, layer: LayerSpec, dense_layer: LayerSpec, costs: Costs, dense_params: int,
               attn_kept: tuple[int, int], plan=None) -> int:
    """MLP channels the block keeps once its attention kept `attn_kept` (query heads, KV
    heads); updates the carry. `dense_params`: the dense block's parameter count."""
    if plan is not None:
      target = costs.attn(plan.heads, kv_heads_after(dense_layer, plan.heads, self.free_groups)) + costs.mlp(
          plan.channels)
    else:
      target = (1 - self.sparsity) * dense_params
    carry = self.carry if plan is not None or self.carry_rounding else 0.0
    attn_params = costs.attn(*attn_kept)
    n = round_units(channels_for_budget(costs, target - attn_params - carry, layer.ffn_dim), self.round_to,
                    layer.ffn_dim)
    self.carry += attn_params + costs.mlp(n) - target
    return n


def round_units(n: int, multiple: int, most: int) -> int:
  """`n` kept units rounded to the nearest multiple of `multiple` in [multiple, most] (the lower
  one on a tie); `n` itself when it keeps all `most` units or no multiple fits."""
  if multiple <= 1 or n >= most:
    return n
  lo = multiple * (n // multiple)
  fits = [c for c in (lo, lo + multiple) if multiple <= c <= most]
  return min(fits, key=lambda c: (abs(c - n), c)) if fits else n


def min_units(min_keep: float, n: int) -> int:
  """Units of `n` that a module keeps under `min_keep` (at least one)."""
  return max(1, math.ceil(min_keep * n))


class UnitKind(enum.StrEnum):
  HEAD = "head"
  CHANNEL = "channel"


@dataclasses.dataclass(frozen=True)
class LayerScores:
  """One pruned block as the adaptive plan sees it: its index in the model, its shape, its
  parameter costs and its dense-model scores ([num_heads] and [ffn_dim], higher = keep)."""

  index: int
  spec: LayerSpec
  costs: Costs
  head_scores: np.ndarray
  channel_scores: np.ndarray


class Unit(NamedTuple):
  """One removable head or channel in the global ranking."""

  z: float  # ranking key: the (standardized, maybe per-parameter) score, lowest goes first
  kind: UnitKind
  pos: int  # position of its block in the plan's list
  cost: float  # parameters its removal frees


def adaptive(layers: Sequence[LayerScores], budget: float, free_groups: bool = False, standardize: bool = True,
             per_param: bool = False, min_keep: float = 0.0) -> dict[int, LayerPlan]:
  """FLAP-style global allocation (AL-AM) from dense-model scores: {block index: LayerPlan}.

  Scores are standardized per module kind over all pruned layers and ranked
  together; units are removed, lowest first, until the removed parameters
  reach `budget`, keeping at least one head and one channel per layer. Head
  counts are then moved to the nearest feasible GQA size that keeps at least
  as many heads, and MLP channels (continuing down the same ranking) make up
  the difference so the total lands on the budget. `standardize=False` takes
  scores that are already on one scale (FLAP's per-layer z-scores) as they are;
  `per_param=True` ranks units by score per parameter removed (scores that are
  costs, such as output errors, where removing a head costs as much as several
  channels). `min_keep`: every module keeps at least this fraction of its heads
  and channels (at least one), which bounds how far the ranking may empty a layer.
  """
  units = ranked_units(layers, standardize, per_param)
  specs = [ls.spec for ls in layers]
  heads = [l.num_heads for l in specs]
  chans = [l.ffn_dim for l in specs]
  h_min = [min_units(min_keep, l.num_heads) for l in specs]
  c_min = [min_units(min_keep, l.ffn_dim) for l in specs]
  removed_units = np.zeros(len(units), bool)
  removed = 0.0
  for u, (z, kind, pos, cost) in enumerate(units):
    if budget - removed < cost / 2:
      continue  # would overshoot: let smaller units fill the rest
    if kind is UnitKind.HEAD and heads[pos] > h_min[pos]:
      heads[pos] -= 1
    elif kind is UnitKind.CHANNEL and chans[pos] > c_min[pos]:
      chans[pos] -= 1
    else:
      continue
    removed += cost
    removed_units[u] = True
  # Feasible head counts (keep at least as many), then recount exactly.
  for pos, l in enumerate(specs):
    heads[pos] = min(n for n, _ in feasible_heads(l, free_groups) if n >= heads[pos])
  deficit = budget - _removed_params(layers, heads, chans, free_groups)
  _settle_channels(units, removed_units, chans, c_min, deficit)
  return {ls.index: LayerPlan(heads[pos], chans[pos]) for pos, ls in enumerate(layers)}


def ranked_units(layers: Sequence[LayerScores], standardize: bool, per_param: bool) -> list[Unit]:
  """Every head and channel of `layers`, lowest key first (ties: in block, then head-before-channel order)."""
  z_h = np.concatenate([np.asarray(ls.head_scores, np.float64) for ls in layers])
  z_c = np.concatenate([np.asarray(ls.channel_scores, np.float64) for ls in layers])
  if standardize:
    z_h, z_c = _standardize(z_h), _standardize(z_c)
  units = []
  off_h = off_c = 0
  for pos, ls in enumerate(layers):
    l, c = ls.spec, ls.costs
    # A query head's share of its KV head goes with it (all of it under MHA).
    head_cost = (c.attn(l.num_heads, l.num_kv_heads) - c.attn(0, 0)) / l.num_heads
    hk, ck = (head_cost, c.per_channel) if per_param else (1.0, 1.0)
    units += [Unit(z / hk, UnitKind.HEAD, pos, head_cost) for z in z_h[off_h:off_h + l.num_heads]]
    units += [Unit(z / ck, UnitKind.CHANNEL, pos, c.per_channel) for z in z_c[off_c:off_c + l.ffn_dim]]
    off_h += l.num_heads
    off_c += l.ffn_dim
  units.sort(key=lambda u: u.z)
  return units


def _removed_params(layers: Sequence[LayerScores], heads: list[int], chans: list[int], free_groups: bool):
  """Parameters the blocks free when they keep `heads` and `chans`, counted exactly."""
  r = 0
  for pos, ls in enumerate(layers):
    l, c = ls.spec, ls.costs
    r += c.attn(l.num_heads, l.num_kv_heads) - c.attn(heads[pos], kv_heads_after(l, heads[pos], free_groups))
    r += c.mlp(l.ffn_dim) - c.mlp(chans[pos])
  return r


def _settle_channels(units: list[Unit], removed_units: np.ndarray, chans: list[int], c_min: list[int],
                     deficit: float) -> None:
  """Lands the total on the budget (updates `chans`): too little removed, continue down the
  ranking with channels; too much, give back the last channels removed."""
  for u, (_, kind, pos, cost) in enumerate(units):
    if kind is not UnitKind.CHANNEL or removed_units[u] or chans[pos] <= c_min[pos]:
      continue
    if deficit <= cost / 2:
      break
    chans[pos] -= 1
    deficit -= cost
  for u in reversed(np.flatnonzero(removed_units)):
    _, kind, pos, cost = units[u]
    if kind is not UnitKind.CHANNEL:
      continue
    if -deficit <= cost / 2:
      break
    chans[pos] += 1
    deficit += cost


def _standardize(x: np.ndarray) -> np.ndarray:
  sd = x.std()
  return (x - x.mean()) / (sd if sd > 0 else 1.0)


def check_ratio(ratio: float) -> float:
  if not 0.0 <= ratio < 1.0:
    raise UsageError(f"sparsity {ratio} is outside [0, 1); pass the fraction of block parameters to remove, "
                     "e.g. --sparsity 0.2")
  return float(ratio)
