"""Token windows: evaluation windows and seeded calibration windows.

Text is tokenized as one stream without special tokens and cut into
non-overlapping windows of N tokens, the protocol of the paper and of the
reference figures in DEVELOPERS.md. Files are read through `jaxprune.data.stream`,
only as far as the windows need.

The prefix: a model whose tokenizer adds BOS when it encodes text (Gemma) has
only ever seen text after BOS, so each of its windows is fed as `[BOS] + N`
tokens (`bos_prefix` reads this from the tokenizer, `prefixed` applies it). Every
window builder here takes the prefix, so evaluation and calibration windows carry
it alike. Next-token scoring of `[BOS] + N` then predicts all N window tokens, the
first one from BOS, and nothing predicts BOS: perplexity needs no offset. A
tokenizer that adds no BOS (SmolLM2, GPT-2) has the empty prefix: its windows are
the N stream tokens, N - 1 of them predicted, exactly as before.
"""

from __future__ import annotations

import logging

import numpy as np

from jaxprune.data.stream import check_file, decode, read_tokens
from jaxprune.errors import UsageError

log = logging.getLogger(__name__)

# Calibration draws windows from anywhere in the text, so it reads the whole file, but no
# more than this many tokens (128 MiB of ids; WikiText-103's training text is ~120M tokens).
CALIB_MAX_TOKENS = 1 << 25


def read_text(path: str) -> str:
  """The whole file as text (UTF-8, checked with the offset of a bad byte)."""
  check_file(path)
  with open(path, "rb") as f:
    return decode(f.read(), path)


def check_seq_len(seq_len: int, spec=None, flag: str = "--seq-len") -> None:
  """A window length the model can take: 2 tokens or more (one predicted), and within a
  learned position table (where positions past it would be silently clamped)."""
  if seq_len < 2:
    raise UsageError(f"{flag} must be at least 2 to predict anything, got {seq_len}; use e.g. {flag} 128")
  if spec is not None and spec.fam.positions == "learned" and seq_len > spec.max_positions:
    raise UsageError(f"windows of {seq_len} tokens ({flag}) are longer than the model's {spec.max_positions} "
                     f"positions; use {flag} {spec.max_positions} or less")


def check_window_args(seq_len: int, max_windows: int | None, flag: str = "--seq-len") -> None:
  check_seq_len(seq_len, flag=flag)
  if max_windows is not None and max_windows < 1:
    raise UsageError(f"max_windows must be positive, got {max_windows}")


def bos_prefix(tokenizer) -> tuple[int, ...]:
  """The tokens the tokenizer puts before any text it encodes: (BOS id,) or ().

  Asked of the tokenizer itself, by encoding a probe with and without special tokens, so
  every way a tokenizer can add BOS counts: `add_bos_token`, a post-processor template
  (Hugging Face `tokenizer.json`), and for a GGUF file `tokenizer.ggml.add_bos_token`,
  which transformers' GGUF conversion turns into that template.
  """
  bos = getattr(tokenizer, "bos_token_id", None)
  if bos is None:
    return ()
  probe = "a"
  with_special = list(tokenizer(probe)["input_ids"])
  plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
  return (int(bos),) if with_special[:1] == [bos] and plain[:1] != [bos] else ()


def prefixed(windows: np.ndarray, prefix: tuple[int, ...] = ()) -> np.ndarray:
  """Windows [W, N] fed as `prefix + window`: [W, len(prefix) + N]; the windows themselves without a prefix."""
  if not prefix:
    return windows
  head = np.broadcast_to(np.asarray(prefix, windows.dtype), (len(windows), len(prefix)))
  return np.concatenate([head, windows], axis=1)


def text_windows(path: str, tokenizer, seq_len: int, max_windows: int | None = None) -> np.ndarray:
  """The first `max_windows` windows [W, P + L] of the file at `path`, each after the tokenizer's
  prefix (P = 1 with BOS, else 0), reading only as far as they need."""
  check_window_args(seq_len, max_windows)
  stream, _ = read_tokens(path, tokenizer, None if max_windows is None else max_windows * seq_len)
  return eval_windows(stream, seq_len, max_windows, source=path, prefix=bos_prefix(tokenizer))


def calibration_stream(path: str, tokenizer, max_tokens: int = CALIB_MAX_TOKENS) -> np.ndarray:
  """The token stream of a calibration text: the whole file, or its first `max_tokens` tokens."""
  stream, whole = read_tokens(path, tokenizer, max_tokens, what="calibration text")
  if not whole:
    stream = stream[:max_tokens]
    log.warning("%s holds more than %d tokens; calibration windows are drawn from the first %d (a bound on "
                "memory: every token of the text is held)", path, max_tokens, max_tokens)
  return stream


def tokenize(tokenizer, text: str) -> np.ndarray:
  """One stream of token ids, no special tokens."""
  return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32)


def num_windows(stream: np.ndarray, seq_len: int) -> int:
  return len(stream) // seq_len


def eval_windows(stream: np.ndarray, seq_len: int, max_windows: int | None = None, source: str = "text",
                 prefix: tuple[int, ...] = ()):
  """The first `max_windows` non-overlapping windows [W, L] of a token stream, each after `prefix`
  ([W, len(prefix) + L]; see `bos_prefix`)."""
  check_window_args(seq_len, max_windows, flag="seq_len")
  n = num_windows(stream, seq_len)
  if n == 0:
    raise UsageError(f"{source} has {len(stream)} tokens, fewer than one window of {seq_len}; "
                     "use a longer text or a smaller --seq-len")
  if max_windows is not None:
    n = min(n, max_windows)
  return prefixed(stream[:n * seq_len].reshape(n, seq_len), prefix)


def sample_windows(stream: np.ndarray, seq_len: int, n: int, seed: int, exclude: np.ndarray | None = None,
                   source: str = "text", prefix: tuple[int, ...] = ()):
  """`n` distinct non-overlapping windows drawn with `seed`, plus their indices.

  Args:
    exclude: window indices that must not be drawn (e.g. calibration windows
      when drawing held-out ones).
    prefix: tokens each window is fed after (`bos_prefix`); the draw does not depend on it.

  Returns:
    (windows [n, len(prefix) + L] int32, indices [n] of the windows in the stream)
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
  return prefixed(windows.astype(np.int32), prefix), idx
