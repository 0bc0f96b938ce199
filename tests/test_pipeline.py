"""The greedy pipeline end to end on tiny models."""

import dataclasses

import jax
import numpy as np
import pytest

import jaxprune
from jaxprune import kernels
from jaxprune.errors import UsageError
from jaxprune.models import logits
from jaxprune.pipeline import PruneConfig, prune
from jaxprune.spec import block_param_count

KINDS = ["llama_mha", "llama_gqa", "llama_bias", "qwen2", "mistral", "gpt2"]


def _calib(n=16, t=16, seed=0):
  return np.random.default_rng(seed).integers(0, 128, size=(n, t)).astype(np.int32)


def _leaves_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


@pytest.mark.parametrize("kind", KINDS)
def test_prunes_to_the_ratio_and_runs(tiny_dir, kind):
  m = jaxprune.load(tiny_dir(kind))
  r = prune(m, _calib(), PruneConfig(sparsity=0.3, batch_size=8))
  p = r.report["params"]
  dense_blocks = sum(block_param_count(b) for b in m.params["layers"])
  pruned_blocks = sum(block_param_count(b) for b in r.model.params["layers"])
  assert p["pruned_blocks_before"] == dense_blocks and p["pruned_blocks_after"] == pruned_blocks
  assert p["after"] == r.model.num_params
  # Within one MLP channel per block of the requested ratio.
  per_channel = 3 * m.spec.hidden_size if m.spec.fam.gated_mlp else 2 * m.spec.hidden_size + 1
  assert abs(p["ratio_of_pruned_blocks"] - 0.3) <= m.spec.num_layers * per_channel / dense_blocks
  assert p["ratio_global"] == pytest.approx(1 - r.model.num_params / m.num_params)
  out = np.asarray(logits(r.model.spec, r.model.params, _calib(2, 20, seed=1)))
  assert np.all(np.isfinite(out))
  # The input model is untouched.
  assert _leaves_equal(m.params, jaxprune.load(tiny_dir(kind)).params)


def test_same_seed_gives_bit_identical_weights(tiny_dir):
  m = jaxprune.load(tiny_dir("llama_gqa"))
  cfg = PruneConfig(sparsity=0.4, batch_size=8, heads="similarity", refit=True, intercept=True)
  a = prune(m, _calib(), cfg).model
  b = prune(m, _calib(), cfg).model
  assert a.spec == b.spec and _leaves_equal(a.params, b.params)


def test_reconstruction_lowers_the_error_it_targets(tiny_dir):
  m = jaxprune.load(tiny_dir("llama_mha"))
  r = prune(m, _calib(32), PruneConfig(sparsity=0.3, batch_size=8))
  for mod in r.report["modules"]:
    for level in ("first_level", "second_level"):
      assert mod[level]["residual_after"] <= mod[level]["residual_before"] + 1e-7
    assert mod["error_reconstructed"] <= mod["error_inherited"] + 1e-7
  later = [mod for mod in r.report["modules"] if mod["error_inherited"] > 1e-4]
  assert later and all(mod["error_reconstructed"] < mod["error_inherited"] for mod in later)


def test_nothing_removed_at_zero_sparsity_without_reconstruction(tiny_dir):
  m = jaxprune.load(tiny_dir("qwen2"))
  r = prune(m, _calib(), PruneConfig(sparsity=0.0, reconstruct=False, batch_size=8))
  assert r.model.spec == m.spec and _leaves_equal(r.model.params, m.params)


@pytest.mark.parametrize("cfg", [
    dict(heads="similarity"), dict(heads="similarity", tau=1e-6), dict(allocation="adaptive"),
    dict(allocation="adaptive", heads="similarity"), dict(score_data="random"), dict(score_data="identity"),
    dict(refit=True, intercept=True), dict(reconstruct=False, refit=True), dict(layers=(1, 2)),
    dict(free_groups=True), dict(method="goa-energy"), dict(attn_sparsity=0.0), dict(method="goa-obs", refit=True),
    dict(compensate=True, reconstruct=False), dict(auto_damping=True, refit=True)])
def test_every_option_runs_and_meets_the_budget(tiny_dir, cfg):
  m = jaxprune.load(tiny_dir("llama_gqa"))
  r = prune(m, _calib(), PruneConfig(sparsity=0.3, batch_size=8, **cfg))
  ratio = r.report["params"]["ratio_of_pruned_blocks"]
  if cfg.get("tau") is None:
    assert abs(ratio - 0.3) < 0.05
  if "layers" in cfg:
    assert r.model.spec.layers[0] == m.spec.layers[0] and _leaves_equal(r.model.params["layers"][0],
                                                                        m.params["layers"][0])
  assert np.all(np.isfinite(np.asarray(logits(r.model.spec, r.model.params, _calib(2)))))


def test_intercept_adds_biases_consistently(tiny_dir):
  m = jaxprune.load(tiny_dir("llama_gqa"))
  r = prune(m, _calib(), PruneConfig(sparsity=0.3, batch_size=8, intercept=True))
  s = r.model.spec
  assert s.qkv_bias and s.o_bias and s.mlp_bias
  for blk in r.model.params["layers"]:
    assert all("bias" in blk["attn"][k] for k in "qkvo") and all("bias" in blk["mlp"][k] for k in blk["mlp"])


def test_kernels_compile_once_per_distinct_shape(tiny_dir):
  m = jaxprune.load(tiny_dir("llama_gqa"))
  kernels.first_pass.clear_cache()
  kernels.final_pass.clear_cache()
  prune(m, _calib(), PruneConfig(sparsity=0.3, batch_size=8))
  # Both layers are dense and alike when their statistics are taken: one compile per module kind.
  assert kernels.first_pass._cache_size() == 2
  # Pruned shapes: at most one per distinct (kind, layer shape).
  assert kernels.final_pass._cache_size() <= 4


@pytest.mark.parametrize("cfg,msg", [
    (dict(sparsity=1.0), r"outside \[0, 1\)"), (dict(sparsity=-0.1), r"outside \[0, 1\)"),
    (dict(layers=(0, 3)), "block range 0:3 is outside"), (dict(layers=(1, 1)), "block range"),
    (dict(heads="similarity", tau=0.0), "tau must be positive"), (dict(tau=-1.0), "tau must be positive"),
    (dict(method="nope"), "unknown pruning method"), (dict(damping=0.0), "damping must be positive"),
    (dict(batch_size=3), "not a multiple of the 8 data-parallel devices")])
def test_bad_config_is_refused(tiny_dir, cfg, msg):
  m = jaxprune.load(tiny_dir("llama_mha"))
  with pytest.raises(UsageError, match=msg):
    prune(m, _calib(), dataclasses.replace(PruneConfig(batch_size=8), **cfg))


def test_calibration_that_does_not_split_is_refused(tiny_dir):
  m = jaxprune.load(tiny_dir("llama_mha"))
  with pytest.raises(UsageError, match="do not split into batches"):
    prune(m, _calib(12), PruneConfig(batch_size=8))


def test_auto_damping_chooses_on_held_out_windows(tiny_dir):
  from jaxprune.pipeline import DAMPING_GRID
  m = jaxprune.load(tiny_dir("llama_gqa"))
  r = prune(m, _calib(24), PruneConfig(sparsity=0.3, batch_size=8, auto_damping=True, refit=True))
  assert r.report["calibration"]["held_out_for_damping"] == 8
  for mod in r.report["modules"]:
    for level in ("first_level", "second_level", "refit"):
      held = mod[level]["heldout_residuals"]
      assert len(held) == len(DAMPING_GRID)
      best = min(held, key=held.get)
      assert mod[level]["damping"] == pytest.approx(float(best)) or mod[level]["retries"] > 0
  with pytest.raises(UsageError, match="at least two batches"):
    prune(m, _calib(8), PruneConfig(batch_size=8, auto_damping=True))
