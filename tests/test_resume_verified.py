"""Resume trusts nothing it finds: every input tensor is fingerprinted, and every checkpoint
file is checked (sha256 and finiteness) before it is used or published; a damaged one is
recomputed, to the bits an uninterrupted run gives."""

import dataclasses
import logging
import os
import shutil

import jax
import numpy as np
import pytest

import jaxprune
from jaxprune.prune import checkpoint as ckpt_lib
from jaxprune.prune import fingerprint
from jaxprune import reconstruct
from jaxprune.errors import CheckpointError, UsageError
from jaxprune.prune import PruneConfig, prune
from tests import tiny

LAYERS = 4
CONFIG = PruneConfig(sparsity=0.4, batch_size=8)  # the recipe: adaptive plan, dense-output store, refit
CALIB = np.random.default_rng(0).integers(1, tiny.VOCAB, size=(16, 16), dtype=np.int32)


class _Stop(Exception):
  """Stands for a kill: raised once a block's state is durable."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(model directory, the weights of an uninterrupted run)."""
  path = tiny.save("llama_gqa", str(tmp_path_factory.mktemp("verified") / "model"), layers=LAYERS)
  return path, _leaves(prune(jaxprune.load(path), CALIB, CONFIG).model)


def _leaves(model) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(jaxprune.io.lazy.materialize(model).params)]


def _assert_same_bits(model, expected):
  got = _leaves(model)
  assert len(got) == len(expected)
  assert all(a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes() for a, b in zip(got, expected))


def _stopped(model, directory, after: int):
  """A run killed once block `after` is durable: its checkpoint directory."""

  def progress(event):
    if event["event"] == "block" and event["layer"] == after:
      raise _Stop

  with pytest.raises(_Stop):
    prune(model, CALIB, CONFIG, checkpoint=directory, progress=progress)
  return directory


def _resume(model, directory, events=None):
  return prune(model, CALIB, CONFIG, checkpoint=directory, progress=(events.append if events is not None else None))


def _changed(path: str, out: str, key: str, change) -> str:
  """A copy of model directory `path` with tensor `key` of its safetensors changed."""
  from safetensors.numpy import load_file, save_file

  shutil.copytree(path, out)
  tensors = load_file(os.path.join(out, "model.safetensors"))
  tensors[key] = change(tensors[key].copy())
  save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
  return out


def _one_ulp(a):
  a.flat[7] = np.nextafter(a.flat[7], np.float32(np.inf))
  return a


@pytest.mark.parametrize("lazy", [False, True])
def test_fingerprint_covers_a_middle_block(setup, tmp_path, lazy):
  """One value of block 2 of 4 moved by one ulp: another model (blocks in memory are hashed as
  they are, streamed ones as the files they come from); a byte-identical copy elsewhere is the same."""
  path, _ = setup
  fp = lambda p: fingerprint.weights_digest(jaxprune.load(p, lazy=lazy).params)
  changed = _changed(path, str(tmp_path / "changed"), "model.layers.2.mlp.up_proj.weight", _one_ulp)
  copy = shutil.copytree(path, str(tmp_path / "copy"))
  assert fp(changed) != fp(path)
  assert fp(copy) == fp(path)


def test_resume_with_a_changed_middle_block_is_refused(setup, tmp_path):
  path, _ = setup
  d = _stopped(jaxprune.load(path, lazy=True), str(tmp_path / "ckpt"), after=0)
  changed = _changed(path, str(tmp_path / "changed"), "model.layers.2.self_attn.q_proj.weight", _one_ulp)
  with pytest.raises(UsageError, match="different model"):
    _resume(jaxprune.load(changed, lazy=True), d)


def _nan_rewrite(path: str) -> None:
  """Rewrites an .npz as a valid file whose first array holds a NaN."""
  with np.load(path) as z:
    arrays = {k: z[k].copy() for k in z.files}
  first = sorted(arrays)[0]
  arrays[first].flat[0] = np.nan
  np.savez(path, **arrays)


def _truncate(path: str) -> None:
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _flip_byte(path: str) -> None:
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    b = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([b[0] ^ 1]))


@pytest.mark.parametrize("name,damage,found", [
    ("block_0001.npz", _nan_rewrite, "sha256 differs"),
    ("block_0000.npz", _truncate, "sha256 differs"),
    ("streams_0003.npz", _flip_byte, "sha256 differs"),
    ("block_0002.npz", os.remove, "missing"),
])
def test_damaged_checkpoint_file_is_recomputed_from_the_first_block(setup, tmp_path, caplog, name, damage, found):
  """Found when the run resumes, before any block is pruned (the first event is the restart,
  then block 0 again), said in one warning line, and recomputed: the same bits as an
  uninterrupted run, and a checkpoint whose files all verify again."""
  path, expected = setup
  model = jaxprune.load(path, lazy=True)
  d = _stopped(model, str(tmp_path / "ckpt"), after=2)
  damage(os.path.join(d, name))
  events = []
  with caplog.at_level(logging.WARNING, logger="jaxprune.prune.checkpoint"):
    result = _resume(model, d, events)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and name in warnings[0] and found in warnings[0] and "\n" not in warnings[0]
  assert events[0] == {"event": "recompute", "next_block": 0}
  assert [e["layer"] for e in events if e["event"] == "block"] == list(range(LAYERS))
  _assert_same_bits(result.model, expected)


def test_nan_in_a_checkpoint_block_is_found_even_with_its_hash_rewritten(setup, tmp_path, caplog):
  """A block rewritten with NaN whose recorded hash was updated too is still not used."""
  path, expected = setup
  model = jaxprune.load(path)
  d = _stopped(model, str(tmp_path / "ckpt"), after=1)
  block = os.path.join(d, "block_0001.npz")
  _nan_rewrite(block)
  state = ckpt_lib.read_state(d)
  state.files["block_0001.npz"] = fingerprint.file_sha256(block)
  ckpt_lib.write_json(os.path.join(d, ckpt_lib.STATE), state.to_json(), force=True)
  with caplog.at_level(logging.WARNING, logger="jaxprune.prune.checkpoint"):
    result = _resume(model, d)
  assert any("NaN or Inf" in r.getMessage() for r in caplog.records)
  _assert_same_bits(result.model, expected)


def test_block_damaged_during_the_run_is_not_published(setup, tmp_path):
  """A finished block's file that changes after the resume checked it is checked again when
  the output is assembled: the run fails with one line and publishes nothing."""
  path, _ = setup
  model = jaxprune.load(path)
  d = _stopped(model, str(tmp_path / "ckpt"), after=1)

  def damage_once(event):
    if event["event"] == "module" and event["layer"] == 2 and event["module"] == "attn":
      _flip_byte(os.path.join(d, "block_0000.npz"))

  with pytest.raises(CheckpointError, match=r"block_0000\.npz was damaged after it was written") as e:
    prune(model, CALIB, CONFIG, checkpoint=d, progress=damage_once)
  assert "\n" not in str(e.value)


def test_nan_or_inf_in_the_given_weights_is_refused_naming_the_tensor(setup, tmp_path):
  """Two defences: the loader refuses a file whose tensor holds NaN (streamed or not), and
  prune refuses a model whose parameters hold NaN or Inf however they were made."""
  path, _ = setup

  def poison(value):
    def change(a):
      a.flat[3] = value
      return a
    return change

  nan = _changed(path, str(tmp_path / "nan"), "model.layers.2.mlp.down_proj.weight", poison(np.nan))
  with pytest.raises(CheckpointError, match=r"tensor model\.layers\.2\.mlp\.down_proj\.weight holds NaN"):
    prune(jaxprune.load(nan, lazy=True), CALIB, CONFIG)
  model = jaxprune.load(path)
  layers = list(model.params["layers"])
  mlp = dict(layers[2]["mlp"])
  mlp["down"] = {**mlp["down"], "kernel": mlp["down"]["kernel"].at[0, 3].set(np.nan)}
  layers[2] = {**layers[2], "mlp": mlp}
  poisoned = dataclasses.replace(model, params={**model.params, "layers": type(model.params["layers"])(layers)})
  with pytest.raises(CheckpointError, match=r"block 2 of the model given to prune holds NaN values in mlp/down/kernel"):
    prune(poisoned, CALIB, CONFIG)
  embed = model.params["embed"]["embedding"].at[1, 3].set(np.inf)
  with pytest.raises(CheckpointError, match=r"model given to prune holds Inf values in embed/embedding"):
    prune(dataclasses.replace(model, params={**model.params, "embed": {"embedding": embed}}), CALIB, CONFIG)


def test_non_finite_solve_is_refused_not_published(setup, monkeypatch):
  """Degenerate statistics that give a NaN refit: one error naming the pruned tensor."""
  path, _ = setup
  solve = reconstruct.ridge_solve

  def nan_solve(*args, **kw):
    w, info = solve(*args, **kw)
    return w * np.float32(np.nan), info

  monkeypatch.setattr(reconstruct, "ridge_solve", nan_solve)
  with pytest.raises(UsageError, match=r"block \d's pruned (attn|mlp) holds NaN values in \w+/\w+/(kernel|bias)"):
    prune(jaxprune.load(path), CALIB, CONFIG)


@pytest.mark.parametrize("preset,overrides", [
    ("recommended", {}),  # its intercept would add biases and its refit change weights
    ("paper", {}),
    ("baseline", {"method": "flap", "allocation": "adaptive"}),  # FLAP's compensation adds biases
])
@pytest.mark.parametrize("lazy", [False, True])
def test_sparsity_zero_is_the_identity(setup, preset, overrides, lazy):
  path, _ = setup
  model = jaxprune.load(path, lazy=lazy)
  r = prune(model, CALIB, PruneConfig.preset(preset, sparsity=0.0, batch_size=8, **overrides))
  assert r.model.spec == model.spec
  _assert_same_bits(r.model, _leaves(model))
  assert r.report["modules"] == [] and r.report["params"]["after"] == r.report["params"]["before"]
