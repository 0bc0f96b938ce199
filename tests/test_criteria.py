"""Criteria against direct computations on tiny modules; head similarity selection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import allocate, criteria, placement
from jaxprune.criteria.stats import ModuleStats
from jaxprune.errors import UsageError
from jaxprune.models import adapter as A
from jaxprune.models import layers as L
from jaxprune.stats import moments
from tests.numerics import assert_within_sum_bound

CFG = L.BlockConfig(norm="rms", eps=1e-6, act="silu", gated=True, rope=None, sliding_window=None, kv_map=None)


def _mlp(rng, D=6, F=5, gated=False, bias=False):
  p = {"up": {"kernel": rng.normal(size=(D, F))}, "down": {"kernel": rng.normal(size=(F, D))}}
  if gated:
    p["gate"] = {"kernel": rng.normal(size=(D, F))}
  if bias:
    for k in p:
      p[k]["bias"] = rng.normal(size=(p[k]["kernel"].shape[1],))
  return {k: {n: jnp.asarray(v, jnp.float32) for n, v in d.items()} for k, d in p.items()}


def test_second_moment_equals_removed_output_energy_of_a_relu_module():
  """With ReLU and a sign-symmetric input set, E[relu(z)^2] = E[z^2] / 2 exactly, so the
  metric 1/2 ||b_j||^2 E[(x a_j)^2] is the energy the module's output loses without channel j."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(200, 6))
  x = np.concatenate([x, -x])  # symmetric: z and -z equally often
  p = _mlp(rng)
  a, b = np.asarray(p["up"]["kernel"], np.float64), np.asarray(p["down"]["kernel"], np.float64)
  h = np.maximum(x @ a, 0)
  full = h @ b
  removed = []
  for j in range(5):
    keep = np.arange(5) != j
    removed.append(np.mean(np.sum((full - h[:, keep] @ b[keep]) ** 2, axis=1)))
  stats = ModuleStats(inputs=moments.update(moments.init(6), jnp.asarray(x, jnp.float32)))
  got = np.asarray(criteria.second_moment(A.MLP, p, stats))
  # Worst case of float32 (tests/numerics.py, point 1): the Gram is a 400-term sum, the
  # quadratic form two (D+1)-term sums, plus rounding x to float32 and a few products; the
  # same expression on absolute values bounds the sum of |terms|.
  abs_terms = 0.5 * np.sum(b ** 2, 1) * np.mean((np.abs(x) @ np.abs(a)) ** 2, axis=0)
  assert_within_sum_bound(got, removed, abs_terms, 400 + 2 * 7 + 8, "relu metric")


@pytest.mark.parametrize("gated,bias", [(True, False), (False, True)])
def test_output_energy_is_exact_for_any_activation(gated, bias):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(64, 6)).astype(np.float32)
  p = _mlp(rng, gated=gated, bias=bias)
  cfg = CFG if gated else L.BlockConfig("layer", 1e-5, "gelu_tanh", False, None, None, None)
  h, _ = A.inner(A.MLP, cfg, p, jnp.asarray(x)[None], None)
  h = np.asarray(h[0], np.float64)
  b = np.asarray(p["down"]["kernel"], np.float64)
  want = [np.mean(np.sum(np.outer(h[:, j], b[j]) ** 2, axis=1)) for j in range(5)]
  stats = ModuleStats(inputs=moments.update(moments.init(6), jnp.asarray(x)),
                      hidden=moments.update(moments.init(5), jnp.asarray(h, jnp.float32)))
  # Nonnegative terms: a 64-term sum of squares, a D-term row norm, h rounded to float32.
  assert_within_sum_bound(criteria.output_energy(A.MLP, p, stats), want, want, 64 + 6 + 8, "output energy")


def test_gated_metric_is_the_product_of_up_and_gate_forms():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(50, 6)).astype(np.float32)
  p = _mlp(rng, gated=True)
  stats = ModuleStats(inputs=moments.update(moments.init(6), jnp.asarray(x)))
  b2 = np.sum(np.asarray(p["down"]["kernel"], np.float64) ** 2, axis=1)
  def form(k, f=lambda v: v):
    z = f(x.astype(np.float64)) @ f(np.asarray(p[k]["kernel"], np.float64))
    return 0.5 * b2 * np.mean(z ** 2, axis=0)
  # |d(PQ)| <= |dP| |Q| + |P| |dQ| (+ second order), each form bounded as in the ReLU test above.
  up, gate = form("up"), form("gate")
  abs_terms = form("up", np.abs) * gate + up * form("gate", np.abs)
  assert_within_sum_bound(criteria.second_moment(A.MLP, p, stats), up * gate, abs_terms, 50 + 2 * 7 + 10,
                          "gated metric")


def _attn(rng, D=8, N=4, K=2, H=3):
  return {"q": {"kernel": jnp.asarray(rng.normal(size=(D, N, H)), jnp.float32)},
          "k": {"kernel": jnp.asarray(rng.normal(size=(D, K, H)), jnp.float32)},
          "v": {"kernel": jnp.asarray(rng.normal(size=(D, K, H)), jnp.float32)},
          "o": {"kernel": jnp.asarray(rng.normal(size=(N, H, D)), jnp.float32)}}


def test_head_metric_sums_its_channels_removed_energy():
  rng = np.random.default_rng(3)
  p = _attn(rng)
  x = jnp.asarray(rng.normal(size=(2, 7, 8)), jnp.float32)
  heads, _ = A.inner(A.ATTN, CFG, p, x, jnp.arange(7)[None])
  v = np.asarray(heads, np.float64).reshape(-1, 4, 3)  # tokens, head, channel
  o = np.asarray(p["o"]["kernel"], np.float64)
  # Removing channel c of head i alone loses E[v_ic^2] ||o_ic||^2 of output energy.
  per_channel = np.mean(v ** 2, axis=0) * np.sum(o ** 2, axis=-1)
  stats = ModuleStats(hidden=moments.update(moments.init(12), heads), kv_index=(0, 0, 1, 1))
  # Nonnegative terms only: 14-token sums of squares, D-term row norms, 3 channels.
  n = 14 + 8 + 3 + 4
  want = per_channel.sum(-1)
  assert_within_sum_bound(criteria.second_moment(A.ATTN, p, stats), 0.5 * want, 0.5 * want, n, "head metric")
  assert_within_sum_bound(criteria.output_energy(A.ATTN, p, stats), want, want, n, "head energy")


def test_identity_variant_uses_weight_norms():
  rng = np.random.default_rng(4)
  p = _attn(rng)
  stats = ModuleStats(identity=True, kv_index=(0, 0, 1, 1))
  vn = np.sum(np.asarray(p["v"]["kernel"], np.float64) ** 2, axis=0)[[0, 0, 1, 1]]
  on = np.sum(np.asarray(p["o"]["kernel"], np.float64) ** 2, axis=-1)
  # Sums of squares of weights (nonnegative terms): D-term norms, then 3 channels.
  want = 0.5 * (vn * on).sum(-1)
  assert_within_sum_bound(criteria.second_moment(A.ATTN, p, stats), want, want, 8 + 8 + 3 + 2, "identity heads")
  m = _mlp(rng)
  a, b = np.asarray(m["up"]["kernel"], np.float64), np.asarray(m["down"]["kernel"], np.float64)
  want = 0.5 * np.sum(b ** 2, 1) * np.sum(a ** 2, 0)
  assert_within_sum_bound(criteria.second_moment(A.MLP, m, ModuleStats(identity=True)), want, want, 6 + 6 + 4,
                          "identity channels")


D_EXAMPLE = np.array([[0.00, 0.30, 0.10, 0.50],
                      [0.30, 0.00, 0.05, 0.40],
                      [0.10, 0.05, 0.00, 0.20],
                      [0.50, 0.40, 0.20, 0.00]])


def test_algorithm2_hand_worked_example():
  # tau=0.15: (0,2) selects 0; (1,2) selects 1; head 2 stays as the representative.
  assert criteria.algorithm2(D_EXAMPLE, 0.15) == [0, 1]
  # tau=0.25: additionally (2,3)=0.20 selects 2, since neither 2 nor 3 is selected yet.
  assert criteria.algorithm2(D_EXAMPLE, 0.25) == [0, 1, 2]
  assert criteria.algorithm2(D_EXAMPLE, 0.01) == []
  with pytest.raises(UsageError, match="tau must be positive"):
    criteria.algorithm2(D_EXAMPLE, 0.0)


def test_budgeted_removes_exactly_k_lower_scored_of_similar_pairs():
  scores = np.array([4.0, 3.0, 2.0, 1.0])
  # Most similar pair (1,2): drop 2 (lower score); then (0,1): drop 1.
  assert criteria.budgeted(D_EXAMPLE, scores, 2) == [1, 2]
  assert criteria.budgeted(D_EXAMPLE, scores, 0) == []
  with pytest.raises(UsageError):
    criteria.budgeted(D_EXAMPLE, scores, 4)


def test_search_tau_meets_a_global_budget():
  Ds = [D_EXAMPLE, D_EXAMPLE * 2]
  for budget in (0, 2, 3, 5):
    tau = criteria.search_tau(Ds, budget)
    got = sum(len(criteria.algorithm2(D, tau)) for D in Ds)
    assert abs(got - budget) <= 1


def test_registry_lookup_and_errors():
  assert {"goa", "goa-energy"} <= set(criteria.names())
  with pytest.raises(UsageError, match="unknown pruning method 'nope'"):
    criteria.get("nope")


def _ranks(x):
  return np.argsort(np.argsort(x, kind="stable"), kind="stable")


@pytest.mark.parametrize("width", [1, 2])
def test_refit_aware_order_equals_brute_force_greedy(width):
  """The OBS sweep removes, at every step, the unit whose loss raises the refit error least."""
  rng = np.random.default_rng(5)
  n_units = 5
  U = n_units * width
  x = rng.normal(size=(400, U))
  x[:, 2 * width] = x[:, 3 * width] + 0.05 * rng.normal(size=400)  # two nearly redundant units
  y = x @ rng.normal(size=(U, 3)) + 0.1 * rng.normal(size=(400, 3))
  m = moments.update(moments.init(U, 3), jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
  delta = 1e-6
  lam = delta * np.mean(np.sum(x**2, 0))

  def refit_error(units):
    cols = [u * width + c for u in units for c in range(width)]
    xs = x[:, cols]
    w = np.linalg.solve(xs.T @ xs + lam * np.eye(len(cols)), xs.T @ y)
    return np.sum((xs @ w - y) ** 2) + lam * np.sum(w ** 2)

  alive, want = list(range(n_units)), {}
  for t in range(n_units - 1):
    best = min(alive, key=lambda u: refit_error([v for v in alive if v != u]))
    want[best] = t
    alive.remove(best)
  want[alive[0]] = n_units - 1
  if width == 1:
    kind, p = A.MLP, _mlp(rng, F=U)
  else:
    kind, p = A.ATTN, _attn(rng, N=n_units, K=n_units, H=width)
  stats = ModuleStats(hidden=m, damping=delta)
  got = np.asarray(criteria.get("goa-obs").score(kind, p, stats))
  np.testing.assert_array_equal(_ranks(got), [want[u] for u in range(n_units)])


@pytest.mark.parametrize("per_step_units", [40, 300])  # one unit per step, and 3 per step
def test_refit_aware_stopped_at_n_remove_keeps_the_full_sweeps_prefix(per_step_units):
  """With n_remove the sweep stops there: the units it removes, their order and their costs
  are the full sweep's (to the bit), every other unit scores above them, so keeping the top
  n - n_remove selects the same channels."""
  from jaxprune.criteria import obs_sweep
  rng = np.random.default_rng(11)
  F, T = per_step_units, 2000
  x = rng.normal(size=(T, F)) @ (np.eye(F) + 0.3 * rng.normal(size=(F, F)))
  y = x @ rng.normal(size=(F, 4)) + 0.5 * rng.normal(size=(T, 4))
  m = moments.update(moments.init(F, 4), jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
  p = _mlp(rng, F=F)
  full = criteria.get("goa-obs").score(A.MLP, p, ModuleStats(hidden=m, damping=1e-5, intercept=True))
  per_step = obs_sweep.step_size(F)
  for n_remove in (1, per_step + 1, F // 3, F - 1):
    part = criteria.get("goa-obs").score(A.MLP, p, ModuleStats(hidden=m, damping=1e-5, intercept=True,
                                                                   n_remove=n_remove))
    gone = np.argsort(full, kind="stable")[:n_remove]
    np.testing.assert_array_equal(np.argsort(part, kind="stable")[:n_remove], gone)
    np.testing.assert_array_equal(part[gone], full[gone])
    assert np.min(np.delete(part, gone)) > np.max(part[gone])
    keep = F - n_remove
    np.testing.assert_array_equal(allocate.choose_channels(part, keep), allocate.choose_channels(full, keep))


def _eager_sweep(ginv, w, width, per_step, n_remove):
  """The textbook sweep in numpy float64: G^-1 and W rewritten by the joint update of each
  step's per_step cheapest units. Returns (order of the removed units, their costs)."""
  n = (ginv.shape[0] - 1) // width  # the ones column is last
  alive, gone, paid = np.ones(n, bool), [], []
  while len(gone) < n_remove:
    cost = np.full(n, np.inf)
    for j in np.flatnonzero(alive):
      c = slice(j * width, (j + 1) * width)
      cost[j] = np.sum(w[c] * np.linalg.solve(ginv[c, c], w[c]))
    take = np.argsort(cost, kind="stable")[:min(per_step, n_remove - len(gone))]
    cols = np.concatenate([np.arange(j * width, (j + 1) * width) for j in take])
    m = np.linalg.inv(ginv[np.ix_(cols, cols)])
    ginv, w = ginv - ginv[:, cols] @ m @ ginv[cols], w - ginv[:, cols] @ m @ w[cols]
    alive[take] = False
    gone += list(take)
    paid += list(cost[take])
  return np.asarray(gone), np.asarray(paid)


@pytest.mark.parametrize("width,n_units", [(1, 1100), (64, 17)])
def test_factored_obs_sweep_is_the_textbook_sweep(width, n_units):
  """The sweep keeps G^-1 as its first inverse less U U^T and reads only the rows it removes;
  it must remove the units the textbook sweep removes (G^-1 and W rewritten at every step),
  in the same order (ties within a step aside: a step's units go together), at the same
  costs to float64 rounding (G is well conditioned here, cond ~ 10: errors near
  d cond eps ~ 1e-12, bounded at 1e-9)."""
  from jaxprune.criteria import obs_sweep as O
  rng = np.random.default_rng(3)
  U, T = n_units * width, 3000
  x = rng.normal(size=(T, U)) @ (np.eye(U) + 0.05 * rng.normal(size=(U, U)))
  y = x @ rng.normal(size=(U, 8)) + 0.5 * rng.normal(size=(T, 8))
  m = moments.update(moments.init(U, 8), jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
  per_step = O.step_size(n_units)
  with jax.enable_x64(True):
    ginv = O.ridge_inverse(m.xx, 1e-5, True)
    xy = jnp.asarray(m.xy, jnp.float64)
    for n_remove in (n_units - 1, n_units // 2):
      order, paid = O.removal_order(ginv, xy, width, True, per_step, n_remove)
      gone, cost = _eager_sweep(np.asarray(ginv), np.asarray(ginv @ xy), width, per_step, n_remove)
      steps = lambda units: np.asarray(units) // per_step
      np.testing.assert_array_equal(steps(order[gone]), steps(np.arange(n_remove)))  # each unit in its step
      np.testing.assert_allclose(paid[gone], cost, rtol=1e-9)
      assert np.all(order[np.setdiff1d(np.arange(n_units), gone)] >= n_remove)


def test_blocked_obs_sweep_equals_the_exact_one_on_uncorrelated_blocks():
  """Channels of different blocks never fire on the same token, so the Gram matrix is
  block-diagonal, the refit error is a sum over blocks, and the exact greedy sweep
  interleaves the blocks' own sweeps by cost: the blocked form must give its order."""
  from jaxprune.criteria.output_approx import refit_aware
  rng = np.random.default_rng(8)
  U, T = 8, 600
  x = np.zeros((T, U))
  x[:300, :4] = rng.normal(size=(300, 4)) * rng.uniform(0.2, 2.0, size=4)
  x[300:, 4:] = rng.normal(size=(300, 4)) * rng.uniform(0.2, 2.0, size=4)
  x[:, 1] += 0.3 * x[:, 2]  # some correlation inside a block
  y = x @ rng.normal(size=(U, 3)) + 0.1 * rng.normal(size=(T, 3))
  m = moments.update(moments.init(U, 3), jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
  p = _mlp(rng, F=U)
  stats = ModuleStats(hidden=m, damping=1e-6)
  exact = _ranks(refit_aware(A.MLP, p, stats))
  np.testing.assert_array_equal(_ranks(refit_aware(A.MLP, p, stats, block=U)), exact)
  np.testing.assert_array_equal(_ranks(refit_aware(A.MLP, p, stats, block=4)), exact)


def _dense_sweep_stats(x2, w2a, shrink, intercept, skip=0):
  """The plan's statistics of a dense module from its full Gram matrix: X2's moments with
  the cross moment of its own output X2 W + b, shrunk."""
  m = moments.sums(jnp.asarray(x2[:, :, skip:], jnp.float32))
  m = moments.shrink(moments.Moments(m.xx, m.xx @ jnp.asarray(w2a)), shrink, w2a)
  return ModuleStats(hidden=m, damping=1e-5, intercept=intercept)


def test_plan_costs_from_the_stream_equal_the_gram_sweep_in_one_block():
  """With one block the plan's costs formed from X2 itself are the exact sweep's on the
  shrunk full Gram matrix with the dense cross moment (first positions skipped)."""
  from jaxprune.criteria.output_approx import refit_aware, refit_aware_stream
  rng = np.random.default_rng(9)
  U, D = 10, 4
  x2 = (rng.normal(size=(2, 3, 20, U)) * rng.uniform(0.2, 2, size=U) + 0.3 * rng.normal(size=U)).astype(np.float32)
  p = _mlp(rng, D=D, F=U)
  w2a = np.concatenate([np.asarray(p["down"]["kernel"]), rng.normal(size=(1, D))]).astype(np.float32)
  stats = _dense_sweep_stats(x2, w2a, 0.25, True, skip=2)
  want = refit_aware(A.MLP, p, stats)
  got = refit_aware_stream(A.MLP, p, stats, jnp.asarray(x2), w2a, 0.25, skip=2, block=U)
  np.testing.assert_array_equal(_ranks(got), _ranks(want))


def test_plan_costs_from_the_stream_on_uncorrelated_blocks_are_the_exact_sweeps():
  """Channels of different blocks never fire on the same token: the Gram matrix is
  block-diagonal, so the blocks formed from X2 lose nothing and the exact sweep's order
  (on the whole Gram matrix) is the blocked one's."""
  from jaxprune.criteria.output_approx import refit_aware, refit_aware_stream
  rng = np.random.default_rng(8)
  U, T = 8, 300
  x2 = np.zeros((1, 2, T, U), np.float32)
  x2[:, 0, :, :4] = rng.normal(size=(T, 4)) * rng.uniform(0.2, 2.0, size=4)
  x2[:, 1, :, 4:] = rng.normal(size=(T, 4)) * rng.uniform(0.2, 2.0, size=4)
  x2[..., 1] += 0.3 * x2[..., 2]  # some correlation inside a block
  p = _mlp(rng, D=3, F=U)
  w2a = np.concatenate([np.asarray(p["down"]["kernel"]), np.zeros((1, 3))]).astype(np.float32)
  stats = _dense_sweep_stats(x2, w2a, 0.0, False)
  got = refit_aware_stream(A.MLP, p, stats, jnp.asarray(x2), w2a, 0.0, block=4)
  np.testing.assert_array_equal(_ranks(got), _ranks(refit_aware(A.MLP, p, stats)))


def test_host_sweep_blocks_hold_blas_to_one_thread_and_give_it_back(monkeypatch):
  """The plan's small host blocks run on one BLAS thread (placement.serial_blas) and leave
  the pools as they found them; systems of SERIAL_BLAS_BELOW rows or more keep the pools."""
  from threadpoolctl import threadpool_info, threadpool_limits
  from jaxprune import placement
  from jaxprune.criteria import obs_sweep, output_approx

  def pools():
    return {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

  seen = []
  real = obs_sweep.ridge_inverse

  def spy(xx, delta, intercept):
    seen.append(pools())
    return real(xx, delta, intercept)

  monkeypatch.setattr(obs_sweep, "ridge_inverse", spy)
  rng = np.random.default_rng(8)
  x2 = rng.normal(size=(1, 2, 50, 8)).astype(np.float32)
  p = _mlp(rng, D=3, F=8)
  w2a = np.concatenate([np.asarray(p["down"]["kernel"]), np.zeros((1, 3))]).astype(np.float32)
  stats = _dense_sweep_stats(x2, w2a, 0.0, True)
  with threadpool_limits(2, user_api="blas"):  # a pool of two, whatever the machine's default
    before = pools()
    assert before and set(before.values()) == {2}
    output_approx.refit_aware_stream(A.MLP, p, stats, jnp.asarray(x2), w2a, 0.0, block=4)
    assert len(seen) == 2 and all(set(s.values()) == {1} for s in seen)
    assert pools() == before
    monkeypatch.setattr(placement, "SERIAL_BLAS_BELOW", 5)  # the blocks' 5-row systems count as large
    output_approx.refit_aware_stream(A.MLP, p, stats, jnp.asarray(x2), w2a, 0.0, block=4)
    assert seen[2:] == [before, before]


def test_blocked_sweep_stopped_at_n_remove_removes_what_the_full_one_removes():
  """Each block's sweep stops at n_remove: the n_remove lowest merged scores are the same units,
  in the same order, as with every block swept to the end."""
  from jaxprune.criteria.output_approx import refit_aware
  rng = np.random.default_rng(11)
  U, T = 24, 400
  x = rng.normal(size=(T, U)) @ rng.normal(size=(U, U)) * 0.3 + rng.normal(size=(T, U)) * rng.uniform(0.2, 2, U)
  y = x @ rng.normal(size=(U, 3)) + 0.1 * rng.normal(size=(T, 3))
  m = moments.update(moments.init(U, 3), jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
  p = _mlp(rng, F=U)
  full = np.asarray(refit_aware(A.MLP, p, ModuleStats(hidden=m, damping=1e-6, intercept=True), block=8))
  for n_remove in (3, 10, 17):
    part = np.asarray(refit_aware(A.MLP, p, ModuleStats(hidden=m, damping=1e-6, intercept=True, n_remove=n_remove),
                                  block=8))
    np.testing.assert_array_equal(np.argsort(part, kind="stable")[:n_remove],
                                  np.argsort(full, kind="stable")[:n_remove])


def test_blocked_sweep_goes_further_only_in_blocks_the_removals_reach(monkeypatch):
  """A block's sweep first stops a little past its share of the removals; a block holding
  most of the cheap channels is swept again, further. The units that go, their order and
  their scores are those of every block swept to n_remove."""
  from jaxprune.criteria import obs_sweep
  from jaxprune.criteria import output_approx as O
  rng = np.random.default_rng(12)
  U, T = 32, 500
  x = rng.normal(size=(T, U)) @ (np.eye(U) + 0.2 * rng.normal(size=(U, U)))
  w = rng.normal(size=(U, 3))
  w[:8] *= 0.01  # the first block's channels add almost nothing to the output
  y = x @ w + 0.1 * rng.normal(size=(T, 3))
  m = moments.update(moments.init(U, 3), jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
  p = _mlp(rng, F=U)
  depths = []
  real = obs_sweep.removal_order
  monkeypatch.setattr(obs_sweep, "removal_order", lambda *a: depths.append(a[-1]) or real(*a))

  def scores(margin, stats):
    monkeypatch.setattr(O, "BLOCK_DEPTH_MARGIN", margin)
    depths.clear()
    return np.asarray(O.refit_aware(A.MLP, p, stats, block=8)), list(depths)

  for n_remove in (6, 12):
    stats = ModuleStats(hidden=m, damping=1e-6, intercept=True, n_remove=n_remove)
    want, deep = scores(10**6, stats)  # every block swept to n_remove at once
    assert deep == [min(7, n_remove)] * 4
    got, steps = scores(1, stats)
    assert len(steps) > 4 and steps[0] < deep[0], steps  # stopped short at first, then the first block again
    go = np.argsort(want, kind="stable")[:n_remove]
    np.testing.assert_array_equal(np.argsort(got, kind="stable")[:n_remove], go)
    np.testing.assert_array_equal(got[go], want[go])
    assert np.all(np.delete(got, go) > got[go].max())


def test_fully_shrunk_refit_aware_order_is_flaps_fluctuation():
  """With the covariance shrunk to its diagonal the greedy OBS cost of a channel is
  var_j ||w_j||^2 (FLAP's fluctuation, its own weights W2), so the order is FLAP's."""
  rng = np.random.default_rng(7)
  F = 12
  x = rng.normal(size=(500, F)) @ rng.normal(size=(F, F)) * rng.uniform(0.2, 3, size=F) + rng.normal(size=F)
  p = _mlp(rng, F=F)
  w2 = np.asarray(p["down"]["kernel"], np.float64)
  b2 = np.zeros(w2.shape[1])
  y = x @ w2 + 0.2 * rng.normal(size=(500, w2.shape[1]))
  m = moments.update(moments.init(F, w2.shape[1]), jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
  m = moments.shrink(m, 1.0, np.concatenate([w2, b2[None]], 0))
  got = np.asarray(criteria.get("goa-obs").score(A.MLP, p, ModuleStats(hidden=m, damping=1e-9, intercept=True)))
  fluct = x.var(0) * np.sum(w2**2, 1)
  np.testing.assert_array_equal(np.argsort(got), np.argsort(fluct))


def test_blocked_obs_sweeps_run_side_by_side_on_the_devices(monkeypatch):
  """Where the solves run on the devices (GPUs: here forced on 8 host CPU devices), the
  blocks of a wide module's sweep go one a device, each from its own thread; the scores are
  those of the same sweeps run one after another on one device, bit for bit."""
  from jaxprune.criteria import obs_sweep
  from jaxprune.criteria import output_approx as O

  assert len(jax.local_devices()) == 8
  monkeypatch.setattr(placement, "lapack_solves", lambda: False)
  rng = np.random.default_rng(11)
  U, T = 48, 400
  x = rng.normal(size=(T, U)) @ (np.eye(U) + 0.1 * rng.normal(size=(U, U)))
  y = x @ rng.normal(size=(U, 4)) + 0.3 * rng.normal(size=(T, 4))
  m = moments.update(moments.init(U, 4), jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
  p, stats = _mlp(rng, F=U), ModuleStats(hidden=m, damping=1e-5, intercept=True)
  where = []
  order = obs_sweep.removal_order
  monkeypatch.setattr(obs_sweep, "removal_order", lambda ginv, *a: where.append(ginv.devices()) or order(ginv, *a))
  side_by_side = np.asarray(O.refit_aware(A.MLP, p, stats, block=8))  # 6 blocks
  assert len(where) == 6 and len({d for s in where for d in s}) == 6, where
  one = jax.local_devices()[:1]
  monkeypatch.setattr(O.jax, "local_devices", lambda *a, **k: one)
  where.clear()
  serial = np.asarray(O.refit_aware(A.MLP, p, stats, block=8))
  assert len(where) == 6 and len({d for s in where for d in s}) == 1, where  # one after another, one device
  np.testing.assert_array_equal(side_by_side, serial)
