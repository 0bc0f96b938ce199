"""Allocation: GQA-feasible head sets, budgets that land on the ratio."""

import itertools

import numpy as np
import pytest

from jaxprune import allocate
from jaxprune.errors import UsageError
from jaxprune.spec import LayerSpec

SMOL = LayerSpec(9, 3, 64, 1536)


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
    plans = allocate.adaptive([0, 1, 2], specs, [c] * 3, hs, cs, ratio * 3 * dense)
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
