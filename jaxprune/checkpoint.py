"""Durable per-block state of a pruning run, so a killed run resumes where it stopped.

After every finished block the pipeline saves, in a checkpoint directory:

  block_0007.npz     the pruned block's parameters (written once, when the block is done)
  streams_0007.npz   the activation streams entering the next block (dense, pruned,
                     random-token), exactly as float arrays
  state.json         the next block, the budget carry, the report rows so far, the
                     adaptive plan and tau, and the run's fingerprint

Every file is written to a temporary name and renamed into place, and state.json
(which names the streams file) is replaced last, so a run killed at any instant
leaves the previous consistent state. A resumed run loads the finished blocks
and the streams and continues with the next block; since every later step is a
deterministic function of those arrays, its output is bit-identical to that of
an uninterrupted run. A checkpoint written for a different model, calibration
set or configuration is refused (the fingerprint names which one differs).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import signal
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from jaxprune.errors import UsageError
from jaxprune.io.atomic import write_file, write_json
from jaxprune.sharding import to_host
from jaxprune.spec import LayerSpec

STATE = "state.json"
# Test hook: the process SIGKILLs itself right after saving this block's state,
# which is what a preemption at that instant looks like.
KILL_ENV = "JAXPRUNE_KILL_AFTER_BLOCK"


def _digest(*arrays) -> str:
  h = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(np.asarray(a))
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


def fingerprint(model, config, calib, score_windows) -> dict[str, str]:
  """What a checkpoint must agree on with the run that resumes it, one digest per input."""
  cfg = dataclasses.asdict(config)
  # The same weights: the spec, the embedding and the first and last blocks' tensors.
  probe = [model.params["embed"]["embedding"] if "embed" in model.params else None]
  blocks = model.params["layers"]
  probe += jax.tree.leaves(blocks[0]) + jax.tree.leaves(blocks[-1])
  return {
      "model": hashlib.sha256(json.dumps(model.spec.to_json(), sort_keys=True).encode()).hexdigest()[:16] + ":" +
               _digest(*[p for p in probe if p is not None]),
      "calibration": _digest(calib),
      "score_windows": _digest(score_windows) if score_windows is not None else "none",
      "config": hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16],
  }


def _save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
  write_file(path, lambda f: np.savez(f, **arrays), force=True, binary=True)


def save_block(path: str, block: dict) -> None:
  """One block's parameters as an .npz of its flattened paths (written atomically)."""
  flat = traverse_util.flatten_dict(block, sep="/")
  # to_host: a block split over processes is gathered (every process saves it, in the same order).
  _save_npz(path, {k: to_host(v) for k, v in flat.items()})


def save_block_shards(path: str, block: dict) -> int:
  """Block `block` as an Orbax checkpoint at `path`, written by every process at once: each
  writes only the shards its own devices hold (one copy of each replicated shard), so
  nothing is gathered. `path` must be one directory that every process sees (a shared file
  system or a bucket); Orbax commits it atomically once every process has written.

  Returns:
    The number of values this process wrote.
  """
  import orbax.checkpoint as ocp

  ckptr = ocp.StandardCheckpointer()
  try:
    ckptr.save(path, block)
    ckptr.wait_until_finished()
  finally:
    ckptr.close()
  return sum(s.data.size for x in jax.tree.leaves(block) if isinstance(x, jax.Array)
             for s in x.addressable_shards if s.replica_id == 0)


def _load_block_shards(path: str) -> dict:
  """A block written by `save_block_shards`, whole, as host arrays (every shard read back).

  Read by the checkpoint handler, not a Checkpointer, whose restore is a barrier of all
  processes: here one process may read while the others wait (process 0 writing the output)."""
  import orbax.checkpoint as ocp
  from etils import epath

  handler = ocp.PyTreeCheckpointHandler()
  try:
    tree = handler.metadata(epath.Path(path)).tree
    args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray, dtype=m.dtype), tree,
                        is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
    block = handler.restore(epath.Path(path), args=ocp.args.PyTreeRestore(restore_args=args))
  except Exception as e:  # noqa: BLE001 -- orbax and tensorstore raise many types for missing pieces
    raise UsageError(f"the pruned block in {path} could not be read back ({type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''}); with several processes the blocks' "
                     "directory must be one that every host sees (a shared file system or a bucket)") from None
  finally:
    handler.close()
  return jax.tree.map(jax.numpy.asarray, block)


def load_block(path: str) -> dict:
  """A block written by `save_block` (an .npz) or `save_block_shards` (a directory), exactly as it was."""
  if os.path.isdir(path):
    return _load_block_shards(path)
  with np.load(path) as z:
    flat = {tuple(k.split("/")): jax.numpy.asarray(z[k]) for k in z.files}
  return traverse_util.unflatten_dict(flat)


@dataclasses.dataclass
class Resumed:
  """What a checkpoint restores: the next block to prune and the state entering it
  (finished blocks as the paths of their files, read when needed)."""

  next_block: int
  blocks: dict[int, str]
  layer_specs: dict[int, LayerSpec]
  streams: dict[str, np.ndarray]
  state: dict[str, Any]


class RunCheckpoint:
  """The checkpoint directory of one run (see the module docstring)."""

  def __init__(self, path: str, fp: dict[str, str]):
    self.path = path
    self.fp = fp
    os.makedirs(path, exist_ok=True)

  def block_path(self, i: int) -> str:
    return os.path.join(self.path, f"block_{i:04d}.npz")

  def exists(self) -> bool:
    return os.path.exists(os.path.join(self.path, STATE))

  def load(self) -> Resumed:
    with open(os.path.join(self.path, STATE)) as f:
      state = json.load(f)
    differ = [k for k in self.fp if state["fingerprint"].get(k) != self.fp[k]]
    if differ:
      raise UsageError(f"the checkpoint in {self.path} belongs to a run with a different {', '.join(differ)}; "
                       "resume with the same model, calibration data and options, or remove the checkpoint "
                       "(pass --force) to start over")
    nxt = state["next_block"]
    blocks, specs = {}, {}
    for i in state["finished_blocks"]:
      blocks[i] = self.block_path(i)
      d = state["layer_specs"][str(i)]
      specs[i] = LayerSpec(**{**d, "kv_map": None if d["kv_map"] is None else tuple(d["kv_map"])})
    with np.load(os.path.join(self.path, state["streams"])) as z:
      streams = {k: z[k] for k in z.files}
    return Resumed(nxt, blocks, specs, streams, state)

  def save(self, i: int, block: dict, layer_spec: LayerSpec, streams: dict[str, np.ndarray],
           state: dict[str, Any]) -> None:
    """Saves block i (just finished) and the state entering block i + 1."""
    save_block(self.block_path(i), block)
    name = f"streams_{i + 1:04d}.npz"
    _save_npz(os.path.join(self.path, name), streams)
    prev = {}
    if self.exists():
      with open(os.path.join(self.path, STATE)) as f:
        prev = json.load(f)
    finished = sorted(set(prev.get("finished_blocks", [])) | {i})
    specs = {**prev.get("layer_specs", {}), str(i): dataclasses.asdict(layer_spec)}
    state = {**state, "fingerprint": self.fp, "next_block": i + 1, "finished_blocks": finished,
             "layer_specs": specs, "streams": name}
    write_json(os.path.join(self.path, STATE), state, force=True)  # last: names the streams file
    for old in glob.glob(os.path.join(self.path, "streams_*.npz")):
      if os.path.basename(old) != name:
        os.remove(old)
    if os.environ.get(KILL_ENV) == str(i):
      os.kill(os.getpid(), signal.SIGKILL)
