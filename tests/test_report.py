"""`jaxprune report DIR` on tiny pruned runs: the four PNGs, and the head divergences behind one."""

import json
import os
import shutil

import numpy as np
import pytest
from matplotlib import image

from jaxprune import criteria
from jaxprune.cli import main
from jaxprune.cli.report_cmd import FIGURES
from jaxprune.report.plots import KEPT
from tests import tiny

QUALITY = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "quality.json")
BASE = ("--sparsity", "0.3", "--calib-samples", "16", "--seq-len", "16", "--batch-size", "8")


def _cli(capsys, *argv):
  capsys.readouterr()
  code = main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


@pytest.fixture(scope="module")
def setup(tiny_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("report")
  model = str(root / "model")
  shutil.copytree(tiny_dir("llama_gqa"), model)
  tiny.add_word_tokenizer(model)
  return {"model": model, "calib": tiny.write_words(str(root / "calib.txt"), 900, seed=1), "root": root}


def _png(path):
  img = image.imread(str(path))  # float RGBA in [0, 1]
  assert img.ndim == 3 and img.shape[2] in (3, 4)
  return img[..., :3]


@pytest.fixture(scope="module")
def run_dir(setup):
  """One tiny run for every test (pruning is the slow part): --heads similarity at a fixed tau and
  without reconstruction, so layer 0's divergences are the dense model's (see below)."""
  out = setup["root"] / "run"
  code = main([str(a) for a in ("prune", setup["model"], *BASE, "--calib", setup["calib"], "--heads", "similarity",
                                "--tau", "0.02", "--no-reconstruct", "--out", out)])
  assert code == 0
  return out


def test_report_writes_four_nonblank_pngs(capsys, run_dir):
  run = run_dir
  code, out, err = _cli(capsys, "report", run, "--quality", QUALITY)
  assert code == 0, err
  # The perplexity-vs-parameters figure labels every row of the quality table (a few KB of
  # antialiased text each), so its bound grows with the table; the others have a fixed layout.
  labels = len({r["key"].rsplit("|", 1)[0] for r in json.load(open(QUALITY))["runs"]})
  for name in FIGURES:
    img = _png(run / name)
    assert img.shape[0] >= 300 and img.shape[1] >= 400, (name, img.shape)
    assert img.std() > 0.01, f"{name} is blank"  # a blank canvas has std 0
    assert os.path.getsize(run / name) < (50_000 + 5_000 * labels if name == "perplexity_vs_params.png" else 200_000)
    assert str(run / name) in out
  # The kept-units figure draws the kept bars in the KEPT colour.
  rgb = np.asarray([int(KEPT[i:i + 2], 16) / 255 for i in (1, 3, 5)])
  assert (np.abs(_png(run / "kept.png") - rgb).max(-1) < 0.02).mean() > 0.01
  # The middle layer's matrix and tau are the run's own.
  hs = json.loads((run / "figures.json").read_text())["head_similarity"]
  D = np.asarray(hs["js"])
  report = json.loads((run / "report.json").read_text())
  attn1 = next(m for m in report["modules"] if m["layer"] == 1 and m["module"] == "attn")
  assert hs["layer"] == 1 and hs["from_run"] and hs["tau"] == 0.02 and np.allclose(D, attn1["js"], rtol=0, atol=1e-9)
  assert hs["selected"] == criteria.algorithm2(D, hs["tau"]) == attn1["similar_heads"]
  assert hs["pairs_under_tau"] == [[i, j] for i in range(4) for j in range(i + 1, 4) if D[i, j] < hs["tau"]]

  # Figures are never replaced without --force.
  before = (run / "kept.png").read_bytes()
  code, _, err = _cli(capsys, "report", run, "--quality", QUALITY)
  assert code == 2 and "already exists" in err and "--force" in err
  assert (run / "kept.png").read_bytes() == before
  code, _, err = _cli(capsys, "report", run, "--quality", QUALITY, "--force", "--js-layer", "0", "--tau", "0.5")
  assert code == 0, err
  hs = json.loads((run / "figures.json").read_text())["head_similarity"]
  assert hs["layer"] == 0 and hs["tau"] == 0.5


def test_recomputed_divergences_equal_the_runs(capsys, run_dir, tmp_path):
  """Layer 0 of a --heads similarity run without reconstruction sees the dense stream, so the
  divergences `report` recomputes from the dense model must be the ones the run used."""
  run = tmp_path / "run"
  shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("*.png", "figures.json"))
  code, _, err = _cli(capsys, "report", run, "--js-layer", "0", "--quality", QUALITY)
  assert code == 0, err
  used = json.loads((run / "figures.json").read_text())["head_similarity"]
  assert used["from_run"] and used["tau"] == 0.02 and used["layer"] == 0
  report = json.loads((run / "report.json").read_text())
  attn0 = next(m for m in report["modules"] if m["layer"] == 0 and m["module"] == "attn")
  assert used["selected"] == attn0["similar_heads"]
  # --model forces the recomputation; the calibration windows are rebuilt from report.json
  # (its text path, seed, window count and length).
  code, _, err = _cli(capsys, "report", run, "--js-layer", "0", "--model", report["model"], "--quality", QUALITY,
                      "--force")
  assert code == 0, err
  again = json.loads((run / "figures.json").read_text())["head_similarity"]
  assert not again["from_run"] and again["tau"] == 0.02 and again["selected"] == used["selected"]
  # Same windows (the run's 16, rebuilt from its seed), same f32 statistic, summed over the 16 x 16
  # (window, query) rows in another order. Reassociating an f32 sum of n = 256 terms moves it by at
  # most n * 2^-24 * sum|terms| <= 256 * 6e-8 * (256 ln 2), i.e. 1.1e-5 after dividing by the 256
  # rows; the report rounds to 1e-6 (5e-7 more); the attention probabilities themselves come from
  # another jitted graph and differ by a few eps, which moves a JS value by O(eps).
  np.testing.assert_allclose(again["js"], used["js"], rtol=0, atol=1.5e-5)


def test_report_refuses_what_it_cannot_draw(capsys, run_dir, tmp_path):
  code, _, err = _cli(capsys, "report", tmp_path)
  assert code == 2 and "report.json does not exist" in err and "jaxprune prune" in err
  fresh = tmp_path / "copy"
  shutil.copytree(run_dir, fresh, ignore=shutil.ignore_patterns("*.png", "figures.json"))
  code, _, err = _cli(capsys, "report", fresh, "--js-layer", "7", "--quality", QUALITY)
  assert code == 2 and "--js-layer 7 is outside the model's 2 blocks" in err
  assert not [f for f in os.listdir(fresh) if f.endswith(".png")]  # nothing half-written
  code, _, err = _cli(capsys, "report", fresh, "--model", tmp_path / "nowhere")
  assert code == 2 and "does not exist" in err and "--model" in err
