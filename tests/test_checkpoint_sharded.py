"""The sharded checkpoint (`RunCheckpoint(sharded=True)`: Orbax directories, each process writing
its own shards) that runs over several processes keep, exercised in one process on a 2 x 4 mesh of
host devices: a run stopped after a block resumes to the bits of an uninterrupted run, a damaged
directory is recomputed, and a checkpoint is resumed only by a run with as many processes.
tests/test_tpu_scripts.py runs it across two processes."""

import glob
import logging
import os

import jax
import numpy as np
import pytest

import jaxprune
from jaxprune import sharding
from jaxprune.errors import UsageError
from jaxprune.prune import PruneConfig, checkpoint as ckpt_lib, prune
from tests import tiny

CONFIG = PruneConfig(sparsity=0.3, batch_size=8)  # the recipe: adaptive plan, refit, absorb
CALIB = np.random.default_rng(0).integers(1, tiny.VOCAB, size=(16, 16), dtype=np.int32)


class _Stop(Exception):
  """Stands for a kill: raised once a block's state is durable."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(a 3-block model, the 2 x 4 mesh, an uninterrupted run's weights)."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  model = jaxprune.load(tiny.save("llama_gqa", str(tmp_path_factory.mktemp("sharded") / "model"), layers=3))
  mesh = sharding.make_mesh(2, 4)
  return model, mesh, _leaves(prune(model, CALIB, CONFIG, mesh=mesh).model)


@pytest.fixture
def sharded(monkeypatch):
  monkeypatch.setattr(ckpt_lib, "several_processes", lambda: True)


def _leaves(model) -> list[bytes]:
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(model.params)]


def _stopped(setup, directory: str, after: int = 0) -> str:
  model, mesh, _ = setup

  def progress(event):
    if event["event"] == "block" and event["layer"] == after:
      raise _Stop

  with pytest.raises(_Stop):
    prune(model, CALIB, CONFIG, mesh=mesh, checkpoint=directory, progress=progress)
  return directory


def test_a_stopped_run_resumes_from_its_orbax_directories_bit_identically(setup, sharded, tmp_path):
  model, mesh, want = setup
  ckpt = _stopped(setup, str(tmp_path / "ckpt"))
  state = ckpt_lib.read_state(ckpt)
  assert state.next_block == 1 and state.streams == "streams_0001"
  for name in ("block_0000", "streams_0001"):  # directories, each with its recorded sha256
    assert os.path.isdir(os.path.join(ckpt, name)) and state.files[name] == ckpt_lib.dir_sha256(os.path.join(ckpt, name))
  events = []
  got = prune(model, CALIB, CONFIG, mesh=mesh, checkpoint=ckpt, progress=events.append)
  assert _leaves(got.model) == want
  assert [e["layer"] for e in events if e["event"] == "block"] == [1, 2]  # block 0 was not done again
  assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(ckpt, "streams_*"))) == ["streams_0003"]


def test_a_damaged_directory_is_recomputed(setup, sharded, tmp_path, caplog):
  model, mesh, want = setup
  ckpt = _stopped(setup, str(tmp_path / "ckpt"), after=1)
  # One byte of one of block 0's files changed: its sha256 no longer matches.
  files = sorted(f for f in glob.glob(os.path.join(ckpt, "block_0000", "**", "*"), recursive=True) if os.path.isfile(f)
                 and os.path.getsize(f) > 0)
  with open(files[-1], "r+b") as f:
    b = f.read(1)
    f.seek(0)
    f.write(bytes([b[0] ^ 1]))
  with caplog.at_level(logging.WARNING):
    got = prune(model, CALIB, CONFIG, mesh=mesh, checkpoint=ckpt)
  assert "block_0000 is not the file that was written" in caplog.text and "recomputing from the first block" in caplog.text
  assert _leaves(got.model) == want


def test_a_sharded_checkpoint_resumes_only_with_several_processes(setup, sharded, tmp_path, monkeypatch):
  model, mesh, _ = setup
  ckpt = _stopped(setup, str(tmp_path / "ckpt"))
  monkeypatch.setattr(ckpt_lib, "several_processes", lambda: False)
  with pytest.raises(UsageError, match="was written by a run with several processes; resume it with as many processes"):
    prune(model, CALIB, CONFIG, mesh=mesh, checkpoint=ckpt)


def test_a_run_stopped_after_its_last_block_resumes_to_its_output(setup, sharded, tmp_path):
  """A preemption notice that came late stops the run once every block is durable: resuming
  only assembles the output."""
  model, mesh, want = setup
  ckpt = _stopped(setup, str(tmp_path / "ckpt"), after=2)
  assert ckpt_lib.read_state(ckpt).next_block == 3
  events = []
  got = prune(model, CALIB, CONFIG, mesh=mesh, checkpoint=ckpt, progress=events.append)
  assert _leaves(got.model) == want and not [e for e in events if e["event"] == "block"]


def test_a_block_is_written_while_the_next_is_pruned(setup, sharded, tmp_path, monkeypatch):
  """The sharded save is Orbax's async one: while block i + 1 is pruned, block i's save is under
  way and not yet recorded (state.json names block i - 1's state); the "block" event of block i
  comes once its save is finished and state.json names it; the last block is durable before the
  run returns."""
  from jaxprune.prune import engine

  model, mesh, _ = setup
  directory = str(tmp_path / "ckpt")
  recorded = lambda: ckpt_lib.read_state(directory).next_block if os.path.exists(
      os.path.join(directory, ckpt_lib.STATE)) else 0
  during, events = [], []
  step = engine.step

  def spy(ctx, m):
    during.append((m.i, recorded()))
    return step(ctx, m)

  def progress(event):
    if event["event"] == "block":
      events.append((event["layer"], recorded()))

  monkeypatch.setattr(engine, "step", spy)
  prune(model, CALIB, CONFIG, mesh=mesh, checkpoint=directory, progress=progress)
  # Each block's modules run with the block before last recorded: the last one's save is in flight.
  assert sorted(set(during)) == [(0, 0), (1, 0), (2, 1)], during
  assert events == [(0, 1), (1, 2), (2, 3)], events
