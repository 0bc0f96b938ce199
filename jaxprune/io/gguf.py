"""Reading GGUF files (llama.cpp's `llama`, `qwen3` and `gemma3` architectures).

The header (metadata and tensor table) is parsed here with `struct` straight
from a memory map: `gguf.GGUFReader` builds a numpy view per metadata value,
which takes seconds for a 49k-token vocabulary. Tensors are dequantized to
float32 with `gguf.quants.dequantize`, so every quantization type that package
implements is supported. llama.cpp's converter permutes the rows of Q and K
for its interleaved RoPE (`llama` only), and stores Gemma's norm weights with
their +1 added; both are undone exactly as transformers' GGUF loader does, so
the weights are in Hugging Face layout and go through the same key table as a
Hugging Face checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import struct
from typing import Any

import numpy as np

from jaxprune import families
from jaxprune.errors import CheckpointError, ConfigError
from jaxprune.families.base import Family, Sliding
from jaxprune.families.gemma3 import gguf_query_scalar, swa_layers
from jaxprune.io.hf import to_device
from jaxprune.io.hf_config import spec_from_hf_config
from jaxprune.io.mapping import tensors_to_params
from jaxprune.model import Model
from jaxprune.spec import check_params

# The family each readable llama.cpp architecture is read as (Mistral's GGUF files are `llama` ones).
_FAMILIES = {f.gguf_arch: f for f in map(families.get, ("llama", "qwen3", "gemma3"))}
SUPPORTED_ARCHS = tuple(_FAMILIES)
GGUF_VERSIONS = (2, 3)

_BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")

# GGUF metadata value types with a fixed width: type id -> struct format.
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
  """One tensor of a GGUF file, not yet read.

  Attributes:
    shape: in numpy order (GGUF lists dimensions fastest-first).
    qtype: the ggml type id (`gguf.GGMLQuantizationType`).
    data: the tensor's raw bytes, a uint8 view of the memory-mapped file.
  """

  name: str
  shape: tuple[int, ...]
  qtype: int
  data: np.ndarray


@dataclasses.dataclass(frozen=True)
class GGUFFile:
  path: str
  fields: dict[str, Any]  # metadata key -> value; arrays of strings are lists of str
  tensors: tuple[GGUFTensor, ...]


class _Cursor:
  """Little-endian reads from a byte buffer, advancing an offset."""

  def __init__(self, buf, pos: int = 0):
    self.buf, self.pos = buf, pos

  def unpack(self, fmt: str):
    # A crafted count ("1000000000Q") fails on the file's size before struct allocates its result.
    size = struct.calcsize("<" + fmt)
    if self.pos + size > len(self.buf):
      raise struct.error(f"{size} bytes at offset {self.pos} run past the end of the file ({len(self.buf)} bytes)")
    vals = struct.unpack_from("<" + fmt, self.buf, self.pos)
    self.pos += size
    return vals

  def string(self) -> str:
    (n,) = self.unpack("Q")
    s = bytes(self.buf[self.pos:self.pos + n])
    if len(s) != n:
      raise struct.error(f"string of {n} bytes runs past the end of the file")
    self.pos += n
    return s.decode("utf-8", errors="replace")

  def value(self, vtype: int):
    if vtype in _SCALAR:
      return self.unpack(_SCALAR[vtype])[0]
    if vtype == _STRING:
      return self.string()
    if vtype == _ARRAY:
      etype, n = self.unpack("IQ")
      if etype in _SCALAR:
        return list(self.unpack(f"{n}{_SCALAR[etype]}"))
      return [self.value(etype) for _ in range(n)]
    raise ValueError(f"unknown metadata value type {vtype}")


def read_gguf(path: str) -> GGUFFile:
  """Parses a GGUF file's metadata and tensor table; tensor data stays on disk (mmap)."""
  from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

  try:
    blob = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)  # plain views: memmap slicing is slow
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path} could not be memory-mapped ({e}); check that it is a readable, non-empty file") \
        from None
  try:
    if bytes(blob[:4]) != b"GGUF":
      raise CheckpointError(f"{path} does not start with the GGUF magic bytes (found {bytes(blob[:4])!r}); "
                            "it is not a GGUF file")
    cur = _Cursor(blob, 4)
    (version,) = cur.unpack("I")
    if version not in GGUF_VERSIONS:
      raise CheckpointError(f"{path} is GGUF version {version} (or big-endian); supported: little-endian versions "
                            f"{', '.join(map(str, GGUF_VERSIONS))}. Re-convert it with a recent llama.cpp")
    n_tensors, n_fields = cur.unpack("QQ")
    fields = {}
    for _ in range(n_fields):
      key = cur.string()
      (vtype,) = cur.unpack("I")
      fields[key] = cur.value(vtype)
    table = []
    for _ in range(n_tensors):
      name = cur.string()
      (n_dims,) = cur.unpack("I")
      dims = cur.unpack(f"{n_dims}Q")
      qtype, offset = cur.unpack("IQ")
      table.append((name, tuple(int(d) for d in reversed(dims)), qtype, offset))
  except (struct.error, ValueError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path} has a damaged GGUF header ({e}); the file may be truncated or corrupt. "
                          "Re-download it") from None
  align = fields.get("general.alignment", 32)
  if not isinstance(align, int) or isinstance(align, bool) or align <= 0:
    raise CheckpointError(f"{path}: general.alignment is {align!r}, expected a positive integer; the GGUF header is "
                          "corrupt. Re-download it")
  start = -(-cur.pos // align) * align
  tensors = []
  for name, shape, qtype, offset in table:
    try:
      block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    except (ValueError, KeyError):
      raise CheckpointError(f"{path}: tensor {name} has ggml type id {qtype}, which the installed gguf package "
                            "does not know; upgrade gguf (pip install -U gguf)") from None
    if not shape:
      raise CheckpointError(f"{path}: tensor {name} has no dimensions; the GGUF tensor table is corrupt. "
                            "Re-download it")
    if shape[-1] % block:
      raise CheckpointError(f"{path}: tensor {name} of shape {shape} does not fill whole blocks of {block} "
                            f"({GGMLQuantizationType(qtype).name}); the file is corrupt")
    byte_shape = (*shape[:-1], shape[-1] // block * nbytes)
    begin, end = start + offset, start + offset + math.prod(byte_shape)  # Python ints: a crafted shape cannot wrap
    if end > len(blob):
      raise CheckpointError(f"{path} is truncated: tensor {name} needs bytes {begin}..{end} but the file has "
                            f"{len(blob)}. Re-download it")
    tensors.append(GGUFTensor(name, shape, qtype, blob[begin:end].reshape(byte_shape)))
  return GGUFFile(path, fields, tuple(tensors))


def hf_config_from_gguf(reader: GGUFFile, path: str = "") -> dict:
  """The Hugging Face config dict a GGUF file's metadata describes."""
  arch = reader.fields.get("general.architecture")
  if arch not in SUPPORTED_ARCHS:
    raise ConfigError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHS)}")
  fam = _FAMILIES[arch]
  a = lambda k, d=None: reader.fields.get(f"{arch}.{k}", d)  # noqa: E731
  n = lambda k, d=None, integer=True: _meta(reader.fields, f"{arch}.{k}", d, path, integer)  # noqa: E731
  names = {t.name for t in reader.tensors}
  n_heads = n("attention.head_count")
  hidden = n("embedding_length")
  vocab = a("vocab_size")
  if vocab is None:  # most llama.cpp files say it only through their token list
    vocab = _meta({"tokenizer.ggml.tokens": len(reader.fields.get("tokenizer.ggml.tokens", ()))},
                  "tokenizer.ggml.tokens", None, path)
  cfg = {
      "model_type": fam.model_type,
      "vocab_size": n("vocab_size", vocab),
      "hidden_size": hidden,
      "intermediate_size": n("feed_forward_length"),
      "num_hidden_layers": n("block_count"),
      "num_attention_heads": n_heads,
      "num_key_value_heads": n("attention.head_count_kv", n_heads),
      "head_dim": n("attention.key_length", hidden // n_heads),
      "rms_norm_eps": n("attention.layer_norm_rms_epsilon", 1e-5, integer=False),
      "max_position_embeddings": n("context_length", 2048),
      "tie_word_embeddings": "output.weight" not in names,
      "attention_bias": "blk.0.attn_q.bias" in names,
      fam.act_key: fam.act_to_hf[fam.act],
      "bos_token_id": reader.fields.get("tokenizer.ggml.bos_token_id"),
      "eos_token_id": reader.fields.get("tokenizer.ggml.eos_token_id"),
  }
  rope = {"rope_type": "default", "rope_theta": n("rope.freq_base", 10000.0, integer=False)}
  scaling = a("rope.scaling.type")
  if scaling not in (None, "none"):
    if scaling != "linear":
      raise ConfigError(f"{path}: GGUF rope.scaling.type {scaling!r} is not supported; supported: none, linear")
    rope.update(rope_type="linear", factor=n("rope.scaling.factor", integer=False))
  if "rope_freqs.weight" in names:
    raise ConfigError(f"{path}: GGUF per-frequency RoPE factors (rope_freqs.weight, as in Llama 3.1) are not "
                      "supported; load the Hugging Face checkpoint instead")
  cfg["rope_parameters"] = rope
  if fam.sliding == Sliding.LAYER_TYPES:
    # What llama.cpp's gemma3 computes where the file is silent (llama_model_gemma3::load_arch_hparams):
    # no window without its key; the window on five of every six layers; the sliding layers' RoPE
    # base 10k and unscaled; queries scaled as `gguf_query_scalar` says.
    window = a("attention.sliding_window") or None
    n_layers = cfg["num_hidden_layers"]
    sliding = swa_layers(_pattern(reader, arch, n_layers, path), n_layers) if window else [False] * n_layers
    cfg["sliding_window"] = window
    cfg["layer_types"] = ["sliding_attention" if s else "full_attention" for s in sliding]
    cfg["rope_parameters"] = {"full_attention": rope, "sliding_attention": {
        "rope_type": "default", "rope_theta": n("rope.freq_base_swa", 10000.0, integer=False)}}
    cfg["query_pre_attn_scalar"] = gguf_query_scalar(hidden, n_heads, n_layers, cfg["head_dim"])
    cfg["final_logit_softcapping"] = a("final_logit_softcapping")
  return cfg


def _pattern(reader: GGUFFile, arch: str, n_layers: int, path: str):
  """`{arch}.attention.sliding_window_pattern`: a period (llama.cpp's default 6) or one flag per layer."""
  key = f"{arch}.attention.sliding_window_pattern"
  p = reader.fields.get(key, 6)
  if isinstance(p, list) and len(p) == n_layers or isinstance(p, int) and not isinstance(p, bool) and p >= 0:
    return p
  raise ConfigError(f"{path}: GGUF metadata {key} is {p!r}, expected a period (an integer >= 0) or {n_layers} "
                    "per-layer flags; the file is not a complete llama.cpp model. Re-convert or re-download it")


def _family(reader: GGUFFile) -> Family:
  return _FAMILIES[reader.fields.get("general.architecture")]


def _meta(fields: dict, key: str, default, path: str, integer: bool = True):
  """Metadata `key` as a positive integer (or finite positive number): a crafted or truncated
  header gets one line naming the key, not a TypeError deep in the config code."""
  v = fields.get(key, default)
  if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)) or not 0 < v < float("inf"):
    what = "missing" if v is None else f"{v!r}"
    raise ConfigError(f"{path}: GGUF metadata {key} is {what}, expected a positive "
                      f"{'integer' if integer else 'number'}; the file is not a complete llama.cpp model. "
                      "Re-convert or re-download it")
  return v if integer else float(v)


def reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undo llama.cpp's Q/K row permutation (rows grouped per head as (2, H/2) -> (H/2, 2))."""
  dim = w.shape[0] // n_head // 2
  return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _dequantize(t: GGUFTensor, path: str) -> np.ndarray:
  """One tensor as float32 in numpy order."""
  from gguf import GGMLQuantizationType
  from gguf.quants import dequantize

  qtype = GGMLQuantizationType(t.qtype)
  try:
    w = dequantize(t.data, qtype)
  except (NotImplementedError, ValueError, KeyError) as e:
    raise CheckpointError(f"{path}: tensor {t.name} uses quantization {qtype.name}, which the installed "
                          f"gguf package cannot dequantize ({e}); upgrade gguf or re-quantize the file") from None
  return np.asarray(w, dtype=np.float32).reshape(t.shape)


def _hf_names(reader: GGUFFile, path: str = "") -> dict[str, GGUFTensor]:
  """Hugging Face key -> the GGUF tensor holding it."""
  fam = _family(reader)
  top, block = fam.gguf_top, fam.gguf_block
  out = {}
  for t in reader.tensors:
    m = _BLOCK_RE.fullmatch(t.name)
    if m and m.group(2) in block:
      key = fam.table.block_prefix.format(i=m.group(1)) + block[m.group(2)]
    elif t.name in top:
      key = top[t.name]
    else:
      raise CheckpointError(f"{path}: unexpected GGUF tensor {t.name!r} for a {fam.name} model; expected only "
                            f"{', '.join(top)} and blk.N.{{{', '.join(block)}}}")
    out[key] = t
  return out


def _hf_tensor(t: GGUFTensor, cfg: dict, path: str) -> np.ndarray:
  """One tensor dequantized to f32, with llama.cpp's Q/K row permutation (llama) and norm offset (Gemma) undone."""
  w = _dequantize(t, path)
  fam = families.for_model_type(cfg["model_type"])
  if not fam.gguf_rope_permuted:
    return w - np.float32(fam.norm_offset) if fam.norm_offset and t.name.endswith("norm.weight") else w
  if ".attn_q." in t.name:
    w = reverse_permute(w, cfg["num_attention_heads"])
  elif ".attn_k." in t.name:
    w = reverse_permute(w, cfg["num_key_value_heads"])
  return w


def read_gguf_tensors(reader: GGUFFile, cfg: dict, path: str = "", progress=None) -> dict[str, np.ndarray]:
  """GGUF tensors, dequantized to f32 and renamed to Hugging Face keys; `progress(done, total)`
  after each tensor (dequantizing a quantized model takes a while)."""
  names = _hf_names(reader, path)
  out = {}
  for k, t in names.items():
    out[k] = _hf_tensor(t, cfg, path)
    if progress is not None:
      progress(len(out), len(names))
  return out


def load_gguf(path: str, dtype=np.float32, lazy: bool = False, progress=None) -> Model:
  """Loads a LLaMA-architecture GGUF file as a jaxprune `Model`.

  With `lazy`, blocks are dequantized when used (`jaxprune.io.lazy`); else every tensor is
  dequantized here, with `progress(done, total)` after each.
  """
  if not os.path.isfile(path):
    raise CheckpointError(f"{path} is not a file; pass the path of a .gguf file")
  reader = read_gguf(path)
  cfg = hf_config_from_gguf(reader, path)
  spec = spec_from_hf_config(cfg)
  if lazy:
    from jaxprune.io.lazy import lazy_model

    names = _hf_names(reader, path)
    return lazy_model(spec, list(names), lambda k: _hf_tensor(names[k], cfg, path), path, dtype)
  params = tensors_to_params(spec, read_gguf_tensors(reader, cfg, path, progress), source=path)
  check_params(spec, params)
  return Model(spec, to_device(params, dtype), source=os.path.abspath(path))


def load_gguf_tokenizer(path: str):
  """A transformers fast tokenizer built from the GGUF's vocabulary.

  Uses transformers' own GGUF tokenizer conversion (the code behind
  `AutoTokenizer.from_pretrained(..., gguf_file=...)`), imported directly
  because the public entry point also imports torch.
  """
  from transformers import PreTrainedTokenizerFast
  from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

  architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(path)
  backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
  return PreTrainedTokenizerFast(tokenizer_object=backend, **{**tokenizer_config, **extra})
