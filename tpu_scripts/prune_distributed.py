"""Prune with jaxprune on a (data, model) device mesh, one or many processes.

Single process (one TPU VM, one GPU host, or CPU with forced host devices):

    python tpu_scripts/prune_distributed.py smollm2-135m --calib ../shared/data/wikitext-2/valid.txt \\
        --sparsity 0.2 --mesh-data 4 --mesh-model 2 --out runs/smollm2-20-mesh

Several processes (a TPU pod slice, or GPU hosts): start the same command on
every host. `jax.distributed.initialize()` is called when

  * --coordinator HOST:PORT, --num-processes N and --process-id I are given
    (GPU clusters without a scheduler JAX knows), or
  * --distributed on (JAX auto-detects the cluster: Cloud TPU pod slices, SLURM,
    Open MPI), or
  * --distributed auto (the default) and the environment shows several
    processes: JAX_COORDINATOR_ADDRESS, SLURM_NTASKS > 1, OMPI_COMM_WORLD_SIZE > 1,
    or a TPU pod slice (TPU_WORKER_HOSTNAMES listing several workers).

Every process streams the model (safetensors, GGUF and Orbax checkpoints: the
blocks stay on disk until the run reaches them, so a host holds one block at a
time; PyTorch pickles are read whole) and reads the same calibration text; the
windows are drawn with the same seed, so they agree (each after BOS where the
tokenizer adds one, as `jaxprune prune` draws them). The parameters are placed
on the mesh by logical axis names (`jaxprune.sharding.param_shardings`: heads,
KV heads, MLP channels and the vocabulary over `model`), a block when the run
reaches it; the calibration streams are sharded over `data`, and
`jaxprune.prune.prune(..., mesh=mesh)` runs the greedy pipeline. Its
statistics are sums, so XLA's all-reduce over `data` gives the single-device
result up to summation order; a Gram matrix's rows are split over `model` while
they accumulate. Every finished block and the streams entering the next are
checkpointed in OUT.checkpoint; with several processes as Orbax checkpoints of
which each process writes only its own shards (a directory every host sees), so
no block is gathered; at the end process 0 alone reads the blocks back, a block
at a time, to write the Hugging Face directory (`save_hf`) and report.json. A
killed run continues with --resume (the same command, processes and mesh),
bit-identically; after a preemption notice (SIGTERM to any process) every
process stops after the same finished block and exits with status 75.
(--no-checkpoint: the blocks go to --blocks-dir instead; --gather-blocks gathers
each block to every process, for clusters without shared storage, and keeps no
checkpoint.)

See tpu_scripts/README.md for memory considerations and the TPU VM launcher.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time

log = logging.getLogger("prune_distributed")

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.join(HERE, "..") not in sys.path:  # run from a checkout without `pip install -e .`
  sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..")))


def parse_args(argv=None) -> argparse.Namespace:
  # Building the options imports jaxprune (and JAX) but initialises no backend, so
  # jax.distributed.initialize() can still come after.
  from jaxprune.cli import add_compile_cache_options
  from jaxprune.cli.prune_cmd import SOLVES
  from jaxprune.cli.prune_options import add_config_options
  from jaxprune.prune import presets

  p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="See tpu_scripts/README.md.",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("model", help="built-in name (smollm2-135m), HF directory, .gguf file; every host must see it")
  p.add_argument("--out", required=True, help="output directory, written by process 0 (must not exist unless --force)")
  p.add_argument("--force", action="store_true", help="replace an existing --out")
  p.add_argument("--calib", default="random", help="calibration text file (the same on every host) or 'random'")
  p.add_argument("--calib-samples", type=int, default=128, help="calibration windows (default 128)")
  p.add_argument("--seq-len", type=int, default=128, help="tokens per window (default 128)")
  p.add_argument("--preset", default=None, choices=presets.names(),
                 help="the recipe options start from (default: recommended; baseline with --method naming a "
                 "published tool), as for `jaxprune prune`")
  p.add_argument("--config", default=None, metavar="FILE.yaml",
                 help="YAML file of PruneConfig fields; overrides the preset, and options here override it")
  p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                 help="parameter dtype for pruning (default float32; statistics are float32 either way)")
  # Every host compiles the same kernels; with a cache on each (or on a shared path) a restarted
  # run does not compile them again.
  add_compile_cache_options(p)
  # Every PruneConfig field, as `jaxprune prune` has them (--batch-size unset: 16 rounded up
  # to a multiple of the data axis).
  add_config_options(p)
  mesh = p.add_argument_group("mesh")
  mesh.add_argument("--mesh-data", type=int, default=None,
                    help="devices on the `data` axis (default: all devices / --mesh-model)")
  mesh.add_argument("--mesh-model", type=int, default=1, help="devices on the `model` axis (default 1)")
  mesh.add_argument("--solves", default="auto", choices=SOLVES,
                    help="split: statistics kept split over `model` and solved on the devices (no whole Gram "
                    "anywhere); joined: gathered where the solves run; auto (default): split on accelerators")
  dist = p.add_argument_group("multi-process")
  dist.add_argument("--distributed", choices=("auto", "on", "off"), default="auto",
                    help="call jax.distributed.initialize(): auto = when flags or the environment show several "
                    "processes (default)")
  dist.add_argument("--coordinator", default=None, help="HOST:PORT of process 0's coordinator service")
  dist.add_argument("--num-processes", type=int, default=None)
  dist.add_argument("--process-id", type=int, default=None)
  ckpt = p.add_argument_group("checkpoint")
  ckpt.add_argument("--resume", action="store_true",
                    help="continue a killed or preempted run from its last finished block (the checkpoint in "
                    "OUT.checkpoint), with the same processes, mesh and options; bit-identical to an uninterrupted run")
  ckpt.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                    help="where the checkpoint is kept (default OUT.checkpoint). With several processes it is Orbax, "
                    "each process writing its own shards, so DIR must be one that every host sees (a shared file "
                    "system or a bucket mount) even where --out is worker 0's own disk")
  ckpt.add_argument("--no-checkpoint", dest="checkpoint", action="store_false",
                    help="do not save each finished block in the checkpoint (a killed run then starts over)")
  dist.add_argument("--blocks-dir", default=None, metavar="DIR",
                    help="with several processes and --no-checkpoint: where every process writes its own shards of "
                    "each finished block (Orbax), for process 0 to read back when it writes --out; a directory every "
                    "host sees, a shared file system or a bucket (default: OUT.blocks beside --out; removed once "
                    "--out is written)")
  dist.add_argument("--gather-blocks", action="store_true",
                    help="with several processes: gather each finished block to every process instead (a "
                    "collective; needs no shared storage, but every host receives and stores every block)")
  args = p.parse_args(argv)
  if args.calib == "selfgen":  # `jaxprune prune`'s self-generation would run the whole model on every host
    from jaxprune.errors import UsageError
    raise UsageError("--calib selfgen is not offered by prune_distributed.py; pass a text file or 'random' "
                     "(or generate with `jaxprune prune --calib selfgen`)")
  return args


# ---------------------------------------------------------------------------
# Multi-process start-up


def multi_process_env(env=os.environ) -> str | None:
  """Why the environment looks like one process of several (None: it does not)."""
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS is set"
  for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    try:
      if int(env.get(var, "1")) > 1:
        return f"{var}={env[var]}"
    except ValueError:
      pass
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1:
    return f"TPU pod slice with {len(hosts)} workers (TPU_WORKER_HOSTNAMES)"
  return None


def init_distributed(args) -> str | None:
  """Calls jax.distributed.initialize() when asked or detected; returns why (None: single process).

  Must run before any JAX computation: it decides which devices `jax.devices()` lists.
  """
  import jax

  explicit = [args.coordinator, args.num_processes, args.process_id]
  if any(v is not None for v in explicit):
    if args.distributed == "off":
      raise SystemExit("--distributed off contradicts --coordinator/--num-processes/--process-id")
    if any(v is None for v in explicit):
      raise SystemExit("--coordinator, --num-processes and --process-id go together; give all three "
                       "(or none, to let JAX detect a Cloud TPU, SLURM or Open MPI cluster with --distributed on)")
    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)
    return f"flags: process {args.process_id} of {args.num_processes}, coordinator {args.coordinator}"
  if args.distributed == "off":
    return None
  why = "--distributed on" if args.distributed == "on" else multi_process_env()
  if why is None:
    return None
  jax.distributed.initialize()  # cluster auto-detection (Cloud TPU metadata, SLURM, Open MPI, JAX_* env)
  return why


# ---------------------------------------------------------------------------
# Pieces the test reuses for its single-device reference


def build_config(args, data: int):
  """The run's PruneConfig: preset < --config file < options, as `jaxprune prune` resolves it."""
  import dataclasses

  from jaxprune.cli.prune_options import resolve_config

  config, _ = resolve_config(args)
  if args.batch_size is None:
    config = dataclasses.replace(config, batch_size=-(-16 // data) * data)
  # The text alone: the recipe's share of self-generated text would run the whole model on every
  # host (calibrate on a file that already holds text the model wrote, to have both).
  return dataclasses.replace(config, selfgen_share=0.0)


def calibration(args, model, tokenizer):
  """[calib_samples, P + seq_len] int32 windows drawn as `jaxprune prune` draws them, after BOS
  (P = 1) where the tokenizer adds one (issue 29: Gemma is fed [BOS] + window everywhere);
  identical on every process (same file, same seed, same tokenizer)."""
  from jaxprune.cli.prune_inputs import calibration as draw

  return draw(args, model, tokenizer, build_config(args, 1), [(args.calib, args.calib_samples)])


def _host_device():
  """This process's CPU device, or None (the default device) where JAX has no CPU backend."""
  import jax

  try:
    return jax.local_devices(backend="cpu")[0]
  except RuntimeError:
    return None


def sharding_summary(spec, mesh) -> dict:
  """How many parameter leaves (and values) the `model` axis splits, from the shapes alone
  (the blocks of a streamed run are placed on the mesh one at a time)."""
  import math

  import jax

  from jaxprune import sharding
  from jaxprune.spec import param_shapes

  is_shape = lambda x: isinstance(x, tuple) and all(isinstance(n, int) for n in x)
  shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, "float32"), param_shapes(spec), is_leaf=is_shape)
  leaves = jax.tree.leaves(shapes)
  shards = jax.tree.leaves(sharding.param_shardings(shapes, mesh, quiet=True))
  split = [sh for sh in shards if sharding.MODEL in jax.tree.leaves(tuple(sh.spec))]
  per_device = sum(math.prod(sh.shard_shape(x.shape)) for x, sh in zip(leaves, shards))
  return {"leaves": len(leaves), "leaves_split_over_model": len(split),
          "values": int(sum(math.prod(x.shape) for x in leaves)), "values_on_one_device": int(per_device)}


# ---------------------------------------------------------------------------


def _check_shared(path: str, what: str, pid: int, multihost_utils) -> None:
  """Refuses a directory (`what`: the option that names it) that some process does not see as
  process 0 does (a local disk): process 0 could not read the other processes' shards back."""
  import numpy as np

  from jaxprune.errors import UsageError

  marker = os.path.join(path, ".written-by-process-0")
  token = np.int64(time.time_ns() if pid == 0 else 0)
  token = int(multihost_utils.broadcast_one_to_all(token))
  if pid == 0:
    os.makedirs(path, exist_ok=True)
    with open(marker, "w") as f:
      f.write(str(token))
  multihost_utils.sync_global_devices("prune_distributed: shared dir marked")
  try:
    with open(marker) as f:
      sees = f.read() == str(token)
  except OSError:
    sees = False
  blind = np.flatnonzero(np.asarray(multihost_utils.process_allgather(np.int32(sees))) == 0).tolist()
  if blind:
    raise UsageError(f"{what} {path} is not shared: process(es) {blind} do not see what process 0 wrote there. "
                     "Every process writes its shards of the pruned blocks there for process 0 to read back; "
                     "pass a directory on storage every host mounts, or --no-checkpoint --gather-blocks")


# The exit status of a run that stopped for a preemption notice (sysexits' EX_TEMPFAIL: run it again).
PREEMPTED = 75


class Preempted(Exception):
  """Every process reached the preemption sync point after block `block` (durable in the checkpoint)."""

  def __init__(self, block: int):
    super().__init__(block)
    self.block = block


def main(argv=None) -> int:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax: a dozen lines for every block it saves
  args = parse_args(argv)
  t_start = time.perf_counter()
  why = init_distributed(args)

  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  import jaxprune
  from jaxprune.cli import enable_compile_cache
  from jaxprune import placement, sharding
  from jaxprune.errors import UsageError
  from jaxprune.cli.prune_cmd import checkpoint_dir, prepare_checkpoint
  from jaxprune.io.atomic import atomic_dir, check_target
  from jaxprune.io.export import hf_problems, save_hf
  from jaxprune.io.lazy import is_lazy
  from jaxprune.prune import prune

  if args.compile_cache:
    enable_compile_cache(args.compile_cache)
  pid, nproc = jax.process_index(), jax.process_count()
  # Every finished block goes to the checkpoint (with several processes, each writes its own
  # shards there); without one, several processes write them to one shared directory (none
  # gathers them).
  # --gather-blocks is for clusters without shared storage, where several processes cannot share a checkpoint.
  if nproc > 1 and args.gather_blocks and args.resume:
    raise UsageError("--resume continues from a checkpoint, which several processes write to storage every host "
                     "sees; --gather-blocks runs without one: drop --gather-blocks")
  ckpt = None
  if args.checkpoint and not (nproc > 1 and args.gather_blocks):
    ckpt = os.path.abspath(os.path.expanduser(args.checkpoint_dir)) if args.checkpoint_dir else checkpoint_dir(args.out)
  blocks_dir = None
  if nproc > 1 and ckpt is None and not args.gather_blocks:
    blocks_dir = os.path.abspath(os.path.expanduser(args.blocks_dir or args.out.rstrip("/") + ".blocks"))
  refused = None
  if pid == 0:  # fail before any work
    try:
      check_target(args.out, args.force)
      if ckpt is not None or args.resume:  # --resume without a checkpoint, a checkpoint without --resume or --force
        prepare_checkpoint(args, ckpt)
      if blocks_dir is not None and os.path.lexists(check_target(blocks_dir, args.force)):
        shutil.rmtree(blocks_dir)  # a killed run's (with --force)
    except UsageError as e:
      refused = e
  if nproc > 1 and multihost_utils.broadcast_one_to_all(np.int32(refused is not None)) and refused is None:
    log.error("process 0 refused the output paths (see its log); stopping")
    return 2
  if refused is not None:
    raise refused
  for shared, what in ((blocks_dir, "--blocks-dir"), (ckpt if nproc > 1 else None, "the checkpoint directory")):
    if shared is not None:
      _check_shared(shared, what, pid, multihost_utils)
  log.info("process %d of %d (%s); %d devices in all, %d local (%s)", pid, nproc, why or "single process",
           jax.device_count(), jax.local_device_count(), jax.default_backend())

  n_dev = jax.device_count()
  data = args.mesh_data if args.mesh_data is not None else n_dev // args.mesh_model
  mesh = sharding.make_mesh(data, args.mesh_model)
  if data * args.mesh_model < n_dev:
    log.warning("the %dx%d mesh uses %d of %d devices", data, args.mesh_model, data * args.mesh_model, n_dev)

  t0 = time.perf_counter()
  # jaxprune.load places the tree on the default device; on an accelerator that would put the whole model on
  # one chip before sharding it. Load into host memory (the CPU backend) instead.
  # Safetensors, GGUF and Orbax checkpoints stream: their blocks stay on disk until the run
  # reaches them, so a host holds a block at a time, not the model (jaxprune.io.lazy).
  with jax.default_device(_host_device()):
    model = jaxprune.load(args.model, dtype=args.dtype or "float32", lazy=True)
  # Every process: the windows of a BOS-adding tokenizer start with BOS, random ones too.
  tokenizer = jaxprune.load_tokenizer(args.model)
  config = build_config(args, data).check(model.spec)
  calib = calibration(args, model, tokenizer)
  # Host arrays -> the mesh: each process puts its own devices' shards from its (identical)
  # copy; a streamed model's blocks are placed by the pipeline as it reaches them.
  streamed = is_lazy(model.params)
  top = {k: v for k, v in model.params.items() if not (streamed and k == "layers")}
  params = {**sharding.shard_params(jax.device_get(top), mesh), **({"layers": model.params["layers"]} if streamed
                                                                   else {})}
  model = jaxprune.Model(model.spec, params, model.source)
  load_s = time.perf_counter() - t0
  shard_info = sharding_summary(model.spec, mesh)
  log.info("loaded in %.1fs; %d of %d parameter leaves split over `model`; %.1f%% of the values on each device",
           load_s, shard_info["leaves_split_over_model"], shard_info["leaves"],
           100 * shard_info["values_on_one_device"] / shard_info["values"])

  def progress(event):
    if pid == 0 and event.get("event") == "module":
      log.info("layer %d %s: %d -> %d units, error %.4f (%.1fs)", event["layer"], event["module"],
               event["units_before"], event["units_after"], event.get("error_after", float("nan")),
               event["seconds"])
    # A block event comes once the block is in the checkpoint. Every process asks at every block,
    # so that after a preemption notice (SIGTERM to any of them) all stop after the same block.
    if event.get("event") == "block" and nproc > 1 and multihost_utils.reached_preemption_sync_point(event["layer"]):
      raise Preempted(event["layer"])

  t0 = time.perf_counter()
  try:
    result = prune(model, calib, config, mesh=mesh, progress=progress, blocks_dir=blocks_dir, checkpoint=ckpt,
                   solves=args.solves)
  except Preempted as e:
    log.warning("process %d: preempted; every process stopped after block %d%s", pid, e.block,
                f", which is in {ckpt}: run the same command with --resume to continue" if ckpt else
                " (no checkpoint: --no-checkpoint was given)")
    return PREEMPTED
  prune_s = time.perf_counter() - t0
  if "block_values_written" in result.report:
    log.info("process %d wrote %d values of the pruned blocks (its own shards) to %s", pid,
             result.report["block_values_written"], ckpt or blocks_dir)

  # Every process takes part in the gathers. A streamed run's pruned blocks are already in
  # files (in --blocks-dir, or each process's own, gathered as they finished); process 0's
  # save_hf reads them one at a time.
  out = result.model.params
  host_params = jax.tree.map(placement.to_host, {k: v for k, v in out.items() if not (streamed and k == "layers")})
  if streamed:
    host_params["layers"] = out["layers"]
  if pid == 0:
    pruned = jaxprune.Model(result.model.spec, host_params, result.model.source)
    report = {**result.report, "model": args.model,
              "mesh": {"data": data, "model": args.mesh_model, "processes": nproc, "devices": n_dev,
                       "backend": jax.default_backend(), "distributed": why},
              "parameter_sharding": shard_info, "streamed": streamed}
    if streamed:  # what this process read of the dense blocks: its devices' slices only
      report["block_reads"] = int(model.params["layers"].reads)
      report["block_values_read"] = int(model.params["layers"].values_read)
    report["seconds"] = {**report["seconds"], "load": load_s, "prune": prune_s,
                         "wall": time.perf_counter() - t_start}
    with atomic_dir(args.out, force=args.force) as tmp:
      save_hf(pruned, tmp, tokenizer=tokenizer, force=True,
              jax_only=bool(hf_problems(pruned.spec)))
      with open(os.path.join(tmp, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    for written in (blocks_dir, ckpt):  # the run's own: its blocks are in --out now
      if written is not None and os.path.isdir(written):
        shutil.rmtree(written)
    p = report["params"]
    log.info("parameters %.2fM -> %.2fM (%.1f%% of the pruned blocks); pruning %.1fs; wrote %s", p["before"] / 1e6,
             p["after"] / 1e6, 100 * p["ratio_of_pruned_blocks"], prune_s, args.out)
  if nproc > 1:
    multihost_utils.sync_global_devices("prune_distributed: saved")  # nobody exits while process 0 writes
  return 0


def _main() -> int:
  from jaxprune.errors import JaxpruneError
  try:
    return main()
  except JaxpruneError as e:  # bad input: one line, as the CLI prints it
    print(f"prune_distributed: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(_main())
