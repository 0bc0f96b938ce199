"""Harness for the bad-input tests: run the CLI, check the one-line error, check nothing was lost.

Every case asserts the same four things: the exit code, that the error is one line
(`jaxprune CMD: error: ...`) naming what was wrong, that no traceback was printed, and
that every file that existed before the run is still there with the same bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Result:
  rc: int
  stdout: str
  stderr: str

  @property
  def error_lines(self) -> list[str]:
    return [l for l in self.stderr.splitlines() if ": error:" in l]


def run_cli(*args: str, cwd: str | None = None) -> Result:
  """`jaxprune ARGS` in this process (fast: JAX and the models stay loaded).

  An exception that escapes the CLI fails the test here with its traceback: the CLI
  must turn every user error into a line on stderr and an exit code.
  """
  from jaxprune import cli

  out, err = io.StringIO(), io.StringIO()
  old = os.getcwd()
  try:
    if cwd:
      os.chdir(cwd)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      try:
        rc = cli.main(["--no-compile-cache", *args])
      except SystemExit as e:  # argparse's own usage errors
        rc = e.code if isinstance(e.code, int) else 1
  finally:
    os.chdir(old)
  return Result(int(rc), out.getvalue(), err.getvalue())


def run_cli_process(*args: str, cwd: str | None = None, timeout: float = 300, env: dict | None = None) -> Result:
  """`python -m jaxprune ARGS` in a child process: for hangs (the timeout fails the test),
  signals, and what a user's terminal really shows."""
  e = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
  p = subprocess.run([sys.executable, "-m", "jaxprune", "--no-compile-cache", *args], cwd=cwd or REPO, env=e,
                     capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
  return Result(p.returncode, p.stdout, p.stderr)


def assert_one_line_error(r: Result, *needles: str, rc: int = 2) -> str:
  """The run failed with exit code `rc`, one `error:` line that contains every needle
  (case-insensitive), and no traceback. Returns the line."""
  assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, f"traceback printed:\n{r.stderr[-3000:]}"
  assert r.rc == rc, f"exit code {r.rc}, expected {rc}; stderr:\n{r.stderr[-3000:]}"
  lines = r.error_lines
  assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n{r.stderr[-3000:]}"
  for n in needles:
    assert n.lower() in lines[0].lower(), f"{n!r} not in the error line: {lines[0]}"
  return lines[0]


def snapshot(*roots: str) -> dict[str, tuple[str, int]]:
  """Every regular file under `roots` (or `roots` themselves) -> (sha256, size)."""
  files = {}
  for root in roots:
    paths = [root] if os.path.isfile(root) else [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    for p in paths:
      if os.path.isfile(p) and not os.path.islink(p):
        with open(p, "rb") as f:
          files[p] = (hashlib.sha256(f.read()).hexdigest(), os.path.getsize(p))
  return files


def assert_intact(before: dict[str, tuple[str, int]]) -> None:
  """Every file of `snapshot(...)` is still there with the same bytes."""
  lost = [p for p in before if not os.path.isfile(p)]
  changed = [p for p in before if p not in lost and snapshot(p)[p] != before[p]]
  assert not lost and not changed, f"lost: {lost[:5]}, changed: {changed[:5]}"
