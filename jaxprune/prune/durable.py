"""The run's durable state: what state.json holds, typed and versioned, and the streams a
finished block leaves for the next.

state.json is one flat JSON object (layout `VERSION`): the checkpoint's own fields (which
block comes next, the finished blocks, their sizes, the streams file, every file's sha256,
the run's fingerprint) and the run's record (`RunRecord`: the budget's carry, the report
rows, pass counts, phase seconds, the plan and tau, the plan's stored dense outputs).
Layout 1 (before the sha256s) is refused with one line; so is any other.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import numpy as np

from jaxprune import sharding
from jaxprune.errors import CheckpointError
from jaxprune.prune.streams import Group

VERSION = 2

# Fields of the checkpoint's own and of the run's record that must be there, with their JSON types.
_FILE_FIELDS = dict(fingerprint=dict, next_block=int, finished_blocks=list, layer_specs=dict, streams=str, files=dict)
_RUN_FIELDS = dict(carry=(int, float), modules=list, passes=dict, phase_seconds=dict, plans=dict,
                   plan_seconds=(int, float))


@dataclasses.dataclass(frozen=True)
class RunRecord:
  """What the engine records of a run at a block boundary (besides arrays).

  Attributes:
    carry: the budget's carry entering the next block.
    modules, passes, phase_seconds: the report so far (`state.RunState`).
    plans: the adaptive plan, block index (a string) -> [heads, channels]; {} when uniform.
    tau: the similarity threshold the run uses, or None.
    plan_seconds, plan_phase_seconds: the plan's wall seconds, in all and by phase.
    dense_outputs: whether the plan's dense outputs are kept in the checkpoint (their sha256s: dense_digests).
  """

  carry: float
  modules: tuple
  passes: dict
  phase_seconds: dict
  plans: dict
  tau: float | None
  plan_seconds: float
  plan_phase_seconds: dict = dataclasses.field(default_factory=dict)
  dense_outputs: bool = False
  dense_digests: dict = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "modules": list(self.modules)}


@dataclasses.dataclass(frozen=True)
class DurableState:
  """state.json: the checkpoint's fields and the run's record (see the module docstring)."""

  fingerprint: dict
  next_block: int
  finished_blocks: tuple
  layer_specs: dict  # block index (a string) -> LayerSpec as a dict
  streams: str  # the streams file entering next_block
  files: dict  # file name -> sha256
  run: RunRecord
  version: int = VERSION

  def to_json(self) -> dict[str, Any]:
    return {**self.run.to_json(), "version": self.version, "fingerprint": self.fingerprint,
            "next_block": self.next_block, "finished_blocks": list(self.finished_blocks),
            "layer_specs": self.layer_specs, "streams": self.streams, "files": self.files}

  @classmethod
  def from_json(cls, state, path: str, fix: str) -> "DurableState":
    """The state read from `path`, or a one-line CheckpointError ending in `fix`."""
    version = state.get("version", 1) if isinstance(state, dict) else None
    if version != VERSION:
      raise CheckpointError(f"{path} has checkpoint layout version {version!r}; this jaxprune reads version "
                            f"{VERSION}: {fix}")
    for fields in (_FILE_FIELDS, _RUN_FIELDS):
      missing = [k for k, kind in fields.items() if not isinstance(state.get(k), kind)]
      if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)} (or holds another type); {fix}")
    names = {f.name for f in dataclasses.fields(RunRecord)}
    run = RunRecord(**{k: v for k, v in state.items() if k in names})
    return cls(**{k: state[k] for k in _FILE_FIELDS}, run=run, version=version)


def streams_arrays(groups: list[Group], xs, host: bool = True) -> dict:
  """The streams entering the next block by name (what streams_* holds): host arrays, or
  with `host=False` the arrays as they lie on the mesh (a sharded checkpoint writes each
  process's shards, which a run over several processes cannot gather to one host)."""
  keep = np.asarray if host else (lambda x: x)
  streams = {}
  for g, grp in enumerate(groups):
    streams[f"xp_{g}"] = keep(grp.xp)
    if grp.xd is grp.xp:  # nothing changed yet: one stream stands for both (`step._unchanged`)
      streams[f"same_{g}"] = np.asarray(True)
    elif grp.xd is not None:
      streams[f"xd_{g}"] = keep(grp.xd)
  if xs is not None:
    streams["xs"] = keep(xs)
  return streams


def streams_from(z: dict[str, np.ndarray], n_groups: int, mesh) -> tuple[list[Group], Any]:
  """The streams `streams_arrays` wrote, put back on the mesh (where a sharded checkpoint's
  already are): (groups, scoring stream or None)."""
  put = functools.partial(jax.device_put, device=sharding.stream_sharding(mesh))
  groups = []
  for g in range(n_groups):
    xp = put(z[f"xp_{g}"])
    groups.append(Group(xp if f"same_{g}" in z else put(z[f"xd_{g}"]) if f"xd_{g}" in z else None, xp))
  return groups, put(z["xs"]) if "xs" in z else None
