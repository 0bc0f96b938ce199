"""Allocation: GQA-feasible head sets, budgets that land on the ratio."""

import itertools

import numpy as np
import pytest

from jaxprune import allocate
from jaxprune.errors import UsageError
from jaxprune.spec import LayerSpec

SMOL = LayerSpec(9, 3, 64, 1536)


def _scores(specs, costs, hs, cs, first=0):
  return [allocate.LayerScores(first + i, *z) for i, z in enumerate(zip(specs, costs, hs, cs))]


def test_feasible_head_counts_under_equal_groups():
  counts = sorted({n for n, _ in allocate.feasible_heads(SMOL)})
  assert counts == [1, 2, 3, 4, 6, 9]  # k kept groups x g heads each
  assert (6, 3) in allocate.feasible_heads(SMOL) and (6, 2) in allocate.feasible_heads(SMOL)
  assert sorted({n for n, _ in allocate.feasible_heads(SMOL, free_groups=True)}) == list(range(1, 10))


def test_choose_heads_is_the_best_feasible_set():
  rng = np.random.default_rng(0)
  groups = np.asarray(SMOL.kv_index)
  for n_keep in (1, 2, 3, 4, 6):
    prio = rng.normal(size=9)
    got = allocate.choose_heads(SMOL, prio, n_keep)
    best = -np.inf
    for subset in itertools.combinations(range(9), n_keep):
      sizes = np.bincount(groups[list(subset)], minlength=3)
      if len(set(sizes[sizes > 0])) == 1:
        best = max(best, prio[list(subset)].sum())
    assert len(got) == n_keep and prio[got].sum() == pytest.approx(best)
  # An infeasible size moves to the nearest feasible one (ties: keep more).
  assert len(allocate.choose_heads(SMOL, rng.normal(size=9), 5)) == 6


def test_uniform_and_channels_land_on_the_budget():
  c = allocate.Costs(576, 64, False, False, False, True)
  dense = c.attn(9, 3) + c.mlp(1536)
  n = allocate.uniform_heads(SMOL, c, 0.2)
  assert n == 6  # 25% of attention is the feasible fraction nearest 20%
  ch = allocate.channels_for_budget(c, 0.8 * dense - c.attn(6, 3), 1536)
  kept = c.attn(6, 3) + c.mlp(ch)
  assert abs(kept - 0.8 * dense) <= c.per_channel / 2


def test_adaptive_meets_budget_and_floors():
  c = allocate.Costs(64, 16, True, True, True, True)
  specs = [LayerSpec(4, 2, 16, 96)] * 3
  rng = np.random.default_rng(1)
  hs = [rng.random(4) for _ in specs]
  cs = [rng.random(96) * (10 if i == 0 else 1) for i in range(3)]
  dense = c.attn(4, 2) + c.mlp(96)
  for ratio in (0.1, 0.3, 0.6):
    plans = allocate.adaptive(_scores(specs, [c] * 3, hs, cs), ratio * 3 * dense)
    kept = sum(c.attn(p.heads, allocate.kv_heads_after(specs[0], p.heads)) + c.mlp(p.channels)
               for p in plans.values())
    assert abs((1 - kept / (3 * dense)) - ratio) < 0.01
    assert all(p.heads >= 1 and p.channels >= 1 for p in plans.values())
    assert all(p.heads in (1, 2, 4) for p in plans.values())  # feasible with 2 KV groups
  # The high-scoring layer keeps more channels.
  assert plans[0].channels > plans[1].channels


@pytest.mark.parametrize("r", [-0.1, 1.0, 1.5])
def test_ratio_outside_range_is_refused(r):
  with pytest.raises(UsageError, match=r"outside \[0, 1\)"):
    allocate.check_ratio(r)


def test_adaptive_min_keep_bounds_every_module():
  """Scores that would empty one layer's MLP: min_keep keeps a fraction of it, and the
  budget is still met by the other layers."""
  c = allocate.Costs(64, 16, True, True, True, True)
  specs = [LayerSpec(4, 2, 16, 96)] * 3
  hs = [np.full(4, 10.0)] * 3  # heads never go first
  cs = [np.full(96, 0.01), np.linspace(1, 2, 96), np.linspace(1, 2, 96)]  # layer 0 is cheapest
  dense = c.attn(4, 2) + c.mlp(96)
  free = allocate.adaptive(_scores(specs, [c] * 3, hs, cs), 0.4 * 3 * dense, standardize=False)
  assert free[0].channels == 1
  bounded = allocate.adaptive(_scores(specs, [c] * 3, hs, cs), 0.4 * 3 * dense, standardize=False, min_keep=0.25)
  assert bounded[0].channels == 24 and bounded[0].heads >= 1
  kept = sum(c.attn(p.heads, allocate.kv_heads_after(specs[0], p.heads)) + c.mlp(p.channels)
             for p in bounded.values())
  assert abs((1 - kept / (3 * dense)) - 0.4) < 0.01


def test_adaptive_per_param_ranks_costs_per_parameter_removed():
  """A head costs as many parameters as several channels: with per_param its cost is
  divided by its parameters, so a head whose cost per parameter is lowest goes first."""
  c = allocate.Costs(64, 16, False, False, False, True)
  spec = LayerSpec(4, 4, 16, 96)  # MHA: any head count is feasible
  head_params = (c.attn(4, 4) - c.attn(0, 0)) / 4
  ratio = head_params / c.per_channel  # a head is worth this many channels
  hs = [np.array([0.5 * ratio, 100, 100, 100]) * 1.0]  # head 0: half a channel's cost per parameter
  cs = [np.linspace(1, 2, 96)]
  budget = head_params  # room for exactly one head
  per = allocate.adaptive(_scores([spec], [c], hs, cs), budget, standardize=False, per_param=True)
  raw = allocate.adaptive(_scores([spec], [c], hs, cs), budget, standardize=False)
  assert per[0].heads == 3 and per[0].channels == 96
  assert raw[0].heads == 4  # ranked by raw cost, channels (cost 1-2) go before a head (cost ~ 0.5 * ratio)


@pytest.mark.parametrize("carry", [False, True])
def test_budget_rounds_once_or_carries_to_land_on_the_total(carry):
  """Uniform 'once': every block keeps the same channels (the error is the rounding of one
  block, times the blocks); 'carry': each block makes up what the ones before kept beyond
  theirs, so the total lands within one channel of the budget."""
  layer = LayerSpec(4, 2, 16, 97)
  costs = allocate.Costs(D=64, H=16, qkv_bias=False, o_bias=False, mlp_bias=False, gated=True)
  dense = costs.attn(4, 2) + costs.mlp(97)
  budget = allocate.Budget(0.3, attn_sparsity=0.0, carry_rounding=carry)
  kept = []
  for _ in range(7):
    heads = budget.heads(layer, layer, costs)
    assert heads == (4, 2)  # attn_sparsity 0: every head stays
    kept.append(budget.channels(layer, layer, costs, dense, heads))
  total = sum(costs.attn(4, 2) + costs.mlp(n) for n in kept)
  target = 0.7 * dense * len(kept)
  if carry:
    assert abs(total - target) <= costs.per_channel / 2 + 1e-6 and len(set(kept)) > 1
  else:
    assert len(set(kept)) == 1 and abs(total - target) <= len(kept) * costs.per_channel / 2
  assert budget.carry == pytest.approx(total - target)


# Plans of `allocate.adaptive` at 0f155af (before LayerScores and the Unit records), on the
# random scores of `_random_case`: the reshaped function must give them unit for unit.
FROZEN_PLANS = {
    0: {10: (4, 62), 11: (4, 82), 12: (4, 86)},
    1: {10: (3, 10), 11: (4, 16), 12: (9, 26), 13: (9, 34)},
    2: {10: (4, 1), 11: (4, 12), 12: (3, 31), 13: (4, 36), 14: (2, 37)},
    3: {10: (1, 24), 11: (1, 24), 12: (1, 31)},
    4: {10: (9, 8), 11: (9, 20), 12: (9, 32), 13: (9, 33)},
    5: {10: (6, 64), 11: (2, 64), 12: (5, 64), 13: (3, 64), 14: (2, 64)},
    6: {10: (4, 10), 11: (1, 31), 12: (4, 49)},
    7: {10: (3, 10), 11: (3, 10), 12: (3, 10), 13: (3, 10)},
}


def _random_case(t, rng):
  """Case t: 3-5 blocks of one of three shapes (GQA 4/2, GQA 9/3, MHA 6), bias and gating
  flags, a budget of 10-70 %, and every option of `adaptive` on in some case."""
  n = 3 + t % 3
  specs = [LayerSpec([4, 9, 6][t % 3], [2, 3, 6][t % 3], 16, [96, 40, 64][t % 3])] * n
  c = allocate.Costs(64, 16, bool(t % 2), t % 3 == 0, t % 4 == 0, t % 5 != 0)
  hs = [rng.normal(size=s.num_heads) for s in specs]
  cs = [rng.gamma(2.0, size=s.ffn_dim) * (1 + i) for i, s in enumerate(specs)]
  dense = c.attn(specs[0].num_heads, specs[0].num_kv_heads) + c.mlp(specs[0].ffn_dim)
  budget = [0.1, 0.3, 0.5, 0.7][t % 4] * n * dense
  kw = dict(free_groups=t == 5, standardize=t % 2 == 0, per_param=t in (3, 6), min_keep=[0.0, 0.25][t % 2])
  return _scores(specs, [c] * n, hs, cs, first=10), budget, kw


def test_adaptive_gives_the_frozen_plans_of_the_list_based_version():
  rng = np.random.default_rng(7)
  for t, want in FROZEN_PLANS.items():
    layers, budget, kw = _random_case(t, rng)
    got = allocate.adaptive(layers, budget, **kw)
    assert {i: (p.heads, p.channels) for i, p in got.items()} == want, (t, kw)


def test_ranked_units_are_typed_records_in_key_order():
  layers, _, _ = _random_case(1, np.random.default_rng(0))
  units = allocate.ranked_units(layers, standardize=True, per_param=False)
  assert len(units) == sum(ls.spec.num_heads + ls.spec.ffn_dim for ls in layers)
  assert [u.z for u in units] == sorted(u.z for u in units)
  assert {u.kind for u in units} == {allocate.UnitKind.HEAD, allocate.UnitKind.CHANNEL}
  assert allocate.UnitKind.HEAD == "head"  # a member still equals its string
  heads = [u for u in units if u.kind is allocate.UnitKind.HEAD]
  assert len(heads) == sum(ls.spec.num_heads for ls in layers)
  assert all(u.cost == layers[u.pos].costs.per_channel for u in units if u.kind is allocate.UnitKind.CHANNEL)
