"""Atomic writes: a directory or a file appears complete, or not at all.

Everything is written into a temporary sibling first (same filesystem, so the
final `rename` is atomic) and moved into place only when writing succeeded. An
existing output is never touched unless `force=True`; a failed write leaves
neither a partial output nor temporary debris behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import IO, Any, Callable, Iterator

from jaxprune.errors import UsageError


def check_target(out: str, force: bool) -> str:
  """`out` as an absolute path, after refusing to overwrite it without `force`."""
  out = os.path.abspath(os.path.expanduser(out))
  if os.path.lexists(out):
    if not force:
      raise UsageError(f"{out} already exists; pass --force (force=True) to replace it, or choose another output path")
  return out


def _fsync_tree(root: str) -> None:
  """Flushes every file under `root` to disk, so the rename publishes complete files."""
  for dirpath, _, files in os.walk(root):
    for name in files:
      fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.lexists(path):
    os.remove(path)


@contextlib.contextmanager
def atomic_dir(out: str, force: bool = False) -> Iterator[str]:
  """Yields a temporary directory that replaces `out` when the block succeeds.

  Example:
    with atomic_dir("pruned", force=False) as tmp:
      write_everything_into(tmp)
    # "pruned" now exists, complete; on an exception it was never created.

  Raises:
    UsageError: `out` exists and `force` is False (nothing is changed).
  """
  out = check_target(out, force)
  parent, name = os.path.split(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
  try:
    yield tmp
    _fsync_tree(tmp)
    if os.path.lexists(out):  # force: move the old output aside, swap, then delete it
      old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
      os.rmdir(old)
      os.rename(out, old)
      try:
        os.rename(tmp, out)
      except BaseException:
        os.rename(old, out)
        raise
      _remove(old)
    else:
      os.rename(tmp, out)
  finally:
    if os.path.lexists(tmp):
      _remove(tmp)


def write_file(path: str, write: Callable[[IO], None], force: bool = False, binary: bool = False) -> str:
  """Calls `write(f)` on a temporary sibling of `path`, then moves it into place with `os.replace`.

  The file gets the permissions an ordinary `open` would give (mkstemp's are 0600).
  """
  path = check_target(path, force)
  parent, name = os.path.split(path)
  os.makedirs(parent, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  try:
    os.chmod(tmp, 0o666 & ~umask)
    with os.fdopen(fd, "wb" if binary else "w") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.lexists(tmp):
      os.remove(tmp)
    raise
  return path


def write_json(path: str, obj: Any, force: bool = False) -> str:
  """Writes `obj` as JSON to `path` atomically (see `write_file`)."""

  def dump(f):
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")

  return write_file(path, dump, force)


def dump_json(path: str, obj: Any) -> None:
  """Plain JSON write, for files inside a directory that `atomic_dir` publishes."""
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
