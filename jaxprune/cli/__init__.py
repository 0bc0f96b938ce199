"""`jaxprune` command line: a thin shell over the library.

Each subcommand lives in its own module with `add_parser(subparsers)` and
`run(args) -> int`. The library never sees `args`: subcommands turn them into
frozen configs and call library functions. Errors derived from JaxpruneError,
and OSErrors of file operations, print as one line (what, expected, fix) with exit
status 2; `--debug` prints the traceback instead. SIGTERM (timeouts, Slurm, docker
stop) unwinds like Ctrl-C, so temporary outputs are removed, and exits with 143.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import logging
import os
import signal
import sys
import threading
import traceback
from typing import Iterator

from jaxprune.errors import JaxpruneError

SUBCOMMANDS = ("eval", "inspect", "prune", "export", "generate", "report", "heal", "plan")


DEFAULT_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")),
                             "jaxprune", "xla")


def enable_compile_cache(path: str) -> None:
  """Turns on JAX's persistent compilation cache in `path` for every kernel worth caching."""
  import jax

  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  # Cache every compile that took at least 0.5 s, whatever the size of the executable.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def return_freed_memory() -> None:
  """Makes glibc's malloc give large freed blocks back to the system.

  A streamed run allocates and frees a block's worth of numpy and XLA buffers per
  module; with glibc's adaptive thresholds those end up in per-thread heaps that never
  shrink, and the process's resident memory creeps up by hundreds of MB. A fixed
  64 KiB mmap threshold and two arenas (what MALLOC_MMAP_THRESHOLD_=65536
  MALLOC_ARENA_MAX=2 would do) keep it at what is live. Other C libraries: no-op;
  JAXPRUNE_MALLOC=default leaves malloc alone.
  """
  if os.environ.get("JAXPRUNE_MALLOC") == "default" or not sys.platform.startswith("linux"):
    return
  import ctypes

  try:
    libc = ctypes.CDLL("libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return
  M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's malloc.h
  mallopt(M_MMAP_THRESHOLD, 65536)
  mallopt(M_TRIM_THRESHOLD, 1 << 20)
  mallopt(M_ARENA_MAX, 2)


def add_compile_cache_options(parser: argparse.ArgumentParser) -> None:
  """--compile-cache DIR / --no-compile-cache (args.compile_cache: the directory, or None)."""
  parser.add_argument("--compile-cache", default=os.environ.get("JAXPRUNE_COMPILE_CACHE", DEFAULT_CACHE),
                      metavar="DIR", help="JAX's persistent compilation cache, so a second run (or a resumed one) "
                      "does not compile its kernels again (default: %(default)s; env JAXPRUNE_COMPILE_CACHE)")
  parser.add_argument("--no-compile-cache", dest="compile_cache", action="store_const", const=None,
                      help="do not read or write the persistent compilation cache")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="jaxprune", description=__doc__.splitlines()[0])
  parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
  parser.add_argument("--debug", action="store_true", help="print the full traceback of an error instead of one line")
  add_compile_cache_options(parser)
  sub = parser.add_subparsers(dest="command", required=True)
  for name in SUBCOMMANDS:
    try:
      mod = importlib.import_module(f"jaxprune.cli.{name}_cmd")
    except ModuleNotFoundError as e:
      if e.name == f"jaxprune.cli.{name}_cmd":
        continue  # subcommand not built yet
      raise
    p = mod.add_parser(sub)
    p.set_defaults(_run=mod.run)
  return parser


class Terminated(KeyboardInterrupt):
  """SIGTERM, raised wherever the program is, so that every cleanup runs as for Ctrl-C."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
  """Within the block, SIGTERM raises `Terminated` (only the main thread may set handlers)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def handler(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not cut the cleanup short
    raise Terminated()

  old = signal.signal(signal.SIGTERM, handler)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, old)


def _os_error_line(e: OSError) -> str:
  what = f"{os.fsdecode(e.filename)}: " if e.filename is not None else ""
  code = errno.errorcode.get(e.errno, str(e.errno))
  return f"{what}{e.strerror or os.strerror(e.errno)} ({code}); check that path, or run with --debug for the traceback"


def _report(command: str, e: BaseException, debug: bool) -> int:
  """Prints what stopped the command (one line, or the traceback with --debug); the exit status."""
  if debug:
    traceback.print_exception(e)
  elif isinstance(e, Terminated):
    print(f"jaxprune {command}: error: terminated by SIGTERM; temporary files were removed and no output was "
          "published (an existing checkpoint is kept for --resume)", file=sys.stderr)
  elif isinstance(e, KeyboardInterrupt):
    print(f"jaxprune {command}: interrupted", file=sys.stderr)
  elif isinstance(e, JaxpruneError):
    print(f"jaxprune {command}: error: {e}", file=sys.stderr)
  else:
    print(f"jaxprune {command}: error: {_os_error_line(e)}", file=sys.stderr)
  if isinstance(e, KeyboardInterrupt):
    return 143 if isinstance(e, Terminated) else 130
  return 2


def main(argv=None) -> int:
  return_freed_memory()
  parser = build_parser()
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  if not args.verbose:  # JAX's own INFO lines (e.g. the missing-TPU probe) are noise to users
    logging.getLogger("jax").setLevel(logging.WARNING)
  with sigterm_as_interrupt():
    try:
      if args.compile_cache:
        enable_compile_cache(args.compile_cache)
      return int(args._run(args) or 0)
    except (JaxpruneError, KeyboardInterrupt) as e:
      return _report(args.command, e, args.debug)
    except OSError as e:
      if e.errno is None:  # not a file operation's error: a bug, keep its traceback
        raise
      return _report(args.command, e, args.debug)


if __name__ == "__main__":
  sys.exit(main())
