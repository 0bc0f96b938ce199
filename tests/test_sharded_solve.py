"""The row-split ridge solve (`jaxprune.sharded_solve`) against SciPy's float64 Cholesky.

Every bound is derived, none fitted (tests/numerics.py's rule), from Higham, "Accuracy and
Stability of Numerical Algorithms", 2nd ed.:
- Cholesky solve (Thm 10.4): the computed X solves (A + dA) X = C with
  |dA| <= gamma(3d + 1) |L| |L^T|, and |L| |L^T| <= delta delta^T entrywise, delta = sqrt(diag A)
  (Cauchy-Schwarz on the columns of L^T). As X - X* = -A^-1 dA X, the forward error is at
  most |A^-1| gamma(3d + 1) delta (delta^T |X|), whatever order the sums ran in (any mesh).
- Refinement in the working precision (Ch. 12): the solve reports omega, the componentwise
  backward error it computed; Thm 12.3 puts its limit at about gamma(d + 1), and the true
  backward error exceeds the computed one by at most the residual's own rounding,
  gamma(d + 2) (|A| |X| + |C|), plus the ridge's rounding to the working precision, u lam |X|.
|A^-1| is formed in float64 by numpy; its own error (cond(A) u64 < 1e-9 relative here) is
below what these bounds can resolve.
"""

from __future__ import annotations


import numpy as np
import pytest
import scipy.linalg

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from jaxprune import sharded_solve, sharding
from jaxprune.prune import PruneConfig
from jaxprune.reconstruct import ridge_lam
from tests.numerics import assert_within

MESHES = [(1, 8), (2, 4), (4, 2), (1, 1)]  # (data, model)
D, E = 512, 24  # E divisible by 2 and 4: C's columns split over `data`
CONDS = (1e8, 1e3)  # of the Gram matrix before damping: the case, and one where float32 is accurate
U64, U32 = 2.0**-53, 2.0**-24


def gamma(n: int, u: float) -> float:
  return n * u / (1 - n * u)


@pytest.fixture(scope="module", autouse=True)
def _one_blas_thread():
  """Eight forced CPU devices each call a threaded OpenBLAS (LAPACK's trsm behind XLA's triangular
  solves) on a two-core machine; the threads' spinning made each solve about 100x slower."""
  try:
    from threadpoolctl import threadpool_limits
  except ImportError:
    yield
    return
  with threadpool_limits(1):
    yield


def ill_conditioned(d: int, cond: float, seed: int) -> np.ndarray:
  """A float32 Gram matrix (statistics are float32 sums) with eigenvalues log-spaced from 1 to 1/cond."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.standard_normal((d, d)))
  g = (q * np.logspace(0, -np.log10(cond), d)) @ q.T
  return ((g + g.T) / 2).astype(np.float32)


@pytest.fixture(scope="module", params=CONDS, ids=lambda c: f"cond{c:.0e}")
def system(request):
  """G, C, the ridge jaxprune uses by default, and the float64 A = G + lam I with SciPy's solve."""
  g = ill_conditioned(D, request.param, seed=0)
  c = np.random.default_rng(1).standard_normal((D, E)).astype(np.float32)
  lam = float(ridge_lam(np.diagonal(g), PruneConfig().damping))
  a = g.astype(np.float64) + lam * np.eye(D)
  ref = scipy.linalg.cho_solve(scipy.linalg.cho_factor(a, lower=True), c.astype(np.float64))
  return dict(g=g, c=c, lam=lam, a=a, inv=np.abs(np.linalg.inv(a)), ref=ref)


@pytest.fixture(scope="module")
def solved(system):
  """{(mesh, dtype): Solution}: every solve the tests compare, made once."""
  out = {}
  for shape in MESHES:
    mesh = sharding.make_mesh(*shape)
    for dtype in ("float64", "float32"):
      out[shape, dtype] = sharded_solve.solve(system["g"], system["c"], system["lam"], mesh, dtype=jnp.dtype(dtype))
  return out


def cholesky_forward_bound(s, x) -> np.ndarray:
  """|X - X*| for a float64 Cholesky solve that returned x (Thm 10.4; 3d + 2: the ridge's addition too)."""
  delta = np.sqrt(np.diagonal(s["a"]))
  return s["inv"] @ (gamma(3 * D + 2, U64) * delta[:, None] * (delta @ np.abs(x))[None])


def refined_backward_bound(s, x, omega: float, d: int = D) -> np.ndarray:
  """|C - A X| for a float32 refined solve that reported omega (module doc), plus this check's float64 rounding."""
  scale = np.abs(s["a"]) @ np.abs(x) + np.abs(s["c"].astype(np.float64))
  comp = omega * (1 + gamma(d + 2, U32)) + gamma(d + 2, U32) + U32 + gamma(d + 2, U64)
  return comp * scale


def gradient(s, x) -> np.ndarray:
  """A X - C (the least-squares gradient, up to 2) in float64."""
  return s["a"] @ x - s["c"].astype(np.float64)


@pytest.mark.parametrize("shape", MESHES)
def test_float64_matches_scipy_cholesky(system, solved, shape):
  sol = solved[shape, "float64"]
  w = np.asarray(sol.w, np.float64)
  bound = cholesky_forward_bound(system, w) + cholesky_forward_bound(system, system["ref"])
  assert_within(w, system["ref"], bound, f"sharded float64 solve {shape} vs scipy")


@pytest.mark.parametrize("shape", MESHES)
def test_float32_refined_matches_float64(system, solved, shape):
  """Float32 with refinement reaches the backward error of a float32 residual (checked in float64),
  and so the float64 solve within |A^-1| times it. On the Gram of condition 1e8 at jaxprune's
  damping (cond(A) about 2e6) that bound exceeds |W| itself, as it must: a float32 solve there
  can be off by cond(A) u, about 10%; at condition 1e3 it is a few parts in 10^4."""
  sol = solved[shape, "float32"]
  assert sol.omega <= gamma(D + 1, U32), f"refinement stopped at omega {sol.omega:.3g} > gamma(d+1)"
  w = np.asarray(sol.w, np.float64)
  res = gradient(system, w)
  assert_within(res, np.zeros_like(res), refined_backward_bound(system, w, sol.omega), f"float32 residual {shape}")
  bound = system["inv"] @ refined_backward_bound(system, w, sol.omega) + cholesky_forward_bound(system, system["ref"])
  assert_within(w, system["ref"], bound, f"sharded float32+refinement {shape} vs float64",
                cond=float(np.linalg.cond(system["a"])), scale=float(np.max(np.abs(system["ref"]))))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_same_on_every_mesh(system, solved, dtype):
  one = np.asarray(solved[(1, 1), dtype].w, np.float64)
  for shape in MESHES[:-1]:
    sol = solved[shape, dtype]
    w = np.asarray(sol.w, np.float64)
    if dtype == "float64":
      bound = cholesky_forward_bound(system, w) + cholesky_forward_bound(system, one)
    else:
      bound = system["inv"] @ (refined_backward_bound(system, w, sol.omega) +
                               refined_backward_bound(system, one, solved[(1, 1), dtype].omega))
    assert_within(w, one, bound, f"{dtype} solve on {shape} vs one device")


@pytest.mark.parametrize("shape", MESHES)
def test_it_is_the_least_squares_optimum(system, solved, shape):
  """The gradient (G + lam I) W - C vanishes to the solve's backward error: Cholesky's in float64,
  the refined residual's in float32."""
  w64 = np.asarray(solved[shape, "float64"].w, np.float64)
  delta = np.sqrt(np.diagonal(system["a"]))
  scale = np.abs(system["a"]) @ np.abs(w64) + np.abs(system["c"].astype(np.float64))
  bound = gamma(3 * D + 2, U64) * delta[:, None] * (delta @ np.abs(w64))[None] + gamma(D + 2, U64) * scale
  g64 = gradient(system, w64)
  assert_within(g64, np.zeros_like(g64), bound, f"float64 gradient {shape}")
  sol = solved[shape, "float32"]
  w32 = np.asarray(sol.w, np.float64)
  g32 = gradient(system, w32)
  assert_within(g32, np.zeros_like(g32), refined_backward_bound(system, w32, sol.omega),
                f"float32 gradient {shape}")


def test_results_and_inputs_stay_row_blocks(system, solved):
  """Every array the solve places or returns is held as row blocks: a device's part of G is d/m rows."""
  for ((data, model), _), sol in solved.items():
    mesh = sharding.make_mesh(data, model)
    cols = E // data
    assert {s.data.shape for s in sol.w.addressable_shards} == {(D // model, cols)}
    g = jax.device_put(system["g"], NamedSharding(mesh, sharded_solve.row_spec(mesh)))
    assert {s.data.shape for s in g.addressable_shards} == {(D // model, D)}
    diag = sharded_solve.diagonal(g, mesh)  # the ridge's input, read from the row blocks
    assert {s.data.shape for s in diag.addressable_shards} == {(D // model,)}
    np.testing.assert_array_equal(np.asarray(diag), np.diagonal(system["g"]))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_no_device_holds_more_than_its_share_and_a_panel(dtype):
  """XLA's buffer assignment for one device of a model axis of 8: beside its arguments (its row
  block of G and block of C), the kernel's temporaries are its row block in the solve's dtype
  (which becomes its rows of L), one panel (d x d/m), at most 6 b x b blocks (the diagonal block,
  its factor, L_kk as broadcast, L_ik, one trailing update, a mask) and 4 b x e blocks (W, the
  residual, the correction, the block passed round the ring). A whole Gram matrix would be 8 row
  blocks; X gathered whole ([d, e], e = d/4 here) would be 16 b x b blocks."""
  d, e, m = 1024, 256, 8
  mesh = sharding.make_mesh(1, m)
  b, item = d // m, jnp.dtype(dtype).itemsize
  with jax.enable_x64(dtype == "float64"):
    g = jax.ShapeDtypeStruct((d, d), jnp.float32, sharding=NamedSharding(mesh, sharded_solve.row_spec(mesh)))
    c = jax.ShapeDtypeStruct((d, e), jnp.float32, sharding=NamedSharding(mesh, sharded_solve.row_spec(mesh, e)))
    lam = jax.ShapeDtypeStruct((), jnp.dtype(dtype))
    steps = 0 if dtype == "float64" else sharded_solve.REFINE_STEPS
    mem = sharded_solve._solve.lower(g, c, lam, mesh=mesh, dtype=jnp.dtype(dtype), steps=steps).compile(
    ).memory_analysis()
  share, panel, small = b * d * item, d * b * item, (6 * b * b + 4 * b * e) * item
  assert mem.argument_size_in_bytes <= b * d * 4 + b * e * 4 + item
  assert mem.temp_size_in_bytes <= share + panel + small, (
      f"temporaries {mem.temp_size_in_bytes} B > row block {share} + panel {panel} + small blocks {small}")
  assert mem.temp_size_in_bytes + mem.argument_size_in_bytes < d * d * item * 0.6  # far from a whole Gram


def test_refinement_repairs_a_weak_factor(monkeypatch):
  """A factor with backward error 1e-4 (as one made with low-precision matmuls, e.g. a TPU's
  default bfloat16 passes, may have) leaves a direct float32 solve far from the least-squares
  optimum; refinement with the residual at HIGHEST brings it back within a float32 residual's
  bound (cond(A) 1e-4 < 1: Higham's Thm 12.3 applies). Without refinement the same solve fails
  that bound."""
  d = 256  # a shape no other test compiles: the weakened kernel stays out of their jit cache
  g = ill_conditioned(d, 1e3, seed=3)
  c = np.random.default_rng(4).standard_normal((d, E)).astype(np.float32)
  lam = float(ridge_lam(np.diagonal(g), PruneConfig().damping))
  s = dict(a=g.astype(np.float64) + lam * np.eye(d), c=c)
  factor = sharded_solve._factor

  def weak(a, i, m):
    wobble = 1e-4 * jnp.sin(jnp.arange(a.size, dtype=a.dtype).reshape(a.shape))
    return factor(a * (1 + wobble), i, m)

  monkeypatch.setattr(sharded_solve, "_factor", weak)
  mesh = sharding.make_mesh(2, 4)
  try:
    refined = sharded_solve.solve(g, c, lam, mesh, dtype=jnp.float32)
    direct = sharded_solve.solve(g, c, lam, mesh, dtype=jnp.float32, refine=0)
  finally:
    sharded_solve._solve.clear_cache()
  assert refined.refinements >= 1 and refined.omega <= gamma(d + 1, U32)
  w = np.asarray(refined.w, np.float64)
  res = s["a"] @ w - c
  assert_within(res, np.zeros_like(res), refined_backward_bound(s, w, refined.omega, d), "refined weak factor")
  w0 = np.asarray(direct.w, np.float64)
  assert np.any(np.abs(s["a"] @ w0 - c) > refined_backward_bound(s, w0, 0.0, d)), "the weak factor alone was enough"


def intercept_system(d: int, n: int, seed: int):
  """Statistics of X [n, d] with nonzero means and Y = X W + noise, as a module's solve sees them."""
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal((n, d)) * np.logspace(0, -2, d) + rng.standard_normal(d)).astype(np.float32)
  y = (x @ rng.standard_normal((d, E)) + 0.1 * rng.standard_normal((n, E))).astype(np.float32)
  g, xy = x.T.astype(np.float64) @ x, x.T.astype(np.float64) @ y
  return (g.astype(np.float32), xy.astype(np.float32), x.sum(0, dtype=np.float64).astype(np.float32),
          np.float32(n), y.sum(0, dtype=np.float64).astype(np.float32))


def test_intercept_is_the_augmented_solve():
  """With the ones column eliminated (module doc), W and b equal SciPy's solve of the augmented
  system [[G + lam I, s], [s^T, n]] within both solves' bounds (the elimination's own roundings:
  forming the Schur complement, gamma(4) of its terms, its right-hand side, gamma(3), and the bias, gamma(d + 2))."""
  d = 256
  g, xy, s, n, ysum = intercept_system(d, 2048, seed=2)
  lam = float(ridge_lam(np.diagonal(g), PruneConfig().damping))
  g64, s64, c64, y64, n64 = (v.astype(np.float64) for v in (g, s, xy, ysum, n))
  aug = np.zeros((d + 1, d + 1))
  aug[:d, :d], aug[:d, d], aug[d, :d], aug[d, d] = g64 + lam * np.eye(d), s64, s64, n64
  rhs = np.vstack([c64, y64[None]])
  ref = scipy.linalg.cho_solve(scipy.linalg.cho_factor(aug, lower=True), rhs)
  sol = sharded_solve.solve(g, xy, lam, sharding.make_mesh(2, 4), intercept=sharded_solve.Intercept(s, n, ysum))
  w, b = np.asarray(sol.w, np.float64), np.asarray(sol.bias, np.float64)

  schur = g64 + lam * np.eye(d) - np.outer(s64, s64) / n64
  inv = np.abs(np.linalg.inv(schur))
  delta = np.sqrt(np.diagonal(schur))
  backward = (gamma(3 * d + 1, U64) * delta[:, None] * (delta @ np.abs(w))[None] +
              gamma(4, U64) * ((np.abs(g64) + lam * np.eye(d) + np.outer(np.abs(s64), np.abs(s64)) / n64) @ np.abs(w)) +
              gamma(3, U64) * (np.abs(c64) + np.outer(np.abs(s64), np.abs(y64)) / n64))
  w_bound = inv @ backward
  b_bound = (np.abs(s64) @ w_bound + gamma(d + 2, U64) * (np.abs(y64) + np.abs(s64) @ np.abs(w))) / n64
  da = np.sqrt(np.diagonal(aug))
  ref_bound = np.abs(np.linalg.inv(aug)) @ (gamma(3 * (d + 1) + 2, U64) * da[:, None] * (da @ np.abs(ref))[None])
  assert_within(w, ref[:d], w_bound + ref_bound[:d], "intercept W vs augmented scipy")
  assert_within(b, ref[d], b_bound + ref_bound[d], "intercept bias vs augmented scipy")


def test_a_failed_factorisation_returns_none():
  """An indefinite system (negative ridge) gives no finite factor: None, so the caller damps more."""
  g = np.eye(64, dtype=np.float32)
  c = np.ones((64, 8), np.float32)
  assert sharded_solve.solve(g, c, -2.0, sharding.make_mesh(2, 4)) is None


def test_split_solves_keep_the_default_paths_units(tiny_dir, monkeypatch):
  """Opt-in (`placement.split_solves`): a tiny LLaMA pruned on a 2 x 4 mesh with its solves split over
  `model` keeps every module's units of the default path on that mesh, and its NLL moves less than
  a reordering of the float32 sums may move it (tests/numerics.py, point 2; test_mesh's draws)."""
  import jaxprune
  from jaxprune import placement
  from jaxprune.eval.perplexity import perplexity
  from jaxprune.prune import prune
  from tests.numerics import assert_reordering
  from tests.test_mesh import _calib, _reordered

  calib, cfg, mesh = _calib(), PruneConfig.preset("recommended", sparsity=0.3, batch_size=8), sharding.make_mesh(2, 4)
  load = lambda: jaxprune.load(tiny_dir("llama_gqa"), lazy=True)
  default = prune(load(), calib, cfg, mesh=mesh)
  widths, solve = [], sharded_solve.solve
  monkeypatch.setattr(sharded_solve, "solve", lambda g, *a, **k: widths.append(g.shape[0]) or solve(g, *a, **k))
  with placement.split_solves(mesh):
    split = prune(load(), calib, cfg, mesh=mesh)
  assert widths and all(w % 4 == 0 for w in widths)  # every solve went split (padded to the axis)
  assert [m["kept"] for m in split.report["modules"]] == [m["kept"] for m in default.report["modules"]]
  a = perplexity(default.model.spec, default.model.params, calib).mean_nll
  b = perplexity(split.model.spec, split.model.params, calib).mean_nll
  if b != a:  # equal NLLs hold within any bound; the reordering draws (4 more prunes) only when they differ
    assert_reordering(b, a, _reordered(load, calib, cfg, a), "split solves nll")


def test_float32_intercept_is_least_squares():
  """Float32 with refinement (a TPU's path) with the ones column: both blocks of the augmented
  gradient vanish to a float32 residual's backward error. Data rows: C - (G + lam I) W - s b, the
  residual the refinement drives (its rounding, gamma(d + 3), and the bias's, gamma(d + 2), of
  |G||W| + lam |W| + |C| + |s| (|s|^T |W| + |y|) / n). Ones row: y - s^T W - n b, which the bias
  b = (y - s^T W) / n zeroes but for its own rounding, gamma(d + 2) (|y| + |s|^T |W|)."""
  d = 256
  g, xy, s, n, ysum = intercept_system(d, 2048, seed=2)
  lam = float(ridge_lam(np.diagonal(g), PruneConfig().damping))
  sol = sharded_solve.solve(g, xy, lam, sharding.make_mesh(2, 4), dtype=jnp.float32,
                            intercept=sharded_solve.Intercept(s, n, ysum))
  assert sol.omega <= gamma(d + 1, U32)
  w, b = np.asarray(sol.w, np.float64), np.asarray(sol.bias, np.float64)
  g64, s64, c64, y64, n64 = (v.astype(np.float64) for v in (g, s, xy, ysum, n))
  sw = np.abs(s64) @ np.abs(w) + np.abs(y64)
  scale = np.abs(g64) @ np.abs(w) + lam * np.abs(w) + np.abs(c64) + np.outer(np.abs(s64), sw) / n64
  comp = sol.omega * (1 + gamma(d + 3, U32)) + 2 * gamma(d + 3, U32) + U32 + gamma(d + 3, U64)
  rows = c64 - g64 @ w - lam * w - np.outer(s64, b)
  assert_within(rows, np.zeros_like(rows), comp * scale, "float32 intercept data rows")
  ones = y64 - s64 @ w - n64 * b
  assert_within(ones, np.zeros_like(ones), (gamma(d + 2, U32) + gamma(d + 2, U64)) * sw + U32 * n64 * np.abs(b),
                "float32 intercept ones row")
