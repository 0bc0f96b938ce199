"""The greedy pipeline end to end on tiny models."""

import dataclasses
import math
import os

import chex
import jax
import numpy as np
import pytest

import jaxprune
from jaxprune.prune import presets
from jaxprune.stats import passes
from jaxprune.errors import UsageError
from jaxprune.models import logits
from jaxprune.prune import PruneConfig, prune
from jaxprune.spec import block_param_count

KINDS = ["llama_mha", "llama_gqa", "llama_bias", "qwen2", "mistral", "gpt2"]


def _calib(n=16, t=16, seed=0):
  return np.random.default_rng(seed).integers(0, 128, size=(n, t)).astype(np.int32)


def _leaves_equal(a, b) -> bool:
  try:
    chex.assert_trees_all_equal(a, b, strict=True)
  except AssertionError:
    return False
  return True


# The paper's configuration, so that these tests do not move with the recommended defaults.
PAPER = presets.PAPER


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
  r = prune(m, _calib(32), PruneConfig(sparsity=0.3, batch_size=8, inherited_error=True, **PAPER))
  for mod in r.report["modules"]:
    for level in ("first_level", "second_level"):
      lvl = mod[level]
      # The raw residual of the solve is stored; a solve that fits worse keeps the original weights.
      assert lvl["kept_original"] == (lvl["residual_after"] >= lvl["residual_before"])
    second = mod["second_level"]
    assert mod["error_reconstructed"] == min(second["residual_after"], second["residual_before"])
  # Where the pruned stream differs from the dense one, the solves really fit better.
  later = [mod for mod in r.report["modules"] if mod["error_inherited"] > 1e-4]
  assert later and all(not mod["second_level"]["kept_original"] for mod in later)
  assert all(mod["error_reconstructed"] < mod["error_inherited"] for mod in later)


def test_nothing_removed_at_zero_sparsity_without_reconstruction(tiny_dir):
  m = jaxprune.load(tiny_dir("qwen2"))
  r = prune(m, _calib(), PruneConfig(sparsity=0.0, batch_size=8, **{**PAPER, "reconstruct": False}))
  assert r.model.spec == m.spec and _leaves_equal(r.model.params, m.params)


def _attn(r):
  return [m for m in r.report["modules"] if m["module"] == "attn"]


def _kept(r):
  return [m["kept"] for m in r.report["modules"]]


# Each option with a check that it had its effect (r: its run, base: the PAPER run).
OPTIONS = {
    "similarity": (dict(heads="similarity"), lambda r, base: all("similar_heads" in m for m in _attn(r))),
    "tau": (dict(heads="similarity", tau=1e-6),  # nothing is that similar: no head goes
            lambda r, base: r.report["tau"] == 1e-6 and all(m["similar_heads"] == [] for m in _attn(r))),
    "adaptive": (dict(allocation="adaptive"), lambda r, base: r.report["seconds"]["plan"] > 0),
    "adaptive-similarity": (dict(allocation="adaptive", heads="similarity"),
                            lambda r, base: r.report["tau"] is not None and r.report["tau"] > 0),
    "random-stats": (dict(score_data="random"), lambda r, base: _kept(r) != _kept(base)),
    "identity-stats": (dict(score_data="identity"), lambda r, base: _kept(r) != _kept(base)),
    "refit-intercept": (dict(refit=True, intercept=True),
                        lambda r, base: all("refit" in m for m in r.report["modules"]) and r.model.spec.mlp_bias),
    "refit-only": (dict(reconstruct=False, refit=True),
                   lambda r, base: all("refit" in m and "second_level" not in m for m in r.report["modules"])),
    "layers": (dict(layers=(1, 2)), lambda r, base: r.report["config"]["layers"] == [1, 2]),
    "free-groups": (dict(free_groups=True),
                    lambda r, base: [m["units_after"] for m in _attn(r)] != [m["units_after"] for m in _attn(base)]),
    "goa-energy": (dict(method="goa-energy"), lambda r, base: _kept(r) != _kept(base)),
    "no-attn": (dict(attn_sparsity=0.0), lambda r, base: all(m["units_after"] == m["units_before"] for m in _attn(r))),
    "goa-obs": (dict(method="goa-obs", refit=True), lambda r, base: _kept(r) != _kept(base)),
    "compensate": (dict(compensate=True, reconstruct=False), lambda r, base: r.model.spec.mlp_bias),
    "auto-damping": (dict(auto_damping=True, refit=True),
                     lambda r, base: all("heldout_residuals" in m["refit"] for m in r.report["modules"])),
}


@pytest.fixture(scope="module")
def paper_run(tiny_dir):
  return prune(jaxprune.load(tiny_dir("llama_gqa")), _calib(), PruneConfig(sparsity=0.3, batch_size=8, **PAPER))


@pytest.mark.parametrize("name", list(OPTIONS))
def test_every_option_runs_meets_the_budget_and_has_its_effect(tiny_dir, paper_run, name):
  cfg, had_effect = OPTIONS[name]
  m = jaxprune.load(tiny_dir("llama_gqa"))
  r = prune(m, _calib(), PruneConfig(sparsity=0.3, batch_size=8, **{**PAPER, **cfg}))
  ratio = r.report["params"]["ratio_of_pruned_blocks"]
  if cfg.get("tau") is None:
    assert abs(ratio - 0.3) < 0.05
  if "layers" in cfg:
    assert r.model.spec.layers[0] == m.spec.layers[0] and _leaves_equal(r.model.params["layers"][0],
                                                                        m.params["layers"][0])
  assert np.all(np.isfinite(np.asarray(logits(r.model.spec, r.model.params, _calib(2)))))
  assert had_effect(r, paper_run), f"option {cfg} left no trace in the run"


def test_intercept_adds_biases_consistently(tiny_dir):
  m = jaxprune.load(tiny_dir("llama_gqa"))
  r = prune(m, _calib(), PruneConfig(sparsity=0.3, batch_size=8, intercept=True))
  s = r.model.spec
  assert s.qkv_bias and s.o_bias and s.mlp_bias
  for blk in r.model.params["layers"]:
    assert all("bias" in blk["attn"][k] for k in "qkvo") and all("bias" in blk["mlp"][k] for k in blk["mlp"])


def test_kernels_compile_once_per_module_kind(tiny_dir, max_traces):
  m = jaxprune.load(tiny_dir("llama_gqa"))
  cfg = PruneConfig(sparsity=0.3, batch_size=8, **PAPER)
  prune(m, _calib(), cfg)
  # Statistics are taken on dense-shaped modules and the pruned stream advances by a
  # full-width second level with zero rows for removed units, so each pass compiles
  # once per module kind however many distinct shapes the layers end with.
  max_traces(passes, "dense_pass", 2, static_argnames=("kind", "cfg", "first_moments", "inherited_error", "mesh", "skip"))
  max_traces(passes, "hidden_pass", 2, static_argnames=("kind", "cfg", "needs", "mesh"))
  max_traces(passes, "second_apply", 2, static_argnames=("mesh",))
  prune(m, _calib(), cfg)


@pytest.mark.parametrize("cfg,msg", [
    (dict(sparsity=1.0), r"outside \[0, 1\)"), (dict(sparsity=-0.1), r"outside \[0, 1\)"),
    (dict(layers=(0, 3)), "block range 0:3 is outside"), (dict(layers=(1, 1)), "block range"),
    (dict(heads="similarity", tau=0.0), "tau must be positive"), (dict(tau=-1.0), "tau must be positive"),
    (dict(method="nope"), "unknown pruning method"), (dict(damping=0.0), "damping must be positive"),
    (dict(batch_size=3), "not a multiple of the 8 data-parallel devices"),
    (dict(shrink=1.5), r"shrink must lie in \[0, 1\], got 1.5"), (dict(min_keep=1.0), r"min_keep must lie in \[0, 1\)"),
    (dict(selfgen_samples=0), "selfgen_samples must be a positive number of windows, got 0"),
    (dict(absorb=1.5), r"absorb must lie in \[0, 1\], got 1.5")])
def test_bad_config_is_refused(tiny_dir, cfg, msg):
  m = jaxprune.load(tiny_dir("llama_mha"))
  with pytest.raises(UsageError, match=msg):
    prune(m, _calib(), dataclasses.replace(PruneConfig(batch_size=8), **cfg))


def test_calibration_that_does_not_split_is_refused(tiny_dir):
  m = jaxprune.load(tiny_dir("llama_mha"))
  with pytest.raises(UsageError, match="do not split into batches"):
    prune(m, _calib(12), PruneConfig(batch_size=8))


def test_auto_damping_chooses_on_held_out_windows(tiny_dir):
  from jaxprune.prune.config import DAMPING_GRID
  m = jaxprune.load(tiny_dir("llama_gqa"))
  r = prune(m, _calib(24), PruneConfig(sparsity=0.3, batch_size=8, auto_damping=True, refit=True, reconstruct=True))
  assert r.report["calibration"]["held_out_for_damping"] == 8
  # Modules that keep everything on the dense model's input are left as they are (no solve).
  solved = [mod for mod in r.report["modules"] if not mod.get("unchanged")]
  assert solved
  for mod in solved:
    for level in ("first_level", "second_level", "refit"):
      held = mod[level]["heldout_residuals"]
      assert len(held) == len(DAMPING_GRID)
      best = min(held, key=held.get)
      assert mod[level]["damping"] == pytest.approx(float(best)) or mod[level]["retries"] > 0
  with pytest.raises(UsageError, match="at least two batches"):
    prune(m, _calib(8), PruneConfig(batch_size=8, auto_damping=True))


def test_recommended_plan_ranks_goa_obs_costs_and_keeps_min_keep(tiny_dir):
  """The default preset allocates adaptively by goa-obs costs (relative to the residual
  stream, per parameter): layers end with different widths, none below min_keep, on budget."""
  m = jaxprune.load(tiny_dir("llama_gqa"))
  c = PruneConfig(sparsity=0.4, batch_size=8)
  assert (c.allocation, c.method, c.min_keep) == ("adaptive", "goa-obs", 0.25)
  r = prune(m, _calib(), c)
  layers = r.model.spec.layers
  dense = m.spec.layers[0]
  assert all(l.ffn_dim >= math.ceil(0.25 * dense.ffn_dim) and l.num_heads >= 1 for l in layers)
  assert abs(r.report["params"]["ratio_of_pruned_blocks"] - 0.4) < 0.02
  loose = prune(m, _calib(), dataclasses.replace(c, min_keep=0.0, shrink=0.0))
  assert [l.ffn_dim for l in loose.model.spec.layers] != [l.ffn_dim for l in layers] or \
      [l.num_heads for l in loose.model.spec.layers] != [l.num_heads for l in layers]


def test_adaptive_plan_keeps_dense_outputs_for_the_layer_loop(tiny_dir, tmp_path, monkeypatch):
  """The recipe's plan runs the dense model once and stores each module's output; the layer
  loop reads them instead of a second dense pass, keeps the same units as a run that
  recomputes them, and leaves no files behind."""
  import tempfile

  from jaxprune.stats import dense_outputs
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  dirs, init = [], dense_outputs.DenseOutputs.__init__
  monkeypatch.setattr(dense_outputs.DenseOutputs, "__init__",
                      lambda self, directory, durable=False: dirs.append(directory) or init(self, directory, durable))
  m = jaxprune.load(tiny_dir("llama_gqa"))
  c = PruneConfig(sparsity=0.4, batch_size=8)
  stored = prune(m, _calib(), c)
  n_modules = 2 * m.spec.num_layers
  assert stored.report["passes"]["dense_read"] == n_modules and "dense_pass" not in stored.report["passes"]
  assert len(dirs) == 1 and dirs[0].startswith(str(tmp_path)) and not os.path.exists(dirs[0])
  monkeypatch.setattr(dense_outputs.DenseOutputs, "fits", staticmethod(lambda directory, nbytes: False))
  again = prune(m, _calib(), c)
  # Without the store, each module's output is computed again by the plan's kernels (the same bits:
  # tests/test_resume_dense_outputs.py).
  assert again.report["passes"]["dense_recompute"] == n_modules and "dense_read" not in again.report["passes"]
  assert "dense_pass" not in again.report["passes"]
  assert [mod["kept"] for mod in stored.report["modules"]] == [mod["kept"] for mod in again.report["modules"]]
  chex.assert_trees_all_equal_shapes(stored.model.params, again.model.params)


def test_adaptive_allocation_compiles_per_module_kind_not_per_width(tiny_dir):
  """Layers that end with different widths add no compiles: solves, residuals, surgery and
  added biases of each width run on the host, so a 6-block run compiles what a 2-block one does."""
  from tests import tiny

  compiles = []
  for layers in (2, 6):
    path = tiny.save("llama_gqa", str(tiny_dir("llama_gqa")) + f"-{layers}", layers=layers)
    m = jaxprune.load(path)
    jax.clear_caches()
    r = prune(m, _calib(), PruneConfig(sparsity=0.4, batch_size=8))
    assert len({l.ffn_dim for l in r.model.spec.layers}) > 1  # the widths do differ
    compiles.append(r.report["passes"]["compiles"])
  assert compiles[1] == compiles[0], compiles


@pytest.mark.parametrize("backend,mesh", [("gpu", None), ("tpu", None), ("gpu", (2, 4)), ("tpu", (2, 4))],
                         ids=["gpu", "tpu", "gpu-split", "tpu-split"])
def test_emulated_accelerator_paths_compile_nothing_per_block(tiny_dir, monkeypatch, backend, mesh):
  """Issue 31's compile bound on the emulated accelerator paths (`jax.default_backend` says gpu:
  float64 solves on the device; tpu: solves on the host, the float64 JAX work on the host CPU;
  on a 2 x 4 mesh, `auto` keeps the statistics split to solves and sweeps on the devices, float32
  with refinement on the TPU): a 12-block model whose layers end with different widths compiles
  at most one new kernel per block once every pruned module kind has been pruned on two streams
  (device solves pad each kept width to its bucket, `placement.bucket_width`), and keeps the
  CPU path's units (on its mesh)."""
  from jaxprune import sharding
  from jaxprune.prune.metrics import Compiles
  from tests import tiny

  path = tiny.save("llama_gqa", str(tiny_dir("llama_gqa")) + "-12", layers=12)
  m, cfg = jaxprune.load(path), PruneConfig(sparsity=0.4, batch_size=8)
  mesh = None if mesh is None else sharding.make_mesh(*mesh)
  ref = prune(m, _calib(), cfg, mesh=mesh)
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  jax.clear_caches()
  after_block, kinds_pruned = {}, {}

  def progress(event):
    if event["event"] == "module" and len(event["kept"]) < event["units_before"]:
      kinds_pruned.setdefault(event["module"], event["layer"])
    if event["event"] == "block":
      after_block[event["layer"]] = Compiles.count

  Compiles.start()
  r = prune(m, _calib(), cfg, progress=progress, mesh=mesh)
  assert r.report["devices"]["solves"] == ("joined" if mesh is None else "split")
  assert len({l.ffn_dim for l in r.model.spec.layers}) > 2  # the widths do differ
  # The adaptive plan may keep every head (then MLPs only). The first pruned block sees one
  # stream (dense and pruned still equal); the next compiles the two-stream variants once.
  first = max(kinds_pruned.values()) + 1
  assert "mlp" in kinds_pruned and first < 6, kinds_pruned
  new = after_block[11] - after_block[first]
  assert new <= 11 - first, (backend, new, after_block)
  assert [mod["kept"] for mod in r.report["modules"]] == [mod["kept"] for mod in ref.report["modules"]]


def test_modules_before_the_first_change_are_left_as_they_are(tiny_dir):
  """A module that keeps all its units while its input is still the dense model's is not refit:
  its least-squares refit would only return its own weights up to the ridge."""
  m = jaxprune.load(tiny_dir("llama_gqa"))
  # The default recipe at a small sparsity (without the intercept, whose zero biases would change
  # the modules' leaves): the adaptive plan leaves the first modules whole (sparsity 0 returns
  # the model before any module runs, so it cannot show this).
  r = prune(m, _calib(), PruneConfig(sparsity=0.05, intercept=False, batch_size=8))
  mods = r.report["modules"]
  first = next(j for j, mod in enumerate(mods) if not mod.get("unchanged"))
  assert first >= 1, "the plan prunes the first module: no module to check"
  whole = mods[:first]
  assert all(mod["error_after"] == 0.0 and mod["from_store"] for mod in whole)
  # Their weights come out as they went in, bit for bit.
  for mod in whole:
    dense, pruned = m.params["layers"][mod["layer"]][mod["module"]], r.model.params["layers"][mod["layer"]][mod["module"]]
    for a, b in zip(jax.tree.leaves(dense), jax.tree.leaves(pruned), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Once a module has changed, every later one is fit on its changed input.
  assert all(not mod.get("unchanged") and "refit" in mod for mod in mods[first:])


def test_skip_positions_changes_only_the_statistics_and_is_checked(tiny_dir):
  """skip_positions leaves each window's first positions out of the fits: the refit then
  differs from the full-window one, and a count that leaves no position is refused with the window length named."""
  m = jaxprune.load(tiny_dir("llama_gqa"))
  cfg = PruneConfig.preset("recommended", sparsity=0.3, batch_size=8)
  full = prune(m, _calib(), cfg)
  skipped = prune(m, _calib(), dataclasses.replace(cfg, skip_positions=2))
  assert skipped.report["config"]["skip_positions"] == 2
  assert not _leaves_equal(full.model.params, skipped.model.params)
  assert [mod["layer"] for mod in full.report["modules"]] == [mod["layer"] for mod in skipped.report["modules"]]
  assert all(np.isfinite(mod["error_after"]) for mod in skipped.report["modules"])
  with pytest.raises(UsageError, match=r"skip_positions=16 .*16-token"):
    prune(m, _calib(), dataclasses.replace(cfg, skip_positions=16))
  with pytest.raises(UsageError, match="skip_positions must be .* got -1"):
    prune(m, _calib(), dataclasses.replace(cfg, skip_positions=-1))


def _mlp_streams(model, tokens, i):
  """The residual stream entering block i's MLP, and that MLP's input after its norm."""
  from jaxprune.models import layers as L
  from jaxprune.models.forward import attn_step, hidden_states, positions_for
  pos = positions_for(tokens)
  x, _ = hidden_states(model.spec, model.params, tokens, layers=range(i))
  cfg = L.block_config(model.spec, i)
  x, _ = attn_step(cfg, model.params["layers"][i], x, pos)
  return np.asarray(x, np.float64), L.norm(cfg, model.params["layers"][i]["mlp_norm"], x)


@pytest.mark.parametrize("absorb", [0.5, 1.0])
def test_absorb_refits_onto_the_dense_stream(tiny_dir, absorb):
  # With absorb = a, the last MLP's refit solves least squares against its dense output plus
  # a times the error the residual stream carries in (dense stream minus pruned stream).
  from jaxprune.models import adapter as A
  from jaxprune.models import layers as L
  m = jaxprune.load(tiny_dir("llama_gqa"))
  damping = 1e-6
  cfg = PruneConfig.preset("paper", method="goa-obs", sparsity=0.3, attn_sparsity=0.0, reconstruct=False, refit=True,
                           intercept=True, damping=damping, absorb=absorb, batch_size=8)
  calib = _calib(32, 16)
  r = prune(m, calib, cfg)
  i = m.spec.num_layers - 1
  xd, hd = _mlp_streams(m, calib, i)
  xp, hp = _mlp_streams(r.model, calib, i)
  assert np.linalg.norm(xd - xp) > 1e-2 * np.linalg.norm(xd)  # the stream carries an error into the last MLP
  yd = np.asarray(A.apply(A.MLP, L.block_config(m.spec, i), m.params["layers"][i]["mlp"], hd, None), np.float64)
  p = r.model.params["layers"][i]["mlp"]
  x2 = np.asarray(A.inner(A.MLP, L.block_config(r.model.spec, i), p, hp, None)[0], np.float64)
  x2 = x2.reshape(-1, x2.shape[-1])
  xa = np.concatenate([x2, np.ones((len(x2), 1))], axis=1)
  w2, b2 = (np.asarray(t, np.float64) for t in A.second_level(A.MLP, p))
  got = np.concatenate([w2, b2[None]])
  lam = damping * np.mean(np.sum(x2**2, axis=0))
  reg = lam * np.diag([1.0] * x2.shape[1] + [0.0])

  def solve(y):
    return np.linalg.solve(xa.T @ xa + reg, xa.T @ y.reshape(-1, y.shape[-1]))

  def objective(w, y):
    return float(np.sum((xa @ w - y.reshape(-1, y.shape[-1]))**2) + np.sum(w * (reg @ w)))

  target = yd + absorb * (xd - xp)
  best = objective(solve(target), target)
  # The refit is the optimum of the absorbing target: far closer to it than the optimum of the
  # plain target (a refit that ignored `absorb`, or subtracted the error, would sit there, at a
  # ratio of 1 or more). The bound is a discrimination margin, not a rounding tolerance: the
  # float32 statistics and solve move the objective by relative O(1e-6) (gamma(512) ~ 3e-5 at
  # worst), far inside 1e-2 of a gap that is itself a sizeable share of the objective.
  gap = objective(got, target) - best
  plain_gap = objective(solve(yd), target) - best
  assert plain_gap > 0 and gap < 1e-2 * plain_gap, (gap, plain_gap)
