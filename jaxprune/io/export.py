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
  loads it; `jaxprune.torch.load_pruned` loads it without running that file.
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

import collections
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

from jaxprune.errors import ConfigError, JaxpruneError, UsageError
from jaxprune.io.atomic import atomic_dir, check_target, dump_json
from jaxprune.io.decilm import decilm_target, ship_config_code
from jaxprune.io.lazy import is_lazy
from jaxprune.io.layout import DTYPES, REMOTE_CLASSES, REMOTE_CODE, SPEC_FILE, SPEC_FORMAT, cast_finite, parse_dtype
from jaxprune.io.locate import load_tokenizer
from jaxprune.io.mapping import TABLES, block_to_tensors, top_to_tensors
from jaxprune.io.remote_code import save_tokenizer
from jaxprune.model import Model
from jaxprune.spec import ModelSpec, Params

log = logging.getLogger(__name__)

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "gpt2": "GPT2LMHeadModel"}
_LLAMA_ACTS = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}
_GPT2_ACTS = {"silu": "silu", "gelu_tanh": "gelu_new", "gelu": "gelu"}
DEFAULT_SHARD_SIZE = 5 * 10**9
# Without one of these, transformers may build an empty tokenizer from config.json alone.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")


@dataclasses.dataclass(frozen=True)
class HFTarget:
  """How a `ModelSpec` is written for transformers.

  Attributes:
    model_type: the transformers model type written to config.json.
    spec: the spec as transformers sees it: bias flags raised where zeros are padded in.
    padded: bias groups written as zeros ("qkv", "o", "mlp").
    config: the config.json dict.
    per_layer: the config carries `per_layer_config`.
    stock: stock `AutoModelForCausalLM.from_pretrained` (transformers 5.x) builds it.
  """

  model_type: str
  spec: ModelSpec
  padded: tuple[str, ...]
  config: dict
  per_layer: bool
  stock: bool


@dataclasses.dataclass(frozen=True)
class ExportInfo:
  """What `save_hf` wrote."""

  path: str
  format: str  # "hf" | "jaxprune" (no config.json: JAX-only)
  model_type: str | None
  per_layer: bool
  stock: bool  # loads with stock transformers; otherwise use jaxprune.torch.load_pruned
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
    if self.model_type == "nemotron-nas":
      return "vllm serve PATH --trust-remote-code (DeciLMForCausalLM), or jaxprune.load"
    if self.stock:
      return "transformers.AutoModelForCausalLM.from_pretrained"
    return ("transformers.AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True) or "
            "jaxprune.torch.load_pruned")


# --------------------------------------------------------------------------
# What transformers can express.


def _mode(values):
  """Most common value; ties go to the one seen first."""
  return collections.Counter(values).most_common(1)[0][0]


def _layer_key(i: int, n: int) -> str:
  """Zero-padded layer index, as transformers writes per_layer_config keys."""
  return str(i).zfill(len(str(n - 1)))


def _bias_plan(spec: ModelSpec) -> tuple[str, dict[str, bool]]:
  """The model type to write and the bias flags it implies for each group."""
  fam = spec.family
  has = {"qkv": spec.qkv_bias, "o": spec.o_bias, "mlp": spec.mlp_bias}
  if fam == "gpt2":
    return "gpt2", {"qkv": True, "o": True, "mlp": True}
  if fam == "qwen2" and not (spec.o_bias or spec.mlp_bias):
    return "qwen2", {"qkv": True, "o": False, "mlp": False}
  if fam == "mistral" and not any(has.values()):
    return "mistral", dict(has)
  if spec.sliding_window is not None:
    if fam == "mistral":
      raise ConfigError(
          f"this mistral model has biases ({', '.join(k for k, v in has.items() if v)}) that transformers' mistral "
          f"code cannot hold, and sliding_window={spec.sliding_window} that its llama code cannot express, so no "
          "transformers family computes it (prune without an intercept to keep it exportable)")
    raise ConfigError(f"a {fam} model with sliding_window={spec.sliding_window} has no transformers config; only "
                      "mistral configs (without biases) express a sliding window")
  attn = spec.qkv_bias or spec.o_bias
  return "llama", {"qkv": attn, "o": attn, "mlp": spec.mlp_bias}


def hf_problems(spec: ModelSpec) -> list[str]:
  """Why `spec` cannot be written as a transformers config (empty when it can)."""
  if spec.family not in ARCHITECTURES or spec.family not in TABLES:
    return [f"family {spec.family!r} has no transformers export; supported: {', '.join(sorted(ARCHITECTURES))}"]
  problems = []
  uneven = [i for i, l in enumerate(spec.layers) if l.canonical().kv_map is not None]
  if uneven:
    problems.append(f"layers {uneven} have uneven query-to-KV groups, which transformers configs cannot express")
  head_dims = sorted({l.head_dim for l in spec.layers})
  if len(head_dims) > 1:
    problems.append(f"layers have different head_dim {head_dims}; transformers computes one rotary table (or one "
                    "attention split) for all layers")
  if spec.family == "gpt2" and spec.hidden_size % head_dims[0]:
    problems.append(f"GPT-2 derives head_dim from n_embd/n_head, but head_dim {head_dims[0]} does not divide "
                    f"n_embd {spec.hidden_size}")
  try:
    _bias_plan(spec)
  except ConfigError as e:
    problems.append(str(e))
  return problems


def _per_layer_config(spec: ModelSpec, base: dict, groups) -> dict[str, dict]:
  """{layer key: overrides} for the layers whose sizes differ from the global config `base`.

  `groups(layer)` gives dicts of config keys that go together (a layer states
  both head counts when either differs).
  """
  out = {}
  for i, l in enumerate(spec.layers):
    over = {}
    for g in groups(l):
      if any(base[k] != v for k, v in g.items()):
        over.update(g)
    if over:
      out[_layer_key(i, spec.num_layers)] = over
  return out


def _llama_config(spec: ModelSpec, model_type: str, flags: dict[str, bool]) -> tuple[dict, bool]:
  n, D, H = spec.num_layers, spec.hidden_size, spec.layers[0].head_dim
  heads = [(l.num_heads, l.num_kv_heads) for l in spec.layers]
  N, K = _mode(heads)
  F = _mode([l.ffn_dim for l in spec.layers])
  # transformers 5.x's LlamaConfig insists that num_attention_heads divides hidden_size, although the model uses
  # the explicit head_dim. When the common head count does not, the global count is one that does (the heads of
  # width head_dim that fill hidden_size), and every layer states its own count.
  if model_type == "llama" and D % N:
    N = K = D // H if D % H == 0 else 1
  rope = spec.rope
  rope_params = {"rope_type": rope.kind, "rope_theta": float(rope.theta)}
  if rope.kind in ("linear", "llama3"):
    rope_params["factor"] = float(rope.factor)
  if rope.kind == "llama3":
    rope_params.update(low_freq_factor=float(rope.low_freq_factor), high_freq_factor=float(rope.high_freq_factor),
                       original_max_position_embeddings=int(rope.original_max_positions))
  cfg = {
      "architectures": [ARCHITECTURES[model_type]],
      "model_type": model_type,
      "vocab_size": spec.vocab_size,
      "hidden_size": D,
      "num_hidden_layers": n,
      "num_attention_heads": N,
      "num_key_value_heads": K,
      "head_dim": H,
      "intermediate_size": F,
      "hidden_act": _LLAMA_ACTS[spec.act],
      "max_position_embeddings": spec.max_positions,
      "rms_norm_eps": float(spec.norm_eps),
      "rope_parameters": rope_params,
      "tie_word_embeddings": spec.tie_embeddings,
      "bos_token_id": spec.bos_token_id,
      "eos_token_id": spec.eos_token_id,
  }
  if model_type == "llama":
    cfg.update(attention_bias=flags["qkv"], mlp_bias=flags["mlp"])
  elif model_type == "mistral":
    cfg["sliding_window"] = spec.sliding_window
  elif model_type == "qwen2":
    cfg.update(use_sliding_window=False, sliding_window=None)
  per_layer = _per_layer_config(spec, cfg, lambda l: (
      {"num_attention_heads": l.num_heads, "num_key_value_heads": l.num_kv_heads}, {"intermediate_size": l.ffn_dim}))
  if per_layer:
    cfg["per_layer_config"] = per_layer
    if model_type == "llama" and any("num_attention_heads" in v for v in per_layer.values()):
      # LlamaConfig's validator reads the global num_attention_heads, which a heterogeneous config refuses to
      # give unless this documented switch is on; without it AutoConfig (hence AutoTokenizer) cannot read the
      # directory. Building the model from the global sizes still fails loudly (a size mismatch), as it should.
      cfg["allow_global_per_layer_attribute_access"] = True
  return cfg, not per_layer


def _gpt2_config(spec: ModelSpec) -> tuple[dict, bool]:
  n = spec.num_layers
  H = spec.layers[0].head_dim
  N = spec.hidden_size // H  # GPT-2 splits n_embd into n_head heads: keep the original head count
  F = _mode([l.ffn_dim for l in spec.layers])
  cfg = {
      "architectures": [ARCHITECTURES["gpt2"]],
      "model_type": "gpt2",
      "vocab_size": spec.vocab_size,
      "n_embd": spec.hidden_size,
      "n_layer": n,
      "n_head": N,
      "n_inner": F,
      "n_positions": spec.max_positions,
      "layer_norm_epsilon": float(spec.norm_eps),
      "activation_function": _GPT2_ACTS[spec.act],
      "tie_word_embeddings": spec.tie_embeddings,
      "bos_token_id": spec.bos_token_id,
      "eos_token_id": spec.eos_token_id,
  }
  per_layer = _per_layer_config(spec, cfg, lambda l: ({"n_head": l.num_heads}, {"n_inner": l.ffn_dim}))
  if per_layer:
    cfg["per_layer_config"] = per_layer
  return cfg, not per_layer


def hf_target(spec: ModelSpec) -> HFTarget:
  """The transformers form of `spec`; raises ConfigError when there is none."""
  problems = hf_problems(spec)
  if problems:
    raise ConfigError(
        "this model cannot be written as a Hugging Face checkpoint: " + "; ".join(problems) +
        ". Export it for JAX only with jax_only=True (CLI: --format jaxprune or --format orbax)")
  model_type, flags = _bias_plan(spec)
  padded = tuple(g for g, have in (("qkv", spec.qkv_bias), ("o", spec.o_bias), ("mlp", spec.mlp_bias))
                 if flags[g] and not have)
  hf_spec = dataclasses.replace(spec, qkv_bias=flags["qkv"], o_bias=flags["o"], mlp_bias=flags["mlp"])
  if model_type == "gpt2":
    cfg, stock = _gpt2_config(hf_spec)
  else:
    cfg, stock = _llama_config(hf_spec, model_type, flags)
  return HFTarget(model_type, hf_spec, padded, cfg, "per_layer_config" in cfg, stock)


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
  if spec.family not in TABLES:
    raise ConfigError(f"family {spec.family!r} cannot be exported; supported: {', '.join(sorted(TABLES))}")
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
      if target.per_layer:
        # Per-layer sizes that transformers' modeling code does not apply: ship the classes
        # that do, so `from_pretrained(..., trust_remote_code=True)` builds every layer at its size.
        shutil.copyfile(os.path.join(os.path.dirname(__file__), "modeling_per_layer.py"),
                        os.path.join(tmp, REMOTE_CODE + ".py"))
        files.append(REMOTE_CODE + ".py")
        cfg["auto_map"] = {"AutoModelForCausalLM": f"{REMOTE_CODE}.{REMOTE_CLASSES[target.model_type]}"}
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
