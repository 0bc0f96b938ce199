"""The greedy module-wise pruning loop: plain Python around `step.step` and the jitted
passes of `jaxprune.stats.passes` (docs/engine.md).

For each block in order, attention then MLP, the loop asks the budget for the module's
shape, runs the step, checks its pruned stream is finite and replaces the run's state
(`state.RunState`) with the step's result; after each block it makes the block durable
(with a checkpoint), spills it to a file (when streaming) and reports a "block" event.
Before the loop: the criterion's preparation and, with adaptive allocation, the plan
(`plan.make`), whose dense outputs the loop then reads instead of running the dense
model again. The input model is never modified; at sparsity 0 it is returned as it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from jaxprune import allocate, criteria, placement, sharding
from jaxprune.errors import CheckpointError, UsageError
from jaxprune.io import lazy as lazy_io
from jaxprune.model import Model
from jaxprune.models import adapter as A
from jaxprune.models import layers as L
from jaxprune.prune import budget as budget_lib
from jaxprune.prune import checkpoint as run_checkpoint
from jaxprune.prune import durable, plan as plan_lib, spill as spill_lib, streams
from jaxprune.prune.config import PruneConfig, PruneResult
from jaxprune.prune.context import StepContext, bias_after, uses_dense
from jaxprune.prune.finite import BAD_WEIGHTS, check_finite, check_module
from jaxprune.prune.fingerprint import fingerprint
from jaxprune.prune.metrics import Compiles, report
from jaxprune.prune.state import Blocks, RunState
from jaxprune.prune.step import ModuleInput, step
from jaxprune.spec import spec_from_params
from jaxprune.stats import passes

log = logging.getLogger(__name__)


def prune(model: Model, calib: np.ndarray, config: PruneConfig = PruneConfig(), *, score_windows=None, mesh=None,
          progress: Callable[[dict], None] | None = None, checkpoint: str | None = None,
          blocks_dir: str | None = None, solves: placement.Solves | str = placement.Solves.AUTO) -> PruneResult:
  """Prunes `model` with calibration token windows `calib` [S, T].

  Args:
    score_windows: token windows [S', T] for score_data="random" (default:
      uniformly random ids with config.seed, as many as `calib`).
    mesh: a (data, model) Mesh (`sharding.make_mesh`; default: all devices on `data`). The
      activations are sharded over `data`, the blocks over `model`.
    progress: called with a dict after every module ("module": its report row), plan
      layer ("plan") and block ("block", after the block is durable when there is a checkpoint).
    checkpoint: a directory where every finished block's state is saved
      (`jaxprune.prune.checkpoint`); if it already holds the state of this run (same
      model, windows and config), the run resumes after its last finished block
      and gives bit-identical results to an uninterrupted run.
    blocks_dir: where a streamed run without `checkpoint` keeps its finished blocks, as
      Orbax checkpoints that every process writes its own shards of (nothing is gathered;
      `checkpoint.save_shards`). With several processes it must be one directory
      that every process sees. Default: a temporary directory of this process, to which
      each finished block is gathered whole.
    solves: where the statistics are solved (`placement.Solves`): kept split over the mesh's
      `model` axis and solved on its devices, or joined where the solves run; `auto` splits
      them on an accelerator's mesh with a `model` axis.

  Returns:
    PruneResult(model, report): the pruned Model (the input is untouched) and a JSON-able report.
  """
  with contextlib.ExitStack() as stack:  # owns the temporary store of dense outputs, if any
    # Every kernel the run traces (statistics, targets, solves, the criterion's preparation) takes
    # the stated precision; jit keys its cache on it, so no kernel compiled under another leaks in.
    stack.enter_context(jax.default_matmul_precision(str(config.matmul_precision)))
    stack.enter_context(placement.split_solves(placement.solve_mesh(solves, mesh)))
    return _prune(model, calib, config, _Run(score_windows, mesh, progress or (lambda event: None), checkpoint,
                                             blocks_dir), stack)


class _Run(NamedTuple):
  """The keyword arguments of `prune`."""

  score_windows: Any
  mesh: Any
  progress: Callable[[dict], None]
  checkpoint: str | None
  blocks_dir: str | None


def _prune(model: Model, calib, config: PruneConfig, run: _Run, stack) -> PruneResult:
  c = config.check(model.spec)
  mesh = run.mesh or sharding.make_mesh()
  t_start = time.perf_counter()
  compiles0 = Compiles.start()
  layers = model.params["layers"]
  reads0 = (layers.reads, layers.prefetched) if lazy_io.is_lazy(model.params) else (0, 0)
  crit = criteria.get(c.method)
  spill_lib.check_blocks_dir(run.blocks_dir)
  state = RunState(Blocks(model.params["layers"]), tuple(model.spec.layers))
  if c.sparsity == 0 and not c.attn_sparsity:
    # Nothing to remove: the model as it is (a refit or added biases would only change it).
    state = dataclasses.replace(state, passes={"compiles": 0})
    return PruneResult(model, report(model, model, c, state, tau=c.tau, plan_seconds=0.0,
                                     seconds=time.perf_counter() - t_start, calib=calib, mesh=mesh,
                                     with_dense=uses_dense(c, crit), values_written=_written(model, run, state)))
  check_finite({k: v for k, v in model.params.items() if k != "layers"}, "the model given to prune", BAD_WEIGHTS,
               CheckpointError)
  tokens, s_tokens, score_windows = _windows(model, calib, c, run.score_windows, mesh)
  ckpt = resumed = None
  if run.checkpoint is not None:
    ckpt = run_checkpoint.RunCheckpoint(run.checkpoint, fingerprint(model, c, calib, score_windows))
    if ckpt.exists():
      resumed = ckpt.load(sharding.stream_sharding(mesh))
      log.info("resuming from %s at block %d", run.checkpoint, resumed.next_block)
  spill = spill_lib.Spill(ckpt, run.blocks_dir)

  extra, state = _prepare(crit, model, calib, c, state)
  inp = plan_lib.PlanInputs(model, c, crit, extra, mesh, state.blocks, bias_after(model.spec, c), run.progress)
  plan = _plan(inp, tokens, s_tokens, resumed, ckpt, run.checkpoint, stack)
  ctx = StepContext.build(model, c, mesh, crit, extra, plan.dense_outputs)
  state = dataclasses.replace(state, plan_phase_seconds=dict(plan.phase_seconds))

  first = 0
  if resumed is not None and resumed.streams is None:  # a damaged file: the run starts again
    run.progress({"event": "recompute", "next_block": 0})
  if resumed is None or resumed.streams is None:
    groups = streams.first_groups(model.spec, model.params, tokens, mesh, ctx.with_dense)
    xs = streams.embed_stream(model.spec, model.params, s_tokens, mesh) if s_tokens is not None else None
  else:
    first, state, groups, xs = _restore(state, resumed, len(tokens), mesh)
  state = _loop(ctx, model, state, plan, first, groups, xs, ckpt, spill, run.progress,
                streams.positions(tokens[0].shape[2]))

  pruned = _assemble(ctx, state, model, spill)
  state = state.with_phase("plan", plan.seconds).with_phase("compile", Compiles.seconds - compiles0[0])
  state = dataclasses.replace(state, passes={**state.passes, "compiles": Compiles.count - compiles0[1]})
  return PruneResult(pruned, report(model, pruned, c, state, tau=plan.tau, plan_seconds=plan.seconds,
                                    seconds=time.perf_counter() - t_start, calib=calib, mesh=mesh,
                                    with_dense=ctx.with_dense, values_written=_written(model, run, state),
                                    reads_before=reads0))


def _written(model: Model, run: _Run, state: RunState) -> int | None:
  """Values of the pruned blocks this process wrote as its own shards, reported only where it
  writes shards: to blocks_dir (a streamed run without a checkpoint) or to a sharded checkpoint."""
  to_blocks_dir = run.blocks_dir is not None and run.checkpoint is None and lazy_io.is_lazy(model.params)
  return state.values_written if to_blocks_dir or (run.checkpoint is not None and
                                                   run_checkpoint.several_processes()) else None


def _prepare(crit, model: Model, calib, c: PruneConfig, state: RunState):
  """(the criterion's prepared extras or None, the state with their seconds)."""
  if crit.prepare is None:
    return None, state
  t0 = time.perf_counter()
  # Preparations see the whole model (gradients through it): a streamed model is read in.
  extra = crit.prepare(lazy_io.materialize(model), np.asarray(calib), c)
  state = state.with_phase("prepare", time.perf_counter() - t0)
  log.info("criterion %s prepared in %.1fs", c.method, state.phase_seconds["prepare"])
  return extra, state


def _assemble(ctx: StepContext, state: RunState, model: Model, spill) -> Model:
  """The pruned model: its blocks in memory, or (streamed) read from their files when used."""
  if lazy_io.is_lazy(model.params):
    return spill_lib.streamed_result(ctx, state, model, spill)
  blocks = [ctx.fill_biases(b) for b in state.blocks]
  params = {**model.params, "layers": tuple(blocks)}
  spec = spec_from_params(model.spec.with_layers(state.layer_specs), params)
  return Model.checked(spec, params, model.source)


def _windows(model: Model, calib, c: PruneConfig, score_windows, mesh):
  """(calibration token groups, scoring tokens or None, the scoring windows or None), checked."""
  tokens = streams.split_holdout(streams.chunks(calib, c.batch_size, mesh, "calibration"), c.auto_damping)
  if c.skip_positions >= tokens[0].shape[-1]:
    raise UsageError(f"skip_positions={c.skip_positions} leaves no position of the {tokens[0].shape[-1]}-token "
                     "calibration windows in the statistics; use fewer than the window length")
  if c.score_data == "random" and score_windows is None:
    rng = np.random.default_rng(c.seed + 1)
    score_windows = rng.integers(0, model.spec.vocab_size, size=np.asarray(calib).shape, dtype=np.int32)
  s_tokens = streams.chunks(score_windows, c.batch_size, mesh, "scoring") if c.score_data == "random" else None
  return tokens, s_tokens, score_windows


def _plan(inp: plan_lib.PlanInputs, tokens, s_tokens, resumed, ckpt, checkpoint, stack) -> plan_lib.Plan:
  """The plan a resumed run made before it stopped, the adaptive plan, or none (uniform)."""
  c = inp.config
  if resumed is not None:
    r = resumed.state.run
    store = spill_lib.reopen_dense_outputs(checkpoint, r.dense_digests, stack) if r.dense_outputs else None
    layers = {int(i): allocate.LayerPlan(*hc) for i, hc in r.plans.items()}
    return plan_lib.Plan(layers, r.tau, r.plan_seconds, dict(r.plan_phase_seconds), store)
  if c.allocation != "adaptive":
    return plan_lib.Plan({}, c.tau, 0.0, {})
  # With uniform allocation and no tau, each layer drops its uniform head count
  # by the budgeted similarity rule (`select`), which keeps one shape per layer.
  need_tau = c.heads == "similarity" and c.tau is None
  start, stop = c.block_range(inp.model.spec)
  with_dense = uses_dense(c, inp.crit)
  open_store = lambda calib_tokens: spill_lib.open_dense_outputs(
      inp.model.spec, 2 * (stop - start), calib_tokens, ckpt, stack) if with_dense else None
  return plan_lib.make(inp, tokens, s_tokens, need_tau, open_store)


def _restore(state: RunState, resumed, n_groups: int, mesh):
  """(next block, the state, the streams) entering the checkpoint's next block."""
  blocks, specs = state.blocks, list(state.layer_specs)
  for i, path in resumed.blocks.items():  # read when needed: at the end, or never while streaming
    blocks, specs[i] = blocks.with_block(i, path), resumed.layer_specs[i]
  r = resumed.state.run
  state = RunState(blocks, tuple(specs), r.carry, tuple(r.modules), dict(r.passes), dict(r.phase_seconds),
                   state.plan_phase_seconds)
  groups, xs = durable.streams_from(resumed.streams, n_groups, mesh)
  return resumed.next_block, state, groups, xs


def _loop(ctx: StepContext, model: Model, state: RunState, plan, first, groups, xs, ckpt, spill, progress, pos):
  """Blocks `first`.. in order; returns the final state."""
  c, spec = ctx.config, model.spec
  start, stop = c.block_range(spec)
  b0 = budget_lib.start(c)
  pending = None  # (block, its save under way)
  for i in range(first, spec.num_layers):
    if i >= stop:
      break  # nothing after the range changes
    if i < start:
      run = functools.partial(passes.block_pass, L.block_config(spec, i), state.blocks.placed(i, ctx.mesh),
                              positions=pos, mesh=ctx.mesh)
      state.blocks.prefetch(i + 1, ctx.mesh)
      # Before the first pruned block both streams are the dense model's: one pass.
      groups = [streams.Group(None if g.xd is None else x, x) for g, x in ((g, run(x=g.xp)) for g in groups)]
      xs = run(x=xs) if xs is not None else None
      continue
    for kind in (A.ATTN, A.MLP):
      state, groups, xs = _module(ctx, spec, b0, state, kind, i, groups, xs, plan, progress)
      # Dense block i has been read (by its first module): the next one is read meanwhile.
      state.blocks.prefetch(i + 1, ctx.mesh)
    # Block i is durable, spilled and reported once its save is done. The save of a sharded
    # checkpoint is written while block i + 1 is pruned, so block i - 1's is finished first.
    state = _durable(state, pending, model, spill, progress)
    pending = None
    if ckpt is not None:
      t0 = time.perf_counter()
      record = durable.RunRecord(state.carry, state.modules, state.passes, state.phase_seconds,
                                 {str(k): [v.heads, v.channels] for k, v in plan.layers.items()}, plan.tau,
                                 plan.seconds, state.plan_phase_seconds, ctx.dense_outputs is not None,
                                 ctx.dense_outputs.digests if ctx.dense_outputs is not None else {})
      pending = (i, ckpt.start(i, state.blocks[i], state.layer_specs[i],
                               durable.streams_arrays(groups, xs, host=not ckpt.sharded), record))
      state = state.with_phase("checkpoint", time.perf_counter() - t0)
      if not ckpt.sharded:  # its files are written: durable now
        state, pending = _durable(state, pending, model, spill, progress), None
    else:
      state = _durable(state, (i, None), model, spill, progress)
  return _durable(state, pending, model, spill, progress)


def _durable(state: RunState, pending, model: Model, spill, progress) -> RunState:
  """Block i of `pending` = (i, its save or None) made durable (its save finished), spilled to a
  file when streaming, and reported; `state` as it is when nothing is pending."""
  if pending is None:
    return state
  i, save = pending
  if save is not None:
    t0 = time.perf_counter()
    written = save.finish()
    state = state.with_phase("checkpoint", time.perf_counter() - t0)
    if written is not None:  # this process's own shards of the block
      state = dataclasses.replace(state, values_written=state.values_written + written)
  if lazy_io.is_lazy(model.params):
    state = spill(state, i)
  progress({"event": "block", "layer": i})
  return state


def _module(ctx: StepContext, spec, b0, state: RunState, kind, i, groups, xs, plan, progress):
  """Block i's module `kind` pruned (`step.step`): (the new state, the next streams)."""
  layer = state.layer_specs[i]
  cfg = L.part_config(L.block_config(spec.with_layers(state.layer_specs), i), kind.name)
  shape, carry = budget_lib.keep_shape(b0, state.carry, spec, kind, i, layer, ctx.bias_after,
                                       state.blocks[i] if kind is A.MLP else None, plan.layers.get(i))
  # Blocks live on the mesh, sharded over its `model` axis (dense ones as they are read, pruned
  # ones as they come out of surgery), so no device holds a whole block.
  blk = state.blocks.placed(i, ctx.mesh)
  res = step(ctx, ModuleInput(kind, i, blk, layer, cfg, groups, xs, shape, plan.tau))
  check_module(res.out, kind, i)
  state = state.with_module(i, sharding.place(res.out.block, ctx.mesh), res.out.layer, res.metrics, carry)
  progress({"event": "module", **state.modules[-1]})
  return state, res.out.groups, res.out.xs
