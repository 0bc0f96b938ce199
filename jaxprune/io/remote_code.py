"""Exports carry no remote code of their input.

A tokenizer saved with `save_pretrained` writes back the `auto_map` of the directory it
was loaded from, and some tokenizers copy their source `.py` files. Users load per-layer
exports with `trust_remote_code=True` (for jaxprune's own modeling file), which would then
also run the input's third-party code. So whatever the tokenizer writes is cleaned: its
JSON files lose their remote-code keys and any `.py` file it adds is removed, each drop
said once.
"""

from __future__ import annotations

import json
import logging
import os

log = logging.getLogger(__name__)

#: Top-level keys of a tokenizer's JSON files that make transformers import code from the directory.
REMOTE_KEYS = ("auto_map", "trust_remote_code")


def save_tokenizer(tok, out_dir: str) -> None:
  """`tok.save_pretrained(out_dir)`, keeping nothing of the input's remote code."""
  before = set(os.listdir(out_dir))
  tok.save_pretrained(out_dir)
  for name in sorted(set(os.listdir(out_dir)) - before):
    path = os.path.join(out_dir, name)
    if name.endswith(".py"):
      os.remove(path)  # written just now into jaxprune's own temporary directory
      log.warning("export: dropped %s, code that the input's tokenizer carried (exports ship only jaxprune's own "
                  "modeling file)", name)
    elif name.endswith(".json"):
      _drop_keys(path, name)


def _drop_keys(path: str, name: str) -> None:
  with open(path, encoding="utf-8") as f:
    d = json.load(f)
  dropped = [k for k in REMOTE_KEYS if isinstance(d, dict) and k in d]
  if not dropped:
    return
  for k in dropped:
    del d[k]
  with open(path, "w", encoding="utf-8") as f:
    json.dump(d, f, indent=2, ensure_ascii=False)
    f.write("\n")
  log.warning("export: dropped %s from %s (remote code of the input, which the export must not run)",
              ", ".join(dropped), name)
