"""Least-squares reconstruction from sufficient statistics."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import reconstruct
from jaxprune.stats import moments


def _moments(x, y):
  m = moments.update(moments.init(x.shape[1], y.shape[1]), jnp.asarray(x), jnp.asarray(y))
  return m, float(np.sum(y.astype(np.float64)**2))


def _objective(x, y, w, lam, intercept):
  xa = np.concatenate([x, np.ones((len(x), 1))], 1) if intercept else x
  ridge = lam * np.sum(w[:x.shape[1]]**2)
  return np.sum((xa @ w - y)**2) + ridge


@pytest.mark.parametrize("intercept", [False, True])
def test_solution_is_optimal(intercept):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(400, 12)) * rng.uniform(0.1, 3, size=12)
  y = rng.normal(size=(400, 5)) + 2.0
  m, yy = _moments(x.astype(np.float32), y.astype(np.float32))
  delta = 1e-3
  w, info = reconstruct.ridge_solve(m, m.xy, delta, intercept)
  w = np.asarray(w, np.float64)
  assert info.retries == 0 and w.shape == (13 if intercept else 12, 5)
  lam = delta * np.mean(np.sum(x**2, 0))
  # Gradient of the damped objective vanishes (relative to its scale)...
  xa = np.concatenate([x, np.ones((400, 1))], 1) if intercept else x
  grad = 2 * xa.T @ (xa @ w - y) + 2 * lam * np.concatenate([w[:12], np.zeros((len(w) - 12, 5))])
  assert np.max(np.abs(grad)) < 1e-3 * np.max(np.abs(2 * xa.T @ y))
  # ... and no random perturbation does better.
  best = _objective(x, y, w, lam, intercept)
  for _ in range(50):
    assert _objective(x, y, w + 1e-3 * rng.normal(size=w.shape), lam, intercept) > best
  # The residual computed from the sums matches the direct one.
  r = float(reconstruct.residual(m, m.xy, yy, jnp.asarray(w, jnp.float32)))
  assert r == pytest.approx(np.sum((xa @ w - y)**2), rel=1e-4)


def test_exact_recovery_when_representable():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(300, 8))
  w_true = rng.normal(size=(8, 3))
  b_true = rng.normal(size=3)
  y = x @ w_true + b_true
  m, _ = _moments(x.astype(np.float32), y.astype(np.float32))
  w, _ = reconstruct.ridge_solve(m, m.xy, 1e-9, intercept=True)
  np.testing.assert_allclose(np.asarray(w)[:8], w_true, atol=2e-4)
  np.testing.assert_allclose(np.asarray(w)[8], b_true, atol=2e-4)


def test_without_intercept_bias_is_not_fitted():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(300, 4))
  y = x @ rng.normal(size=(4, 2)) + 5.0  # an offset a bias-free fit cannot absorb
  m, yy = _moments(x.astype(np.float32), y.astype(np.float32))
  w0, _ = reconstruct.ridge_solve(m, m.xy, 1e-6, intercept=False)
  w1, _ = reconstruct.ridge_solve(m, m.xy, 1e-6, intercept=True)
  assert w0.shape == (4, 2) and w1.shape == (5, 2)
  np.testing.assert_allclose(np.asarray(w1)[4], 5.0, atol=1e-3)
  assert float(reconstruct.residual(m, m.xy, yy, w1)) < 1e-3 * float(reconstruct.residual(m, m.xy, yy, w0))


def test_dead_inputs_and_retry_are_handled():
  x = np.zeros((50, 6), np.float32)
  x[:, :3] = np.random.default_rng(3).normal(size=(50, 3))  # three inputs never fire
  y = x[:, :2] * 2
  m, _ = _moments(x, y)
  w, info = reconstruct.ridge_solve(m, m.xy, 1e-3, intercept=False)
  assert np.all(np.isfinite(np.asarray(w)))
  np.testing.assert_allclose(np.asarray(w)[3:], 0.0, atol=1e-6)
  # A non-finite Gram cannot be solved at any damping: a clear error, not NaN weights.
  bad = moments.Moments(m.xx.at[0, 0].set(jnp.nan), m.xy)
  with pytest.raises(FloatingPointError, match="not finite"):
    reconstruct.ridge_solve(bad, bad.xy, 1e-3, intercept=False)


def test_failed_factorisation_retries_with_more_damping():
  # Not positive definite at delta=1e-3 (lam ~ 5e-4 < 4e-3) but fine at 1e-2.
  xx = jnp.asarray([[1.0, 0.0, 0.0], [0.0, -0.004, 0.0], [0.0, 0.0, 10.0]], jnp.float32)
  xy = jnp.ones((3, 1), jnp.float32)
  w, info = reconstruct.ridge_solve(moments.Moments(xx, xy), xy, 1e-3, intercept=False)
  assert info.retries == 1 and info.delta == pytest.approx(1e-2)
  assert np.all(np.isfinite(np.asarray(w)))


def test_replicated_statistics_are_solved_once_and_stay_replicated():
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P

  from jaxprune import sharding

  rng = np.random.default_rng(3)
  x, y = rng.normal(size=(64, 6)).astype(np.float32), rng.normal(size=(64, 2)).astype(np.float32)
  m, _ = _moments(x, y)
  mesh = sharding.make_mesh()
  assert mesh.devices.size == 8
  rep = NamedSharding(mesh, P())
  m8 = jax.tree.map(lambda a: jax.device_put(a, rep), m)
  assert len(sharding.local_copy(m8.xx).sharding.device_set) == 1
  w1, _ = reconstruct.ridge_solve(m, m.xy, 1e-3, True)
  w8, _ = reconstruct.ridge_solve(m8, m8.xy, 1e-3, True)
  assert w8.sharding.is_equivalent_to(rep, w8.ndim)
  np.testing.assert_array_equal(np.asarray(w8), np.asarray(w1))
