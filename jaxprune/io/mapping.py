"""Hugging Face tensors <-> jaxprune parameters, through the family's table, both ways.

The tables live with their families (`jaxprune.families`). Import consumes keys
through the table and refuses anything it does not know; export writes exactly
the table's keys, so the two directions cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Callable

import numpy as np
from flax import traverse_util

from jaxprune import families
from jaxprune.errors import CheckpointError, ShapeError
from jaxprune.families.tensors import Path, TensorTable
from jaxprune.spec import LayerSpec, ModelSpec, Params

log = logging.getLogger(__name__)


def table(spec: ModelSpec) -> TensorTable:
  """The tensor-name table of `spec`'s family."""
  return families.get(spec.family).table


def key_renames(tab: TensorTable, keys) -> dict[str, str]:
  """Checkpoint key -> the key the tables use: checkpoints saved without the LM-head wrapper
  lack the base-model prefix."""
  base = tab.base_prefix
  if any(k.startswith(base) for k in keys):
    return {k: k for k in keys}
  return {k: (k if k.startswith("lm_head.") else base + k) for k in keys}


def normalize_keys(tab: TensorTable, tensors: dict) -> dict:
  """`tensors` under the keys the tables use (`key_renames`)."""
  names = key_renames(tab, tensors)
  return {names[k]: v for k, v in tensors.items()}


def check_keys(spec: ModelSpec, keys, is_zero: Callable[[str], bool], source: str = "checkpoint") -> None:
  """Raises CheckpointError naming the missing and unexpected tensors among `keys` (table keys).

  `is_zero(key)` says whether a tensor is all zeros: such biases that the spec lacks change
  nothing (exports write them where the target family requires a bias, jaxprune.io.export),
  so they are accepted.
  """
  tab = table(spec)
  keys = set(keys)
  want = [r.hf for r in tab.top if r.when(spec, None)]
  want += [tab.block_prefix.format(i=i) + r.hf for i, layer in enumerate(spec.layers)
           for r in tab.block if r.when(spec, layer)]
  missing = [k for k in want if k not in keys]
  ignored = [re.compile(p) for p in tab.ignored]
  wanted = set(want)
  # Tied checkpoints sometimes carry a copy of the embedding as lm_head.weight.
  extra = [k for k in keys if k not in wanted and not any(p.fullmatch(k) for p in ignored)
           and not (k == "lm_head.weight" and spec.tie_embeddings)
           and not (k.endswith(".bias") and is_zero(k))]
  if missing or extra:
    parts = []
    if missing:
      parts.append(f"missing tensors: {_abbrev(missing)}")
    if extra:
      parts.append(f"unexpected tensors: {_abbrev(extra)}")
    raise CheckpointError(
        f"{source} does not match a {spec.family} model with {spec.num_layers} layers "
        f"({'; '.join(parts)}). Check that the config belongs to these weights.")


def _take(spec: ModelSpec, rules, prefix: str, layer: LayerSpec | None, get: Callable[[str], np.ndarray],
          source: str, check_finite: bool = True) -> Params:
  """The leaves of `rules` (HF keys `prefix + rule.hf`, read with `get`), nested by path.

  Every tensor is checked to be finite as it is read (`check_finite=False` only for views
  of the file that read nothing yet; their slices are checked when read).
  """
  flat: dict[Path, np.ndarray] = {}
  for rule in rules:
    if not rule.when(spec, layer):
      continue
    key = prefix + rule.hf
    arr = np.asarray(get(key))
    if check_finite:
      require_finite(arr, key, source)
    try:
      leaves = rule.load(arr, layer)
    except ValueError:
      raise ShapeError(
          f"{source}: tensor {key} has shape {arr.shape}, which does not fit the config "
          f"(layer sizes {layer}). Check that config.json belongs to these weights.") from None
    flat.update(zip(rule.paths, leaves, strict=True))
  return traverse_util.unflatten_dict(flat)


def top_params(spec: ModelSpec, get: Callable[[str], np.ndarray], source: str = "checkpoint") -> Params:
  """Everything but the blocks (embeddings, final norm, LM head), from HF tensors read with `get`."""
  return _take(spec, table(spec).top, "", None, get, source)


def block_params(spec: ModelSpec, i: int, get: Callable[[str], np.ndarray], source: str = "checkpoint",
                 check_finite: bool = True) -> Params:
  """Block i's parameter tree from HF tensors read with `get` (keys as the tables name them)."""
  tab = table(spec)
  return _take(spec, tab.block, tab.block_prefix.format(i=i), spec.layers[i], get, source, check_finite)


def require_finite(arr: np.ndarray, key: str, source: str = "checkpoint") -> None:
  """Raises CheckpointError when tensor `key` holds NaN or Inf.

  A non-finite weight makes every logit after it NaN: pruning would fit to NaN statistics
  and evaluation would print `perplexity nan`, so the checkpoint is refused when read.
  """
  if arr.dtype.kind in "biu":
    return
  finite = np.isfinite(arr)
  if finite.all():
    return
  at = tuple(int(i) for i in np.argwhere(~finite)[0])
  what = "NaN" if np.isnan(arr[at]) else "Inf"
  raise CheckpointError(
      f"{source}: tensor {key} holds {what} (first at index {at}, {int((~finite).sum())} of {arr.size} values not "
      "finite); the checkpoint is damaged. Re-download or re-export it")


def untie_distinct_head(spec: ModelSpec, keys, get: Callable[[str], np.ndarray],
                        source: str = "checkpoint") -> ModelSpec:
  """`spec`, untied when its config ties the LM head to the embedding but the checkpoint
  (table keys `keys`, read with `get`) holds an `lm_head.weight` that differs from it.

  This is what transformers 5.x computes from such a directory (`PreTrainedModel.tie_weights`
  keeps both tensors when they differ, with a warning): ignoring the head would give another
  model. A head equal to the embedding (checkpoints that save both) stays tied.
  """
  embed = families.get(spec.family).embed_tensor
  if not spec.tie_embeddings or "lm_head.weight" not in keys or embed not in keys:
    return spec  # a missing embedding is reported by `check_keys`
  if np.array_equal(np.asarray(get("lm_head.weight")), np.asarray(get(embed))):
    return spec
  log.warning("%s: the config ties the LM head to the embedding (tie_word_embeddings), but the checkpoint's "
              "lm_head.weight differs from %s; using it untied, as transformers does", source, embed)
  return dataclasses.replace(spec, tie_embeddings=False)


def tensors_to_params(spec: ModelSpec, tensors: dict[str, np.ndarray], source: str = "checkpoint") -> Params:
  """HF tensors (PyTorch layout) -> jaxprune parameter tree (numpy leaves).

  Raises CheckpointError naming missing and unexpected keys.
  """
  tensors = normalize_keys(table(spec), dict(tensors))
  check_keys(spec, tensors, lambda k: not np.any(tensors[k]), source)
  blocks = tuple(block_params(spec, i, tensors.__getitem__, source) for i in range(spec.num_layers))
  return {**top_params(spec, tensors.__getitem__, source), "layers": blocks}


def top_to_tensors(spec: ModelSpec, params: Params) -> dict[str, np.ndarray]:
  """HF tensors of everything but the blocks."""
  top = traverse_util.flatten_dict({k: v for k, v in params.items() if k != "layers"})
  return {rule.hf: rule.save(*[np.asarray(top[p]) for p in rule.paths], None)
          for rule in table(spec).top if rule.when(spec, None)}


def block_to_tensors(spec: ModelSpec, i: int, block: Params) -> dict[str, np.ndarray]:
  """HF tensors of block i."""
  tab, layer = table(spec), spec.layers[i]
  blk = traverse_util.flatten_dict(block)
  return {tab.block_prefix.format(i=i) + rule.hf: rule.save(*[np.asarray(blk[p]) for p in rule.paths], layer)
          for rule in tab.block if rule.when(spec, layer)}


def params_to_tensors(spec: ModelSpec, params: Params) -> dict[str, np.ndarray]:
  """jaxprune parameter tree -> HF tensors (PyTorch layout), exactly the table's keys."""
  out = top_to_tensors(spec, params)
  for i in range(spec.num_layers):
    out.update(block_to_tensors(spec, i, params["layers"][i]))
  return out


def _abbrev(keys: list[str], n: int = 6) -> str:
  keys = sorted(keys)
  return ", ".join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")
