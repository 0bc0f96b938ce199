"""A preemption at the worst instant, for the resume tests: the process dies right after a
given block became durable. Hooked into the engine's public `progress` callback, whose
"block" event comes once the block's checkpoint is written; the engine knows nothing of it."""

from __future__ import annotations

import os
import signal

# Set in a child process's environment to the block after which it SIGKILLs itself.
ENV = "JAXPRUNE_TEST_KILL_AFTER_BLOCK"


def _sigkill() -> None:
  os.kill(os.getpid(), signal.SIGKILL)


def wrap(prune, block: int, kill=_sigkill):
  """`prune` whose run calls `kill()` at the "block" event of `block`, before anyone else sees it."""

  def killing_prune(*args, progress=None, **kwargs):
    def hook(event):
      if event.get("event") == "block" and event.get("layer") == block:
        kill()
      if progress is not None:
        progress(event)

    return prune(*args, progress=hook, **kwargs)

  return killing_prune


def install_from_env() -> None:
  """In a child process: the CLI's `prune` (read from `jaxprune.prune` when it runs) killed per ENV."""
  import jaxprune.prune

  if os.environ.get(ENV):
    jaxprune.prune.prune = wrap(jaxprune.prune.prune, int(os.environ[ENV]))


def python_c(then: str, root: str) -> str:
  """`python -c` code that installs the kill hook and tests/watch_hook.py's watch (from the
  checkout at `root`), each where its variable is set, then runs `then`."""
  return ("import sys; sys.path.insert(0, %r); from tests import kill_hook, watch_hook; kill_hook.install_from_env(); "
          "watch_hook.install_from_env(); " % root + then)
