"""Statistics that stay split over the mesh's `model` axis to the solve (`jaxprune.stats.split`,
`jaxprune.criteria.obs_split`; issue 31).

Each split operation is checked against the same operation on the joined statistics
(`moments.join`), with bounds derived from the arithmetic (tests/numerics.py, point 1); the
split sweep against the host sweep; and a whole run on a 2 x 4 mesh is watched: no array on
any device, and nothing brought to the host, holds a whole Gram matrix or cross moment.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxprune import placement, sharding
from jaxprune.criteria import obs_split, obs_sweep
from jaxprune.reconstruct import ridge_lam
from jaxprune.stats import moments, split
from tests.numerics import assert_within
from tests.test_sharded_solve import U32, U64, _one_blas_thread, gamma  # noqa: F401  (the fixture applies here)

T, D, E = 3000, 96, 24


def _data(seed=0, d=D, e=E):
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal((T, d)) @ rng.standard_normal((d, d)) * 0.3 + 0.5).astype(np.float32)
  y = (x @ rng.standard_normal((d, e)) + rng.standard_normal((T, e))).astype(np.float32)
  return x, y


def _split(x, y, mesh):
  rows = sharding.gram_rows(mesh, x.shape[1])
  return jax.jit(lambda x, y: moments.split_sums(x, y, rows))(jnp.asarray(x), jnp.asarray(y))


def _rows_only(a, mesh):
  """Every device holds a row block of `a` (1/model of its rows), never the whole."""
  m = mesh.shape["model"]
  assert all(s.data.shape[0] * m == a.shape[0] for s in a.addressable_shards), [s.data.shape for s in a.addressable_shards]


@pytest.fixture(scope="module", params=[(2, 4), (1, 8)], ids=["2x4", "1x8"])
def mesh(request):
  return sharding.make_mesh(*request.param)


def test_a_cut_is_the_joined_statistics_cut(mesh):
  """The kept features of split statistics, padded: exactly `subset_padded` of the joined ones
  (gathers and sums of one nonzero term: no rounding), still split by rows."""
  rs = _split(*_data(), mesh)
  idx = np.array([3, 50, 7, 90, 11, 60, 2, 95, 0])
  width = 16
  cut = split.cut(rs, idx, width)
  _rows_only(cut.gram, mesh), _rows_only(cut.xy, mesh)
  got, ref = moments.join(cut), moments.subset_padded(moments.join(rs), idx, width)
  np.testing.assert_array_equal(np.asarray(got.xx), np.asarray(ref.xx))
  np.testing.assert_array_equal(np.asarray(got.xy), np.asarray(ref.xy))
  with pytest.raises(ValueError, match="model axis"):
    split.cut(rs, idx, 10 if mesh.shape["model"] == 4 else 12)


def test_shrink_and_cross_are_the_joined_ones(mesh):
  """`split.shrink` and `split.with_cross` against `moments.shrink` and X^T X [W; b] on the joined
  statistics: every entry a sum of at most d + 4 float32 terms in each, so the two differ by at
  most 2 gamma(d + 4) times the sum of the terms' magnitudes."""
  rs = _split(*_data(1), mesh)
  j = moments.join(rs)
  w_aug = np.random.default_rng(2).standard_normal((D + 1, E)).astype(np.float32)
  xx, wa = np.abs(np.asarray(j.xx, np.float64)), np.abs(w_aug.astype(np.float64))
  got = moments.join(split.with_cross(rs, w_aug))
  _rows_only(split.with_cross(rs, w_aug).xy, mesh)
  assert_within(np.asarray(got.xy), np.asarray(j.xx, np.float64) @ w_aug, 2 * gamma(D + 4, U32) * (xx @ wa),
                "split cross moment")
  alpha = 0.25
  ref = moments.shrink(j, alpha, jnp.asarray(w_aug))
  sh = split.shrink(rs, alpha, w_aug)
  _rows_only(sh.gram, mesh)
  got = moments.join(sh)
  s, n = xx[-1, :-1], float(xx[-1, -1])
  terms = xx[:D, :D] + np.outer(s, s) / n
  assert_within(np.asarray(got.xx)[:D, :D], np.asarray(ref.xx)[:D, :D], 2 * gamma(4, U32) * terms, "split shrink G")
  # X^T Y's terms: (1 - alpha) |xy| and alpha |U| |[W; b]| with U the uncorrelated statistics
  # (the diagonal's g_jj, the means' s_i s_j / n, the ones column's s_i).
  unc = np.abs(np.asarray(j.xx, np.float64))
  unc[:D, :D] = np.diag(np.diagonal(xx)[:D]) + np.outer(s, s) / n
  scale = (1 - alpha) * np.abs(np.asarray(j.xy, np.float64)) + alpha * unc @ wa
  assert_within(np.asarray(got.xy), np.asarray(ref.xy), 2 * gamma(D + 4, U32) * scale, "split shrink X^T Y")


def test_residual_and_diagonal_are_the_joined_ones(mesh):
  """||[X 1] [W; b] - Y||^2 from split statistics against float64 numpy on the joined ones (both
  float64 sums of at most d + 3 terms), and the diagonal exactly."""
  x, y = _data(3)
  rs = _split(x, y, mesh)
  j = moments.join(rs)
  xx, xy = np.asarray(j.xx, np.float64), np.asarray(j.xy, np.float64)
  np.testing.assert_array_equal(split.diagonal(rs), np.diagonal(np.asarray(j.xx))[:D])
  w = np.random.default_rng(4).standard_normal((D + 1, E))
  yy = float(np.sum(np.square(y, dtype=np.float64)))
  ref = float(np.sum(w * (xx @ w)) - 2 * np.sum(w * xy) + yy)
  scale = float(np.sum(np.abs(w) * (np.abs(xx) @ np.abs(w))) + 2 * np.sum(np.abs(w * xy)) + yy)
  assert abs(split.residual(rs, yy, w) - ref) <= 2 * gamma(D + 3, U64) * scale


@pytest.mark.parametrize("width,intercept,d", [(1, True, D), (8, True, D), (12, False, D), (1, False, D),
                                               (64, True, 512)])
def test_the_split_sweep_is_the_host_sweep(mesh, width, intercept, d):
  """The greedy OBS sweep on split statistics removes the units the host sweep removes, in the same
  order, at the same costs: both are float64 from the same float32 sums, so their costs differ
  by the forward error of two float64 solves of the system, at most cond(A) gamma(3d + 1) times
  the cost (Higham Thm 10.4 per factorization), per step of the sweep. (Widths 8 and 12 leave
  units of a head that straddle devices, which the sweep first lays out again; 64-wide heads, two
  or more a device, waited forever when their costs were one batched LAPACK solve.)"""
  rs = _split(*_data(5, d=d), mesh)
  j = moments.join(rs)
  n = d // width
  delta = 1e-3
  with placement.float64_solves():
    # The host's sweep on host statistics, as the joined path hands them to it.
    ginv = obs_sweep.ridge_inverse(np.asarray(j.xx), delta, intercept)
    order, paid = obs_sweep.removal_order(ginv, jnp.asarray(np.asarray(j.xy)), width, intercept,
                                          obs_sweep.step_size(n), n // 2)
  got_order, got_paid = obs_split.removal_order(rs, width, delta, intercept, obs_sweep.step_size(n), n // 2)
  k = d + 1 if intercept else d
  a = np.asarray(j.xx, np.float64)[:k, :k]
  a[np.arange(d), np.arange(d)] += float(ridge_lam(np.diagonal(a)[:d], delta))
  bound = np.linalg.cond(a) * gamma(3 * k + 1, U64) * n
  gone = order < n // 2
  costs = np.sort(paid[gone])
  assert np.all(np.diff(costs) > 2 * bound * costs[1:]), "the data's removal costs are too close to order"
  np.testing.assert_array_equal(got_order[gone], order[gone])
  assert_within(got_paid[gone], paid[gone], bound * np.abs(paid[gone]), "split sweep costs")


def test_a_split_run_holds_no_whole_gram_anywhere(tiny_dir, monkeypatch):
  """The default preset on a 2 x 4 mesh with its statistics split (`--solves split`): at every
  statistics pass, cut, shrink, sweep and solve, no device holds a square shard as wide as a
  module's Gram matrix (its X2 widths: Gemma's 128-channel attention and 96-channel MLP), the
  statistics handed on are split by rows (a 1/4 share each), and nothing as wide is brought to
  the host (tests/watch_hook.py). The run's units equal those of the same mesh with the
  statistics joined, and its report says where they were solved."""
  import jaxprune
  from jaxprune.prune import PruneConfig, prune
  from tests import watch_hook
  from tests.test_mesh import _calib

  cfg, mesh = PruneConfig.preset("recommended", sparsity=0.3, batch_size=8), sharding.make_mesh(2, 4)
  load = lambda: jaxprune.load(tiny_dir("gemma3"), lazy=True)
  calib = _calib()
  joined = prune(load(), calib, cfg, mesh=mesh)
  assert joined.report["devices"]["solves"] == "joined"  # auto on a CPU
  watch = watch_hook.install(monkeypatch.setattr, {96, 97, 128, 129})
  run = prune(load(), calib, cfg, mesh=mesh, solves="split")
  assert all(watch.calls.get(k) for k in ("_sweep", "cut", "shrink", "with_cross", "_solve")), watch.calls
  assert not watch.seen, watch.seen[:5]
  assert not watch.converted, watch.converted[:5]
  assert run.report["devices"]["solves"] == "split"
  assert [m["kept"] for m in run.report["modules"]] == [m["kept"] for m in joined.report["modules"]]


def test_the_solves_option_is_the_placement_enum():
  from jaxprune.cli.prune_cmd import SOLVES

  assert SOLVES == tuple(str(v) for v in placement.Solves)


def test_split_solves_without_a_model_axis_are_refused(tiny_dir, tmp_path, capsys):
  """`--solves split` on a mesh without a `model` axis: one line naming the fix, no traceback."""
  from jaxprune.cli import main

  out, model = str(tmp_path / "o"), tiny_dir("llama_gqa")
  capsys.readouterr()
  assert main(["--no-compile-cache", "prune", model, "--sparsity", "0.2", "--calib", "random", "--calib-samples",
               "8", "--seq-len", "16", "--no-progress", "--out", out, "--mesh", "data=8,model=1", "--solves",
               "split"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--solves split" in err[0] and "--mesh data=D,model=M" in err[0], err
  assert not os.path.exists(out)
