"""`jaxprune` command line: a thin shell over the library.

Each subcommand lives in its own module with `add_parser(subparsers)` and
`run(args) -> int`. The library never sees `args`: subcommands turn them into
frozen configs and call library functions. Errors derived from JaxpruneError
print as one line (what, expected, fix) with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

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


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="jaxprune", description=__doc__.splitlines()[0])
  parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
  parser.add_argument("--compile-cache", default=os.environ.get("JAXPRUNE_COMPILE_CACHE", DEFAULT_CACHE),
                      metavar="DIR", help="JAX's persistent compilation cache, so a second run (or a resumed one) "
                      "does not compile its kernels again (default: %(default)s; env JAXPRUNE_COMPILE_CACHE)")
  parser.add_argument("--no-compile-cache", dest="compile_cache", action="store_const", const=None,
                      help="do not read or write the persistent compilation cache")
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


def main(argv=None) -> int:
  return_freed_memory()
  parser = build_parser()
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  if not args.verbose:  # JAX's own INFO lines (e.g. the missing-TPU probe) are noise to users
    logging.getLogger("jax").setLevel(logging.WARNING)
  if args.compile_cache:
    enable_compile_cache(args.compile_cache)
  try:
    return int(args._run(args) or 0)
  except JaxpruneError as e:
    print(f"jaxprune {args.command}: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"jaxprune {args.command}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
