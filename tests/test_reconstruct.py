"""Least-squares reconstruction from sufficient statistics."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import placement, reconstruct
from jaxprune.stats import moments
from tests.numerics import U32, assert_within, gamma


def _moments(x, y):
  m = moments.update(moments.init(x.shape[1], y.shape[1]), jnp.asarray(x), jnp.asarray(y))
  return m, float(np.sum(y.astype(np.float64)**2))


def _objective(x, y, w, lam, intercept):
  xa = np.concatenate([x, np.ones((len(x), 1))], 1) if intercept else x
  ridge = lam * np.sum(w[:x.shape[1]]**2)
  return np.sum((xa @ w - y)**2) + ridge


def _aug(x, intercept):
  return np.concatenate([x, np.ones((len(x), 1))], 1) if intercept else x


def _ridge64(x, y, delta, intercept):
  """The float64 solution of the system ridge_solve solves, and its matrix A."""
  xa = _aug(x, intercept)
  lam = delta * np.mean(np.sum(x**2, 0))
  a = xa.T @ xa + np.diag([lam] * x.shape[1] + [0.0] * (xa.shape[1] - x.shape[1]))
  return np.linalg.solve(a, xa.T @ y), a


def _solve_bound(x, y, w, a):
  """Elementwise first-order bound on |w_float32_stats - w_exact| (tests/numerics.py, point 1).

  ridge_solve solves (A + dA) w' = b + db in float64, where dA, db are the float32
  sums' errors (and x, y rounded to float32): |dA| <= gamma(N+4) |X|^T|X|, |db| <=
  gamma(N+4) |X|^T|Y|. Then |w' - w| <= |A^-1| (|dA| |w| + |db|), plus rounding w' to float32.
  """
  xa = np.abs(_aug(x, a.shape[0] > x.shape[1]))
  g = gamma(len(x) + 4)
  return np.abs(np.linalg.inv(a)) @ (g * (xa.T @ xa @ np.abs(w) + xa.T @ np.abs(y))) + U32 * np.abs(w)


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
  xa = _aug(x, intercept)
  grad = 2 * xa.T @ (xa @ w - y) + 2 * lam * np.concatenate([w[:12], np.zeros((len(w) - 12, 5))])
  # w solves (A + dA) w = b + db exactly (float64) up to rounding w to float32, so the
  # gradient 2 (A w - b) = 2 (db - dA w) is bounded by the float32 sums' errors (see _solve_bound).
  ax = np.abs(xa)
  a = xa.T @ xa + lam * np.diag([1.0] * 12 + [0.0] * (len(w) - 12))
  bound = 2 * gamma(400 + 4) * (ax.T @ ax @ np.abs(w) + ax.T @ np.abs(y)) + 2 * U32 * np.abs(a) @ np.abs(w)
  assert_within(grad, np.zeros_like(grad), bound, "ridge gradient")
  # ... and no random perturbation does better.
  best = _objective(x, y, w, lam, intercept)
  for _ in range(50):
    assert _objective(x, y, w + 1e-3 * rng.normal(size=w.shape), lam, intercept) > best
  # The residual computed from the sums matches the direct one.
  w32 = np.asarray(jnp.asarray(w, jnp.float32), np.float64)
  r = float(reconstruct.residual(m, m.xy, yy, jnp.asarray(w32, jnp.float32)))
  # r = w^T G w - 2 w^T X^T Y + ||Y||^2 from float32 sums: each part off by gamma(N+4) times
  # its absolute-value form; the float64 arithmetic on top adds nothing comparable.
  aw = np.abs(w32)
  bound = gamma(400 + 4) * (np.sum(aw * (ax.T @ ax @ aw)) + 2 * np.sum(aw * (ax.T @ np.abs(y))) + np.sum(y**2))
  assert_within(r, np.sum((xa @ w32 - y)**2), bound, "residual from sums")


def test_exact_recovery_when_representable():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(300, 8))
  w_true = rng.normal(size=(8, 3))
  b_true = rng.normal(size=3)
  y = x @ w_true + b_true
  m, _ = _moments(x.astype(np.float32), y.astype(np.float32))
  w, _ = reconstruct.ridge_solve(m, m.xy, 1e-9, intercept=True)
  exact, a = _ridge64(x, y, 1e-9, True)
  # The float64 solution recovers the truth up to the damping (lam ~ 3e-7 against Gram
  # eigenvalues ~ 300: relative 1e-9) and float64 rounding.
  np.testing.assert_allclose(exact, np.vstack([w_true, b_true]), atol=1e-7)
  assert_within(w, exact, _solve_bound(x, y, exact, a), "exact recovery")


def test_without_intercept_bias_is_not_fitted():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(300, 4))
  y = x @ rng.normal(size=(4, 2)) + 5.0  # an offset a bias-free fit cannot absorb
  m, yy = _moments(x.astype(np.float32), y.astype(np.float32))
  w0, _ = reconstruct.ridge_solve(m, m.xy, 1e-6, intercept=False)
  w1, _ = reconstruct.ridge_solve(m, m.xy, 1e-6, intercept=True)
  assert w0.shape == (4, 2) and w1.shape == (5, 2)
  exact, a = _ridge64(x, y, 1e-6, True)
  np.testing.assert_allclose(exact[4], 5.0, atol=1e-4)  # float64: damping moves it by ~1e-6 relative
  assert_within(w1, exact, _solve_bound(x, y, exact, a), "intercept")
  # The bias-free fit leaves the offset: 25 per entry against ~0 with the intercept.
  assert float(reconstruct.residual(m, m.xy, yy, w1)) < 1e-3 * float(reconstruct.residual(m, m.xy, yy, w0))


def test_dead_inputs_and_retry_are_handled():
  x = np.zeros((50, 6), np.float32)
  x[:, :3] = np.random.default_rng(3).normal(size=(50, 3))  # three inputs never fire
  y = x[:, :2] * 2
  m, _ = _moments(x, y)
  w, info = reconstruct.ridge_solve(m, m.xy, 1e-3, intercept=False)
  assert np.all(np.isfinite(np.asarray(w)))
  # Dead inputs have all-zero Gram rows and cross moments (exact zeros in float32), so their
  # weights solve lam * w = 0: exactly zero up to the Cholesky's rounding of zero right-hand sides.
  np.testing.assert_array_equal(np.asarray(w)[3:], 0.0)
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
  assert len(placement.local_copy(m8.xx).sharding.device_set) == 1
  w1, _ = reconstruct.ridge_solve(m, m.xy, 1e-3, True)
  w8, _ = reconstruct.ridge_solve(m8, m8.xy, 1e-3, True)
  assert w8.sharding.is_equivalent_to(rep, w8.ndim)
  np.testing.assert_array_equal(np.asarray(w8), np.asarray(w1))


def test_solves_are_float64_even_where_the_accelerator_has_none(monkeypatch):
  """An ill-conditioned Gram (condition > 1e6): the float64 solve matches numpy's float64
  solution, a float32 Cholesky of the same system does not; on a TPU (no float64) the solve
  runs on the host CPU in float64 rather than in float32 on the chip."""
  import jax
  import jax.numpy as jnp

  from jaxprune import reconstruct
  from jaxprune.stats import moments

  rng = np.random.default_rng(3)
  n, d = 4000, 24
  base = rng.normal(size=(n, 4))
  x = base @ rng.normal(size=(4, d)) + 3e-3 * rng.normal(size=(n, d))  # rank 4 + a whisper
  y = x @ rng.normal(size=(d, 3)) + 0.01 * rng.normal(size=(n, 3))
  xa = np.concatenate([x, np.ones((n, 1))], axis=1)
  m = moments.Moments(jnp.asarray(xa.T @ xa, jnp.float32), None)
  xy = jnp.asarray(xa.T @ y, jnp.float32)
  delta = 1e-9
  g = np.asarray(m.xx, np.float64)[:d, :d]
  lam = delta * np.mean(np.diag(g))
  want = np.linalg.solve(g + lam * np.eye(d), np.asarray(xy, np.float64)[:d])
  assert np.linalg.cond(g + lam * np.eye(d)) > 1e6
  got, _ = reconstruct.ridge_solve(m, xy, delta, intercept=False)
  scale = np.max(np.abs(want))
  assert np.max(np.abs(np.asarray(got, np.float64) - want)) < 1e-5 * scale
  g32 = jnp.asarray(g + lam * np.eye(d), jnp.float32)
  f32 = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(g32, lower=True), jnp.asarray(xy)[:d])
  assert not np.max(np.abs(np.asarray(f32, np.float64) - want)) < 1e-3 * scale
  # On a TPU the same code runs on the host CPU, in float64.
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert placement.solve_on_host()
  with placement.float64_solves():
    a = placement.to_solve(m.xx)
    assert a.dtype == jnp.float64 and a.devices() == {jax.devices("cpu")[0]}
  host, _ = reconstruct.ridge_solve(m, xy, delta, intercept=False)
  np.testing.assert_array_equal(np.asarray(host), np.asarray(got))


@pytest.mark.parametrize("intercept", [False, True])
def test_a_solve_reports_the_residual_of_its_own_solution(intercept):
  """The residual from the normal equations' identity (no product with G) equals
  ||[X 1] W - Y||^2 computed from the data for the float64 ridge solution."""
  from jaxprune import reconstruct
  from jaxprune.stats import moments

  rng = np.random.default_rng(4)
  n, d, e = 500, 12, 3
  x = rng.normal(size=(n, d)) + 0.5
  y = x @ rng.normal(size=(d, e)) + 2.0 + 0.3 * rng.normal(size=(n, e))
  xa = np.concatenate([x, np.ones((n, 1))], axis=1)
  m = moments.Moments(jnp.asarray(xa.T @ xa), None)
  xy, yy = jnp.asarray(xa.T @ y), jnp.asarray(np.sum(y ** 2))
  delta = 1e-2
  w, info = reconstruct.ridge_solve(m, xy, delta, intercept, yy=yy)
  g = np.asarray(m.xx, np.float64)  # the float32 sums the solve saw, in float64
  c = np.asarray(xy, np.float64)
  k = d + 1 if intercept else d
  lam = delta * np.mean(np.diag(g)[:d])
  w64 = np.linalg.solve(g[:k, :k] + np.diag([lam] * d + [0.0] * (k - d)), c[:k])
  want = np.sum(w64 * (g[:k, :k] @ w64)) - 2 * np.sum(w64 * c[:k]) + float(yy)
  # Two float64 evaluations of one quantity from float32 sums: agree to float64 rounding of ||Y||^2.
  assert abs(info.residual - want) <= 1e-9 * float(yy)


@pytest.mark.parametrize("intercept", [False, True])
def test_lapack_and_xla_solves_agree(intercept):
  """The CPU's SciPy Cholesky and XLA's (the GPU path) solve the same float64 system."""
  import jax
  import jax.numpy as jnp

  from jaxprune import reconstruct

  rng = np.random.default_rng(6)
  x = np.concatenate([rng.normal(size=(300, 20)) + 1.0, np.ones((300, 1))], axis=1)
  xx, xy = x.T @ x, x.T @ rng.normal(size=(300, 4))
  with jax.enable_x64(True):
    a = np.asarray(reconstruct._solve(jnp.asarray(xx), jnp.asarray(xy), jnp.asarray(1e-3), intercept))
  b = reconstruct._solve_lapack(xx, xy, 1e-3, intercept)
  # Two backward-stable float64 Cholesky solves of a system with condition < 1e4.
  np.testing.assert_allclose(a, b, rtol=0, atol=1e-9 * np.max(np.abs(b)))


def _shrunk_problem(seed=0, n=400, d=6, e=3):
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(d, d))
  x = rng.normal(size=(n, d)) @ mix + rng.normal(size=d)  # correlated channels with nonzero means
  w = rng.normal(size=(d, e))
  b = rng.normal(size=e)
  y = x @ w + b + 0.3 * rng.normal(size=(n, e))  # the target: W's output plus an inherited error
  return x, y, np.concatenate([w, b[None]], 0)


def _normwise_bound(xa, y, w_aug, a, b, w, n):
  """Normwise first-order bound on ||w_computed - w|| for the solve a w = b made from float32
  sums (tests/numerics.py, point 1, in norms): the sums over n tokens and the shrink's few
  extra operations per entry perturb a by at most gamma(n + d + 8) |Xa|^T|Xa| and b by
  gamma(n + d + 8) (|Xa|^T|Y| + |Xa|^T|Xa| |W|) (b mixes X^T Y with X^T X W), so
  ||dw|| <= cond(a) (ea + eb) / (1 - cond(a) ea) ||w||, plus rounding w to float32."""
  g = gamma(n + xa.shape[1] + 8)
  xx_abs = np.abs(xa).T @ np.abs(xa)
  ea = g * np.linalg.norm(xx_abs, 2) / np.linalg.norm(a, 2)
  eb = g * np.linalg.norm(np.abs(xa).T @ np.abs(y) + xx_abs @ np.abs(w_aug)) / np.linalg.norm(b)
  k = np.linalg.cond(a)
  assert k * ea < 0.5, "the problem is too ill-conditioned for a first-order bound"
  return k * (ea + eb) / (1 - k * ea) * np.linalg.norm(w) + U32 * np.abs(w).max()


def test_shrink_zero_is_the_measured_statistics_and_one_keeps_the_weights():
  x, y, w_aug = _shrunk_problem()
  m, _ = _moments(x, y)
  same = moments.shrink(m, 0.0, w_aug)
  np.testing.assert_array_equal(np.asarray(same.xx), np.asarray(m.xx))
  full = moments.shrink(m, 1.0, w_aug)
  # Covariance diagonal, means and count as measured: each off-diagonal entry is a
  # difference of float32 sums of n products, within gamma(n + 4) of its absolute sum.
  s = np.asarray(full.xx, np.float64)
  n = s[-1, -1]
  cov = s[:-1, :-1] - np.outer(s[-1, :-1], s[-1, :-1]) / n
  xa = _aug(x, True)
  bound = 2 * gamma(len(x) + 4) * (np.abs(xa).T @ np.abs(xa))[:-1, :-1]
  off = np.abs(cov - np.diag(np.diag(cov)))
  assert np.all(off <= bound + 1e-300)
  np.testing.assert_array_equal(s[-1], np.asarray(m.xx)[-1])
  # A refit of channels 0..2 on fully shrunk statistics keeps their weights and moves the
  # mean output of the removed channels into the bias: FLAP's compensation.
  keep = np.array([0, 1, 2])
  sub = moments.subset(full, keep)
  w, _ = reconstruct.ridge_solve(sub, sub.xy, 1e-9, True)
  gone = np.setdiff1d(np.arange(x.shape[1]), keep)
  expect = np.concatenate([w_aug[keep], (w_aug[-1] + x.mean(0)[gone] @ w_aug[gone])[None]], 0)
  # The float64 system the float32 statistics stand for: [X_k 1] with a diagonal covariance.
  idx = np.concatenate([keep, [x.shape[1]]])
  xak = xa[:, idx]
  a64 = xak.T @ xak
  mu, k = x.mean(0)[keep], len(keep)
  c = a64[:k, :k] - len(x) * np.outer(mu, mu)
  a64[:k, :k] -= c - np.diag(np.diag(c))
  b64 = a64 @ expect
  tol = _normwise_bound(xak, y, w_aug[idx], a64, b64, expect, len(x))
  assert np.linalg.norm(np.asarray(w, np.float64) - expect) <= tol


def test_shrink_is_a_variance_weighted_ridge_toward_the_weights():
  """Solving on shrunk statistics is the ridge (G + l D) V = X^T Y + l D W, l = a / (1 - a),
  D the statistics with the covariance's off-diagonal removed: the fit pulled toward W."""
  x, y, w_aug = _shrunk_problem(1)
  m, _ = _moments(x, y)
  a = 0.4
  sh = moments.shrink(m, a, w_aug)
  v, _ = reconstruct.ridge_solve(sh, sh.xy, 1e-12, True)
  xa = _aug(x, True).astype(np.float64)
  xx = xa.T @ xa
  n = len(x)
  mu = x.mean(0)
  cov = x.T @ x - n * np.outer(mu, mu)
  off = cov - np.diag(np.diag(cov))
  dd = xx.copy()
  dd[:-1, :-1] -= off
  lam = a / (1 - a)
  expect = np.linalg.solve(xx + lam * dd, xa.T @ y + lam * dd @ w_aug)
  tol = _normwise_bound(xa, y, w_aug, xx + lam * dd, xa.T @ y + lam * dd @ w_aug, expect, n)
  assert np.linalg.norm(np.asarray(v, np.float64) - expect) <= tol
  # Between the unshrunk solution and W.
  full = np.linalg.solve(xx, xa.T @ y)
  assert np.linalg.norm(expect - w_aug) < np.linalg.norm(full - w_aug)


def test_one_ridge_formula_on_host_and_under_jit():
  """`ridge_lam` is the ridge of every solve: numpy and traced jax.numpy give the float64 lam
  (up to summation order), and an all-zero input (mean diagonal 0) still gets delta, a positive ridge."""
  import jax

  diag = np.random.default_rng(5).uniform(0.1, 9.0, size=37).astype(np.float32)
  with placement.float64_solves():
    traced = float(jax.jit(reconstruct.ridge_lam)(jnp.asarray(diag), 1e-3))
  host = float(reconstruct.ridge_lam(diag, 1e-3))
  assert host == 1e-3 * np.mean(diag.astype(np.float64))
  # Two float64 means of 37 positive terms in different summation orders: within 37 roundings.
  assert abs(traced - host) <= 37 * np.finfo(np.float64).eps * host
  assert float(reconstruct.ridge_lam(np.zeros(4, np.float32), 1e-3)) == 1e-3


@pytest.mark.parametrize("intercept", [False, True])
def test_host_and_device_solvers_agree_and_retry_alike(intercept, monkeypatch):
  """The same problem solved by LAPACK on the host and by XLA on the device: both float64
  Cholesky solves of a well-conditioned system, so their float32 results differ by at most one
  float32 ulp. A system that is not positive definite until the ridge exceeds its negative
  diagonal (-I: lam = delta) takes the same retries to damping 10 on both."""
  rng = np.random.default_rng(8)
  x = rng.normal(size=(300, 9)).astype(np.float32)
  y = (x @ rng.normal(size=(9, 4)) + rng.normal(size=(300, 4))).astype(np.float32)
  m, _ = _moments(x, y)
  bad = moments.Moments(jnp.asarray(np.diag([-1.0] * 9 + [1.0]).astype(np.float32)), None)
  got = {}
  for lapack in (True, False):
    monkeypatch.setattr(placement, "lapack_solves", lambda: lapack)
    w, info = reconstruct.ridge_solve(m, m.xy, 1e-3, intercept)
    _, failed = reconstruct.ridge_solve(bad, jnp.ones((10, 2), jnp.float32), 1e-3, intercept)
    got[lapack] = np.asarray(w), info, failed
  (w_host, info_host, bad_host), (w_dev, info_dev, bad_dev) = got[True], got[False]
  assert np.all(np.abs(w_host - w_dev) <= np.spacing(np.abs(w_host)))
  assert info_host.retries == info_dev.retries == 0
  assert (bad_host.retries, bad_host.delta) == (bad_dev.retries, bad_dev.delta) == (4, 10.0)


@pytest.mark.parametrize("rows", [512, 5])
@pytest.mark.parametrize("intercept", [False, True])
def test_residual_of_given_weights_is_the_data_residual(monkeypatch, rows, intercept):
  """`reconstruct.residual` (on the host a band of G's rows at a time in float64, no float64
  copy of G) is ||[X 1] W - Y||^2 of the data, within what storing the sums in float32 moves
  it, and the XLA path's float64 value of the same float32 sums."""
  monkeypatch.setattr(reconstruct, "RESIDUAL_ROWS", rows)
  rng = np.random.default_rng(5)
  n, d, e = 400, 13, 3
  xa = np.concatenate([rng.normal(size=(n, d)) + 0.5, np.ones((n, 1))], axis=1)
  y = xa[:, :d] @ rng.normal(size=(d, e)) + 1.0 + 0.3 * rng.normal(size=(n, e))
  g32, c32 = (xa.T @ xa).astype(np.float32), (xa.T @ y).astype(np.float32)
  yy = np.float32(np.sum(y ** 2))
  k = d + 1 if intercept else d
  w = rng.normal(size=(k, e)).astype(np.float32)
  w64 = w.astype(np.float64)
  want = np.sum((xa[:, :k] @ w64 - y) ** 2)
  # Each float32 sum is within 2^-24 of itself: the quadratic form moves by at most that share of
  # |W|^T |G| |W|, the cross term of 2 |W| |C|, and ||Y||^2 of its own rounding.
  bound = U32 * (np.sum(np.abs(w64) * (np.abs(g32[:k, :k].astype(np.float64)) @ np.abs(w64)))
                        + 2 * np.sum(np.abs(w64) * np.abs(c32[:k].astype(np.float64))) + float(yy))
  m = moments.Moments(jnp.asarray(g32), None)
  got = float(reconstruct.residual(m, jnp.asarray(c32), jnp.asarray(yy), jnp.asarray(w)))
  assert placement.lapack_solves()
  assert_within(got, want, bound + 2 * U32 * want, "residual")  # returned in float32: one more rounding
  monkeypatch.setattr(placement, "lapack_solves", lambda: False)
  xla = float(reconstruct.residual(m, jnp.asarray(c32), jnp.asarray(yy), jnp.asarray(w)))
  assert_within(got, xla, 2 * U32 * want, "residual (XLA)")  # each rounded once to float32


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
@pytest.mark.parametrize("intercept", [False, True])
def test_a_padded_system_solves_the_kept_features_system(monkeypatch, backend, intercept):
  """`moments.subset_padded` with `rows`: the real features' block and cross moment as the
  exact cut has them, the padding zero; the solve gives the exact cut's solution on the real
  rows (both are float64 Cholesky solves of one system, the padding uncoupled from it), exact
  zeros on the padding, and the same residual; on the host (LAPACK) and on the device (gpu)."""
  import jax

  rng = np.random.default_rng(7)
  n, d, e, k, width = 300, 40, 3, 23, 32
  x = (rng.normal(size=(n, d)) * rng.uniform(0.2, 2, size=d) + 0.3).astype(np.float32)
  y = (x @ rng.normal(size=(d, e)) + rng.normal(size=(n, e)) + 1).astype(np.float32)
  m, yy = _moments(x, y)
  idx = np.sort(rng.choice(d, k, replace=False))
  exact = moments.subset(moments.Moments(np.asarray(m.xx), np.asarray(m.xy)), idx)
  padded = moments.subset_padded(m, idx, width)
  real = np.r_[np.arange(k), width]
  px, py = np.asarray(padded.xx), np.asarray(padded.xy)
  np.testing.assert_array_equal(px[np.ix_(real, real)], exact.xx)
  np.testing.assert_array_equal(py[real], exact.xy)
  assert not px[k:width].any() and not px[:, k:width].any() and not py[k:width].any()

  delta = 1e-3
  want, info = reconstruct.ridge_solve(exact, exact.xy, delta, intercept, yy=yy)
  if backend != "cpu":
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
  got, info_pad = reconstruct.ridge_solve(padded, padded.xy, delta, intercept, yy=yy, rows=k)
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == (width + intercept, e)
  assert not got[k:width].any()
  got = got[real[:k + intercept]]
  # Both solve A w = b in float64 (Higham Thm 10.4: backward error gamma(3k+1) |L||L^T|, so a
  # forward error within cond(A) times that), then round to float32.
  a = reconstruct.ridge_system(np.asarray(exact.xx, np.float64), delta, intercept)
  u64 = 2.0 ** -53
  fwd = np.linalg.cond(a) * (3 * (k + 1) + 1) * u64 / (1 - (3 * (k + 1) + 1) * u64) * np.max(np.abs(want))
  assert_within(got, want, 2 * fwd + 2 * U32 * np.abs(want), "padded solve")
  # The residuals: yy - tr(W^T X^T Y) - lam ||W||^2 in float64 from solutions that agree as above.
  c = np.abs(np.asarray(exact.xy, np.float64))[:len(want)]
  lam = float(reconstruct.ridge_lam(np.diagonal(np.asarray(exact.xx, np.float64))[:k], delta))
  bound = (np.sum(c) + 2 * lam * np.sum(np.abs(want))) * 2 * fwd + 4 * (k + 2) * u64 * (yy + np.sum(c * np.abs(want)))
  assert_within(info_pad.residual, info.residual, bound, "padded solve's residual")
  assert info_pad.delta == info.delta and info_pad.retries == info.retries == 0


@pytest.mark.parametrize("kept,full,model,want", [(1, 1536, 1, 128), (128, 1536, 1, 128), (129, 1536, 1, 256),
                                                  (1500, 1536, 1, 1536), (100, 1536, 4, 512), (513, 1536, 4, 1024),
                                                  (60, 96, 1, 96)])
def test_bucket_width_is_the_next_multiple_of_the_bucket_at_most_the_module(kept, full, model, want):
  class Mesh:  # only its axis sizes are read
    shape = {"data": 1, "model": model}

  assert placement.bucket_width(kept, full, Mesh()) == want
