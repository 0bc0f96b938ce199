"""Export to Hugging Face directories that PyTorch loads, dense or pruned.

`save_hf` writes config.json, safetensors weights, generation_config.json, the
tokenizer and `jaxprune.json` (the exact `ModelSpec`) into a directory,
atomically. Two config forms:

* plain: every layer has the same sizes, so the config is a standard one
  (reduced heads, explicit head_dim, reduced intermediate_size) that stock
  `transformers.AutoModelForCausalLM.from_pretrained` loads;
* per-layer: layers differ, so the config carries transformers' standard
  `per_layer_config` (layer index -> overridden sizes), which transformers'
  config classes read (so AutoConfig and AutoTokenizer work) but whose sizes
  transformers 5.x's modeling code does not apply. The export ships
  modeling_jaxprune.py (`modeling_per_layer.py`: the family's own transformers
  class, with every layer rebuilt at its size) and names it in `auto_map`, so
  stock `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`
  loads it; `jaxprune.pytorch.load_pruned` loads it without running that file.
  GPT-2 with pruned heads always takes this form (GPT-2 derives head_dim from
  n_embd/n_head), and so does LLaMA when the head count does not divide
  hidden_size (LlamaConfig's validator insists on it).

Some models a transformers config cannot say at all (uneven GQA groups,
per-layer head_dim); `save_hf` refuses them unless `jax_only=True`, which
writes the same files without config.json, for JAX use only.

Biases a family cannot express are handled by choosing a family that can:
a Qwen2 or Mistral model that gained an o- or MLP bias (reconstruction with an
intercept) is written as `llama` with `attention_bias`/`mlp_bias`, and biases
the target requires but the model lacks are written as zeros (`padded_params`
counts them; jaxprune's import drops all-zero extra biases, so the round trip
is exact).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import re
import shutil
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import families
from jaxprune.errors import ConfigError, JaxpruneError, UsageError
from jaxprune.io.atomic import atomic_dir, check_target, dump_json
from jaxprune.io.decilm import MODEL_TYPE as DECILM_MODEL_TYPE, decilm_target, ship_config_code
from jaxprune.io.hf_target import HFTarget, hf_problems, hf_target
from jaxprune.io.lazy import is_lazy
from jaxprune.io.layout import DTYPES, REMOTE_CODE, SPEC_FILE, SPEC_FORMAT, cast_finite, parse_dtype
from jaxprune.io.locate import load_tokenizer
from jaxprune.io.mapping import block_to_tensors, top_to_tensors
from jaxprune.io.remote_code import save_tokenizer
from jaxprune.model import Model
from jaxprune.spec import ModelSpec, Params

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 5 * 10**9
# Without one of these, transformers may build an empty tokenizer from config.json alone.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")


@dataclasses.dataclass(frozen=True)
class ExportInfo:
  """What `save_hf` wrote."""

  path: str
  format: str  # "hf" | "jaxprune" (no config.json: JAX-only)
  model_type: str | None
  per_layer: bool
  stock: bool  # loads with stock transformers; otherwise use jaxprune.pytorch.load_pruned
  dtype: str
  num_params: int  # parameters of the JAX model
  exported_params: int  # parameters in the written weights (a tied embedding counted once)
  padded_params: int  # zero biases added because the target family requires them
  files: tuple[str, ...]
  tokenizer: bool

  @property
  def loader(self) -> str:
    if self.format != "hf":
      return "jaxprune.load"
    if self.model_type == DECILM_MODEL_TYPE:
      return "vllm serve PATH --trust-remote-code (DeciLMForCausalLM), or jaxprune.load"
    if self.stock:
      return "transformers.AutoModelForCausalLM.from_pretrained"
    return ("transformers.AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True) or "
            "jaxprune.pytorch.load_pruned")


# --------------------------------------------------------------------------
# Zero biases a target family requires.


_BIAS_LEAVES = {
    "qkv": (("attn", "q"), ("attn", "k"), ("attn", "v")),
    "o": (("attn", "o"),),
    "mlp": (("mlp", "gate"), ("mlp", "up"), ("mlp", "down")),
}


def pad_block(blk: Params, groups) -> Params:
  """Block `blk` with zero biases added to the projections of bias `groups` that lack them."""
  blk = {k: dict(v) if isinstance(v, dict) else v for k, v in blk.items()}
  for g in groups:
    for mod, proj in _BIAS_LEAVES[g]:
      p = blk[mod].get(proj)
      if p is None or "bias" in p:
        continue
      k = np.asarray(p["kernel"])
      # Input projections add a bias per output unit ([n, H] or [F]); o and down per model dimension [D].
      shape = k.shape[-1:] if proj in ("o", "down") else k.shape[1:]
      blk[mod][proj] = {**p, "bias": np.zeros(shape, k.dtype)}
  return blk


def pad_biases(params: Params, groups) -> Params:
  """`params` with zero biases added to the projections of bias `groups` that lack them."""
  return {**params, "layers": tuple(pad_block(blk, groups) for blk in params["layers"])}


# --------------------------------------------------------------------------
# Writing.


def parse_size(size) -> int:
  """Bytes for an int or a string such as '5GB' or '500MB'."""
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.IGNORECASE)
  if not m:
    raise UsageError(f"shard size {size!r} is not a size; write e.g. 5GB, 500MB or a number of bytes")
  unit = (m.group(2) or "B").upper()
  mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
  return int(float(m.group(1)) * mult)


def write_safetensors(tensors: dict[str, np.ndarray] | Iterable[dict[str, np.ndarray]], out_dir: str,
                      max_shard_bytes: int = DEFAULT_SHARD_SIZE) -> list[str]:
  """Writes `tensors` as model.safetensors, or as shards plus model.safetensors.index.json.

  `tensors` is a dict, or an iterable of dicts (pieces, e.g. one block each) that are
  consumed as they come: only the shard being filled is held, and a piece is never split.
  """
  from safetensors.numpy import save_file

  pieces = ({k: v} for k, v in tensors.items()) if isinstance(tensors, dict) else tensors
  meta = {"format": "pt"}  # transformers expects PyTorch-layout safetensors to say so
  written: list[tuple[str, list[str]]] = []  # (file, keys), numbered once the count is known
  shard: dict[str, np.ndarray] = {}
  size = total = 0

  def flush():
    name = f"shard-{len(written):05d}.partial"
    save_file(shard, os.path.join(out_dir, name), metadata=meta)
    written.append((name, list(shard)))

  for piece in pieces:
    nbytes = sum(v.nbytes for v in piece.values())
    if shard and size + nbytes > max_shard_bytes:
      flush()
      shard, size = {}, 0
    shard.update({k: np.ascontiguousarray(v) for k, v in piece.items()})
    size += nbytes
    total += nbytes
  if shard or not written:
    flush()
  if len(written) == 1:
    os.replace(os.path.join(out_dir, written[0][0]), os.path.join(out_dir, "model.safetensors"))
    return ["model.safetensors"]
  names, weight_map = [], {}
  for i, (tmp, keys) in enumerate(written):
    name = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
    os.replace(os.path.join(out_dir, tmp), os.path.join(out_dir, name))
    names.append(name)
    weight_map.update({k: name for k in keys})
  index = {"metadata": {"total_size": int(total)}, "weight_map": weight_map}
  dump_json(os.path.join(out_dir, "model.safetensors.index.json"), index)
  return names + ["model.safetensors.index.json"]


def resolve_tokenizer(model: Model, tokenizer):
  """The tokenizer to save: the given one, the model source's, or None (with a warning)."""
  if tokenizer is False:
    return None
  if tokenizer is not None:
    return tokenizer
  if model.source is None:
    log.warning("the model has no source path to take a tokenizer from; the export has no tokenizer files "
                "(pass tokenizer= to add one)")
    return None
  if os.path.isdir(model.source) and not any(os.path.exists(os.path.join(model.source, f)) for f in _TOKENIZER_FILES):
    log.warning("%s has no tokenizer files; the export has none (pass tokenizer= to add one)", model.source)
    return None
  try:
    return load_tokenizer(model.source)
  except JaxpruneError as e:
    log.warning("no tokenizer written: %s", str(e).splitlines()[0])
    return None


def save_hf(model: Model, out: str, *, dtype=None, force: bool = False, tokenizer=None, jax_only: bool = False,
            max_shard_size=DEFAULT_SHARD_SIZE, progress: Callable[[int], None] | None = None,
            decilm: bool = False) -> ExportInfo:
  """Writes `model` as a Hugging Face directory at `out`, atomically.

  Args:
    model: any jaxprune model, dense or pruned.
    out: the output directory; it must not exist unless `force`.
    dtype: 'float32', 'bfloat16' or 'float16' (default: the parameters' dtype).
    force: replace an existing `out` (only once the new one is complete).
    tokenizer: a transformers tokenizer to save; None takes the one of
      `model.source`; False writes none.
    jax_only: write weights and jaxprune.json but no config.json, for models
      transformers cannot express (uneven GQA groups); `jaxprune.load` reads it.
    max_shard_size: bytes (or '5GB') per safetensors file.
    progress: called with 1 as each of the num_layers + 1 pieces (the embeddings and head,
      then each block) is converted for writing.
    decilm: write the DeciLM (`nemotron-nas`) config that vLLM and TensorRT-LLM load
      (`jaxprune.io.decilm`) instead of a transformers one; the weights are the same.

  Returns:
    An `ExportInfo` saying which loader reads the result.

  Raises:
    ConfigError: the model cannot be written for transformers (and not jax_only), or as
      DeciLM (`decilm`).
    UsageError: `out` exists and `force` is False; nothing is changed.
  """
  import transformers

  spec = model.spec
  final = check_target(out, force)  # fail before any work when the output exists
  if spec.family not in families.exportable():
    raise ConfigError(f"family {spec.family!r} cannot be exported; supported: {', '.join(families.exportable())}")
  if dtype is None:
    dtypes = sorted({jnp.dtype(x.dtype).name for x in jax.tree.leaves(model.params)})
    dtype = dtypes[0] if len(dtypes) == 1 else "float32"
  dtype_name, np_dtype = parse_dtype(dtype)
  shard_bytes = parse_size(max_shard_size)
  target = None if jax_only else decilm_target(spec) if decilm else hf_target(spec)
  padded, tensors_spec = ((), spec) if jax_only else (target.padded, target.spec)
  exported = 0

  def pieces():
    # The embeddings and head, then one piece per block, each read, padded and cast when
    # the writer reaches it: a model streamed from disk is never held whole.
    nonlocal exported
    blocks = (block_to_tensors(tensors_spec, i, pad_block(model.params["layers"][i], padded))
              for i in range(spec.num_layers))
    for piece in itertools.chain([top_to_tensors(tensors_spec, model.params)], blocks):
      piece = {k: cast_finite(v, np_dtype, k) for k, v in piece.items()}
      exported += sum(v.size for v in piece.values())
      if progress is not None:
        progress(1)
      yield piece

  tok = resolve_tokenizer(model, tokenizer)

  with atomic_dir(final, force) as tmp:
    # Eagerly loaded models are packed tensor by tensor, as before; streamed ones block by block.
    files = write_safetensors(pieces() if is_lazy(model.params) else {k: v for p in pieces() for k, v in p.items()}, tmp,
                              shard_bytes)
    dump_json(os.path.join(tmp, SPEC_FILE), {"format": SPEC_FORMAT, "spec": spec.to_json()})
    files.append(SPEC_FILE)
    if target is not None:
      cfg = {**target.config, "dtype": dtype_name, "transformers_version": transformers.__version__}
      if target.remote_code:
        # Per-layer sizes (or MLP biases) that transformers' modeling code does not apply: ship the
        # classes that do, so `from_pretrained(..., trust_remote_code=True)` builds every layer as written.
        shutil.copyfile(os.path.join(os.path.dirname(__file__), "modeling_per_layer.py"),
                        os.path.join(tmp, REMOTE_CODE + ".py"))
        files.append(REMOTE_CODE + ".py")
        remote = families.for_model_type(target.model_type).remote_class
        cfg["auto_map"] = {"AutoModelForCausalLM": f"{REMOTE_CODE}.{remote}"}
      if decilm:
        files.append(ship_config_code(tmp))
      dump_json(os.path.join(tmp, "config.json"), cfg)
      files.append("config.json")
    transformers.GenerationConfig(bos_token_id=spec.bos_token_id, eos_token_id=spec.eos_token_id).save_pretrained(tmp)
    files.append("generation_config.json")
    if tok is not None:
      save_tokenizer(tok, tmp)
  info = ExportInfo(
      path=final, format="jaxprune" if jax_only else "hf", model_type=None if target is None else target.model_type,
      per_layer=bool(target and target.per_layer), stock=bool(target and target.stock), dtype=dtype_name,
      num_params=model.num_params, exported_params=exported,
      padded_params=exported - model.num_params, files=tuple(files), tokenizer=tok is not None)
  log.info("wrote %s (%s, %d parameters; load with %s)", final, info.format, exported, info.loader)
  return info


__all__ = ["DTYPES", "ExportInfo", "HFTarget", "hf_problems", "hf_target", "pad_biases", "save_hf",
           "write_safetensors"]
