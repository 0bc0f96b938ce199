"""GGUF import on tiny files written here with gguf.GGUFWriter, as llama.cpp's converter writes them."""

import copy
import os

import jax
import numpy as np
import pytest

import jaxprune
from jaxprune.errors import CheckpointError, ConfigError
from jaxprune.io.gguf import read_gguf, reverse_permute
from jaxprune.io.hf import read_tensors, weight_files
from jaxprune.io.mapping import tensors_to_params
from tests import tiny
from tests.numerics import sensitivity

# GGUF tensor name -> (HF name, ggml type written). Norms stay F32 as llama.cpp keeps them.
Q = "Q8_0"
BLOCK_TYPES = {"attn_norm": ("input_layernorm", "F32"), "ffn_norm": ("post_attention_layernorm", "F32"),
               "attn_q": ("self_attn.q_proj", Q), "attn_k": ("self_attn.k_proj", Q),
               "attn_v": ("self_attn.v_proj", "F16"),
               "attn_output": ("self_attn.o_proj", "Q4_0"), "ffn_gate": ("mlp.gate_proj", "Q4_1"),
               "ffn_up": ("mlp.up_proj", "Q5_0"), "ffn_down": ("mlp.down_proj", "BF16")}


def permute(w, n_head):
  """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute` (for K, n_head is the KV head count)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model, arch="llama", with_vocab_size=True, extra_tensor=None, qtypes=None):
  """Writes a transformers Llama model as llama.cpp would; returns the HF tensors the file really holds.

  The returned tensors are the *dequantized* values of what was written, with the Q/K permutation undone
  by hand, so a correct reader must reproduce them exactly.
  """
  import gguf
  from gguf.quants import dequantize, quantize

  cfg = model.config
  sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(cfg.num_hidden_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
  w.add_bos_token_id(0)
  if with_vocab_size:
    w.add_vocab_size(cfg.vocab_size)
  else:  # vocabulary size from the token list, as in most llama.cpp files
    w.add_token_list([f"tok{i}" for i in range(cfg.vocab_size)])
    w.add_token_scores([0.0] * cfg.vocab_size)

  hf = {}
  qtypes = {**{k: t for k, (_, t) in BLOCK_TYPES.items()}, **(qtypes or {})}

  def add(name, hf_name, arr, qtype, n_perm=None):
    qt = gguf.GGMLQuantizationType[qtype]
    stored = permute(arr, n_perm) if n_perm else arr
    data = quantize(stored, qt)
    w.add_tensor(name, data, raw_dtype=qt)
    back = np.asarray(dequantize(data, qt), np.float32).reshape(arr.shape)
    if n_perm:  # undo the permutation by moving rows back, independently of the reader's code
      rows = permute(np.arange(arr.shape[0]), n_perm)
      back = back[np.argsort(rows)]
    hf[hf_name] = back

  add("token_embd.weight", "model.embed_tokens.weight", sd["model.embed_tokens.weight"], Q)
  add("output_norm.weight", "model.norm.weight", sd["model.norm.weight"], "F32")
  if not cfg.tie_word_embeddings:
    add("output.weight", "lm_head.weight", sd["lm_head.weight"], "F16")
  for i in range(cfg.num_hidden_layers):
    for g, (h, _) in BLOCK_TYPES.items():
      n_perm = cfg.num_attention_heads if g == "attn_q" else cfg.num_key_value_heads if g == "attn_k" else None
      add(f"blk.{i}.{g}.weight", f"model.layers.{i}.{h}.weight", sd[f"model.layers.{i}.{h}.weight"], qtypes[g],
          n_perm)
  if extra_tensor:
    w.add_tensor(extra_tensor, np.zeros(32, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return hf


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  """(path, torch model, HF tensors the file holds) for an untied MHA model with peaked attention."""
  import torch

  model = tiny.build("llama_mha")
  with torch.no_grad():  # random init leaves attention nearly uniform, which would hide a Q/K permutation error
    for layer in model.model.layers:
      layer.self_attn.q_proj.weight.mul_(8.0)
      layer.self_attn.k_proj.weight.mul_(8.0)
  path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
  return str(path), model, write_gguf(path, model)


def test_permutation_round_trips():
  w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
  for n in (1, 2, 8):
    np.testing.assert_array_equal(reverse_permute(permute(w, n), n), w)
  assert not np.array_equal(permute(w, 2), w)


def test_weights_are_exactly_the_dequantized_file(written):
  path, model, hf = written
  m = jaxprune.load(path)
  want = tensors_to_params(m.spec, hf)
  for (p, got), (_, exp) in zip(jax.tree.leaves_with_path(m.params), jax.tree.leaves_with_path(want)):
    np.testing.assert_array_equal(np.asarray(got), exp, err_msg=jax.tree_util.keystr(p))


def test_lazy_load_dequantizes_each_block_when_read(written):
  path, _, _ = written
  eager, lazy = jaxprune.load(path), jaxprune.load(path, lazy=True)
  assert lazy.params["layers"].reads == 0 and lazy.num_params == eager.num_params
  for i in range(eager.spec.num_layers):
    for a, b in zip(jax.tree.leaves(eager.params["layers"][i]), jax.tree.leaves(lazy.params["layers"][i]),
                    strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for k in ("embed", "final_norm", "lm_head"):
    for a, b in zip(jax.tree.leaves(eager.params[k]), jax.tree.leaves(lazy.params[k]), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_logits_match_torch_with_the_dequantized_weights(written):
  import torch

  path, model, hf = written
  model = copy.deepcopy(model)  # the fixture's model keeps its unquantized weights
  with torch.no_grad():
    state = {**model.state_dict(), **{k: torch.from_numpy(v.copy()) for k, v in hf.items()}}
    model.load_state_dict(state)
    ids = np.random.default_rng(0).integers(0, tiny.VOCAB, size=(2, 20))
    want = model(torch.as_tensor(ids)).logits.numpy()
  got = np.asarray(jaxprune.logits(*_load(path), ids))
  sensitivity(model, ids).check_engines(got, want, "tiny gguf")  # derived bound: tests/numerics.py, point 2


def test_logits_are_close_to_the_unquantized_model(written, tmp_path):
  path, model, _ = written
  model.save_pretrained(tmp_path)
  ids = np.random.default_rng(1).integers(0, tiny.VOCAB, size=(1, 16))
  quantized = np.asarray(jaxprune.logits(*_load(path), ids))
  exact = np.asarray(jaxprune.logits(*_load(str(tmp_path)), ids))
  # 4- to 8-bit weights: a few percent of error. A wrong Q/K permutation would give ~100%.
  rel_rms = np.sqrt(np.mean((quantized - exact)**2) / np.mean(exact**2))
  assert rel_rms < 0.15, rel_rms


def _load(path):
  m = jaxprune.load(path)
  return m.spec, m.params


def test_spec_from_metadata(written):
  path, model, _ = written
  spec = jaxprune.load(path).spec
  cfg = model.config
  assert spec.family == "llama" and spec.num_layers == cfg.num_hidden_layers and not spec.tie_embeddings
  assert spec.layers[0] == jaxprune.LayerSpec(4, 4, 16, 96)
  assert spec.rope.theta == cfg.rope_parameters["rope_theta"] and spec.norm_eps == pytest.approx(cfg.rms_norm_eps)
  assert spec.bos_token_id == 0


def test_tied_gqa_model_with_a_token_list(tmp_path):
  model = tiny.build("llama_gqa")
  path = tmp_path / "gqa.gguf"
  hf = write_gguf(path, model, with_vocab_size=False)
  m = jaxprune.load(str(path))
  assert m.spec.tie_embeddings and m.spec.vocab_size == tiny.VOCAB
  assert m.spec.layers[0] == jaxprune.LayerSpec(4, 2, 16, 96)
  np.testing.assert_array_equal(np.asarray(m.params["layers"][1]["attn"]["k"]["kernel"]),
                                tensors_to_params(m.spec, hf)["layers"][1]["attn"]["k"]["kernel"])


def test_header_parser_agrees_with_gguf_reader(tmp_path):
  import gguf

  path = tmp_path / "t.gguf"
  write_gguf(path, tiny.build("llama_gqa"), with_vocab_size=False)
  ours = read_gguf(str(path))
  ref = gguf.GGUFReader(str(path))
  assert set(ours.fields) == {k for k in ref.fields if not k.startswith("GGUF.")}
  for k, f in ref.fields.items():
    if not k.startswith("GGUF."):
      want = f.contents()
      assert ours.fields[k] == (pytest.approx(want) if isinstance(want, (float, list)) else want), k
  assert [(t.name, t.shape, t.qtype) for t in ours.tensors] == \
      [(t.name, tuple(int(s) for s in reversed(t.shape)), int(t.tensor_type)) for t in ref.tensors]
  for a, b in zip(ours.tensors, ref.tensors):
    np.testing.assert_array_equal(a.data.reshape(-1), np.asarray(b.data).view(np.uint8).reshape(-1))


# --------------------------------------------------------------------------
# Errors.


def test_truncated_tensor_data(written, tmp_path):
  path, _, _ = written
  cut = tmp_path / "cut.gguf"
  cut.write_bytes(open(path, "rb").read()[:os.path.getsize(path) - 100])
  with pytest.raises(CheckpointError) as e:
    jaxprune.load(str(cut))
  assert f"{cut} is truncated: tensor" in str(e.value) and "Re-download it" in str(e.value)


def test_truncated_header(written, tmp_path):
  path, _, _ = written
  cut = tmp_path / "cut.gguf"
  cut.write_bytes(open(path, "rb").read()[:300])
  with pytest.raises(CheckpointError, match="has a damaged GGUF header .*truncated or corrupt. Re-download it"):
    jaxprune.load(str(cut))


def test_not_a_gguf_file(tmp_path):
  f = tmp_path / "fake.gguf"
  f.write_bytes(b"PK\x03\x04" + b"\0" * 64)
  with pytest.raises(CheckpointError, match=r"does not start with the GGUF magic bytes \(found b'PK\\x03\\x04'\)"):
    jaxprune.load(str(f))


def test_empty_file(tmp_path):
  f = tmp_path / "empty.gguf"
  f.write_bytes(b"")
  with pytest.raises(CheckpointError, match="empty.gguf"):
    jaxprune.load(str(f))


def test_unsupported_architecture(tmp_path):
  f = tmp_path / "falcon.gguf"
  write_gguf(f, tiny.build("llama_mha"), arch="falcon")
  with pytest.raises(ConfigError, match="GGUF architecture 'falcon' is not supported; supported: llama"):
    jaxprune.load(str(f))


def test_unexpected_tensor(tmp_path):
  f = tmp_path / "extra.gguf"
  write_gguf(f, tiny.build("llama_mha"), extra_tensor="blk.0.attn_sinks.weight")
  with pytest.raises(CheckpointError, match="unexpected GGUF tensor 'blk.0.attn_sinks.weight' for a llama model; "
                     "expected only token_embd.weight"):
    jaxprune.load(str(f))


def test_quantization_gguf_cannot_dequantize(tmp_path, monkeypatch):
  # A quantization type whose block layout gguf knows but cannot dequantize (Q8_1 in
  # today's gguf; any type in some version). Whatever the installed gguf supports, the
  # package's refusal is simulated so that jaxprune's handling of it is what is tested.
  import gguf
  import gguf.quants

  real = gguf.quants.dequantize

  def refuse_q8_1(data, qtype):
    if qtype == gguf.GGMLQuantizationType.Q8_1:
      raise NotImplementedError("Quantization for Q8_1 is not yet implemented")
    return real(data, qtype)

  monkeypatch.setattr(gguf.quants, "dequantize", refuse_q8_1)
  f = tmp_path / "q81.gguf"
  _write_raw(f, "Q8_1")
  with pytest.raises(CheckpointError, match="uses quantization Q8_1, which the installed gguf package cannot "
                     "dequantize .*upgrade gguf"):
    jaxprune.load(str(f))


def _write_raw(path, qtype):
  """A tiny model whose ffn_down is random bytes of type `qtype`."""
  import gguf

  model = tiny.build("llama_mha")
  hf = write_gguf(path, model)  # a valid file first, to reuse its metadata writer
  block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
  w = gguf.GGUFWriter(str(path), "llama")
  reader = read_gguf(str(path))
  for k, v in reader.fields.items():
    if k.startswith("llama.") or k == "general.alignment":
      w.add_key_value(k, v, gguf.GGUFValueType.get_type(v))
  for t in reader.tensors:
    if t.name == "blk.0.ffn_down.weight":
      raw = np.zeros((t.shape[0], t.shape[1] // block * size), np.uint8)
      w.add_tensor(t.name, raw, raw_dtype=gguf.GGMLQuantizationType[qtype])
    else:
      w.add_tensor(t.name, t.data.copy(), raw_dtype=gguf.GGMLQuantizationType(t.qtype))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return hf


def test_hf_tensors_of_the_same_model_map_identically(written, tiny_dir):
  # The GGUF key table lands on the same Hugging Face names as a safetensors checkpoint.
  path, _, hf = written
  assert set(hf) == set(read_tensors(weight_files(tiny_dir("llama_mha"))))
