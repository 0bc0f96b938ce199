"""The tokenizer part of a GGUF file (`tokenizer.*` metadata) for `save_gguf`.

Two sources, best first:

* a GGUF file the model came from (directly, or through the `report.json` of a
  pruned directory naming it): its `tokenizer.*` fields are copied verbatim, so
  llama.cpp tokenizes exactly as it does for the original model;
* a Hugging Face byte-level BPE `tokenizer.json`: written as llama.cpp's `gpt2`
  tokenizer (tokens, token types, merges, special ids).

The fields are returned as (key, value, GGUF value type, array element type), so
the writer needs no knowledge of where they came from.
"""

from __future__ import annotations

import json
import logging
import os

from jaxprune.errors import JaxpruneError

log = logging.getLogger(__name__)

# llama.cpp reads token ids as uint32 and checks types strictly, so copied fields keep the
# types llama.cpp's converter gives them rather than ones inferred from the Python values.
_ARRAYS = {"tokenizer.ggml.tokens": "STRING", "tokenizer.ggml.merges": "STRING",
           "tokenizer.ggml.token_type": "INT32", "tokenizer.ggml.scores": "FLOAT32"}
# llama.cpp's token types (llama_token_type): normal text, control (special) and user-defined tokens.
_NORMAL, _CONTROL, _USER = 1, 3, 4


def _scalar_type(value) -> str:
  if isinstance(value, bool):
    return "BOOL"
  if isinstance(value, int):
    return "UINT32"
  if isinstance(value, float):
    return "FLOAT32"
  return "STRING"


def _array_type(key: str, values) -> str:
  if key in _ARRAYS:
    return _ARRAYS[key]
  first = values[0] if values else ""
  return "STRING" if isinstance(first, str) else "FLOAT32" if isinstance(first, float) else "INT32"


def typed_fields(fields: dict) -> list[tuple]:
  """(key, value, value type, element type or None) for plain metadata values."""
  out = []
  for key, value in fields.items():
    if isinstance(value, list):
      out.append((key, value, "ARRAY", _array_type(key, value)))
    else:
      out.append((key, value, _scalar_type(value), None))
  return out


def source_gguf(source: str | None) -> str | None:
  """The GGUF file a model's tokenizer can be copied from, or None.

  `source` is `Model.source`: a .gguf path, or a directory; a directory written
  by `jaxprune prune` names the model it was pruned from in report.json.
  """
  from jaxprune.io.locate import resolve

  if not source:
    return None
  if os.path.isfile(source) and source.endswith(".gguf"):
    return source
  report = os.path.join(source, "report.json")
  if not os.path.isfile(report):
    return None
  try:
    with open(report) as f:
      name = json.load(f).get("model")
    loc = resolve(name) if isinstance(name, str) else None
  except (OSError, ValueError, JaxpruneError):
    return None
  return loc.path if loc is not None and loc.kind == "gguf" else None


def from_gguf(path: str) -> list[tuple]:
  """Every `tokenizer.*` field of the GGUF file at `path`."""
  from jaxprune.io.gguf import read_gguf

  fields = read_gguf(path).fields
  return typed_fields({k: v for k, v in fields.items() if k.startswith("tokenizer.")})


def _special_ids(tok: dict, config: dict, vocab: dict[str, int]) -> dict[str, int]:
  out = {}
  for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                    ("pad", "padding_token_id")):
    token = config.get(f"{role}_token")
    if isinstance(token, dict):
      token = token.get("content")
    if isinstance(token, str) and token in vocab:
      out[f"tokenizer.ggml.{key}"] = vocab[token]
  return out


def from_hf(directory: str) -> list[tuple] | None:
  """llama.cpp `gpt2` tokenizer fields from a byte-level BPE tokenizer.json, or None when there is none."""
  path = os.path.join(directory, "tokenizer.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    tok = json.load(f)
  model = tok.get("model") or {}
  if model.get("type") != "BPE":
    log.warning("%s is a %s tokenizer; only byte-level BPE converts to llama.cpp's gpt2 tokenizer, so the GGUF has "
                "no tokenizer (transformers loads it; llama.cpp needs one)", path, model.get("type"))
    return None
  vocab = dict(model["vocab"])
  added = {t["content"]: t for t in tok.get("added_tokens", [])}
  vocab.update({c: t["id"] for c, t in added.items()})
  tokens = [""] * (max(vocab.values()) + 1)
  types = [_NORMAL] * len(tokens)
  for text, i in vocab.items():
    tokens[i] = text
    if text in added:
      types[i] = _CONTROL if added[text].get("special") else _USER
  merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
  config = {}
  cfg_path = os.path.join(directory, "tokenizer_config.json")
  if os.path.isfile(cfg_path):
    with open(cfg_path) as f:
      config = json.load(f)
  log.warning("%s: llama.cpp's pre-tokenizer for this vocabulary is unknown, so the GGUF names 'default' (GPT-2's "
              "word splitting); text may split differently from the Hugging Face tokenizer", path)
  fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
            **_special_ids(tok, config, vocab)}
  return typed_fields(fields)


def tokenizer_fields(source: str | None) -> tuple[list[tuple], str]:
  """(fields, where they came from: a path, or 'none')."""
  gguf_path = source_gguf(source)
  if gguf_path is not None:
    return from_gguf(gguf_path), gguf_path
  if source and os.path.isdir(source):
    fields = from_hf(source)
    if fields is not None:
      return fields, os.path.join(source, "tokenizer.json")
  log.warning("no tokenizer found for %s; the GGUF has none (transformers loads it; llama.cpp needs one)", source)
  return [], "none"
