"""Pruning the real SmolLM2-135M: small calibration so it runs in CI; the full
protocol (128 x 128 calibration, 256 test windows) is benchmarks/quality.py."""

import os

import numpy as np
import pytest

import jaxprune
from jaxprune.data import eval_windows, read_text, sample_windows, tokenize
from jaxprune.eval import perplexity
from jaxprune.prune import PruneConfig, prune

pytestmark = pytest.mark.smollm2

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext-2")


@pytest.fixture(scope="module")
def setup():
  model = jaxprune.load("smollm2-135m")
  tok = jaxprune.load_tokenizer("smollm2-135m")
  calib, _ = sample_windows(tokenize(tok, read_text(os.path.join(DATA, "valid.txt"))), 128, 32, seed=0)
  test = eval_windows(tokenize(tok, read_text(os.path.join(DATA, "test.txt"))), 64, 24)
  dense = perplexity(model.spec, model.params, test, batch_size=8).perplexity
  return model, calib, test, dense


def _ppl(result, test):
  return perplexity(result.model.spec, result.model.params, test, batch_size=8).perplexity


def test_output_energy_beats_random_selection_by_a_wide_margin(setup):
  # The structure of docs/method.md's probe (section 2: 1229 of 1536 MLP channels in every block,
  # all heads kept, 118.6M parameters), with a quarter of its calibration data.
  model, calib, test, dense = setup
  cfg = dict(sparsity=0.15, attn_sparsity=0.0, reconstruct=False, refit=False, intercept=False, compensate=False,
             allocation="uniform", score_data="calib")
  ours = prune(model, calib, PruneConfig(method="goa-energy", **cfg))
  rand = prune(model, calib, PruneConfig(method="random", **cfg))
  assert ours.report["params"]["after"] == rand.report["params"]["after"]
  assert all(abs(l["ffn_dim"] - 1229) <= 1 for l in ours.report["layers"])
  ppl_ours, ppl_rand = _ppl(ours, test), _ppl(rand, test)
  print(f"\ndense {dense:.2f}, goa-energy {ppl_ours:.2f}, random {ppl_rand:.2f}")
  assert dense < ppl_ours < 1.5 * dense
  assert ppl_rand > 2 * ppl_ours


def test_paper_defaults_reconstruct_and_report_per_layer(setup):
  model, calib, test, dense = setup
  r = prune(model, calib, PruneConfig(sparsity=0.2, layers=(0, 10), method="goa", reconstruct=True, refit=False,
                                      intercept=False, damping=1e-3, allocation="uniform", score_data="calib",
                                      attn_sparsity=None, absorb=0.0, inherited_error=True))
  mods = r.report["modules"]
  assert len(mods) == 20 and {m["layer"] for m in mods} == set(range(10))
  # Reconstruction never makes the module error it targets worse, and usually lowers it a lot.
  for m in mods:
    lvl = m["second_level"]
    assert lvl["kept_original"] == (lvl["residual_after"] >= lvl["residual_before"])
  lowered = [m for m in mods if m["error_inherited"] > 0.05]
  assert lowered and np.median([m["error_reconstructed"] / m["error_inherited"] for m in lowered]) < 0.7
  # Layers outside the range are untouched.
  for i in range(10, model.spec.num_layers):
    assert r.model.spec.layers[i] == model.spec.layers[i]
  assert np.isfinite(_ppl(r, test))
