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
import sys

from jaxprune.errors import JaxpruneError

SUBCOMMANDS = ("eval", "inspect", "prune", "export", "generate", "report", "heal", "plan")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="jaxprune", description=__doc__.splitlines()[0])
  parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
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
  parser = build_parser()
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  if not args.verbose:  # JAX's own INFO lines (e.g. the missing-TPU probe) are noise to users
    logging.getLogger("jax").setLevel(logging.WARNING)
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
