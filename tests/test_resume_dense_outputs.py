"""The plan's stored dense outputs (kept in the checkpoint for a resumed run) change no
number: a run whose store does not fit on the disk, or whose stored output is damaged,
computes the same outputs again with the plan's own kernels, to the same bits."""

import logging
import os

import jax
import numpy as np
import pytest

import jaxprune
from jaxprune.prune import PruneConfig, prune
from jaxprune.stats import dense_outputs
from tests import tiny

CALIB = np.random.default_rng(0).integers(1, tiny.VOCAB, size=(24, 16), dtype=np.int32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  return tiny.save("llama_gqa", str(tmp_path_factory.mktemp("store") / "model"), layers=3)


def _bits(result) -> list[bytes]:
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(result.model.params)]


@pytest.mark.parametrize("config", [
    PruneConfig(sparsity=0.4, batch_size=8),  # the recipe: refit with absorb against the dense outputs
    PruneConfig(sparsity=0.4, batch_size=8, auto_damping=True),  # windows in two groups (one held out)
    PruneConfig.preset("recommended", sparsity=0.4, batch_size=8, skip_positions=2, absorb=0.0),
])
def test_results_do_not_depend_on_free_disk_space(model_dir, monkeypatch, config):
  m = jaxprune.load(model_dir)
  stored = prune(m, CALIB, config)
  monkeypatch.setattr(dense_outputs.DenseOutputs, "fits", staticmethod(lambda directory, nbytes: False))
  again = prune(m, CALIB, config)
  # Both paths were taken: every module read its output once, or computed it again.
  assert "dense_recompute" not in stored.report["passes"] and stored.report["passes"]["dense_read"] > 0
  assert "dense_read" not in again.report["passes"]
  assert again.report["passes"]["dense_recompute"] == stored.report["passes"]["dense_read"]
  assert _bits(again) == _bits(stored)


def test_damaged_stored_output_is_computed_again_on_resume(model_dir, tmp_path, caplog):
  config = PruneConfig(sparsity=0.4, batch_size=8)
  m = jaxprune.load(model_dir)
  whole = prune(m, CALIB, config)
  d = str(tmp_path / "ckpt")

  def stop(event):
    if event["event"] == "block" and event["layer"] == 0:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    prune(m, CALIB, config, checkpoint=d, progress=stop)
  path = os.path.join(d, "dense_outputs", "dense_0002_mlp.npy")
  y = np.load(path)
  y.flat[5] += np.float32(1e-3)  # a valid file, finite, but not what was written
  np.save(path, y)
  with caplog.at_level(logging.WARNING, logger="jaxprune.stats.dense_outputs"):
    resumed = prune(m, CALIB, config, checkpoint=d)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and "dense_0002_mlp.npy" in warnings[0] and "sha256" in warnings[0]
  assert resumed.report["passes"]["dense_recompute"] == 1
  assert _bits(resumed) == _bits(whole)
