"""tpu_scripts/prune_distributed.py on host CPU devices: a 4x2 (data x model) mesh in one
process, and the same mesh over two processes joined by jax.distributed (gloo collectives).

Each run's saved model must load with `jaxprune.load`, keep the same units as the same
pruning run on a one-device mesh, and give its logits up to float32 rounding: the
statistics are sums, so only the summation order differs. How far a reordering of those
sums moves the pruned model's logits is measured, not fitted: the one-device run is
repeated with the calibration windows permuted (the same sums in other orders, K draws of
the rounding), and the mesh runs must stay within tests/numerics.py's multiple of the
largest spread (point 2 on reorderings, plus its floor).
"""

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import jaxprune
from jaxprune import sharding
from jaxprune.errors import UsageError
from jaxprune.prune import prune
from tests import kill_hook, tiny, watch_hook
from tests.test_resume import _tensors
from tests.numerics import assert_within, reordering_bound

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SCRIPT = os.path.join(ROOT, "tpu_scripts", "prune_distributed.py")
# The paper's metric with reconstruction on top of the recommended preset (what the script ran
# before it took every PruneConfig option): the test checks the mesh, not the recipe.
REORDERINGS = 4  # permuted one-device runs: K of tests/numerics.py's multiple
ARGS = ["--calib-samples", "16", "--seq-len", "16", "--sparsity", "0.3", "--batch-size", "8", "--method", "goa",
        "--reconstruct", "--no-intercept", "--damping", "1e-3"]


def _script():
  spec = importlib.util.spec_from_file_location("prune_distributed", SCRIPT)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _reference(root, model_dir, text):
  """(root, model_dir, text, the one-device prune, tokens, their logits, the reordering bound)."""
  mod = _script()
  args = mod.parse_args([model_dir, "--out", str(root / "unused"), "--calib", text, *ARGS])
  model = jaxprune.load(model_dir)
  calib = mod.calibration(args, model, jaxprune.load_tokenizer(model_dir))
  ref = prune(model, calib, mod.build_config(args, data=1), mesh=sharding.make_mesh(1, 1))
  tokens = calib[:4]
  ref_logits = np.asarray(jaxprune.logits(ref.model.spec, ref.model.params, tokens))
  spreads = []
  for k in range(REORDERINGS):
    perm = np.random.default_rng(k).permutation(len(calib))
    again = prune(model, calib[perm], mod.build_config(args, data=1), mesh=sharding.make_mesh(1, 1))
    assert [m["kept"] for m in again.report["modules"]] == [m["kept"] for m in ref.report["modules"]]
    spreads.append(np.asarray(jaxprune.logits(again.model.spec, again.model.params, tokens)) - ref_logits)
  bound = reordering_bound(ref_logits, spreads)
  return root, model_dir, text, ref, tokens, ref_logits, bound


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A tiny GQA model with a word tokenizer, a text to calibrate on, and the one-device reference."""
  root = tmp_path_factory.mktemp("tpu_scripts")
  model_dir = tiny.add_word_tokenizer(tiny.save("llama_gqa", str(root / "model")))
  return _reference(root, model_dir, tiny.write_words(str(root / "words.txt"), 4000))


@pytest.fixture(scope="module")
def gemma_setup(tmp_path_factory):
  """A tiny Gemma 3 (one KV head: query heads go inside the group; sliding windows, soft-caps)
  whose tokenizer adds BOS, so every calibration window is [BOS] + window."""
  from tests.test_windows_bos import WORDS, save_tokenizer

  root = tmp_path_factory.mktemp("tpu_scripts_gemma")
  model_dir = save_tokenizer(tiny.save("gemma3", str(root / "model")), "template")
  text = root / "words.txt"
  text.write_text(" ".join(np.random.default_rng(0).choice(WORDS, size=4000)))
  out = _reference(root, model_dir, str(text))
  assert (out[4][:, 0] == 0).all()  # the windows start with the tokenizer's BOS
  return out


def _env(devices: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
    env.pop(var, None)  # the single-process run must not detect a cluster
  return env


def _check_output(out, setup, processes: int, data: int = 4, model: int = 2):
  _, _, _, ref, tokens, ref_logits, bound = setup
  pruned = jaxprune.load(str(out))
  assert pruned.spec == ref.model.spec
  got = np.asarray(jaxprune.logits(pruned.spec, pruned.params, tokens))
  assert_within(got, ref_logits, bound, f"mesh run, {processes} process(es)")
  with open(out / "report.json") as f:
    report = json.load(f)
  assert report["mesh"]["data"] == data and report["mesh"]["model"] == model
  assert report["mesh"]["processes"] == processes and report["devices"]["data"] == data
  # The parameters really were split over `model` (heads, KV heads, MLP channels, vocabulary).
  assert report["parameter_sharding"]["leaves_split_over_model"] > 0
  assert report["parameter_sharding"]["values_on_one_device"] < report["parameter_sharding"]["values"]
  assert [m["kept"] for m in report["modules"]] == [m["kept"] for m in ref.report["modules"]]
  assert report["streamed"]  # each process read the safetensors checkpoint a block at a time
  return report


# Gemma 3 runs the script once, in the two-process case below; its in-process mesh run is
# tests/test_mesh.py's (CI's budget: a Gemma run costs about twice a LLaMA one).
def test_single_process_4x2_mesh_matches_one_device(setup):
  root, model_dir, text, *_ = setup
  out = root / "mesh4x2"
  cache = root / "xla"
  proc = subprocess.run([sys.executable, SCRIPT, model_dir, "--out", str(out), "--calib", text, *ARGS,
                         "--mesh-data", "4", "--mesh-model", "2", "--compile-cache", str(cache)], env=_env(8), cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "process 0 of 1 (single process)" in proc.stderr
  _check_output(out, setup, processes=1)
  assert any(cache.iterdir())  # the run's kernels went to the persistent cache, for a restarted run


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


# The script as a child process whose `jaxprune.prune.prune` SIGKILLs it after the block that
# tests/kill_hook.py's variable names (the script imports `prune` when its main runs).
_KILLABLE = kill_hook.python_c("import runpy; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')",
                               ROOT)


def _two_processes(setup, local, data, model, out, extra=lambda i: [], args=ARGS, env=None, started=None):
  """Runs the script as 2 processes joined by --coordinator; returns them and their logs.
  `started(procs)`, when given, is called once both run (e.g. to signal one of them)."""
  import tempfile

  _, model_dir, text, *_ = setup
  port = _free_port()
  # Each log goes to a file: a pipe read only after the other process's would fill and stop its
  # writer, and with it, at the next collective, both processes.
  files = [tempfile.TemporaryFile("w+") for _ in range(2)]
  procs = [
      subprocess.Popen([sys.executable, "-c", _KILLABLE, SCRIPT, model_dir, "--out", str(out), "--calib", text, *args,
                        "--mesh-data", str(data), "--mesh-model", str(model), "--coordinator", f"localhost:{port}",
                        "--num-processes", "2", "--process-id", str(i), *extra(i)], env={**_env(local), **(env or {})},
                       cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, text=True) for i, f in enumerate(files)
  ]
  logs = []
  try:
    if started is not None:
      started(procs)
    for p, f in zip(procs, files):
      p.wait(timeout=900)
      f.seek(0)
      logs.append(f.read())
  finally:
    for p, f in zip(procs, files):
      if p.poll() is None:
        p.kill()
      f.close()
  return procs, logs


@pytest.mark.parametrize("which,local,data,model", [("setup", 4, 4, 2), ("setup", 2, 1, 4), ("gemma_setup", 2, 1, 4)],
                         ids=["model-axis-within", "model-axis-across", "gemma3-model-axis-across"])
def test_two_processes_share_a_mesh(which, local, data, model, request):
  """jax.distributed.initialize with --coordinator: 2 processes of CPU devices, gloo collectives.

  4x2 on 2 x 4 devices: each process holds whole `model` rows; the finished blocks are
  gathered to both (--gather-blocks). 1x4 on 2 x 2 devices: the `model` axis spans both
  processes, so each holds half of every split weight and of the Gram statistics' rows
  (gathered across them for the solves), and writes its own shards of the finished blocks;
  the tiny Gemma 3 runs that way too (its one KV head replicated, its query heads split).
  """
  setup = request.getfixturevalue(which)
  root, model_dir, *_ = setup
  out = root / f"mesh{data}x{model}_2proc"
  gather = model == 2
  # Without a checkpoint the blocks go to --blocks-dir (the checkpointed runs: test_two_processes_resume).
  procs, logs = _two_processes(setup, local, data, model, out,
                               lambda i: ["--gather-blocks"] if gather else ["--no-checkpoint"])
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {i}:\n{log[-4000:]}"
  assert "process 1 of 2" in logs[1] and f"{2 * local} devices in all, {local} local" in logs[1]
  report = _check_output(out, setup, processes=2, data=data, model=model)
  # Process 0 read the dense blocks slice by slice (memory-mapped safetensors): across the
  # processes it read only its half of every tensor split over `model`; within, all of it
  # (per block read: the adaptive plan and the layer loop each read every block once).
  blocks = jaxprune.load(model_dir).params["layers"]
  whole = report["block_reads"] * sum(np.size(x) for x in jax.tree.leaves(blocks)) // len(blocks)
  if model == 4:
    assert 0 < report["block_values_read"] < whole
  else:
    assert report["block_values_read"] == whole
  if gather:
    assert "block_values_written" not in report and not os.path.exists(f"{out}.blocks")
    return
  # Each process wrote only its own shards of the finished blocks to --blocks-dir (nothing was
  # gathered): together one copy of every value, and neither wrote all of them.
  wrote = [int(re.search(r"process %d wrote (\d+) values of the pruned blocks" % i, log).group(1))
           for i, log in enumerate(logs)]
  pruned_blocks = sum(np.size(x) for x in jax.tree.leaves(jaxprune.load(str(out)).params["layers"]))
  assert sum(wrote) == pruned_blocks and wrote[0] == report["block_values_written"]
  assert all(0 < w < pruned_blocks for w in wrote)
  assert not os.path.exists(f"{out}.blocks")  # removed once the output was written


def test_two_processes_keep_the_statistics_split(gemma_setup):
  """The default preset with `--solves split`, the `model` axis across two processes (1x4 on 2 x 2
  devices): in neither process does a device hold, or the host receive, a whole Gram matrix or
  cross moment of any module (tests/watch_hook.py: the tiny Gemma's X2 widths, 128 and 96,
  which no weight shares, where a LLaMA's attention Gram is as wide as its output weights), and
  the kept units are the one-device run's."""
  setup = gemma_setup
  root, model_dir, text, *_ = setup
  args = ["--calib-samples", "16", "--seq-len", "16", "--sparsity", "0.3", "--batch-size", "8"]
  mod = _script()
  parsed = mod.parse_args([model_dir, "--out", str(root / "unused"), "--calib", text, *args])
  model = jaxprune.load(model_dir)
  calib = mod.calibration(parsed, model, jaxprune.load_tokenizer(model_dir))
  ref = prune(model, calib, mod.build_config(parsed, data=1), mesh=sharding.make_mesh(1, 1))
  out, found = root / "split_2proc", root / "watch"
  procs, logs = _two_processes(setup, 2, 1, 4, out, lambda i: ["--no-checkpoint", "--solves", "split"], args=args,
                               env={watch_hook.ENV: f"{found}:96,97,128,129"})
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {i}:\n{log[-4000:]}"
  with open(out / "report.json") as f:
    report = json.load(f)
  assert report["devices"]["solves"] == "split"
  assert [m["kept"] for m in report["modules"]] == [m["kept"] for m in ref.report["modules"]]
  for i in range(2):
    with open(f"{found}.{i}") as f:
      watched = json.load(f)
    assert all(watched["calls"].get(k) for k in ("_sweep", "cut", "shrink", "with_cross", "_solve")), watched["calls"]
    assert not watched["seen"] and not watched["converted"], (i, watched["seen"][:5], watched["converted"][:5])


@pytest.mark.parametrize("what", ["--blocks-dir", "the checkpoint directory"])
def test_blocks_dir_that_a_process_does_not_see_is_refused(setup, what):
  """Each process given its own --blocks-dir (or --out, so its own OUT.checkpoint) stands for a
  local disk: refused before any work."""
  root, *_ = setup
  out = root / "unshared"
  if what == "--blocks-dir":
    extra = lambda i: ["--no-checkpoint", "--blocks-dir", str(root / f"blocks{i}")]
  else:
    extra = lambda i: ["--out", str(root / f"unshared{i}")]
  procs, logs = _two_processes(setup, 2, 1, 4, out, extra)
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 2, f"process {i}:\n{log[-4000:]}"
    assert f"{what} " in log and "is not shared: process(es) [1] do not see what process 0 wrote" in log, log[-2000:]
    assert "Traceback" not in log
  assert not any(root.glob("unshared*/config.json"))


def test_multi_process_detection():
  mod = _script()
  assert mod.multi_process_env({}) is None
  assert mod.multi_process_env({"SLURM_NTASKS": "1"}) is None
  assert mod.multi_process_env({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
  assert "SLURM_NTASKS" in mod.multi_process_env({"SLURM_NTASKS": "4"})
  assert "2 workers" in mod.multi_process_env({"TPU_WORKER_HOSTNAMES": "t1,t2"})
  with pytest.raises(SystemExit, match="go together"):
    mod.init_distributed(mod.parse_args(["m", "--out", "o", "--coordinator", "h:1"]))
  with pytest.raises(UsageError, match="--calib selfgen is not offered by prune_distributed.py; pass a text file"):
    mod.parse_args(["m", "--out", "o", "--calib", "selfgen"])


def test_script_takes_every_prune_config_option_and_the_presets(tmp_path):
  """prune_distributed.py has `jaxprune prune`'s options: one per PruneConfig field, --preset
  and --config, resolved the same way (preset < file < options)."""
  import dataclasses

  from jaxprune.prune import PruneConfig
  mod = _script()
  flags = {f.name: "--" + f.name.replace("_", "-") for f in dataclasses.fields(PruneConfig)}
  cfg_file = tmp_path / "c.yaml"
  cfg_file.write_text("sparsity: 0.4\nshrink: 0.5\n")
  args = mod.parse_args(["m", "--out", "o", "--preset", "paper", "--config", str(cfg_file), "--min-keep", "0.1",
                         "--allocation", "adaptive", "--no-reconstruct", "--mesh-data", "2"])
  c = mod.build_config(args, data=2)
  assert (c.sparsity, c.shrink, c.min_keep, c.allocation, c.reconstruct) == (0.4, 0.5, 0.1, "adaptive", False)
  assert c.method == PruneConfig.preset("paper").method and c.batch_size == 16
  for name, flag in flags.items():
    assert hasattr(args, name), f"{flag} missing from prune_distributed.py"
  assert mod.parse_args(["m", "--out", "o", "--no-compile-cache"]).compile_cache is None
  assert mod.parse_args(["m", "--out", "o", "--compile-cache", "d"]).compile_cache == "d"


@pytest.fixture(scope="module")
def six_blocks(tmp_path_factory):
  """A 6-block tiny GQA model, its text, and an uninterrupted two-process run of it (1x4 over
  2 x 2 devices: the `model` axis spans both processes), checkpointed as every run is."""
  root = tmp_path_factory.mktemp("resume_two_processes")
  model_dir = tiny.add_word_tokenizer(tiny.save("llama_gqa", str(root / "model"), layers=6))
  setup = (root, model_dir, tiny.write_words(str(root / "words.txt"), 4000))
  procs, logs = _two_processes(setup, 2, 1, 4, root / "whole")
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {i}:\n{log[-4000:]}"
  assert not (root / "whole.checkpoint").exists()  # removed once the output was written
  # Each process wrote only its own shards of the blocks to the checkpoint (nothing was gathered):
  # together one copy of every value, and neither all of them.
  wrote = [int(re.search(r"process %d wrote (\d+) values of the pruned blocks" % i, log).group(1))
           for i, log in enumerate(logs)]
  pruned_blocks = sum(np.size(x) for x in jax.tree.leaves(jaxprune.load(str(root / "whole")).params["layers"]))
  assert sum(wrote) == pruned_blocks and all(0 < w < pruned_blocks for w in wrote)
  return setup, _tensors(root / "whole")


def _resumed(setup, out, whole: dict[str, bytes], next_block: int) -> None:
  """The checkpoint a stopped run left (Orbax directories, each process's shards) resumes with
  --resume to the uninterrupted run's safetensors, byte for byte."""
  ckpt = out.parent / f"{out.name}.checkpoint"
  with open(ckpt / "state.json") as f:
    state = json.load(f)
  assert state["next_block"] == next_block and state["finished_blocks"] == list(range(next_block))
  assert (ckpt / f"block_{next_block - 1:04d}").is_dir() and (ckpt / state["streams"]).is_dir()
  assert state["streams"] == f"streams_{next_block:04d}" and not out.exists()
  procs, logs = _two_processes(setup, 2, 1, 4, out, lambda i: ["--resume"])
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {i}:\n{log[-4000:]}"
    assert f"at block {next_block}" in log and "resuming from" in log
  assert _tensors(out) == whole
  assert not ckpt.exists()


def test_two_processes_resume_after_sigkill(six_blocks):
  """Both processes SIGKILLed right after block 1 of 6 became durable (a third of the blocks)."""
  setup, whole = six_blocks
  out = setup[0] / "killed"
  procs, logs = _two_processes(setup, 2, 1, 4, out, env={kill_hook.ENV: "1"})
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == -9, f"process {i} ended with {p.returncode}:\n{log[-4000:]}"
  _resumed(setup, out, whole, next_block=2)


def test_two_processes_stop_together_on_a_preemption_notice(six_blocks):
  """SIGTERM to process 1 once block 0 is durable: JAX's preemption service tells both, and both
  stop after the same block (exit status 75), which the checkpoint holds."""
  import signal
  import time

  setup, whole = six_blocks
  out = setup[0] / "preempted"
  state = setup[0] / "preempted.checkpoint" / "state.json"

  def notice(procs):
    t0 = time.monotonic()
    while not state.exists() and time.monotonic() - t0 < 300 and all(p.poll() is None for p in procs):
      time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)

  procs, logs = _two_processes(setup, 2, 1, 4, out, started=notice)
  stopped = []
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 75, f"process {i} ended with {p.returncode}:\n{log[-4000:]}"
    stopped.append(int(re.search(r"preempted; every process stopped after block (\d+)", log).group(1)))
  # The sync point is the block after the latest any process had reached when the notice came
  # (the last block too, where a busy machine made the notice late: then only the output is left).
  assert stopped[0] == stopped[1] <= 5
  _resumed(setup, out, whole, next_block=stopped[0] + 1)



@pytest.mark.parametrize("case", ["left without --resume", "--resume without one", "--resume with --no-checkpoint"])
def test_checkpoint_options_are_checked_before_any_work(setup, tmp_path, case):
  """The script's checkpoint options are checked as `jaxprune prune` checks them: one line,
  exit status 2, and the checkpoint a killed run left is kept."""
  _, model_dir, text, *_ = setup
  out = tmp_path / "out"
  extra = {"left without --resume": [], "--resume without one": ["--resume"],
           "--resume with --no-checkpoint": ["--resume", "--no-checkpoint"]}[case]
  if case == "left without --resume":
    (tmp_path / "out.checkpoint").mkdir()
    (tmp_path / "out.checkpoint" / "state.json").write_text("{}")
  proc = subprocess.run([sys.executable, SCRIPT, model_dir, "--out", str(out), "--calib", text, *ARGS, *extra],
                        env=_env(1), cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  want = {"left without --resume": "left a checkpoint in", "--resume without one": "there is no checkpoint in",
          "--resume with --no-checkpoint": "there is no checkpoint in"}[case]
  assert want in proc.stderr.strip().splitlines()[-1]
  assert not out.exists()
  if case == "left without --resume":
    assert (tmp_path / "out.checkpoint" / "state.json").read_text() == "{}"
