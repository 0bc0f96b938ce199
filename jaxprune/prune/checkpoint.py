"""Durable per-block state of a pruning run, so a killed run resumes where it stopped.

After every finished block the engine (`jaxprune.prune.engine`) saves, in a checkpoint directory:

  block_0007.npz     the pruned block's parameters (written once, when the block is done)
  streams_0007.npz   the activation streams entering the next block (dense, pruned,
                     random-token), exactly as float arrays
  state.json         the next block, the budget carry, the report rows so far, the
                     adaptive plan and tau, the run's fingerprint and the sha256 of
                     every block and streams file it names (`durable.DurableState`)

With several processes (`several_processes`) the block and the streams are Orbax
checkpoints instead (block_0007/, streams_0007/): every process writes only the shards
its devices hold, so nothing is gathered, and reads back only its own shards of the
streams; their sha256 is taken over the directory's files. The directory must be one
that every process sees. Process 0 writes state.json once every process has written
(Orbax commits a checkpoint only then), and no process goes on before it has. Their
writing is Orbax's async save: it overlaps the next block's work, and the block is durable
(state.json names it) once that save is done.

Every file is written to a temporary name and renamed into place, and state.json
(which names the streams file) is replaced last, so a run killed at any instant
leaves the previous consistent state. A resumed run loads the finished blocks
and the streams and continues with the next block; since every later step is a
deterministic function of those arrays, its output is bit-identical to that of
an uninterrupted run.

Nothing is trusted: a checkpoint written for a different model (every tensor is
in the fingerprint, `jaxprune.prune.fingerprint`), calibration set or configuration is refused (the fingerprint
names which one differs), and every file is checked against its recorded sha256
and for NaN and Inf before it is used, both when the run resumes and when the
output is assembled. A damaged file found at resume is recomputed (`RunCheckpoint.load`).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxprune.errors import CheckpointError, UsageError
from jaxprune.io.atomic import write_file, write_json
from jaxprune.prune.durable import DurableState, RunRecord
from jaxprune.prune.fingerprint import dir_sha256, file_sha256
from jaxprune.placement import to_host
from jaxprune.spec import LayerSpec

log = logging.getLogger(__name__)

STATE = "state.json"
def several_processes() -> bool:
  """Whether this run's checkpoint is sharded (Orbax, each process its own shards): more than one process."""
  return jax.process_count() > 1


def _save_npz(path: str, arrays: dict[str, np.ndarray]) -> str:
  """Writes `arrays` atomically; returns the file's sha256, read back from the file as it
  lies on disk (np.savez seeks back into what it wrote, so it cannot be hashed on the way)."""
  write_file(path, lambda f: np.savez(f, **arrays), force=True, binary=True)
  return file_sha256(path)


def save_block(path: str, block: dict) -> str:
  """One block's parameters as an .npz of its flattened paths (written atomically); returns its sha256."""
  flat = traverse_util.flatten_dict(block, sep="/")
  # to_host: a block split over processes is gathered (every process saves it, in the same order).
  return _save_npz(path, {k: to_host(v) for k, v in flat.items()})


def _nonfinite(arrays: dict) -> str | None:
  """The name of the first array holding NaN or Inf, or None (arrays on devices are checked there)."""
  for k, a in arrays.items():
    if a.dtype.kind in "fc" or a.dtype.name == "bfloat16":
      finite = to_host(jnp.isfinite(a).all()) if isinstance(a, jax.Array) else np.isfinite(a).all()
      if not finite:
        return k
  return None


def read_verified(path: str, sha256: str | None, sharding=None) -> dict:
  """The arrays of an .npz, or of an Orbax directory, written by this module (flat, by their
  "/"-joined paths), after checking that the file is the one written (its sha256, when
  recorded) and that every array is finite.

  An Orbax directory's arrays of more than one dimension are read onto `sharding` (each
  process its own shards) when it is given, else whole into host memory.

  Raises:
    Damaged: saying what is wrong with the file.
  """
  is_dir = os.path.isdir(path)
  if not (is_dir or os.path.isfile(path)):
    raise Damaged(f"{os.path.basename(path)} is missing")
  if sha256 is not None and (dir_sha256(path) if is_dir else file_sha256(path)) != sha256:
    raise Damaged(f"{os.path.basename(path)} is not the file that was written (its sha256 differs)")
  try:
    if is_dir:
      arrays = traverse_util.flatten_dict(_read_tree(path, sharding), sep="/")
    else:
      with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
  except Exception as e:  # noqa: BLE001 -- zipfile, numpy, orbax and tensorstore raise many types for a cut-off file
    raise Damaged(f"{os.path.basename(path)} cannot be read ({type(e).__name__}: it is truncated or corrupt)") from None
  bad = _nonfinite(arrays)
  if bad is not None:
    raise Damaged(f"{os.path.basename(path)} holds NaN or Inf values (in {bad})")
  return arrays


class Damaged(Exception):
  """A checkpoint file that is missing, altered, unreadable or not finite (the message says which)."""


@dataclasses.dataclass(frozen=True)
class BlockFile:
  """A finished block in its file, with the sha256 recorded when it was written: read back
  only after checking both (so a file damaged since is never used or published)."""

  path: str
  sha256: str | None

  def load(self) -> dict:
    try:
      arrays = read_verified(self.path, self.sha256)
    except Damaged as e:
      raise CheckpointError(f"the pruned block file {self.path} was damaged after it was written ({e}); nothing "
                            "was published: run the same command again (with --resume when the run has a "
                            "checkpoint) to recompute it") from None
    flat = {tuple(k.split("/")): jax.numpy.asarray(v) for k, v in arrays.items()}
    return traverse_util.unflatten_dict(flat)


class PendingSave:
  """A block's save under way (`RunCheckpoint.start`); `finish()` makes it durable, once."""

  def __init__(self, finish):
    self._finish, self._done, self._result = finish, False, None

  def finish(self):
    if not self._done:
      self._done, self._result = True, self._finish()
    return self._result


def start_shards(path: str, tree: dict, force: bool = False):
  """`save_shards` begun in the background (Orbax's async save: the shards are copied off the
  devices before it returns, then written by a thread); returns (the checkpointer, whose
  `wait_until_finished` ends it, the values this process writes)."""
  import orbax.checkpoint as ocp

  ckptr = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler())
  ckptr.save(path, args=ocp.args.StandardSave(tree), force=force)
  return ckptr, sum(s.data.size for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)
                    for s in x.addressable_shards if s.replica_id == 0)


def save_shards(path: str, tree: dict, force: bool = False) -> int:
  """`tree` (a block, or the streams) as an Orbax checkpoint at `path`, written by every
  process at once: each writes only the shards its own devices hold (one copy of each
  replicated shard), so nothing is gathered. `path` must be one directory that every process
  sees (a shared file system or a bucket); Orbax commits it atomically once every process
  has written. With `force` it replaces what is at `path` (a block done again).

  Returns:
    The number of values this process wrote.
  """
  import orbax.checkpoint as ocp

  ckptr = ocp.StandardCheckpointer()
  try:
    ckptr.save(path, tree, force=force)
    ckptr.wait_until_finished()
  finally:
    ckptr.close()
  return sum(s.data.size for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)
             for s in x.addressable_shards if s.replica_id == 0)


def _load_block_shards(path: str) -> dict:
  """A block written by `save_shards`, whole, as host arrays (every shard read back)."""
  try:
    block = _read_tree(path)
  except Exception as e:  # noqa: BLE001 -- orbax and tensorstore raise many types for missing pieces
    raise UsageError(f"the pruned block in {path} could not be read back ({type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''}); with several processes the blocks' "
                     "directory must be one that every host sees (a shared file system or a bucket)") from None
  return jax.tree.map(jax.numpy.asarray, block)


def _read_tree(path: str, sharding=None) -> dict:
  """An Orbax checkpoint's tree: arrays of more than one dimension onto `sharding` when given
  (this process reads only its own shards), the rest whole into host memory.

  Read by the checkpoint handler, not a Checkpointer, whose restore is a barrier of all
  processes: here one process may read while the others wait (process 0 writing the output)."""
  import orbax.checkpoint as ocp
  from etils import epath

  def restore_args(m):
    if sharding is not None and len(m.shape) > 1:
      return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=tuple(m.shape), dtype=m.dtype)
    return ocp.RestoreArgs(restore_type=np.ndarray, dtype=m.dtype)

  handler = ocp.PyTreeCheckpointHandler()
  try:
    tree = handler.metadata(epath.Path(path)).tree
    args = jax.tree.map(restore_args, tree, is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
    return handler.restore(epath.Path(path), args=ocp.args.PyTreeRestore(restore_args=args))
  finally:
    handler.close()


def load_block(path: str) -> dict:
  """A block written by `save_block` (an .npz) or `save_shards` (a directory), exactly as it was."""
  if os.path.isdir(path):
    return _load_block_shards(path)
  with np.load(path) as z:
    flat = {tuple(k.split("/")): jax.numpy.asarray(z[k]) for k in z.files}
  return traverse_util.unflatten_dict(flat)


@dataclasses.dataclass
class Resumed:
  """What a checkpoint restores: the next block to prune and the state entering it
  (finished blocks as their verified files, read when needed). `streams` is None when
  the run starts again from its first block (a damaged file; see `RunCheckpoint.load`),
  with only the plan and the dense outputs (`state`) kept."""

  next_block: int
  blocks: dict[int, BlockFile]
  layer_specs: dict[int, LayerSpec]
  streams: dict[str, np.ndarray] | None
  state: DurableState


def read_state(directory: str) -> DurableState:
  """The checkpoint's state.json, checked for being whole and of this layout (one-line errors)."""
  path = os.path.join(directory, STATE)
  fix = f"pass --force to start over (the checkpoint in {directory} is then removed)"
  try:
    with open(path, "rb") as f:
      state = json.loads(f.read().decode())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path} is not valid JSON ({type(e).__name__} at {getattr(e, 'pos', '?')}); {fix}") from None
  return DurableState.from_json(state, path, fix)


class RunCheckpoint:
  """The checkpoint directory of one run (see the module docstring): sharded (Orbax, each
  process its own shards) when `sharded`, by default where the run has several processes."""

  def __init__(self, path: str, fp: dict[str, str], sharded: bool | None = None):
    self.path = path
    self.fp = fp
    self.sharded = several_processes() if sharded is None else sharded
    self.hashes: dict[str, str] = {}  # file name -> sha256 of the files the last `save` recorded
    os.makedirs(path, exist_ok=True)

  def _name(self, kind: str, i: int) -> str:
    return f"{kind}_{i:04d}" + ("" if self.sharded else ".npz")

  def block_path(self, i: int) -> str:
    return os.path.join(self.path, self._name("block", i))

  def exists(self) -> bool:
    return os.path.exists(os.path.join(self.path, STATE))

  def load(self, stream_sharding=None) -> Resumed:
    """The state to resume from, every file it names verified first (hash and finiteness);
    a sharded checkpoint's streams read onto `stream_sharding`.

    Only the streams entering the next block are kept (one streams file: disk use does
    not grow with the blocks), so a damaged block file or streams file means starting
    again from the first block, with the plan kept; every later block is then recomputed
    and replaces its file. One warning line says what was found.
    """
    state = read_state(self.path)
    differ = [k for k in self.fp if state.fingerprint.get(k) != self.fp[k]]
    if differ:
      raise UsageError(f"the checkpoint in {self.path} belongs to a run with a different {', '.join(differ)}; "
                       "resume with the same model, calibration data and options, or remove the checkpoint "
                       "(pass --force) to start over")
    if state.streams.endswith(".npz") == self.sharded:
      raise UsageError(f"the checkpoint in {self.path} was written by a run with "
                       f"{'one process' if self.sharded else 'several processes'}; resume it with as many "
                       "processes as it was started with, or pass --force to start over")
    files = state.files
    blocks, specs = {}, {}
    try:
      for i in state.finished_blocks:
        blocks[i] = BlockFile(self.block_path(i), files.get(os.path.basename(self.block_path(i)), "unrecorded"))
        read_verified(blocks[i].path, blocks[i].sha256)
        d = state.layer_specs[str(i)]
        specs[i] = LayerSpec(**{**d, "kv_map": None if d["kv_map"] is None else tuple(d["kv_map"])})
      streams = read_verified(os.path.join(self.path, state.streams), files.get(state.streams, "unrecorded"),
                              stream_sharding)
    except Damaged as e:
      log.warning("checkpoint %s: %s; recomputing from the first block (only the streams entering block %d "
                  "are kept), so that no damaged block is used or published", self.path, e, state.next_block)
      return Resumed(0, {}, {}, None, state)
    return Resumed(state.next_block, blocks, specs, streams, state)

  def block_file(self, i: int) -> BlockFile:
    """Finished block i as the file written for it, with the sha256 `save` recorded."""
    return BlockFile(self.block_path(i), self.hashes[os.path.basename(self.block_path(i))])

  def save(self, i: int, block: dict, layer_spec: LayerSpec, streams: dict, run: RunRecord) -> int | None:
    """Saves block i (just finished) and the state entering block i + 1; returns how many of
    the block's values this process wrote (sharded), or None. `start(...).finish()`."""
    return self.start(i, block, layer_spec, streams, run).finish()

  def start(self, i: int, block: dict, layer_spec: LayerSpec, streams: dict, run: RunRecord) -> "PendingSave":
    """Begins saving block i (just finished) and the state entering block i + 1; the block is
    durable once the returned save's `finish()` has returned (which returns what `save` does).

    Blocks finish in order, so the finished blocks are those before i that the previous
    state lists (a run started again from an earlier block drops the later ones) and i.
    Single-process, the files are written before `start` returns. Sharded, the block and
    the streams go to Orbax's async save, so their writing overlaps the next block's work:
    every process takes part, and in `finish` waits for its shards, process 0 writes the
    state, and each returns once the state is written. One save at a time: finish the last
    before starting the next (committing a state drops the other streams directories).
    """
    name = self._name("streams", i + 1)
    if not self.sharded:
      hashes = {os.path.basename(self.block_path(i)): save_block(self.block_path(i), block),
                name: _save_npz(os.path.join(self.path, name), streams)}
      self.hashes = self._commit(i, name, hashes, layer_spec, run)
      return PendingSave(lambda: None)
    writes = [start_shards(self.block_path(i), block, force=True),
              start_shards(os.path.join(self.path, name), streams, force=True)]

    def finish() -> int:
      for ckptr, _ in writes:
        try:
          ckptr.wait_until_finished()
        finally:
          ckptr.close()
      if jax.process_index() == 0:  # Orbax has committed both: every process has written its shards
        hashes = {os.path.basename(self.block_path(i)): dir_sha256(self.block_path(i)),
                  name: dir_sha256(os.path.join(self.path, name))}
        self._commit(i, name, hashes, layer_spec, run)
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"jaxprune checkpoint: block {i}")
      self.hashes = read_state(self.path).files
      return writes[0][1]

    return PendingSave(finish)

  def _commit(self, i: int, name: str, hashes: dict, layer_spec: LayerSpec, run: RunRecord) -> dict:
    """Writes state.json entering block i + 1 (its streams in `name`), then drops older streams;
    returns the sha256s it records."""
    prev = read_state(self.path) if self.exists() else None
    finished = [b for b in (prev.finished_blocks if prev else []) if b < i] + [i]
    specs = {**{str(b): prev.layer_specs[str(b)] for b in finished[:-1]}, str(i): dataclasses.asdict(layer_spec)}
    blocks = {os.path.basename(self.block_path(b)) for b in finished}
    files = {**{k: v for k, v in (prev.files if prev else {}).items() if k in blocks}, **hashes}
    state = DurableState(self.fp, i + 1, tuple(finished), specs, name, files, run)
    write_json(os.path.join(self.path, STATE), state.to_json(), force=True)  # last: names the streams file
    for old in glob.glob(os.path.join(self.path, "streams_*")):
      if os.path.basename(old) != name:
        shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
    return files
