"""Export to GGUF for llama.cpp, dense or pruned (per-layer widths included).

Which llama.cpp architecture a model becomes:

* every layer the same shape: the family's own (`llama` for LLaMA and Mistral;
  `qwen3`, `gemma3`; `qwen2` for Qwen2 while its attention still spans
  hidden_size and it has no o- or MLP bias, since llama.cpp's qwen2 has neither;
  otherwise `llama`, which computes the same function once Q/K are permuted as
  below);
* per-layer widths: `deci` (llama.cpp's `src/models/deci.cpp`, written for
  NVIDIA's Nemotron-NAS), which reads `head_count`, `head_count_kv` and
  `feed_forward_length` as per-layer arrays and optional q/k/v, attn_output and
  ffn gate/up/down biases, so the intercepts of reconstruction are kept. It
  computes LLaMA's block only: llama.cpp's qwen3 and gemma3 read those arrays
  but build every layer with layer 0's widths, so their per-layer models are
  refused (`Family.gguf_deci`).

llama.cpp's `llama` and `deci` rotate adjacent pairs (its NORM RoPE) where
Hugging Face rotates halves, so the rows of Q and K (weights and biases) are
permuted within each head, the inverse of `jaxprune.io.gguf.reverse_permute`;
`qwen2`, `qwen3` and `gemma3` use NEOX RoPE, the Hugging Face order, and are
written unpermuted. Gemma's norm weights are stored with its offset added, as
llama.cpp's converter stores them (the reader subtracts it). What only one
architecture reads (Gemma's window, its pattern, the sliding layers' RoPE base,
the logit soft-cap) comes from the family (`Family.gguf_meta`).
All-zero biases (the siblings an intercept's bias flag implies) are left out:
llama.cpp treats a missing bias as zero, and skipping it saves an add per token.

What llama.cpp cannot compute is refused (`gguf_problems`, with the family's
own `Family.gguf_checks`): uneven query-to-KV groups, per-layer head_dim,
activations other than the architecture's, GPT-2, and per family: sliding
windows (llama), o/MLP biases (qwen3, gemma3), a query scale other than
llama.cpp's (gemma3). Norms and biases stay float32 at every tensor type, as in
llama.cpp's converter; at q8_0 a matrix whose rows do not fill 32-wide blocks is
written as f16.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from jaxprune import families
from jaxprune.errors import ConfigError, UsageError
from jaxprune.io.atomic import check_target, write_file
from jaxprune.io.gguf_vocab import tokenizer_fields
from jaxprune.io.layout import cast_finite
from jaxprune.io.mapping import block_to_tensors, top_to_tensors
from jaxprune.model import Model
from jaxprune.spec import ModelSpec

log = logging.getLogger(__name__)

TENSOR_TYPES = ("f32", "f16", "bf16", "q8_0")
# jaxprune's dtype names (`--dtype` of the other formats) mean the same GGUF tensor types.
DTYPE_ALIASES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
# The MLP biases an intercept adds, beyond the names the reader knows (llama.cpp's llama and deci read them; the
# models the reader loads never have them).
_MLP_BIASES = {f"mlp.{p}_proj.bias": f"ffn_{p}.bias" for p in ("gate", "up", "down")}
_Q8_BLOCK = 32
_Q8_LARGEST = 127 * float(np.finfo(np.float16).max)


@dataclasses.dataclass(frozen=True)
class GGUFInfo:
  """What `save_gguf` wrote."""

  path: str
  architecture: str  # llama.cpp's: llama | qwen2 | qwen3 | gemma3 | deci
  per_layer: bool
  tensor_type: str  # f32 | f16 | bf16 | q8_0 (the matrices; norms and biases are f32)
  num_params: int  # parameters of the JAX model
  exported_params: int  # parameters in the file (zero biases left out)
  tensors: int
  f16_fallback: tuple[str, ...]  # q8_0 matrices written as f16 (rows not a multiple of 32)
  tokenizer: str  # where the tokenizer metadata came from, or 'none'


def tensor_type(dtype: str | None) -> str:
  """The GGUF tensor type for a `--dtype` value (None: f32)."""
  name = dtype or "f32"
  name = DTYPE_ALIASES.get(name, name)
  if name not in TENSOR_TYPES:
    raise UsageError(f"GGUF tensor type {dtype!r} is not supported; choose one of {', '.join(TENSOR_TYPES)} "
                     f"(or {', '.join(DTYPE_ALIASES)})")
  return name


# llama.cpp architectures jaxprune writes for the families' uniform models.
_WRITTEN_ARCHS = ("llama", "qwen2", "qwen3", "gemma3")


def gguf_problems(spec: ModelSpec) -> list[str]:
  """Why llama.cpp cannot run `spec` as jaxprune writes it (empty when it can)."""
  if spec.fam.gguf_arch not in _WRITTEN_ARCHS:
    writable = sorted(f.name for f in families.REGISTRY.values() if f.gguf_arch in _WRITTEN_ARCHS)
    return [f"family {spec.family!r} has no GGUF export; supported: {', '.join(writable)}"]
  fam = spec.fam
  problems = []
  widths = sorted({(l.num_heads, l.num_kv_heads, l.ffn_dim) for l in spec.layers})
  if len(widths) > 1 and not fam.gguf_deci:
    problems.append(f"layers differ in width ((heads, KV heads, MLP channels): {widths}); llama.cpp's "
                    f"{fam.gguf_arch} builds every layer with layer 0's, so prune with --allocation uniform "
                    "(or --preset recommended-uniform)")
  uneven = [i for i, l in enumerate(spec.layers) if l.canonical().kv_map is not None]
  if uneven:
    problems.append(f"layers {uneven} have uneven query-to-KV groups; llama.cpp shares each KV head among a "
                    "contiguous, equal group of query heads (prune without --free-groups)")
  head_dims = sorted({l.head_dim for l in spec.layers})
  if len(head_dims) > 1:
    problems.append(f"layers have different head_dim {head_dims}; llama.cpp has one head size per model")
  if spec.act != fam.act:
    problems.append(f"activation {spec.act!r}: llama.cpp's {fam.gguf_arch} gates with {fam.act}")
  if spec.attn_softcap:
    problems.append(f"attention-score soft-capping ({spec.attn_softcap:g}): llama.cpp's {fam.gguf_arch} has none")
  if spec.rope.kind not in ("default", "linear"):
    problems.append(f"RoPE scaling {spec.rope.kind!r} is not written by jaxprune's GGUF export (default and linear "
                    "are); export --format hf and convert it with llama.cpp's convert_hf_to_gguf.py")
  return problems + fam.gguf_checks(spec)


def architecture(spec: ModelSpec) -> str:
  """llama.cpp's architecture for `spec` (see the module docstring)."""
  if not spec.uniform:
    return "deci"
  arch = spec.fam.gguf_arch
  layer = spec.layers[0]
  if arch == "qwen2" and (layer.num_heads * layer.head_dim != spec.hidden_size or spec.o_bias or spec.mlp_bias):
    return "llama"
  return arch


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """Hugging Face's Q/K rows -> llama.cpp's: per head, (2, H/2) -> (H/2, 2); inverse of `reverse_permute`."""
  half = w.shape[0] // n_head // 2
  return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@functools.cache
def _gguf_names(family: str) -> dict[str, str]:
  """Hugging Face name -> GGUF name, for the top tensors and (unprefixed) block tensors of `family`."""
  fam = families.get(family)
  return {**{hf: g for g, hf in fam.gguf_top.items()}, **{hf: g for g, hf in fam.gguf_block.items()}, **_MLP_BIASES}


def gguf_name(hf: str, family: str = "llama") -> str:
  """GGUF name of a Hugging Face key (`model.layers.{i}.x` -> `blk.{i}.y`) of a model of `family`."""
  names = _gguf_names(family)
  if hf in names:
    return names[hf]
  _, _, i, rest = hf.split(".", 3)
  return f"blk.{i}.{names[rest]}"


def _stored(spec: ModelSpec, name: str, w: np.ndarray) -> np.ndarray:
  """A tensor as llama.cpp's converter stores it: Gemma's norms with their offset added, in float32
  (what `jaxprune.io.gguf` subtracts; the sum is the (offset + w) llama.cpp and jaxprune scale by)."""
  w = np.ascontiguousarray(w, np.float32)  # transposed views: the quantizers and the writer want rows
  offset = spec.fam.norm_offset
  return w + np.float32(offset) if offset and name.endswith("norm.weight") else w


def rope_permuted(spec: ModelSpec, arch: str) -> bool:
  """Whether llama.cpp's `arch` wants the rows of Q and K of `spec` permuted (see the module docstring):
  `llama` and `deci` do, the NEOX architectures a family has as its own do not."""
  return arch != spec.fam.gguf_arch or spec.fam.gguf_rope_permuted


def _block_tensors(spec: ModelSpec, i: int, block, permute: bool):
  """(GGUF name, array) of block i, Q/K permuted when `permute`, zero biases left out."""
  layer = spec.layers[i]
  for hf, w in block_to_tensors(spec, i, block).items():
    name = gguf_name(hf, spec.family)
    w = _stored(spec, name, w)
    if hf.endswith(".bias") and not np.any(w):
      continue
    if permute and ".attn_q." in name:
      w = permute_rows(w, layer.num_heads)
    elif permute and ".attn_k." in name:
      w = permute_rows(w, layer.num_kv_heads)
    yield name, w


def model_pieces(model: Model, arch: str):
  """The embeddings and head, then each block: per piece, its (GGUF name, float32 array in Hugging
  Face's [out, in] order)."""
  spec = model.spec
  top = top_to_tensors(spec, model.params)
  yield [(gguf_name(hf, spec.family), _stored(spec, gguf_name(hf, spec.family), w)) for hf, w in top.items()]
  for i in range(spec.num_layers):
    yield list(_block_tensors(spec, i, model.params["layers"][i], permute=rope_permuted(spec, arch)))


def model_tensors(model: Model, arch: str):
  """(GGUF name, float32 array in Hugging Face's [out, in] order) of every tensor, one block at a time."""
  for piece in model_pieces(model, arch):
    yield from piece


def _encode(name: str, w: np.ndarray, ttype: str):
  """(data, ggml type or None for numpy's own) of one tensor at tensor type `ttype`.

  A value the type cannot hold is refused rather than written as inf: llama.cpp would compute
  NaN from the first token on.
  """
  from gguf import GGMLQuantizationType as Q
  from gguf.quants import quantize

  if w.ndim == 1 or ttype == "f32":
    return cast_finite(w, np.float32, name), None
  if ttype == "f16" or (ttype == "q8_0" and w.shape[-1] % _Q8_BLOCK):
    return cast_finite(w, np.float16, name), None
  if ttype == "bf16":
    cast_finite(w, jnp.bfloat16, name)
    return quantize(w, Q.BF16), Q.BF16
  cast_finite(w, np.float32, name)
  big = float(np.max(np.abs(w)))
  if big > _Q8_LARGEST:  # the block scale, max / 127, is a float16
    raise UsageError(f"tensor {name} holds values up to |{big:.6g}|, beyond what q8_0 holds ({_Q8_LARGEST:.6g}: "
                     "127 times float16's largest value, for its block scale), so the export would write inf; "
                     "export with --dtype bf16 or --dtype f32")
  return quantize(w, Q.Q8_0), Q.Q8_0


def _hparams(writer, spec: ModelSpec, arch: str) -> None:
  from gguf import RopeScalingType

  layers = spec.layers
  per_layer = lambda f: [int(f(l)) for l in layers] if arch == "deci" else int(f(layers[0]))  # noqa: E731
  H = layers[0].head_dim
  writer.add_block_count(spec.num_layers)
  writer.add_context_length(spec.max_positions)
  writer.add_embedding_length(spec.hidden_size)
  writer.add_vocab_size(spec.vocab_size)
  writer.add_feed_forward_length(per_layer(lambda l: l.ffn_dim))
  writer.add_head_count(per_layer(lambda l: l.num_heads))
  writer.add_head_count_kv(per_layer(lambda l: l.num_kv_heads))
  # llama.cpp derives the head size from hidden_size / head_count unless told; pruned heads break that.
  writer.add_key_length(H)
  writer.add_value_length(H)
  writer.add_rope_dimension_count(H)
  writer.add_rope_freq_base(float(spec.rope.theta))
  writer.add_layer_norm_rms_eps(float(spec.norm_eps))
  if spec.rope.kind == "linear":
    writer.add_rope_scaling_type(RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(float(spec.rope.factor))
  _family_meta(writer, spec, arch)


def _family_meta(writer, spec: ModelSpec, arch: str) -> None:
  """The keys only the family's architecture reads (`Family.gguf_meta`), typed as llama.cpp reads them."""
  from gguf import GGUFValueType as T

  for key, value in spec.fam.gguf_meta(spec).items():
    if isinstance(value, list):
      writer.add_key_value(f"{arch}.{key}", value, T.ARRAY, T.BOOL)
    else:
      writer.add_key_value(f"{arch}.{key}", value, T.UINT32 if isinstance(value, int) else T.FLOAT32)


def _file_type(ttype: str) -> int:
  from gguf import LlamaFileType as F

  return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[ttype]


def _tokenizer(writer, fields) -> None:
  from gguf import GGUFValueType

  for key, value, vtype, sub in fields:
    writer.add_key_value(key, value, GGUFValueType[vtype], None if sub is None else GGUFValueType[sub])


def _write(writer, f) -> None:
  """Writes everything `writer` holds to the open file `f`."""
  from gguf.gguf_writer import WriterState

  # GGUFWriter opens files by name; handing it the temporary file that `write_file` renames
  # into place is what its own open_output_file does, minus the open.
  writer.fout, writer.state = [f], WriterState.EMPTY
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()


def _metadata(writer, model: Model, arch: str, ttype: str, tokenizer) -> None:
  writer.add_name(os.path.basename(os.path.normpath(model.source)) if model.source else "jaxprune model")
  writer.add_file_type(_file_type(ttype))
  if ttype == "q8_0":
    from gguf import GGML_QUANT_VERSION
    writer.add_quantization_version(GGML_QUANT_VERSION)
  _hparams(writer, model.spec, arch)
  _tokenizer(writer, tokenizer)


def _add_tensors(writer, model: Model, arch: str, ttype: str, progress) -> tuple[list[str], int, int]:
  """Encodes and adds every tensor; returns (q8_0 matrices written as f16, tensors, parameters)."""
  fallback, count, exported = [], 0, 0
  for piece in model_pieces(model, arch):
    for name, w in piece:
      data, qtype = _encode(name, w, ttype)
      if ttype == "q8_0" and w.ndim == 2 and qtype is None:
        fallback.append(name)
      writer.add_tensor(name, data, raw_dtype=qtype)  # quantized bytes: the writer derives the shape from them
      count, exported = count + 1, exported + w.size
    if progress is not None:
      progress(1)
  return fallback, count, exported


def refuse_model(spec: ModelSpec) -> None:
  """Raises ConfigError naming everything of `spec` that llama.cpp cannot run (`gguf_problems`)."""
  problems = gguf_problems(spec)
  if problems:
    raise ConfigError("this model cannot be written as GGUF for llama.cpp: " + "; ".join(problems))


def refuse_directory(out: str) -> None:
  """A GGUF is one file: a directory as `out` is refused, even with force (replacing it by a file
  would delete all it holds)."""
  if os.path.isdir(out):
    raise UsageError(f"{out} is a directory; --format gguf writes one file: pass a file path such as "
                     f"{os.path.join(out, 'model.gguf')}")


def save_gguf(model: Model, out: str, *, dtype: str | None = None, force: bool = False,
              progress: Callable[[int], None] | None = None) -> GGUFInfo:
  """Writes `model` as one GGUF file at `out`, atomically.

  Args:
    model: a jaxprune model of the llama, mistral or qwen2 family, dense or pruned, or of qwen3 or
      gemma3 with every layer the same shape.
    out: the output file; it must not exist unless `force`.
    dtype: tensor type of the matrices: 'f32' (default), 'f16', 'bf16' or 'q8_0'
      ('float32', 'float16', 'bfloat16' also accepted).
    force: replace an existing `out` (only once the new file is complete).
    progress: called with 1 as each of the num_layers + 1 pieces (the embeddings and head,
      then each block) is encoded.

  Returns:
    A `GGUFInfo` naming the llama.cpp architecture written.

  Raises:
    ConfigError: llama.cpp cannot run the model (the message says why).
    CheckpointError: a tensor holds NaN or Inf; nothing is written.
    UsageError: `out` exists and `force` is False, `dtype` is unknown, or a value overflows
      `dtype` (float16's 65504, say); nothing is changed.
  """
  from gguf import GGUFWriter

  ttype = tensor_type(dtype)
  refuse_directory(out)
  final = check_target(out, force, kind="file")
  refuse_model(model.spec)
  arch = architecture(model.spec)
  fields, tok_source = tokenizer_fields(model.source)
  # A spooled temporary file takes each tensor as it is encoded, so the model is never held twice.
  writer = GGUFWriter(None, arch, use_temp_file=True)
  try:
    _metadata(writer, model, arch, ttype, fields)
    fallback, count, exported = _add_tensors(writer, model, arch, ttype, progress)
    write_file(final, lambda f: _write(writer, f), force=force, binary=True)
  finally:
    writer.close()
    if writer.temp_file is not None:  # the tensors encoded before a refusal: spooled to /tmp past a few MB
      writer.temp_file.close()
  if fallback:
    log.warning("%d matrices have rows that are not a multiple of %d and were written as f16: %s", len(fallback),
                _Q8_BLOCK, ", ".join(fallback[:4]) + (" ..." if len(fallback) > 4 else ""))
  info = GGUFInfo(final, arch, arch == "deci", ttype, model.num_params, exported, count, tuple(fallback), tok_source)
  log.info("wrote %s (GGUF, llama.cpp architecture %s, %s, %d parameters)", final, arch, ttype, exported)
  return info


__all__ = ["GGUFInfo", "TENSOR_TYPES", "architecture", "gguf_name", "gguf_problems", "model_pieces", "model_tensors",
           "permute_rows", "refuse_model", "rope_permuted", "save_gguf", "tensor_type"]
