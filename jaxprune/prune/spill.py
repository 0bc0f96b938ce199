"""Where a streamed run's finished blocks and the plan's dense outputs live on disk.

A model loaded with `lazy=True` (`jaxprune.io.lazy`) is streamed: each finished block goes
to a file (the checkpoint's, blocks_dir's, or a temporary directory's) and leaves memory;
the pruned model's blocks are read from those files by whoever uses them.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import tempfile

import jax

from jaxprune.errors import UsageError
from jaxprune.io import lazy as lazy_io
from jaxprune.model import Model
from jaxprune.prune import checkpoint as run_checkpoint
from jaxprune.prune.state import RunState
from jaxprune.spec import bias_flags
from jaxprune.stats import dense_outputs as dense_outputs_lib


def check_blocks_dir(blocks_dir: str | None) -> None:
  """Refuses a blocks directory that holds another run's blocks (they are not this run's to replace)."""
  if blocks_dir is not None and glob.glob(os.path.join(blocks_dir, "block_*")):
    raise UsageError(f"{blocks_dir} already holds pruned blocks (block_*) of another run; remove them or "
                     "pass another blocks directory")


class Spill:
  """The files of one streamed run's finished blocks: the checkpoint's when there is one,
  else blocks_dir's (Orbax, every process its own shards), else a temporary directory's,
  removed when the last reference to this object goes (the pruned model holds one)."""

  def __init__(self, ckpt, blocks_dir: str | None):
    self.ckpt = ckpt
    self.blocks_dir = blocks_dir
    self._tmp: tempfile.TemporaryDirectory | None = None

  def __call__(self, state: RunState, i: int) -> RunState:
    """The state with finished block i in its file only."""
    if self.ckpt is not None:
      return state.with_block(i, self.ckpt.block_file(i))
    if self.blocks_dir is not None:
      path = os.path.join(self.blocks_dir, f"block_{i:04d}")
      written = run_checkpoint.save_shards(path, state.blocks[i])
      return dataclasses.replace(state.with_block(i, path), values_written=state.values_written + written)
    if self._tmp is None:
      self._tmp = tempfile.TemporaryDirectory(prefix="jaxprune-blocks-")
    path = os.path.join(self._tmp.name, f"block_{i:04d}.npz")
    return state.with_block(i, run_checkpoint.BlockFile(path, run_checkpoint.save_block(path, state.blocks[i])))


def streamed_result(ctx, state: RunState, model: Model, spill: Spill) -> Model:
  """The pruned model of a streamed run: its blocks stay in their files and are read (with
  the biases every block ends with) one at a time by whoever uses them, e.g. `save_hf`."""
  spec = dataclasses.replace(model.spec, layers=tuple(l.canonical() for l in state.layer_specs),
                             **bias_flags(ctx.fill_biases(state.blocks[0])))
  blocks = state.blocks
  # The reader holds `spill`, so a temporary directory lives as long as the model reading it.
  layers = lazy_io.LazyBlocks(lambda i, _files=spill: ctx.fill_biases(blocks[i]), lazy_io.block_shapes(spec),
                              source="the pruned blocks")
  return Model(spec, {**model.params, "layers": layers}, model.source)


def dense_outputs_dir(checkpoint: str) -> str:
  return os.path.join(checkpoint, "dense_outputs")


def open_dense_outputs(spec, n_modules: int, calib_tokens, ckpt, stack) -> dense_outputs_lib.DenseOutputs | None:
  """A store for the plan's dense module outputs when the layer loop will need them again:
  in the checkpoint (durable, so a resumed run reads the same ones) or a temporary
  directory removed when the run ends. None on several processes; a store that keeps
  nothing when the outputs do not fit on the disk (the loop then computes them again by
  the plan's kernels: the same numbers either way). The caller asks only when the run
  carries a dense stream."""
  if jax.process_count() > 1:
    return None
  nbytes = n_modules * calib_tokens.size * spec.hidden_size * 4  # streams are at most float32
  directory = dense_outputs_dir(ckpt.path) if ckpt is not None else stack.enter_context(
      tempfile.TemporaryDirectory(prefix="jaxprune-dense-"))
  fits = dense_outputs_lib.DenseOutputs.fits(directory, nbytes)
  store = dense_outputs_lib.DenseOutputs(directory if fits else None, durable=ckpt is not None)
  stack.callback(store.close)  # before a temporary directory goes (callbacks run last-in first-out)
  return store


def reopen_dense_outputs(checkpoint: str, digests: dict, stack) -> dense_outputs_lib.DenseOutputs:
  """The plan's dense outputs a resumed run finds in its checkpoint."""
  store = dense_outputs_lib.DenseOutputs(dense_outputs_dir(checkpoint), durable=True, digests=digests)
  stack.callback(store.close)
  return store
