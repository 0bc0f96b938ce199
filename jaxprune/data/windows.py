"""Token windows: evaluation windows and seeded calibration windows.

Text is tokenized as one stream without special tokens and cut into
non-overlapping windows, the protocol of the paper and of the reference
figures in DEVELOPERS.md.
"""

from __future__ import annotations

import os

import numpy as np

from jaxprune.errors import UsageError


def read_text(path: str) -> str:
  if not os.path.isfile(path):
    raise UsageError(f"text file {path} does not exist; pass a path to a UTF-8 text file")
  with open(path, encoding="utf-8") as f:
    return f.read()


def tokenize(tokenizer, text: str) -> np.ndarray:
  """One stream of token ids, no special tokens."""
  return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32)


def num_windows(stream: np.ndarray, seq_len: int) -> int:
  return len(stream) // seq_len


def eval_windows(stream: np.ndarray, seq_len: int, max_windows: int | None = None, source: str = "text"):
  """The first `max_windows` non-overlapping windows [W, L] of a token stream."""
  if seq_len < 2:
    raise UsageError(f"seq_len must be at least 2 to predict anything, got {seq_len}")
  n = num_windows(stream, seq_len)
  if n == 0:
    raise UsageError(f"{source} has {len(stream)} tokens, fewer than one window of {seq_len}; "
                     "use a longer text or a smaller --seq-len")
  if max_windows is not None:
    if max_windows < 1:
      raise UsageError(f"max_windows must be positive, got {max_windows}")
    n = min(n, max_windows)
  return stream[:n * seq_len].reshape(n, seq_len)


def sample_windows(stream: np.ndarray, seq_len: int, n: int, seed: int, exclude: np.ndarray | None = None,
                   source: str = "text"):
  """`n` distinct non-overlapping windows drawn with `seed`, plus their indices.

  Args:
    exclude: window indices that must not be drawn (e.g. calibration windows
      when drawing held-out ones).

  Returns:
    (windows [n, L] int32, indices [n] of the windows in the stream)
  """
  total = num_windows(stream, seq_len)
  pool = np.setdiff1d(np.arange(total), exclude if exclude is not None else [])
  if n < 1:
    raise UsageError(f"the number of calibration windows must be positive, got {n}")
  if len(pool) < n:
    raise UsageError(f"{source} has {len(stream)} tokens: {len(pool)} free windows of {seq_len} tokens, "
                     f"but {n} were asked for; use fewer samples, a shorter --seq-len or a longer text")
  idx = np.sort(np.random.default_rng(seed).choice(pool, size=n, replace=False))
  windows = np.stack([stream[i * seq_len:(i + 1) * seq_len] for i in idx])
  return windows.astype(np.int32), idx
