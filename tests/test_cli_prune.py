"""`jaxprune prune`, run in-process on a tiny model: outputs, report, and refusals."""

import json
import os
import shutil

import numpy as np
import pytest

import jaxprune
from jaxprune.cli import main
from jaxprune.models import logits
from tests import tiny
from tests.numerics import forward_bound, nll_bound


@pytest.fixture(scope="module")
def model_dir(tiny_dir, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("prune") / "model")
  shutil.copytree(tiny_dir("llama_gqa"), path)
  return tiny.add_word_tokenizer(path)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
  d = tmp_path_factory.mktemp("texts")
  return {"calib": tiny.write_words(str(d / "calib.txt"), 900, seed=1),
          "test": tiny.write_words(str(d / "test.txt"), 400, seed=2),
          "short": tiny.write_words(str(d / "short.txt"), 5, seed=3)}


def run(capsys, *argv):
  capsys.readouterr()
  code = main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


BASE = ("--sparsity", "0.3", "--calib-samples", "16", "--seq-len", "16", "--batch-size", "8")


def test_prune_writes_a_loadable_model_and_a_report(capsys, model_dir, texts, tmp_path):
  out = tmp_path / "pruned"
  code, stdout, err = run(capsys, "prune", model_dir, *BASE, "--calib", texts["calib"], "--eval-text", texts["test"],
                          "--eval-windows", "8", "--out", out)
  assert code == 0, err
  assert "parameters:" in stdout and "perplexity on" in stdout and "time:" in stdout
  report = json.loads((out / "report.json").read_text())
  pruned = jaxprune.load(str(out))
  assert report["params"]["after"] == pruned.num_params < jaxprune.load(model_dir).num_params
  assert abs(report["params"]["ratio_of_pruned_blocks"] - 0.3) < 0.05
  assert set(report["perplexity"]) >= {"dense", "pruned", "text", "windows"}
  assert report["perplexity"]["pruned"]["perplexity"] > 0 and report["config"]["sparsity"] == 0.3
  assert len(report["modules"]) == 2 * pruned.spec.num_layers
  lines = (out / "progress.jsonl").read_text().splitlines()
  assert sum(json.loads(l)["event"] == "module" for l in lines) == len(report["modules"])
  # The saved model is the pruned model: `jaxprune eval` on it works and agrees.
  code, stdout, err = run(capsys, "eval", out, "--text", texts["test"], "--seq-len", "16", "--max-windows", "8")
  assert code == 0, err
  ppl = float(stdout.split("perplexity")[1].split()[0])
  # Two float32 forwards of the same model (batches may differ): within the NLL bound of
  # tests/numerics.py (each forward within forward_bound of exact), plus the 4 printed decimals.
  want = report["perplexity"]["pruned"]["perplexity"]
  windows = np.zeros((8, 16), np.int32) + np.arange(16, dtype=np.int32)
  scale = float(np.abs(np.asarray(logits(pruned.spec, pruned.params, windows))).max())
  import torch
  from jaxprune.pytorch import load_pruned

  pruned64 = load_pruned(str(out), dtype=torch.float64, attn_implementation="eager")
  bound = nll_bound(2 * forward_bound(pruned64, windows), 1, pruned.spec.vocab_size, scale)
  assert ppl == pytest.approx(want, rel=np.expm1(bound), abs=5e-5 * (1 + 1e-9))
  assert not [p for p in os.listdir(tmp_path) if p != "pruned"]  # no temporary debris


def test_selfgen_and_random_calibration_run(capsys, model_dir, tmp_path):
  for calib in ("selfgen", "random"):
    code, _, err = run(capsys, "prune", model_dir, *BASE, "--calib", calib, "--out", tmp_path / calib)
    assert code == 0, err
    report = json.loads((tmp_path / calib / "report.json").read_text())
    assert report["calibration"]["source"] == calib
    # Self-generated text is scored on itself (the recommended-datafree preset), like real calibration.
    assert report["config"]["score_data"] == "calib"


def test_selfgen_window_count_comes_from_the_preset_unless_calib_samples_says(capsys, model_dir, tmp_path):
  """--calib selfgen generates the preset's selfgen_samples windows (1024 in recommended-datafree,
  here --selfgen-samples 8); an explicit --calib-samples sets the count of any calibration."""
  args = ("--sparsity", "0.3", "--seq-len", "16", "--batch-size", "8", "--calib", "selfgen")
  for extra, want in ((("--selfgen-samples", "8"), 8), (("--selfgen-samples", "8", "--calib-samples", "16"), 16)):
    out = tmp_path / str(want)
    code, _, err = run(capsys, "prune", model_dir, *args, *extra, "--out", out)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["windows"] == want and report["config"]["selfgen_samples"] == 8


def test_calibration_mixes_sources(capsys, model_dir, texts, tmp_path):
  """--calib TEXT selfgen: the text's --calib-samples windows then --selfgen-samples self-generated
  ones, each drawn as that source alone draws it, under the text's preset (not the data-free one)."""
  import argparse

  from jaxprune.cli.prune_inputs import calibration
  from jaxprune.prune import PruneConfig

  out = tmp_path / "mix"
  code, _, err = run(capsys, "prune", model_dir, "--sparsity", "0.3", "--seq-len", "16", "--batch-size", "8",
                     "--calib", texts["calib"], "selfgen", "--calib-samples", "8", "--selfgen-samples", "8",
                     "--out", out)
  assert code == 0, err
  report = json.loads((out / "report.json").read_text())
  assert report["calibration"]["windows"] == 16 and report["preset"] == "recommended"
  assert report["calibration"]["sources"] == [texts["calib"], "selfgen"]
  assert report["calibration"]["source"] == f"{texts['calib']} + selfgen"

  model, tok, config = jaxprune.load(model_dir), jaxprune.load_tokenizer(model_dir), PruneConfig(seed=0)
  draw = lambda draws: calibration(argparse.Namespace(seq_len=16, show_progress=False), model, tok, config, draws)
  np.testing.assert_array_equal(draw([(texts["calib"], 8), ("selfgen", 8)]),
                                np.concatenate([draw([(texts["calib"], 8)]), draw([("selfgen", 8)])]))
  code, _, err = run(capsys, "prune", model_dir, *BASE, "--calib", "selfgen", "selfgen", "--out", tmp_path / "twice")
  assert code == 2 and "a source twice" in err and not os.path.exists(tmp_path / "twice")


def test_existing_output_is_kept_without_force(capsys, model_dir, texts, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  code, _, err = run(capsys, "prune", model_dir, *BASE, "--calib", texts["calib"], "--out", out)
  assert code == 2 and "already exists" in err and "--force" in err and "Traceback" not in err
  assert os.listdir(out) == ["keep.txt"]
  code, _, err = run(capsys, "prune", model_dir, *BASE, "--calib", texts["calib"], "--out", out, "--force")
  assert code == 2 and "was not written by jaxprune" in err  # --force replaces only jaxprune's outputs
  assert os.listdir(out) == ["keep.txt"]
  (out / "keep.txt").unlink()
  out.rmdir()
  for extra in ((), ("--force",)):
    code, _, err = run(capsys, "prune", model_dir, *BASE, "--calib", texts["calib"], "--out", out, *extra)
    assert code == 0, err
  assert "report.json" in os.listdir(out)


@pytest.mark.parametrize("args,msg", [
    (("--sparsity", "1.2"), r"sparsity 1.2 is outside \[0, 1\)"),
    (("--sparsity", "-0.1"), r"outside \[0, 1\)"),
    (("--layers", "0:9"), "block range 0:9 is outside the model's 2 blocks"),
    (("--heads", "similarity", "--tau", "0"), "tau must be positive"),
    (("--calib", "SHORT"), "fewer than|free windows"),
    (("--calib", "/nonexistent/text.txt"), "does not exist"),
    (("--damping", "lots"), "option --damping: damping='lots' is not a number; damping takes a number or 'auto'"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(capsys, model_dir, texts, tmp_path, args, msg):
  argv = list(BASE)
  args = [texts["short"] if a == "SHORT" else a for a in args]
  if "--sparsity" in args:
    del argv[0:2]
  if "--calib" not in args:
    argv += ["--calib", texts["calib"]]
  out = tmp_path / "never"
  code, _, err = run(capsys, "prune", model_dir, *argv, *args, "--out", out)
  assert code == 2, err
  assert "Traceback" not in err and len(err.strip().splitlines()) == 1
  import re
  assert re.search(msg, err), err
  assert not os.path.exists(out) and os.listdir(tmp_path) == []
