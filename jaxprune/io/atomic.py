"""Atomic writes: a directory or a file appears complete, or not at all.

Everything is written into a temporary sibling first (same filesystem, so the
final `rename` is atomic) and moved into place only when writing succeeded. An
existing output is never touched unless `force=True` (and then only one jaxprune
wrote: `jaxprune.io.target`); a failed write leaves neither a partial output nor
temporary debris behind. A temporary's name holds the pid and host of its run, and a
directory's its marker, so the next write of the same target removes what a killed
run left, and only that.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import tempfile
from typing import IO, Any, Callable, Iterator

from jaxprune.io.target import OutputError, check_target, host_tag, read_marker, write_marker

__all__ = ["atomic_dir", "check_target", "dump_json", "write_file", "write_json"]

log = logging.getLogger(__name__)

#: What a full, read-only or forbidden destination raises while being written.
_FIXES = {
    errno.ENOSPC: "free some space on that filesystem or choose another --out",
    errno.EDQUOT: "free some space within your quota or choose another --out",
    errno.EFBIG: "choose a filesystem that allows larger files, or a smaller --max-shard-size",
    errno.EACCES: "make it writable or choose another --out",
    errno.EPERM: "make it writable or choose another --out",
    errno.EROFS: "the filesystem is read-only; choose another --out",
    errno.EIO: "check the disk, or choose another --out",
}


def _tag() -> str:
  """The part of a temporary's name that says which live process owns it."""
  return f"{os.getpid()}-{host_tag()}-"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except (PermissionError, OverflowError):  # someone else's process, or no pid at all: not ours to judge
    return True
  return True


def _is_stale(path: str, pid: int, host: str) -> bool:
  """A temporary of a killed jaxprune run: its process is gone (on this host), and a
  directory carries the marker (or is empty), so nothing of the user's is taken."""
  if host != host_tag() or _alive(pid) or os.path.islink(path):
    return False
  if os.path.isdir(path):
    return read_marker(path) is not None or not os.listdir(path)
  return os.path.isfile(path)


def remove_stale(parent: str, name: str) -> None:
  """Removes the `.NAME.tmp-*` / `.NAME.old-*` siblings that killed runs left next to `parent/name`."""
  pattern = re.compile(rf"\.{re.escape(name)}\.(?:tmp|old)-(\d+)-([0-9a-f]{{8}})-\w+")
  try:
    entries = os.listdir(parent)
  except OSError:
    return
  for entry in entries:
    m = pattern.fullmatch(entry)
    path = os.path.join(parent, entry)
    if m and _is_stale(path, int(m.group(1)), m.group(2)):
      log.info("removing %s, left by a killed jaxprune run (pid %s)", path, m.group(1))
      _remove(path)


def _write_error(path: str, e: OSError) -> OutputError:
  code = errno.errorcode.get(e.errno, str(e.errno))
  return OutputError(f"cannot write {path}: {e.strerror or os.strerror(e.errno)} ({code}); nothing was written; "
                     f"{_FIXES[e.errno]}")


def _is_write_error(e: BaseException, out: str) -> bool:
  """An OSError of writing `out` or its temporaries (not, say, of reading an input inside the block)."""
  if not isinstance(e, OSError) or isinstance(e, OutputError) or e.errno not in _FIXES:
    return False
  if e.filename is None:  # write() and fsync() name no file
    return True
  f = os.path.abspath(os.fsdecode(e.filename))
  parent, name = os.path.split(out)
  return f == out or f.startswith(os.path.join(parent, f".{name}."))


def _makedirs(parent: str, out: str) -> None:
  try:
    os.makedirs(parent, exist_ok=True)
  except OSError as e:
    if e.errno in _FIXES:
      raise _write_error(out, e) from e
    raise


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
    UsageError: `out` exists and `force` is False, or `out` is refused (see
      `jaxprune.io.target.check_target`); nothing is changed.
    OutputError: the disk is full, read-only or forbids it; nothing is published.
  """
  out = check_target(out, force)
  parent, name = os.path.split(out)
  _makedirs(parent, out)
  remove_stale(parent, name)
  tmp = None
  try:
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-{_tag()}", dir=parent)
    write_marker(tmp)
    yield tmp
    _fsync_tree(tmp)
    _publish(tmp, out)
  except OSError as e:
    if _is_write_error(e, out):
      raise _write_error(out, e) from e
    raise
  finally:
    if tmp and os.path.lexists(tmp):
      _remove(tmp)


def _publish(tmp: str, out: str) -> None:
  """Moves the finished `tmp` to `out`; an existing `out` (force) is swapped aside first, then deleted."""
  if not os.path.lexists(out):
    os.rename(tmp, out)
    return
  parent, name = os.path.split(out)
  old = tempfile.mkdtemp(prefix=f".{name}.old-{_tag()}", dir=parent)
  os.rmdir(old)
  os.rename(out, old)
  try:
    os.rename(tmp, out)
  except BaseException:
    os.rename(old, out)
    raise
  _remove(old)


def _umask() -> int:
  umask = os.umask(0)
  os.umask(umask)
  return umask


def write_file(path: str, write: Callable[[IO], None], force: bool = False, binary: bool = False) -> str:
  """Calls `write(f)` on a temporary sibling of `path`, then moves it into place with `os.replace`.

  The file gets the permissions an ordinary `open` would give (mkstemp's are 0600).

  Raises:
    UsageError: `path` exists and `force` is False, or it is a directory.
    OutputError: the disk is full, read-only or forbids it; `path` is as it was.
  """
  path = check_target(path, force, kind="file")
  parent, name = os.path.split(path)
  _makedirs(parent, path)
  remove_stale(parent, name)
  tmp = None
  try:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-{_tag()}", dir=parent)
    os.chmod(tmp, 0o666 & ~_umask())
    with os.fdopen(fd, "wb" if binary else "w") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as e:
    if tmp and os.path.lexists(tmp):
      os.remove(tmp)
    if _is_write_error(e, path):
      raise _write_error(path, e) from e
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
