"""Hugging Face key <-> jaxprune parameter tables, one per family, used both ways.

A `Rule` maps one Hugging Face tensor (a PyTorch-layout array) to one or more
jaxprune leaves and back. Import consumes keys through the table and refuses
anything it does not know; export writes exactly the table's keys, so the two
directions cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Callable

import numpy as np
from flax import traverse_util

from jaxprune.errors import CheckpointError, ShapeError
from jaxprune.spec import LayerSpec, ModelSpec, Params

Path = tuple[str, ...]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Rule:
  """One HF tensor <-> leaves at `paths` (relative to a block, or to the model).

  `load(hf_array, layer) -> tuple of leaves`, `save(*leaves, layer) -> hf_array`.
  `when(spec, layer)` says whether the tensor exists for this model.
  """

  hf: str
  paths: tuple[Path, ...]
  load: Callable
  save: Callable
  when: Callable[[ModelSpec, LayerSpec | None], bool] = lambda spec, layer: True


def _ident():
  return dict(load=lambda w, l: (w,), save=lambda w, l: w)


def _linear():
  """PyTorch `nn.Linear.weight` [out, in] <-> kernel [in, out]."""
  return dict(load=lambda w, l: (w.T,), save=lambda k, l: k.T)


def _heads_in(n: str):
  """q/k/v weight [n*H, D] <-> kernel [D, n, H]; n is 'N' or 'K'."""

  def load(w, l):
    n_ = l.num_heads if n == "N" else l.num_kv_heads
    return (w.reshape(n_, l.head_dim, w.shape[1]).transpose(2, 0, 1),)

  def save(k, l):
    return k.transpose(1, 2, 0).reshape(-1, k.shape[0])

  return dict(load=load, save=save)


def _heads_bias(n: str):
  """q/k/v bias [n*H] <-> [n, H]."""

  def load(b, l):
    n_ = l.num_heads if n == "N" else l.num_kv_heads
    return (b.reshape(n_, l.head_dim),)

  return dict(load=load, save=lambda b, l: b.reshape(-1))


def _heads_out(conv1d: bool):
  """o weight [D, N*H] (Linear) or [N*H, D] (GPT-2 Conv1D) <-> kernel [N, H, D]."""

  def load(w, l):
    w = w if conv1d else w.T
    return (w.reshape(l.num_heads, l.head_dim, w.shape[1]),)

  def save(k, l):
    w = k.reshape(-1, k.shape[-1])
    return w if conv1d else w.T

  return dict(load=load, save=save)


def _gpt2_qkv_weight():
  """GPT-2 fused c_attn [D, 3*N*H] (Conv1D layout) <-> q, k, v kernels [D, N, H]."""

  def load(w, l):
    D = w.shape[0]
    q, k, v = np.split(w, 3, axis=1)
    return tuple(x.reshape(D, l.num_heads, l.head_dim) for x in (q, k, v))

  def save(q, k, v, l):
    return np.concatenate([x.reshape(x.shape[0], -1) for x in (q, k, v)], axis=1)

  return dict(load=load, save=save)


def _gpt2_qkv_bias():

  def load(b, l):
    return tuple(x.reshape(l.num_heads, l.head_dim) for x in np.split(b, 3))

  def save(q, k, v, l):
    return np.concatenate([x.reshape(-1) for x in (q, k, v)])

  return dict(load=load, save=save)


def _qkv_bias(spec, layer):
  return spec.qkv_bias


def _o_bias(spec, layer):
  return spec.o_bias


def _mlp_bias(spec, layer):
  return spec.mlp_bias


def _untied(spec, layer):
  return not spec.tie_embeddings


LLAMA_BLOCK = (
    Rule("input_layernorm.weight", (("attn_norm", "scale"),), **_ident()),
    Rule("post_attention_layernorm.weight", (("mlp_norm", "scale"),), **_ident()),
    Rule("self_attn.q_proj.weight", (("attn", "q", "kernel"),), **_heads_in("N")),
    Rule("self_attn.k_proj.weight", (("attn", "k", "kernel"),), **_heads_in("K")),
    Rule("self_attn.v_proj.weight", (("attn", "v", "kernel"),), **_heads_in("K")),
    Rule("self_attn.o_proj.weight", (("attn", "o", "kernel"),), **_heads_out(conv1d=False)),
    Rule("self_attn.q_proj.bias", (("attn", "q", "bias"),), **_heads_bias("N"), when=_qkv_bias),
    Rule("self_attn.k_proj.bias", (("attn", "k", "bias"),), **_heads_bias("K"), when=_qkv_bias),
    Rule("self_attn.v_proj.bias", (("attn", "v", "bias"),), **_heads_bias("K"), when=_qkv_bias),
    Rule("self_attn.o_proj.bias", (("attn", "o", "bias"),), **_ident(), when=_o_bias),
    Rule("mlp.gate_proj.weight", (("mlp", "gate", "kernel"),), **_linear()),
    Rule("mlp.up_proj.weight", (("mlp", "up", "kernel"),), **_linear()),
    Rule("mlp.down_proj.weight", (("mlp", "down", "kernel"),), **_linear()),
    Rule("mlp.gate_proj.bias", (("mlp", "gate", "bias"),), **_ident(), when=_mlp_bias),
    Rule("mlp.up_proj.bias", (("mlp", "up", "bias"),), **_ident(), when=_mlp_bias),
    Rule("mlp.down_proj.bias", (("mlp", "down", "bias"),), **_ident(), when=_mlp_bias),
)

LLAMA_TOP = (
    Rule("model.embed_tokens.weight", (("embed", "embedding"),), **_ident()),
    Rule("model.norm.weight", (("final_norm", "scale"),), **_ident()),
    Rule("lm_head.weight", (("lm_head", "kernel"),), **_linear(), when=_untied),
)

GPT2_BLOCK = (
    Rule("ln_1.weight", (("attn_norm", "scale"),), **_ident()),
    Rule("ln_1.bias", (("attn_norm", "bias"),), **_ident()),
    Rule("ln_2.weight", (("mlp_norm", "scale"),), **_ident()),
    Rule("ln_2.bias", (("mlp_norm", "bias"),), **_ident()),
    Rule("attn.c_attn.weight", (("attn", "q", "kernel"), ("attn", "k", "kernel"), ("attn", "v", "kernel")),
         **_gpt2_qkv_weight()),
    Rule("attn.c_attn.bias", (("attn", "q", "bias"), ("attn", "k", "bias"), ("attn", "v", "bias")),
         **_gpt2_qkv_bias()),
    Rule("attn.c_proj.weight", (("attn", "o", "kernel"),), **_heads_out(conv1d=True)),
    Rule("attn.c_proj.bias", (("attn", "o", "bias"),), **_ident()),
    # GPT-2's MLP is Conv1D: its weights already have the kernel layout.
    Rule("mlp.c_fc.weight", (("mlp", "up", "kernel"),), **_ident()),
    Rule("mlp.c_fc.bias", (("mlp", "up", "bias"),), **_ident()),
    Rule("mlp.c_proj.weight", (("mlp", "down", "kernel"),), **_ident()),
    Rule("mlp.c_proj.bias", (("mlp", "down", "bias"),), **_ident()),
)

GPT2_TOP = (
    Rule("transformer.wte.weight", (("embed", "embedding"),), **_ident()),
    Rule("transformer.wpe.weight", (("pos_embed", "embedding"),), **_ident()),
    Rule("transformer.ln_f.weight", (("final_norm", "scale"),), **_ident()),
    Rule("transformer.ln_f.bias", (("final_norm", "bias"),), **_ident()),
    Rule("lm_head.weight", (("lm_head", "kernel"),), **_linear(), when=_untied),
)


@dataclasses.dataclass(frozen=True)
class FamilyTable:
  top: tuple[Rule, ...]
  block: tuple[Rule, ...]
  block_prefix: str  # HF prefix of block i, with {i}
  base_prefix: str  # prefix that base-model checkpoints (no LM head) omit
  ignored: tuple[str, ...]  # regexes of buffers that checkpoints may carry


_LLAMA = FamilyTable(LLAMA_TOP, LLAMA_BLOCK, "model.layers.{i}.", "model.",
                     ignored=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",))
_GPT2 = FamilyTable(GPT2_TOP, GPT2_BLOCK, "transformer.h.{i}.", "transformer.",
                    ignored=(r"transformer\.h\.\d+\.attn\.(masked_)?bias",))

TABLES = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "gpt2": _GPT2}


def key_renames(table: FamilyTable, keys) -> dict[str, str]:
  """Checkpoint key -> the key the tables use: checkpoints saved without the LM-head wrapper
  lack the base-model prefix."""
  base = table.base_prefix
  if any(k.startswith(base) for k in keys):
    return {k: k for k in keys}
  return {k: (k if k.startswith("lm_head.") else base + k) for k in keys}


def normalize_keys(table: FamilyTable, tensors: dict) -> dict:
  """`tensors` under the keys the tables use (`key_renames`)."""
  names = key_renames(table, tensors)
  return {names[k]: v for k, v in tensors.items()}


def check_keys(spec: ModelSpec, keys, is_zero: Callable[[str], bool], source: str = "checkpoint") -> None:
  """Raises CheckpointError naming the missing and unexpected tensors among `keys` (table keys).

  `is_zero(key)` says whether a tensor is all zeros: such biases that the spec lacks change
  nothing (exports write them where the target family requires a bias, jaxprune.io.export),
  so they are accepted.
  """
  table = TABLES[spec.family]
  keys = set(keys)
  want = [r.hf for r in table.top if r.when(spec, None)]
  want += [table.block_prefix.format(i=i) + r.hf for i, layer in enumerate(spec.layers)
           for r in table.block if r.when(spec, layer)]
  missing = [k for k in want if k not in keys]
  ignored = [re.compile(p) for p in table.ignored]
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
  return _take(spec, TABLES[spec.family].top, "", None, get, source)


def block_params(spec: ModelSpec, i: int, get: Callable[[str], np.ndarray], source: str = "checkpoint",
                 check_finite: bool = True) -> Params:
  """Block i's parameter tree from HF tensors read with `get` (keys as the tables name them)."""
  table = TABLES[spec.family]
  return _take(spec, table.block, table.block_prefix.format(i=i), spec.layers[i], get, source, check_finite)


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
  embed = next(r.hf for r in TABLES[spec.family].top if r.paths == (("embed", "embedding"),))
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
  tensors = normalize_keys(TABLES[spec.family], dict(tensors))
  check_keys(spec, tensors, lambda k: not np.any(tensors[k]), source)
  blocks = tuple(block_params(spec, i, tensors.__getitem__, source) for i in range(spec.num_layers))
  return {**top_params(spec, tensors.__getitem__, source), "layers": blocks}


def top_to_tensors(spec: ModelSpec, params: Params) -> dict[str, np.ndarray]:
  """HF tensors of everything but the blocks."""
  top = traverse_util.flatten_dict({k: v for k, v in params.items() if k != "layers"})
  return {rule.hf: rule.save(*[np.asarray(top[p]) for p in rule.paths], None)
          for rule in TABLES[spec.family].top if rule.when(spec, None)}


def block_to_tensors(spec: ModelSpec, i: int, block: Params) -> dict[str, np.ndarray]:
  """HF tensors of block i."""
  table, layer = TABLES[spec.family], spec.layers[i]
  blk = traverse_util.flatten_dict(block)
  return {table.block_prefix.format(i=i) + rule.hf: rule.save(*[np.asarray(blk[p]) for p in rule.paths], layer)
          for rule in table.block if rule.when(spec, layer)}


def params_to_tensors(spec: ModelSpec, params: Params) -> dict[str, np.ndarray]:
  """jaxprune parameter tree -> HF tensors (PyTorch layout), exactly the table's keys."""
  out = top_to_tensors(spec, params)
  for i in range(spec.num_layers):
    out.update(block_to_tensors(spec, i, params["layers"][i]))
  return out


def _abbrev(keys: list[str], n: int = 6) -> str:
  keys = sorted(keys)
  return ", ".join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")
