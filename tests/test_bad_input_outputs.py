"""Bad outputs and a dying process: `--force` replaces only what jaxprune wrote, never an
input or a place that holds the user's work; an unusable --out is found before any work;
a full disk, SIGTERM or a kill leave nothing behind (issue 27, items 2, 7, 8 and 9).

Every case runs the real command line on a tiny model and asserts, through
tests/badinput.py, the exit code, one error line, no traceback, and that every file that
existed is intact.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from jaxprune.io import export as export_mod
from jaxprune.io.atomic import write_file
from jaxprune.io.target import MARKER, OutputError, host_tag, write_marker
from tests import tiny
from tests.badinput import REPO, Result, assert_intact, assert_one_line_error, run_cli, snapshot

resolve_mod = importlib.import_module("jaxprune.io.resolve")  # `jaxprune.io.resolve` is also a function's name


@pytest.fixture
def model(tiny_dir, tmp_path) -> str:
  """A private copy of a tiny HF model (cases mark it or put it inside other directories)."""
  return shutil.copytree(tiny_dir("llama_gqa"), str(tmp_path / "model"))


@pytest.fixture
def no_work(monkeypatch):
  """Loading a model or deleting or moving anything fails the test: refusals come before all of it."""

  def reached(*a, **k):
    raise AssertionError(f"reached work that a refused output must prevent: {a}")

  import jaxprune

  for owner, name in ((jaxprune, "load"), (resolve_mod, "load"), (shutil, "rmtree"), (os, "rename"),
                      (os, "replace")):
    monkeypatch.setattr(owner, name, reached)


def _marked(path) -> str:
  """`path` as a directory that looks like a jaxprune output, so only the rule under test refuses it."""
  os.makedirs(path, exist_ok=True)
  write_marker(str(path))
  with open(os.path.join(path, "notes.txt"), "w") as f:
    f.write("the user's notes\n")
  return str(path)


def _debris(parent, name: str) -> list[str]:
  return [f for f in os.listdir(parent) if f.startswith(f".{name}.")]


def _refused(*args, needles, roots, cwd=None) -> str:
  """Runs a command that must be refused with one line holding `needles`; everything under `roots` is kept."""
  before = snapshot(*roots)
  line = assert_one_line_error(run_cli(*args, cwd=cwd), *needles)
  assert_intact(before)
  return line


# ---------------------------------------------------------------------------
# --force and the places it never replaces (item 2).


def test_force_never_replaces_the_current_directory(model, tmp_path, no_work):
  work = _marked(tmp_path / "work")
  _refused("export", model, "--out", ".", "--force", needles=("the current directory", work),
           roots=(work, model), cwd=work)


def test_force_never_replaces_an_ancestor_of_the_current_directory(model, tmp_path, no_work):
  outer = _marked(tmp_path / "outer")
  inner = os.path.join(outer, "deep", "cwd")
  os.makedirs(inner)
  _refused("export", model, "--out", outer, "--force", needles=("an ancestor of the current directory", outer),
           roots=(outer, model), cwd=inner)


def test_empty_out_is_refused(model, tmp_path, no_work):
  for extra in ((), ("--force",)):
    _refused("export", model, "--out", "", *extra, needles=("output path is empty", "--out"),
             roots=(str(tmp_path),), cwd=str(tmp_path))


def test_force_never_replaces_the_root(model, no_work):
  # no_work makes any deletion or rename fail the test, so this cannot harm the machine.
  assert_one_line_error(run_cli("export", model, "--out", "/", "--force"), "the filesystem root")


def test_force_never_replaces_a_mount_point(model, no_work):
  mounts = [m for m in ("/proc", "/sys", "/dev") if os.path.ismount(m)]
  if not mounts:
    pytest.skip("no mount point besides / to try on this machine")
  assert_one_line_error(run_cli("export", model, "--out", mounts[0], "--force"), "a mount point", mounts[0])


def test_force_never_replaces_the_home_directory(model, tmp_path, monkeypatch, no_work):
  home = _marked(tmp_path / "home")
  monkeypatch.setenv("HOME", home)
  for out in ("~", home, home + "/"):
    _refused("export", model, "--out", out, "--force", needles=("your home directory", home), roots=(home, model))


def test_force_never_replaces_the_input_model(model, no_work):
  write_marker(model)  # even a model jaxprune exported is an input here
  _refused("export", model, "--out", model, "--force", needles=("an input of this run", model), roots=(model,))
  _refused("prune", model, "--sparsity", "0.2", "--calib", "random", "--out", model, "--force",
           needles=("an input of this run", model), roots=(model,))


def test_force_never_replaces_a_directory_that_holds_the_input(tiny_dir, tmp_path, no_work):
  parent = _marked(tmp_path / "models")
  model = shutil.copytree(tiny_dir("llama_gqa"), os.path.join(parent, "tiny"))
  _refused("export", model, "--out", parent, "--force", needles=("holds an input", parent), roots=(parent,))


def test_force_never_replaces_a_text_input(model, tmp_path, no_work):
  text = tmp_path / "calib.txt"
  text.write_text("some words to calibrate on\n" * 50)
  _refused("prune", model, "--sparsity", "0.2", "--calib", str(text), "--out", str(text), "--force",
           needles=("an input of this run", str(text)), roots=(str(text), model))


def test_file_outputs_never_replace_an_input(model, no_work):
  config = os.path.join(model, "config.json")
  _refused("plan", model, "--json", config, needles=("part of an input of this run", config), roots=(model,))
  _refused("eval", model, "--tasks", "hellaswag", "--output", config, "--force",
           needles=("part of an input of this run", config), roots=(model,))
  _refused("eval", model, "--tasks", "hellaswag", "--output", model, "--force",
           needles=("an input of this run", model), roots=(model,))


def test_a_symlink_to_the_input_is_the_input(model, tmp_path, no_work):
  write_marker(model)
  link = tmp_path / "link"
  link.symlink_to(model, target_is_directory=True)
  _refused("export", model, "--out", str(link), "--force", needles=("an input of this run", str(link)),
           roots=(model,))
  assert os.path.islink(link) and os.path.realpath(link) == os.path.realpath(model)


def test_force_refuses_a_directory_jaxprune_did_not_write(model, tmp_path, no_work):
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "thesis.tex").write_text("years of work\n")
  _refused("export", model, "--out", str(mine), "--force", needles=("was not written by jaxprune", str(mine), MARKER),
           roots=(str(mine),))
  # A marker that is not jaxprune's JSON does not count either.
  (mine / MARKER).write_text("not json")
  _refused("export", model, "--out", str(mine), "--force", needles=("was not written by jaxprune",),
           roots=(str(mine),))


def test_force_replaces_what_jaxprune_wrote(model, tmp_path):
  """The positive control of the refusals: a marked output is replaced, and carries the marker."""
  out = str(tmp_path / "o")
  for extra in ((), ("--force",)):
    r = run_cli("export", model, "--out", out, *extra)
    assert r.rc == 0, r.stderr
    with open(os.path.join(out, MARKER)) as f:
      info = json.load(f)
    assert info["tool"] == "jaxprune" and info["pid"] == os.getpid() and "command" in info
  assert not _debris(tmp_path, "o")


def test_force_replaces_a_prune_output_written_before_the_marker(model, tmp_path):
  """A run directory of an older jaxprune (report.json with config, modules and params, beside
  progress.jsonl) is jaxprune's: `scripts/main.sh` replaces its own runs/smollm2-20. A directory
  with only one of the two, or a report.json of another shape, is not."""
  old = tmp_path / "old"
  old.mkdir()
  (old / "report.json").write_text(json.dumps({"config": {}, "modules": [], "params": {}}))
  _refused("export", model, "--out", str(old), "--force", needles=("was not written by jaxprune",), roots=(str(old),))
  (old / "progress.jsonl").write_text("{}\n")
  r = run_cli("export", model, "--out", str(old), "--force")
  assert r.rc == 0, r.stderr
  assert os.path.isfile(old / MARKER) and not os.path.exists(old / "progress.jsonl")


# ---------------------------------------------------------------------------
# The output location is checked before any work (item 7).


def test_out_under_a_file_is_refused_before_any_work(model, tmp_path, no_work):
  notes = tmp_path / "notes.txt"
  notes.write_text("keep me\n")
  _refused("export", model, "--out", str(notes / "sub" / "out"), needles=("is a file, not a directory", str(notes)),
           roots=(str(tmp_path),))


def test_unwritable_out_is_refused_before_any_work(model, tmp_path, monkeypatch, no_work):
  # Tests run as root, whom permission bits do not stop: the creation that fails is simulated.
  parent = str(tmp_path / "ro")
  os.mkdir(parent)
  mkstemp = tempfile.mkstemp

  def denied(*a, dir=None, **k):
    if dir == parent:
      raise PermissionError(errno.EACCES, "Permission denied", os.path.join(parent, ".x"))
    return mkstemp(*a, dir=dir, **k)

  monkeypatch.setattr(tempfile, "mkstemp", denied)
  out = os.path.join(parent, "new", "out")  # the missing "new" would be created: its parent is probed
  _refused("export", model, "--out", out, needles=("cannot write", out, "Permission denied", "--out"),
           roots=(str(tmp_path),))
  assert os.listdir(parent) == []


def test_too_little_free_space_is_refused_before_any_work(model, tmp_path, monkeypatch, no_work):
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
  out = str(tmp_path / "o")
  line = _refused("export", model, "--out", out, needles=("not enough free space", out, "0.0 MB free"),
                  roots=(str(tmp_path),))
  need = sum(os.path.getsize(os.path.join(model, f)) for f in os.listdir(model)) / 1e6
  assert f"about {need:.1f} MB" in line


# ---------------------------------------------------------------------------
# Write errors (item 9: ENOSPC) leave nothing partial, and keep the old output.


def test_disk_full_while_writing_keeps_the_old_output(model, tmp_path, monkeypatch):
  out = str(tmp_path / "o")
  assert run_cli("export", model, "--out", out).rc == 0
  before = snapshot(str(tmp_path))

  def full(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(export_mod, "write_safetensors", full)
  assert_one_line_error(run_cli("export", model, "--out", out, "--force"), out, "No space left on device", "ENOSPC",
                        "nothing was written", "free some space")
  assert_intact(before)
  assert not _debris(tmp_path, "o") and sorted(os.listdir(tmp_path)) == ["model", "o"]


def test_disk_full_in_a_file_write_leaves_the_old_file(tmp_path):
  path = str(tmp_path / "r.json")
  write_file(path, lambda f: f.write("old\n"))

  def full(f):
    f.write("partial")
    raise OSError(errno.EDQUOT, "Disk quota exceeded")

  with pytest.raises(OutputError, match=r"cannot write .*r\.json: Disk quota exceeded \(EDQUOT\)") as e:
    write_file(path, full, force=True)
  assert "\n" not in str(e.value) and os.listdir(tmp_path) == ["r.json"]
  assert open(path).read() == "old\n"


def test_file_error_outside_jaxprune_is_one_line_and_bugs_keep_their_traceback(model, tmp_path, monkeypatch):
  shard = os.path.join(model, "model.safetensors")

  def unreadable(*a, **k):
    raise PermissionError(errno.EACCES, "Permission denied", shard)

  monkeypatch.setattr(resolve_mod, "load", unreadable)
  out = str(tmp_path / "o")
  assert_one_line_error(run_cli("export", model, "--out", out), shard, "Permission denied", "EACCES")
  assert not os.path.exists(out)

  def bug(*a, **k):
    raise OSError("an OSError without an errno is a bug")

  monkeypatch.setattr(resolve_mod, "load", bug)
  with pytest.raises(OSError, match="without an errno"):
    run_cli("export", model, "--out", out)


def test_debug_prints_the_traceback_instead_of_the_line(model, tmp_path):
  r = run_cli("--debug", "export", model, "--out", "")
  assert r.rc == 2 and "Traceback" in r.stderr and "UsageError: the output path is empty" in r.stderr
  assert not r.error_lines  # the traceback replaces the one line


# ---------------------------------------------------------------------------
# SIGTERM and the temporaries of killed runs (item 8).

# Runs the CLI with the shard writer paused after it wrote: the temporary output exists
# then. The flag file tells the test when to send the signal.
_PAUSED = """
import sys, time
from jaxprune.io import export
write = export.write_safetensors

def paused(*a, **k):
  files = write(*a, **k)
  open(sys.argv[1], "w").close()
  time.sleep(600)
  return files

export.write_safetensors = paused
from jaxprune.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("command", [("export",), ("prune", "--sparsity", "0.3", "--calib", "random", "--calib-samples",
                                                 "8", "--seq-len", "16", "--no-progress")])
def test_sigterm_removes_the_temporaries(model, tmp_path, command):
  out, flag = str(tmp_path / "o"), str(tmp_path / "flag")
  tiny.add_word_tokenizer(model)  # prune needs one
  before = snapshot(str(tmp_path))
  env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu"}
  argv = [command[0], model, *command[1:], "--out", out]
  p = subprocess.Popen([sys.executable, "-c", _PAUSED, flag, "--no-compile-cache", *argv],
                       cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       stdin=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + 300  # a hang guard, not a timing
    while not os.path.exists(flag) and p.poll() is None and time.monotonic() < deadline:
      time.sleep(0.1)
    assert os.path.exists(flag), f"the command never reached its write:\n{p.poll() is not None and p.stderr.read()}"
    assert _debris(tmp_path, "o"), "the temporary output should exist while the writer is paused"
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
  finally:
    if p.poll() is None:
      p.kill()
      p.wait()
  assert_one_line_error(Result(p.returncode, stdout, stderr), "terminated by SIGTERM", "temporary files were removed",
                        rc=143)
  assert not os.path.exists(out) and not _debris(tmp_path, "o")
  assert os.path.isdir(out + ".checkpoint") == (command[0] == "prune")  # kept for --resume, as the line says
  assert_intact(before)


def _dead_pid() -> int:
  """The pid of a process that has exited and been reaped."""
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def test_stale_temporaries_of_dead_runs_are_removed_and_nothing_else(model, tmp_path):
  dead, live, host = _dead_pid(), os.getpid(), host_tag()

  def make(name: str, marked: bool = True, file: bool = False) -> str:
    path = str(tmp_path / name)
    if file:
      with open(path, "w") as f:
        f.write("x" * 1000)
    else:
      os.mkdir(path)
      with open(os.path.join(path, "model.safetensors"), "w") as f:
        f.write("x" * 1000)
      if marked:
        write_marker(path)
    return path

  stale = [make(f".o.tmp-{dead}-{host}-a1"), make(f".o.old-{dead}-{host}-b2"),
           make(f".o.tmp-{dead}-{host}-c3", file=True), make(f".o.tmp-{dead}-{host}-e5", marked=False, file=False)]
  os.remove(os.path.join(stale[-1], "model.safetensors"))  # an empty directory: nothing to lose
  kept = [make(f".o.tmp-{live}-{host}-d4"),  # a live process (this one) may still be writing it
          make(f".o.tmp-{dead}-{host}-f6", marked=False),  # no marker: not provably jaxprune's
          make(f".o.tmp-{dead}-{'0' * 8 if host != '0' * 8 else '1' * 8}-g7"),  # another host's pid
          make(".o.tmp-legacy_name"),  # no pid in the name
          make(f".other.tmp-{dead}-{host}-h8")]  # another target's
  before = snapshot(*kept)
  r = run_cli("export", model, "--out", str(tmp_path / "o"))
  assert r.rc == 0, r.stderr
  assert not [p for p in stale if os.path.lexists(p)]
  assert all(os.path.lexists(p) for p in kept)
  assert_intact(before)
