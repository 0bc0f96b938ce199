"""Where an output may go, decided before any work.

An output never replaces what jaxprune did not write (every directory it publishes
carries a marker file), never an input of the run, and never a place that holds the
user's work whatever it contains: the filesystem root, the home directory, the
current directory or one of its ancestors, a mount point. Paths are compared after
resolving symlinks, so a link to an input is the input. `check_output` also makes
sure the location can be written and has room, so a run is not lost at its end.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
from typing import Iterable

from jaxprune.errors import JaxpruneError, UsageError

MARKER = ".jaxprune-output"


class OutputError(JaxpruneError, OSError):
  """The output could not be written (disk full, read-only, no permission); nothing was published."""


def host_tag() -> str:
  """8 hex digits naming this machine, so a pid is only judged on the host that owns it."""
  return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def write_marker(directory: str) -> None:
  """Marks `directory` as jaxprune's: the pid and host say which run made it (stale temporaries)."""
  from jaxprune.version import __version__

  info = {"tool": "jaxprune", "version": __version__, "command": sys.argv, "pid": os.getpid(), "host": host_tag(),
          "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  with open(os.path.join(directory, MARKER), "w") as f:
    json.dump(info, f, indent=1)
    f.write("\n")


def read_marker(directory: str) -> dict | None:
  """The marker of a directory jaxprune wrote, or None."""
  path = os.path.join(directory, MARKER)
  try:
    with open(path) as f:
      info = json.load(f)
  except (OSError, ValueError):
    return None
  return info if isinstance(info, dict) and info.get("tool") == "jaxprune" else None


def _legacy_output(directory: str) -> bool:
  """A `jaxprune prune` output written before outputs carried the marker: its report.json names
  the run's config and modules, beside progress.jsonl. Without this, `scripts/main.sh --force`
  would refuse the run directory an older checkout wrote."""
  try:
    with open(os.path.join(directory, "report.json")) as f:
      report = json.load(f)
  except (OSError, ValueError):
    return False
  return (isinstance(report, dict) and {"config", "modules", "params"} <= set(report)
          and os.path.isfile(os.path.join(directory, "progress.jsonl")))


def _real(path: str) -> str:
  return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def _within(path: str, root: str) -> bool:
  """`path` is `root` or lies inside it (both real paths)."""
  return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _protected(real: str, inputs: Iterable[str]) -> str | None:
  """Why the real path `real` must never be written over, or None."""
  if real == os.sep:
    return "the filesystem root"
  if real == _real("~"):
    return "your home directory"
  cwd = os.path.realpath(os.getcwd())
  if _within(cwd, real):
    return "the current directory" if real == cwd else "an ancestor of the current directory"
  for p in inputs:
    if p and os.path.lexists(p) and _within(_real(p), real):
      return f"an input of this run ({p})" if _real(p) == real else f"a directory that holds an input ({p})"
  if os.path.ismount(real):
    return "a mount point"
  return None


def _check_replaceable(path: str, kind: str, inputs: Iterable[str]) -> None:
  inside = [p for p in inputs if p and os.path.isdir(p) and _within(_real(path), _real(p))]
  if inside and (kind == "file" or read_marker(path) is None):
    raise UsageError(f"refusing to replace {path}: it is part of an input of this run ({inside[0]}); choose a new "
                     "path for the output")
  if kind == "file":
    if os.path.isdir(path) and not os.path.islink(path):
      raise UsageError(f"{path} is a directory, not a file jaxprune wrote; remove it yourself or choose another "
                       "output path")
  elif read_marker(path) is None and not _legacy_output(path):
    raise UsageError(f"{path} was not written by jaxprune (it has no {MARKER} file), so --force does not replace "
                     "it; remove it yourself or choose another --out")


def check_target(out: str, force: bool, inputs: Iterable[str] = (), kind: str = "dir") -> str:
  """`out` as an absolute path, after refusing every target that must not be written over.

  Args:
    out: the output path.
    force: replace an existing `out`, if jaxprune wrote it (a directory with the marker,
      or a file where `kind` is "file").
    inputs: the run's input paths (model, text files, configs); `out` may be none of
      them, hold none of them, and replace nothing inside them but a jaxprune output.
    kind: "dir" or "file", what will be written at `out`.

  Raises:
    UsageError: the target is refused; nothing was changed.
  """
  if not out or not out.strip():
    raise UsageError(f"the output path is empty ({out!r}); pass the path of a new directory, e.g. --out pruned")
  path = os.path.abspath(os.path.expanduser(out))
  why = _protected(_real(out), inputs)
  if why:
    raise UsageError(f"refusing to write to {path}: it is {why}, which jaxprune never replaces (with or without "
                     "--force); choose a new path for --out")
  if os.path.lexists(path):
    if not force:
      raise UsageError(f"{path} already exists; pass --force (force=True) to replace it, or choose another "
                       "output path")
    _check_replaceable(path, kind, inputs)
  return path


def _existing_ancestor(path: str) -> str:
  while not os.path.lexists(path):
    path = os.path.dirname(path)
  return path


def _probe(directory: str, path: str) -> None:
  """Creates and removes a file in `directory`: the only test of writability that root cannot pass by fiat."""
  try:
    fd, probe = tempfile.mkstemp(prefix=".jaxprune-probe-", dir=directory)
  except OSError as e:
    raise UsageError(f"cannot write {path}: creating a file in {directory} failed ({e.strerror}); fix its "
                     "permissions or choose another --out") from None
  os.close(fd)
  os.remove(probe)


def size_on_disk(*paths: str) -> int:
  """Bytes of the regular files at or under `paths` (missing paths count 0)."""
  total = 0
  for p in paths:
    if os.path.isfile(p):
      total += os.path.getsize(p)
    elif os.path.isdir(p):
      total += sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(p) for f in fs
                   if os.path.isfile(os.path.join(d, f)))
  return total


def check_output(out: str, force: bool, inputs: Iterable[str] = (), need_bytes: int = 0, kind: str = "dir") -> str:
  """`check_target`, then that `out` can be created there and `need_bytes` fit: before any work.

  Creates nothing (the probe file is removed again).

  Raises:
    UsageError: the target is refused, cannot be written, or lacks room.
  """
  path = check_target(out, force, inputs, kind)
  parent = _existing_ancestor(os.path.dirname(path))
  if not os.path.isdir(parent):
    raise UsageError(f"cannot create {path}: {parent} is a file, not a directory; choose another --out")
  _probe(parent, path)
  free = shutil.disk_usage(parent).free
  if need_bytes > free:
    raise UsageError(f"not enough free space for {path}: it needs about {need_bytes / 1e6:.1f} MB (the size of the "
                     f"input) and {parent} has {free / 1e6:.1f} MB free; free some space or choose another --out")
  return path


def local_path(model: str) -> str:
  """The file or directory a model argument names on this machine ("" for a Hub id or a missing built-in)."""
  from jaxprune.io.locate import BUILTIN, resolve

  if model in BUILTIN:
    try:
      return resolve(model).path
    except JaxpruneError:
      return ""  # `load` says what to install, in its own words
  return os.path.expanduser(model)
