"""A (data, model) mesh: activations over `data`, blocks over `model` through the whole run."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import jaxprune
from jaxprune import sharding
from jaxprune.prune import engine
from jaxprune.cli import main
from jaxprune.errors import UsageError
from jaxprune.eval.perplexity import perplexity
from jaxprune.prune import PruneConfig, prune
from tests import tiny
from tests.numerics import assert_reordering

REORDERINGS = 4  # permuted one-device runs: K of tests/numerics.py's multiple (2 M = 272 at K = 4)


def _calib():
  return np.random.default_rng(0).integers(0, tiny.VOCAB, size=(16, 16)).astype(np.int32)


@pytest.mark.parametrize("kind", ["llama_gqa", "qwen2"])
@pytest.mark.parametrize("preset,extra", [("recommended", {}), ("paper", {}),
                                          ("recommended-datafree", {}),  # absorb: targets from both streams
                                          ("baseline", dict(method="flap", allocation="adaptive"))])
def test_model_axis_keeps_the_same_units_with_blocks_sharded(tiny_dir, monkeypatch, kind, preset, extra):
  _assert_mesh_matches_one_device(tiny_dir, monkeypatch, kind, PruneConfig.preset(preset, sparsity=0.3, batch_size=8,
                                                                                  **extra))


@pytest.mark.parametrize("preset", ["paper", "recommended-datafree"])
def test_statistics_kept_split_keep_the_same_units(tiny_dir, monkeypatch, preset):
  """`solves="split"`: the paper's two-step reconstruction (its first level's input moments, which
  are not split, solved split too) and the data-free recipe (shrink 0.5, absorb 1) on the 2 x 4
  mesh keep the one-device run's units, within its reordering bound (tests/test_split_stats.py:
  the default recipe)."""
  _assert_mesh_matches_one_device(tiny_dir, monkeypatch, "llama_gqa",
                                  PruneConfig.preset(preset, sparsity=0.3, batch_size=8), solves="split")


def test_gemma3_keeps_the_same_units_with_blocks_sharded(tiny_dir, monkeypatch):
  """Gemma 3 (q/k norms, post-norms, one KV head, sliding window) on the same mesh. Qwen3's only
  difference from LLaMA, the q/k norms, is a part of Gemma 3, so one family covers both."""
  _assert_mesh_matches_one_device(tiny_dir, monkeypatch, "gemma3", PruneConfig.preset("recommended", sparsity=0.3,
                                                                                      batch_size=8))


def _assert_mesh_matches_one_device(tiny_dir, monkeypatch, kind, cfg, solves="auto"):
  calib = _calib()
  seen = []
  step = engine.step

  def spy(ctx, m):
    seen.append(getattr(m.block["mlp"]["up"]["kernel"].sharding, "spec", None))
    return step(ctx, m)

  monkeypatch.setattr(engine, "step", spy)
  one = prune(jaxprune.load(tiny_dir(kind), lazy=True), calib, cfg, mesh=sharding.make_mesh(1, 1))
  seen.clear()
  mesh = sharding.make_mesh(2, 4)
  got = prune(jaxprune.load(tiny_dir(kind), lazy=True), calib, cfg, mesh=mesh, solves=solves)
  # Every module saw its block split over `model` (MLP channels: 96 dense, then the kept width
  # where 4 divides it; the attention module sees the dense MLP).
  assert seen[0] == sharding.P(None, "model") and all(s is not None for s in seen)
  assert got.report["devices"] == {"data": 2, "model": 4, "platform": "cpu",
                                   "solves": "split" if solves == "split" else "joined"}
  assert [m["kept"] for m in got.report["modules"]] == [m["kept"] for m in one.report["modules"]]
  a = perplexity(one.model.spec, one.model.params, calib).mean_nll
  b = perplexity(got.model.spec, got.model.params, calib).mean_nll
  # The mesh changes only the order of float32 sums (data-parallel statistics, contractions split
  # over `model`). How far such a reordering moves the result is measured, not fitted: the one-device
  # run again on permuted windows (the same sums in other orders), as in test_tpu_scripts.
  assert_reordering(b, a, _reordered(lambda: jaxprune.load(tiny_dir(kind), lazy=True), calib, cfg, a), "mesh nll")


def test_q_k_norm_scales_are_named_by_head_dim(tiny_dir):
  """A q/k norm scales head_dim, not the model width: a rules table that splits `embed` must leave it whole
  (it used to fall to the norms' default, ("embed",), and be split like the hidden norms)."""
  params = jaxprune.load(tiny_dir("gemma3")).params
  blk = sharding.logical_axes(params)["layers"][0]
  assert blk["attn"]["q_norm"]["scale"] == blk["attn"]["k_norm"]["scale"] == ("head_dim",)
  assert blk["attn_post_norm"]["scale"] == blk["mlp_post_norm"]["scale"] == ("embed",)
  mesh = sharding.make_mesh(2, 4)
  placed = sharding.param_shardings(params, mesh, {**sharding.DEFAULT_RULES, "embed": sharding.MODEL}, quiet=True)
  got = placed["layers"][0]
  assert got["attn"]["q_norm"]["scale"].spec == got["attn"]["k_norm"]["scale"].spec == sharding.P(None)
  assert got["attn_post_norm"]["scale"].spec == sharding.P(sharding.MODEL)  # 64 wide: split over 4


def test_place_splits_what_the_axis_divides():
  mesh = sharding.make_mesh(2, 4)
  blk = {"attn": {"q": {"kernel": np.zeros((8, 4, 2), np.float32)}, "k": {"kernel": np.zeros((8, 3, 2), np.float32)}},
         "mlp": {"down": {"kernel": np.zeros((12, 8), np.float32)}}}
  placed = sharding.place(blk, mesh)
  assert placed["attn"]["q"]["kernel"].sharding.spec == sharding.P(None, "model", None)
  assert placed["attn"]["k"]["kernel"].sharding.spec == sharding.P(None, None, None)  # 3 KV heads: replicated
  assert placed["mlp"]["down"]["kernel"].sharding.spec == sharding.P("model", None)
  assert sharding.place(blk, sharding.make_mesh(8, 1)) is blk


@pytest.mark.parametrize("text,want", [("data=2,model=4", (2, 4)), ("model=2", (None, 2)), ("data=8", (8, 1))])
def test_parse_mesh(text, want):
  assert sharding.parse_mesh(text) == want


@pytest.mark.parametrize("text", ["data=2,mdl=4", "data=0", "model=x", "data=2,data=2"])
def test_parse_mesh_refuses(text):
  with pytest.raises(UsageError, match="expected comma-separated data=D and model=M"):
    sharding.parse_mesh(text)


def test_cli_mesh(tiny_dir, tmp_path, capsys):
  import shutil

  src = str(tmp_path / "src")
  shutil.copytree(tiny_dir("llama_gqa"), src)
  tiny.add_word_tokenizer(src)
  text = tmp_path / "calib.txt"
  text.write_text(" ".join(tiny.WORDS[i % len(tiny.WORDS)] for i in range(3000)))
  out = str(tmp_path / "o")
  args = ["--no-compile-cache", "prune", src, "--sparsity", "0.3", "--calib", str(text), "--calib-samples", "16",
          "--seq-len", "16", "--no-progress", "--out"]
  assert main(args + [out, "--mesh", "data=2,model=4", "--solves", "split"]) == 0
  with open(os.path.join(out, "report.json")) as f:
    devices = json.load(f)["devices"]
  assert devices["model"] == 4 and devices["solves"] == "split"
  assert main(args + [str(tmp_path / "p"), "--mesh", "data=4,model=4"]) == 2
  assert "a 4x4 mesh needs 16 devices; 8 are available" in capsys.readouterr().err


@pytest.mark.parametrize("n,m,most,want", [(67, 4, 96, 68), (66, 4, 96, 64), (1, 4, 96, 4), (95, 4, 96, 96),
                                           (96, 5, 96, 96), (94, 5, 96, 95), (3, 8, 6, 3), (10, 1, 96, 10)])
def test_round_units(n, m, most, want):
  from jaxprune.allocate import round_units

  assert round_units(n, m, most) == want


@pytest.mark.parametrize("allocation,rounding", [("uniform", "once"), ("uniform", "carry"), ("adaptive", "carry")])
def test_round_to_keeps_the_mlp_evenly_sharded(tiny_dir, allocation, rounding):
  mesh = sharding.make_mesh(2, 4)
  cfg = PruneConfig.preset("paper", sparsity=0.3, batch_size=8, allocation=allocation, rounding=rounding, round_to=4)
  r = prune(jaxprune.load(tiny_dir("llama_gqa")), _calib(), cfg, mesh=mesh)
  widths = [l.ffn_dim for l in r.model.spec.layers]
  assert all(w % 4 == 0 for w in widths) and min(widths) < 96, widths
  p = r.report["params"]
  # Each module's width is off its budget by under one channel before rounding and by at most
  # round_to / 2 = 2 more after it: 3 channels of 3 * D parameters (gate, up, down; D = 64) a module.
  assert abs(p["budget_error"]) <= 3 * 3 * 64 * len(widths), p
  for blk in r.model.params["layers"]:  # the pruned model's weights are still split over `model`
    assert blk["mlp"]["down"]["kernel"].sharding.spec == sharding.P("model", None)
    assert blk["mlp"]["up"]["kernel"].sharding.spec == sharding.P(None, "model")


def test_device_solves_split_their_columns_over_model(tiny_dir, monkeypatch):
  """Where the solves run on the devices (GPUs: here forced on the CPU), each device solves for
  its own columns of W: the joined Gram matrix replicated, X^T Y split by columns over `model`.
  The run keeps the units of a one-device run with the same solves."""
  from jaxprune import placement, reconstruct

  monkeypatch.setattr(placement, "lapack_solves", lambda: False)
  seen = []
  solve = reconstruct._solve

  def spy(xx, xy, delta, intercept, rows=None):
    seen.append((xx.is_fully_replicated, len(xx.sharding.device_set), tuple(getattr(xy.sharding, "spec", ()))))
    return solve(xx, xy, delta, intercept, rows)

  monkeypatch.setattr(reconstruct, "_solve", spy)
  cfg = PruneConfig.preset("recommended", sparsity=0.3, batch_size=8)
  calib = _calib()
  runs = {}
  for shape in ((1, 1), (2, 4)):
    seen.clear()
    runs[shape] = prune(jaxprune.load(tiny_dir("llama_gqa")), calib, cfg, mesh=sharding.make_mesh(*shape))
    if shape == (2, 4):
      assert seen and all(rep and n == 8 and spec == (None, "model") for rep, n, spec in seen), seen
  one, got = runs[(1, 1)], runs[(2, 4)]
  assert [m["kept"] for m in got.report["modules"]] == [m["kept"] for m in one.report["modules"]]
  a = perplexity(one.model.spec, one.model.params, calib).mean_nll
  b = perplexity(got.model.spec, got.model.params, calib).mean_nll
  assert_reordering(b, a, _reordered(lambda: jaxprune.load(tiny_dir("llama_gqa")), calib, cfg, a), "device solves nll")


def _reordered(load, calib, cfg, first: float, samples: int = REORDERINGS) -> list:
  """How far the one-device run's mean NLL moves when its windows come in other orders
  (tests/numerics.py, point 2 on reorderings: `samples` draws of the rounding)."""
  spreads = []
  for k in range(samples):
    perm = np.random.default_rng(k + 1).permutation(len(calib))
    again = prune(load(), calib[perm], cfg, mesh=sharding.make_mesh(1, 1))
    spreads.append(perplexity(again.model.spec, again.model.params, calib).mean_nll - first)
  return spreads


def test_activations_are_placed_by_logical_names_through_the_rules():
  """Streams, hidden inputs, Gram rows and solutions name their axes like the parameters do,
  so one rules table moves them: e.g. `mlp`-like features off `model` changes the Gram's rows."""
  from jax.sharding import PartitionSpec as P

  mesh = sharding.make_mesh(data=2, model=4)
  assert set(a for axes in sharding.ACTIVATION_AXES.values() for a in axes if a) <= set(sharding.DEFAULT_RULES)
  assert sharding.stream_sharding(mesh).spec == P(None, sharding.DATA)
  assert sharding.gram_rows(mesh, 8).spec == P(sharding.MODEL, None)
  assert sharding.gram_rows(mesh, 8, shards=True).spec == P(sharding.DATA, sharding.MODEL, None)
  assert sharding.gram_rows(mesh, 6) is None  # 4 does not divide 6: the sums stay replicated
  rules = {**sharding.DEFAULT_RULES, "features": None, "batch": None}
  assert sharding.activation_spec("gram", mesh, rules) == P(None, None)
  assert sharding.activation_spec("stream", mesh, rules) == P(None, None)
  assert sharding.activation_spec("hidden", mesh, drop=("features",)) == P(None, sharding.DATA, None, None)
