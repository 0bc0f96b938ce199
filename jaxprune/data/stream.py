"""Text files read and tokenized piece by piece, only as far as the windows need.

Tokenizing a whole file at once holds the text, the tokenizer's per-token
encodings (offsets, words, ...) and the ids together: 40 MB of text passed
6 GB. Here the file is read in pieces of about `CHUNK_BYTES`, each tokenized on
its own and its ids appended to one int32 stream, and reading stops once the
stream holds the tokens asked for.

A piece ends only where tokenizing the pieces gives the ids of the whole text:
after a newline between two visible (non-space) characters, or before a space
between a visible character (or a newline) and a visible character. The
byte-level BPE tokenizers of the supported families (GPT-2, Llama 3, Qwen2,
SmolLM2) split text into words with a GPT-2-like pattern before merging, and
that pattern always starts a new word there: a space leads the word after it,
and a run of whitespace ends before such a space (`\\s+(?!\\S)`); BPE merges
never cross a word. (Not so in " \\nY": the spaces and the newline are words of
their own there, but one word at the end of a piece.) tests/test_bad_input_text.py
checks the equality on WikiText-2 and Shakespeare.
"""

from __future__ import annotations

import logging
import os
import re
from typing import BinaryIO, Iterator

import numpy as np

from jaxprune.errors import UsageError

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20


def check_file(path: str, what: str = "text file") -> None:
  if not os.path.isfile(path):
    problem = "is not a regular file" if os.path.exists(path) else "does not exist"
    raise UsageError(f"{what} {path} {problem}; pass a path to a UTF-8 text file")


def decode(data: bytes, path: str, offset: int = 0, what: str = "text file") -> str:
  """`data` (which starts at byte `offset` of `path`) as UTF-8, or one line naming the first bad byte."""
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    bad = data[e.start:e.start + 1].hex()
    raise UsageError(f"{what} {path} is not UTF-8: byte 0x{bad} at byte offset {offset + e.start} ({e.reason}); "
                     f"convert it, e.g. iconv -f LATIN1 -t UTF-8 {path} > {path}.utf8") from None


_CANDIDATE = re.compile(rb"[\n ]")
_TAIL = 1 << 16


def _char_before(buf: bytes, i: int) -> str:
  """The character that ends at byte `i` of `buf` (up to 4 bytes of UTF-8; "" where none decodes)."""
  return buf[max(i - 4, 0):i].decode("utf-8", errors="ignore")[-1:]


def _char_at(buf: bytes, i: int) -> str:
  return buf[i:i + 4].decode("utf-8", errors="ignore")[:1]


def _visible(c: str) -> bool:
  return bool(c) and not c.isspace()


def _splits_at(buf: bytes, i: int) -> int:
  """Where the text may be split near the space or newline at byte `i` (0: not here): after a
  newline between two visible characters ("x\nY"), before a space between a visible character
  or a newline and a visible character ("x Y", "\n Y")."""
  before, after = _char_before(buf, i), _char_at(buf, i + 1)
  if not _visible(after):
    return 0
  if buf[i] == 0x0A:
    return i + 1 if _visible(before) else 0
  return i if _visible(before) or before == "\n" else 0


def _cut(buf: bytes) -> int:
  """The last position in `buf` where the text may be split (0: none)."""
  for start in (max(len(buf) - _TAIL, 0), 0):  # the tail first: a cut is almost always there
    for m in reversed(list(_CANDIDATE.finditer(buf, start, len(buf) - 4))):
      cut = _splits_at(buf, m.start())
      if cut:
        return cut
  return 0


def pieces(f: BinaryIO, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, bytes]]:
  """(byte offset, bytes) of consecutive pieces of `f`, each ending where tokenization may be split."""
  buf, start = b"", 0
  while True:
    more = f.read(chunk_bytes)
    buf += more
    if not more:
      if buf:
        yield start, buf
      return
    # A piece without a cut (no space or newline between visible characters) grows until it has one.
    cut = _cut(buf) if len(buf) >= chunk_bytes else 0
    if cut:
      yield start, buf[:cut]
      start, buf = start + cut, buf[cut:]


# Text with every kind of place `_cut` may choose (and some it must not), for a tokenizer to be checked on.
_PROBE = ("The cat's 12 toys.\nA dog  ran,\n (quickly) home; \u00e9t\u00e9 x\n\n = Title = \nend 3.5 !? ok\n"
          "\u4e2d\u6587\n\u65e5\u672c \u8a9e\u3000x \u00e9\n\u00e9")


def splits_safely(tokenizer) -> bool:
  """Whether tokenizing `_PROBE` in two pieces, at each place `_cut` may choose, gives the ids of
  the whole (not so for tokenizers that prepend a marker to every text, e.g. SentencePiece
  normalizers that add "▁")."""
  def ids(text):
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])

  data = _PROBE.encode("utf-8")
  cuts = [c for c in (_splits_at(data, m.start()) for m in _CANDIDATE.finditer(data, 0, len(data) - 4)) if c]
  whole = ids(_PROBE)
  return all(ids(data[:c].decode()) + ids(data[c:].decode()) == whole for c in cuts)


def read_tokens(path: str, tokenizer, limit: int | None = None, chunk_bytes: int = CHUNK_BYTES,
                what: str = "text file") -> tuple[np.ndarray, bool]:
  """The token stream of the file at `path` (no special tokens), read until it holds `limit` tokens.

  A tokenizer that does not split safely (`splits_safely`) gets the whole file at once.

  Returns:
    (ids [N] int32: at least `limit` of them when the file has that many, whether the whole file was read)
  """
  check_file(path, what)
  if not splits_safely(tokenizer):
    log.warning("the tokenizer's ids change where a text is split, so %s is tokenized whole", path)
    chunk_bytes = os.path.getsize(path) + 1
  parts, count = [], 0
  with open(path, "rb") as f:
    for offset, data in pieces(f, chunk_bytes):
      ids = tokenizer(decode(data, path, offset, what), add_special_tokens=False)["input_ids"]
      parts.append(np.asarray(ids, np.int32))
      count += len(ids)
      if limit is not None and count >= limit:
        whole = not f.read(1)
        return np.concatenate(parts), whole
  return (np.concatenate(parts) if parts else np.zeros(0, np.int32)), True
