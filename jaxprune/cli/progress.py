"""Progress of a long phase on stderr: a line when it starts, then a tqdm bar with the time left.

The start line is printed even without a terminal or with --no-progress, so a log
never shows minutes of silence; without a bar, one more line after the first step
gives the estimate the bar would have shown.
"""

from __future__ import annotations

import contextlib
import sys
import time


def _duration(seconds: float) -> str:
  if seconds < 90:
    return f"{seconds:.0f} s"
  return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


@contextlib.contextmanager
def phase(start_line: str, total: int, desc: str, unit: str, bar: bool = True):
  """Yields update(n): `n` more of `total` steps done."""
  from tqdm import tqdm

  print(start_line, file=sys.stderr, flush=True)
  t0, done, told = time.perf_counter(), 0, False

  with tqdm(total=total, desc=desc, unit=unit, disable=not bar, file=sys.stderr) as t:

    def update(n: int = 1) -> None:
      nonlocal done, told
      done += n
      t.update(n)
      if not bar and not told and 0 < done < total:
        told = True
        spent = time.perf_counter() - t0
        print(f"{desc}: {done}/{total} {unit} in {_duration(spent)}, est. {_duration(spent * (total - done) / done)} "
              "left", file=sys.stderr, flush=True)

    yield update


class counted:
  """A phase opened at the first `(done, total)` report, for work whose size its library
  function learns only once it starts (e.g. the tensors of a checkpoint).

      with counted("dequantizing {total} tensors", "load", "tensor", bar) as report:
        jaxprune.load(name, progress=report)
  """

  def __init__(self, start_line: str, desc: str, unit: str, bar: bool = True):
    self.start_line, self.desc, self.unit, self.bar = start_line, desc, unit, bar
    self.stack = contextlib.ExitStack()
    self.update = None
    self.done = 0

  def __call__(self, done: int, total: int) -> None:
    if self.update is None:
      self.update = self.stack.enter_context(phase(self.start_line.format(total=total), total, self.desc, self.unit,
                                                   self.bar))
    self.update(done - self.done)
    self.done = done

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.stack.close()


def loading(name: str, bar: bool = True) -> counted:
  """Progress for `jaxprune.load(name, progress=...)`: shown while a GGUF file is dequantized."""
  return counted(f"dequantizing the {{total}} tensors of {name}", "load", "tensor", bar)


def writing(out: str, num_layers: int, bar: bool = True):
  """Progress for `save_hf` and `save_gguf` (`progress=`): the embeddings and head, then each block."""
  return phase(f"writing {out}: the embeddings and {num_layers} blocks", num_layers + 1, "export", "piece", bar)
