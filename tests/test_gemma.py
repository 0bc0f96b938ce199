"""Pruning a tiny Gemma 3 (post-norms, one KV head) with the default recipe: counts, and what the refit fits."""

import numpy as np
import pytest

import jaxprune
from jaxprune.models import adapter as A
from jaxprune.models import layers as L
from jaxprune.models import logits
from jaxprune.models.forward import attn_step, hidden_states, positions_for
from jaxprune.prune import PruneConfig, prune
from jaxprune.spec import block_param_count


def _calib(n=32, t=16, seed=0):
  # Longer than the tiny model's window (8), so the sliding layer's statistics see it.
  return np.random.default_rng(seed).integers(0, 128, size=(n, t)).astype(np.int32)


def test_default_preset_prunes_a_fifth_inside_the_one_kv_group(tiny_dir):
  m = jaxprune.load(tiny_dir("gemma3"))
  assert all(l.num_kv_heads == 1 for l in m.spec.layers) and m.spec.fam.post_norms
  r = prune(m, _calib(), PruneConfig(sparsity=0.2, batch_size=8))
  p = r.report["params"]
  dense = sum(block_param_count(b) for b in m.params["layers"])
  assert p["pruned_blocks_before"] == dense
  assert p["pruned_blocks_after"] == sum(block_param_count(b) for b in r.model.params["layers"])
  # Within one MLP channel (3 x hidden) per block of the requested ratio.
  assert abs(p["ratio_of_pruned_blocks"] - 0.2) <= m.spec.num_layers * 3 * m.spec.hidden_size / dense
  for layer, blk in zip(r.model.spec.layers, r.model.params["layers"]):
    # Heads go from inside the one group: K and V stay whole, and so do the q/k norms and post-norms.
    assert layer.num_kv_heads == 1 and 1 <= layer.num_heads <= 4
    assert blk["attn"]["q_norm"]["scale"].shape == (32,) and "mlp_post_norm" in blk
  assert np.all(np.isfinite(np.asarray(logits(r.model.spec, r.model.params, _calib(2, 20, seed=1)))))


def _mlp_streams(model, tokens, i):
  """The residual stream entering block i's MLP (through the real blocks, post-norms included) and its pre-norm."""
  x, _ = hidden_states(model.spec, model.params, tokens, layers=range(i))
  cfg = L.block_config(model.spec, i)
  x, _ = attn_step(cfg, model.params["layers"][i], x, positions_for(tokens))
  return np.asarray(x, np.float64).reshape(-1, x.shape[-1]), L.norm(cfg, model.params["layers"][i]["mlp_norm"], x)


@pytest.mark.parametrize("absorb", [0.0, 1.0])
def test_refit_is_the_least_squares_fit_of_the_output_before_the_post_norm(tiny_dir, absorb):
  # The last MLP's refit solves least squares of its dense output y (before the post-norm) on the
  # pruned model's own X2, whatever `absorb` says: the stream's error is in post-norm units, which
  # y cannot take up (docs/method.md). The pruned X2 is recomputed by the real forward, so a stream
  # that advanced without the post-norms would show here too.
  m = jaxprune.load(tiny_dir("gemma3"))
  damping = 1e-6
  cfg = PruneConfig.preset("paper", method="goa-obs", sparsity=0.3, attn_sparsity=0.0, reconstruct=False,
                           refit=True, intercept=True, damping=damping, absorb=absorb, batch_size=8)
  calib = _calib()
  r = prune(m, calib, cfg)
  i = m.spec.num_layers - 1
  (xd, hd), (xp, hp) = _mlp_streams(m, calib, i), _mlp_streams(r.model, calib, i)
  assert np.linalg.norm(xd - xp) > 1e-2 * np.linalg.norm(xd)  # the stream carries an error into the last MLP
  yd = np.asarray(A.apply(A.MLP, L.block_config(m.spec, i), m.params["layers"][i]["mlp"], hd, None), np.float64)
  yd = yd.reshape(-1, yd.shape[-1])
  p = r.model.params["layers"][i]["mlp"]
  x2 = np.asarray(A.inner(A.MLP, L.block_config(r.model.spec, i), p, hp, None)[0], np.float64)
  x2 = x2.reshape(-1, x2.shape[-1])
  assert x2.shape[1] < m.spec.layers[i].ffn_dim  # channels were cut
  xa = np.concatenate([x2, np.ones((len(x2), 1))], axis=1)
  reg = damping * np.mean(np.sum(x2**2, axis=0)) * np.diag([1.0] * x2.shape[1] + [0.0])
  fit = lambda y: np.linalg.solve(xa.T @ xa + reg, xa.T @ y)  # noqa: E731
  objective = lambda w: float(np.sum((xa @ w - yd)**2) + np.sum(w * (reg @ w)))  # noqa: E731
  w2, b2 = (np.asarray(t, np.float64) for t in A.second_level(A.MLP, p))
  best = objective(fit(yd))
  # The refit sits at the optimum for y: far closer than the fit of the absorbing target
  # y + (x_d - x_p) (where an absorb that crossed the post-norm would put it). A discrimination
  # margin, as in test_pipeline's absorb test: float32 statistics move the objective by relative
  # O(1e-6), far inside 1e-2 of the gap.
  gap, absorbed_gap = objective(np.concatenate([w2, b2[None]])) - best, objective(fit(yd + xd - xp)) - best
  assert absorbed_gap > 0 and gap < 1e-2 * absorbed_gap, (gap, absorbed_gap)
