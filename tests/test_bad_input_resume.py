"""Bad input around `jaxprune prune`'s checkpoints and weights: one error line, exit code 2,
no traceback, and every file that existed is intact (tests/badinput.py)."""

import glob
import json
import logging
import os
import shutil

import numpy as np
import pytest

import jaxprune.prune
from tests import kill_hook, tiny
from tests.badinput import assert_intact, assert_one_line_error, run_cli, snapshot

ARGS = ("--sparsity", "0.3", "--calib-samples", "16", "--seq-len", "16", "--batch-size", "8", "--no-progress")


class _Killed(BaseException):
  """What the kill hook raises here instead of SIGKILL (the run stops as a preemption would stop it)."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(model, calibration text, a killed run's checkpoint after block 0 of 3, an uninterrupted run's output)."""
  base = tmp_path_factory.mktemp("bad_resume")
  model = tiny.add_word_tokenizer(tiny.save("llama_gqa", str(base / "model"), layers=3))
  calib = tiny.write_words(str(base / "calib.txt"), 900, seed=1)

  def kill():
    raise _Killed

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(jaxprune.prune, "prune", kill_hook.wrap(jaxprune.prune.prune, 0, kill))
    with pytest.raises(_Killed):
      run_cli("prune", model, *ARGS, "--calib", calib, "--out", str(base / "killed"))
  whole = str(base / "whole")
  assert run_cli("prune", model, *ARGS, "--calib", calib, "--out", whole).rc == 0
  return model, calib, str(base / "killed.checkpoint"), whole


def _checkpointed(setup, tmp_path) -> tuple[str, str]:
  """(--out, its checkpoint): a copy of the killed run's checkpoint."""
  out = str(tmp_path / "out")
  shutil.copytree(setup[2], out + ".checkpoint")
  return out, out + ".checkpoint"


def _tensors(directory: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file

  out = {}
  for f in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
    out.update(load_file(f))
  return out


def _changed(model: str, out: str, key: str, value=None) -> str:
  """A copy of `model` with one value of tensor `key` set to `value` (None: moved by one ulp)."""
  from safetensors.numpy import load_file, save_file

  shutil.copytree(model, out)
  tensors = load_file(os.path.join(out, "model.safetensors"))
  a = tensors[key].copy()
  a.flat[5] = np.nextafter(a.flat[5], np.float32(np.inf)) if value is None else value
  save_file({**tensors, key: a}, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
  return out


def _refused(before, out: str, r, *needles: str) -> str:
  line = assert_one_line_error(r, *needles)
  assert_intact(before)
  assert not os.path.exists(out)
  return line


@pytest.mark.parametrize("value,name", [(np.nan, "NaN"), (np.inf, "Inf")])
def test_non_finite_weights_are_refused(setup, tmp_path, value, name):
  model = _changed(setup[0], str(tmp_path / "model"), "model.layers.1.mlp.down_proj.weight", value)
  before = snapshot(model, setup[1])
  out = str(tmp_path / "out")
  _refused(before, out, run_cli("prune", model, *ARGS, "--calib", setup[1], "--out", out), name)
  assert not os.path.exists(out + ".checkpoint")  # what the refused run began is not left behind


def test_resume_with_a_changed_middle_block_is_refused(setup, tmp_path):
  model = _changed(setup[0], str(tmp_path / "model"), "model.layers.1.self_attn.v_proj.weight")
  out, ckpt = _checkpointed(setup, tmp_path)
  before = snapshot(model, setup[1], ckpt)
  r = run_cli("prune", model, *ARGS, "--calib", setup[1], "--out", out, "--resume")
  _refused(before, out, r, "different model", "--force")


def test_resume_with_another_models_checkpoint_is_refused(setup, tmp_path):
  other = tiny.add_word_tokenizer(tiny.save("llama_gqa", str(tmp_path / "other"), seed=3, layers=3))
  out, ckpt = _checkpointed(setup, tmp_path)
  before = snapshot(other, ckpt)
  r = run_cli("prune", other, *ARGS, "--calib", setup[1], "--out", out, "--resume")
  _refused(before, out, r, "different model")


def test_resume_with_other_options_is_refused(setup, tmp_path):
  out, ckpt = _checkpointed(setup, tmp_path)
  before = snapshot(setup[0], ckpt)
  r = run_cli("prune", setup[0], *ARGS, "--seed", "5", "--calib", setup[1], "--out", out, "--resume")
  _refused(before, out, r, "different", "config")


@pytest.mark.parametrize("state,needles", [
    ("{not json", ("not valid JSON", "--force")),
    (b"\xff\xfe{}", ("not valid JSON",)),
    (json.dumps({"version": 99, "next_block": 1}), ("version 99", "reads version 2", "--force")),
    (json.dumps({"next_block": 1, "finished_blocks": [0]}), ("version 1",)),  # the layout before hashes
    (json.dumps({"version": 2, "next_block": 1}), ("lacks", "fingerprint")),
])
def test_damaged_state_json_is_refused(setup, tmp_path, state, needles):
  out, ckpt = _checkpointed(setup, tmp_path)
  with open(os.path.join(ckpt, "state.json"), "wb") as f:
    f.write(state if isinstance(state, bytes) else state.encode())
  before = snapshot(setup[0], ckpt)
  r = run_cli("prune", setup[0], *ARGS, "--calib", setup[1], "--out", out, "--resume")
  _refused(before, out, r, *needles)


@pytest.mark.parametrize("extra,needles", [
    (("--resume",), ("no checkpoint",)),
    (("--resume", "--no-checkpoint"), ("no checkpoint",)),
])
def test_resume_without_a_checkpoint_is_refused(setup, tmp_path, extra, needles):
  out = str(tmp_path / "out")
  before = snapshot(setup[0], setup[1])
  _refused(before, out, run_cli("prune", setup[0], *ARGS, "--calib", setup[1], "--out", out, *extra), *needles)


@pytest.mark.parametrize("extra,needles", [
    ((), ("--resume", "--force")),  # a left checkpoint is not silently discarded
    (("--resume", "--no-checkpoint"), ("contradict",)),
])
def test_left_checkpoint_needs_resume_or_force(setup, tmp_path, extra, needles):
  out, ckpt = _checkpointed(setup, tmp_path)
  before = snapshot(setup[0], ckpt)
  _refused(before, out, run_cli("prune", setup[0], *ARGS, "--calib", setup[1], "--out", out, *extra), *needles)


@pytest.mark.parametrize("value,needles", [
    ("1", ("outside [0, 1)",)), ("-0.1", ("outside [0, 1)",)), ("1.5", ("outside [0, 1)",)), ("a", ("sparsity",))])
def test_sparsity_out_of_range_is_refused(setup, tmp_path, value, needles):
  out = str(tmp_path / "out")
  before = snapshot(setup[0], setup[1])
  args = [a for a in ARGS if a not in ("--sparsity", "0.3")]
  r = run_cli("prune", setup[0], *args, f"--sparsity={value}", "--calib", setup[1], "--out", out)
  _refused(before, out, r, *needles)


def test_sparsity_zero_writes_the_input_weights(setup, tmp_path):
  """The identity, bit for bit, through the CLI (the recommended preset would otherwise add
  intercepts and refit); no checkpoint is left."""
  before = snapshot(setup[0], setup[1])
  out = str(tmp_path / "out")
  args = [a for a in ARGS if a not in ("--sparsity", "0.3")]
  r = run_cli("prune", setup[0], *args, "--sparsity", "0", "--calib", setup[1], "--out", out)
  assert r.rc == 0, r.stderr
  assert_intact(before)
  given, written = _tensors(setup[0]), _tensors(out)
  assert given.keys() == written.keys()
  assert all(given[k].dtype == written[k].dtype and given[k].tobytes() == written[k].tobytes() for k in given)
  assert not os.path.exists(out + ".checkpoint")


def test_truncated_block_is_recomputed_through_the_cli(setup, tmp_path):
  """A truncated block file of a killed run: --resume starts again from the first block and
  writes what the uninterrupted run wrote, with each block once in progress.jsonl."""
  out, ckpt = _checkpointed(setup, tmp_path)
  block = os.path.join(ckpt, "block_0000.npz")
  with open(block, "r+b") as f:
    f.truncate(os.path.getsize(block) // 3)
  r = run_cli("prune", setup[0], *ARGS, "--calib", setup[1], "--out", out, "--resume")
  assert r.rc == 0, r.stderr
  whole, got = _tensors(setup[3]), _tensors(out)
  assert whole.keys() == got.keys() and all(whole[k].tobytes() == got[k].tobytes() for k in whole)
  events = [json.loads(l) for l in open(os.path.join(out, "progress.jsonl"))]
  assert [e["layer"] for e in events if e["event"] == "block"] == [0, 1, 2]
  assert not os.path.exists(ckpt)


def test_fingerprinting_a_large_model_says_it_starts(setup, tmp_path, monkeypatch, caplog):
  """Hashing the weights (minutes for a 70B model) is announced with its estimated time."""
  from jaxprune.prune import fingerprint

  monkeypatch.setattr(fingerprint, "ANNOUNCE_BYTES", 0)
  out = str(tmp_path / "out")
  with caplog.at_level(logging.INFO, logger=fingerprint.__name__):
    r = run_cli("prune", setup[0], *ARGS, "--calib", setup[1], "--out", out)
  assert r.rc == 0, r.stderr
  lines = [m.getMessage() for m in caplog.records if "fingerprinting" in m.getMessage()]
  assert len(lines) == 1 and "GB of weights, about" in lines[0], lines
