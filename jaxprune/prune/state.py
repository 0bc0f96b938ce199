"""The run's state between modules: the blocks, their sizes, the budget's carry and what
has been recorded so far. A frozen value that the loop replaces after every module and
block, never changes in place."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxprune import sharding
from jaxprune.errors import CheckpointError
from jaxprune.io import lazy as lazy_io
from jaxprune.prune import checkpoint as run_checkpoint
from jaxprune.prune.finite import BAD_WEIGHTS, check_finite
from jaxprune.prune.metrics import merged


class Blocks:
  """The run's blocks: the input model's (which may still be on disk, `jaxprune.io.lazy`)
  until a module changes them, then the pruned ones, in memory or, once a streamed run
  has finished and written them, in their file (read again only to assemble the output).

  `with_block` returns a new store; every store of a run shares one memo of the dense
  blocks already found finite, so that each input block is checked once."""

  def __init__(self, dense, new: dict[int, Any] | None = None, checked: set[int] | None = None):
    self.dense = dense
    self._new = dict(new or {})
    self._checked = set() if checked is None else checked

  def __len__(self) -> int:
    return len(self.dense)

  def __getitem__(self, i: int):
    b = self._new.get(i)
    if b is None:
      return self.dense[i]
    if isinstance(b, run_checkpoint.BlockFile):
      return b.load()
    return run_checkpoint.load_block(b) if isinstance(b, str) else b

  def __iter__(self):
    return (self[i] for i in range(len(self)))

  def with_block(self, i: int, block) -> "Blocks":
    """This store with block i replaced (by its parameters, a BlockFile or an Orbax path)."""
    return Blocks(self.dense, {**self._new, i: block}, self._checked)

  def prefetch(self, i: int, mesh) -> None:
    """Starts reading dense block i from its checkpoint in the background, where `placed` will
    read it whole (no `model` axis to read slices for): the read overlaps the block before."""
    if i < len(self) and i not in self._new and isinstance(self.dense, lazy_io.LazyBlocks) and \
        mesh.shape.get(sharding.MODEL, 1) == 1:
      self.dense.prefetch(i)

  def placed(self, i: int, mesh):
    """Block i on the mesh, split over its `model` axis: a dense block still in its checkpoint
    is read slice by slice, each process only what its devices hold (`LazyBlocks.placed`)."""
    if i not in self._new and isinstance(self.dense, lazy_io.LazyBlocks) and mesh.shape.get(sharding.MODEL, 1) > 1:
      blk = self.dense.placed(i, lambda blk: sharding.param_shardings(blk, mesh, quiet=True))
    else:
      blk = sharding.place(self[i], mesh)
    if i not in self._new and i not in self._checked:  # as each input block is read, once
      check_finite(blk, f"block {i} of the model given to prune", BAD_WEIGHTS, CheckpointError)
      self._checked.add(i)
    return blk


@dataclasses.dataclass(frozen=True)
class RunState:
  """Where the run stands.

  Attributes:
    blocks: the blocks (`Blocks`).
    layer_specs: every block's sizes as they stand.
    carry: parameters kept beyond the running budget (`allocate.Budget.carry`).
    modules: the report rows of the modules done, in order.
    passes: kernel calls by kind, summed over the modules.
    phase_seconds: wall seconds by phase of the layer loop.
    plan_phase_seconds: wall seconds by phase of the plan.
    values_written: values of the pruned blocks this process wrote as its own shards (to
      blocks_dir, or to a checkpoint of several processes).
  """

  blocks: Blocks
  layer_specs: tuple
  carry: float = 0.0
  modules: tuple = ()
  passes: dict = dataclasses.field(default_factory=dict)
  phase_seconds: dict = dataclasses.field(default_factory=dict)
  plan_phase_seconds: dict = dataclasses.field(default_factory=dict)
  values_written: int = 0

  def with_block(self, i: int, block, layer=None) -> "RunState":
    specs = self.layer_specs if layer is None else self.layer_specs[:i] + (layer,) + self.layer_specs[i + 1:]
    return dataclasses.replace(self, blocks=self.blocks.with_block(i, block), layer_specs=specs)

  def with_module(self, i: int, block, layer, metrics, carry: float) -> "RunState":
    """The state after block i's module whose step gave `block`, `layer` and `metrics`."""
    return dataclasses.replace(self.with_block(i, block, layer), carry=carry,
                               modules=self.modules + (metrics.row.to_json(),),
                               passes=merged(self.passes, metrics.passes),
                               phase_seconds=merged(self.phase_seconds, metrics.seconds))

  def with_phase(self, name: str, seconds: float) -> "RunState":
    return dataclasses.replace(self, phase_seconds=merged(self.phase_seconds, {name: seconds}))
