"""What a run measures, assembled in one place: a module's report row, the phase meter, the
compile counter and the run's report."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Any

import jax
import numpy as np

from jaxprune import placement, sharding
from jaxprune.io.lazy import LazyBlocks
from jaxprune.spec import count_params, layer_param_count


class Meter:
  """Wall seconds by phase and call counts of one step (or of the plan)."""

  def __init__(self):
    self.seconds: dict[str, float] = {}
    self.passes: dict[str, int] = {}

  @contextlib.contextmanager
  def phase(self, name: str):
    """Adds the wall time of the block to phase `name` (what it computes is waited for inside)."""
    t = time.perf_counter()
    try:
      yield
    finally:
      self.add(name, time.perf_counter() - t)

  def add(self, name: str, seconds: float) -> None:
    self.seconds[name] = self.seconds.get(name, 0.0) + seconds

  def count(self, name: str, n: int = 1):
    self.passes[name] = self.passes.get(name, 0) + n


def merged(total: dict, more: dict) -> dict:
  """`total` with the counts or seconds of `more` added, key by key (a new dict)."""
  out = dict(total)
  for k, v in more.items():
    out[k] = out.get(k, 0) + v
  return out


class Compiles:
  """Seconds JAX spends tracing, lowering and compiling, and how many backend compiles (process-wide)."""

  EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
            "/jax/core/compile/backend_compile_duration")
  seconds = 0.0
  count = 0
  _registered = False

  @classmethod
  def start(cls) -> tuple[float, int]:
    if not cls._registered:
      jax.monitoring.register_event_duration_secs_listener(cls._on_event)
      cls._registered = True
    return cls.seconds, cls.count

  @classmethod
  def _on_event(cls, event, duration, **_):
    if event in cls.EVENTS:
      cls.seconds += duration
      cls.count += event == cls.EVENTS[-1]


@dataclasses.dataclass(frozen=True)
class ModuleRow:
  """The named values one module's step reports; `to_json` is its row of report["modules"].

  `solves` maps "first_level", "second_level" and "refit" to their solve's entry
  (`solve.solve_level`); `selection` is what the similarity rule decided (tau, JS matrix,
  similar heads); `errors` holds error_inherited, error_reconstructed and error_after,
  each relative to the energy of the dense module's outputs, where the run measures them.
  """

  layer: int
  module: str
  units_before: int
  kept: tuple[int, ...]
  scored: bool
  seconds: float
  solves: dict = dataclasses.field(default_factory=dict)
  selection: dict = dataclasses.field(default_factory=dict)
  score_seconds: float | None = None
  errors: dict = dataclasses.field(default_factory=dict)
  from_store: bool | None = None  # set only for a module that kept everything (`unchanged`)

  def to_json(self) -> dict[str, Any]:
    row: dict[str, Any] = {"layer": self.layer, "module": self.module, **self.solves, **self.selection}
    if self.score_seconds is not None:
      row["score_seconds"] = self.score_seconds
    row.update(self.errors)
    row.update(units_before=int(self.units_before), units_after=len(self.kept), kept=[int(k) for k in self.kept],
               scored=bool(self.scored))
    if self.from_store is not None:
      row.update(unchanged=True, from_store=self.from_store)
    row["seconds"] = self.seconds
    return row


def report(dense, pruned, c, run, *, tau, plan_seconds, seconds, calib, mesh, with_dense: bool,
           values_written: int | None, reads_before: tuple[int, int] = (0, 0)) -> dict[str, Any]:
  """The run's JSON report. `run` is the loop's final `state.RunState` (its module rows,
  pass counts and phase seconds); `reads_before`, a streamed model's block reads and reads
  ahead before the run began (others' reads: generation, evaluation)."""
  start, stop = c.block_range(dense.spec)
  idx = range(start, stop)
  block_before = sum(layer_param_count(dense.spec, dense.spec.layers[i]) for i in idx)
  block_after = sum(layer_param_count(pruned.spec, pruned.spec.layers[i]) for i in idx)
  total_before, total_after = count_params(dense.params), count_params(pruned.params)
  # The budget keeps (1 - sparsity) of the dense blocks, added biases included.
  target_after = (1 - c.sparsity) * block_before
  modules = list(run.modules)
  return {
      "config": {**dataclasses.asdict(c), "layers": [start, stop]},
      "tau": tau,
      "calibration": {"windows": int(np.shape(calib)[0]), "seq_len": int(np.shape(calib)[1]),
                      "held_out_for_damping": c.batch_size if c.auto_damping else 0},
      "devices": {"data": int(mesh.shape[sharding.DATA]), "model": int(mesh.shape[sharding.MODEL]),
                  "platform": jax.default_backend(),
                  # Statistics kept split over `model` to solves on the devices, or joined (`placement.Solves`).
                  "solves": "split" if placement.split_solve_mesh() is not None else "joined"},
      "params": {
          "before": total_before,
          "after": total_after,
          "pruned_blocks_before": block_before,
          "pruned_blocks_after": block_after,
          "ratio_of_pruned_blocks": 1 - block_after / block_before,
          "ratio_global": 1 - total_after / total_before,
          "budget_after": target_after,
          # Parameters kept beyond the budget (negative: below), from rounding to whole units.
          "budget_error": block_after - target_after,
          "budget_error_ratio": (block_after - target_after) / block_before,
      },
      "rounding": c.rounding if c.allocation == "uniform" else "carry",
      "layers": [dataclasses.asdict(l) for l in pruned.spec.layers],
      "modules": modules,
      "damping_retries": sum(m.get(k, {}).get("retries", 0) for m in modules
                             for k in ("first_level", "second_level", "refit")),
      # Wall seconds by phase; "compile" (tracing and compiling, process-wide) overlaps the
      # phases whose first call compiled, and "other" is what no phase covers.
      "seconds": {"total": seconds, "plan": plan_seconds,
                  "modules": math.fsum(m["seconds"] for m in modules),
                  "phases": {**run.phase_seconds,
                             "other": seconds - math.fsum(v for k, v in run.phase_seconds.items() if k != "compile")},
                  # The plan's own split (its total is phases["plan"]).
                  "plan_phases": dict(run.plan_phase_seconds)},
      "streams": {"dense": with_dense, "score": c.score_data == "random"},
      "passes": dict(run.passes),
      # What this process wrote of the finished blocks to blocks_dir (its own shards).
      **({"block_values_written": values_written} if values_written is not None else {}),
      # A streamed model: the dense blocks the run read from its checkpoint, and how many of those
      # reads ran in the background while the block before was worked on.
      **({"streaming": {"block_reads": dense.params["layers"].reads - reads_before[0],
                        "read_ahead": dense.params["layers"].prefetched - reads_before[1]}}
         if isinstance(dense.params.get("layers"), LazyBlocks) else {}),
  }
