"""GGUF export for llama.cpp, on tiny random models.

Three kinds of check: every tensor and metadata array read back with the `gguf`
package's own reader; uniform exports loaded by transformers' GGUF loader
(llama.cpp's layout undone by transformers' code, not ours); per-layer exports
checked against what llama.cpp's `src/models/deci.cpp` and `src/llama-model.cpp`
read (key names, array lengths and types, tensor names and shapes). Running the
files in llama.cpp itself is benchmarks/llama_cpp.py's job (it builds llama.cpp).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from jaxprune.errors import ConfigError, UsageError
from jaxprune.io.export import save_hf
from jaxprune.io.gguf import reverse_permute
from jaxprune.io.gguf_export import architecture, gguf_name, permute_rows, save_gguf
from jaxprune.io.gguf_vocab import source_gguf, tokenizer_fields
from jaxprune.model import Model
from jaxprune.spec import spec_from_params
from jaxprune.surgery import prune_model
from tests import badinput, tiny

gguf = pytest.importorskip("gguf")
TOKENS = np.random.default_rng(0).integers(0, tiny.VOCAB, (2, 16))


def per_layer(model: Model) -> Model:
  """Layer 0 loses one KV group and a third of its channels, layer 1 half its channels: widths differ."""
  l0 = model.spec.layers[0]
  G = l0.num_heads // l0.num_kv_heads
  return prune_model(model, heads={0: list(range(G))}, channels={0: list(range(0, l0.ffn_dim, 3)),
                                                                 1: list(range(0, l0.ffn_dim, 2))})


def uniform(model: Model) -> Model:
  """Every layer keeps the same heads (the first KV group) and every other channel."""
  spec = model.spec
  G = spec.layers[0].num_heads // spec.layers[0].num_kv_heads
  n = spec.num_layers
  return prune_model(model, heads={i: list(range(G)) for i in range(n)},
                     channels={i: list(range(0, spec.layers[i].ffn_dim, 2)) for i in range(n)})


def with_intercepts(model: Model, seed: int = 0) -> Model:
  """What reconstruction with an intercept leaves: random o and down biases, zero q/k/v/gate/up biases
  where the model had none."""
  rng = np.random.default_rng(seed)
  blocks = []
  for blk in model.params["layers"]:
    attn, mlp = dict(blk["attn"]), dict(blk["mlp"])
    for group, name in [(attn, n) for n in ("q", "k", "v", "o")] + [(mlp, n) for n in ("gate", "up", "down")]:
      k = group[name]["kernel"]
      shape = k.shape[-1:] if name in ("o", "down") else k.shape[1:]
      b = rng.normal(size=shape) if name in ("o", "down") else group[name].get("bias", np.zeros(shape))
      group[name] = {**group[name], "bias": jnp.asarray(b, k.dtype)}
    blocks.append({**blk, "attn": attn, "mlp": mlp})
  params = {**model.params, "layers": tuple(blocks)}
  return Model.checked(spec_from_params(model.spec, params), params, model.source)


@pytest.fixture(scope="module")
def models(tiny_dir):
  cache = {}

  def get(kind: str, layout: str = "dense", intercepts: bool = False) -> Model:
    key = (kind, layout, intercepts)
    if key not in cache:
      m = jaxprune.load(tiny_dir(kind))
      m = {"dense": lambda x: x, "uniform": uniform, "per_layer": per_layer}[layout](m)
      cache[key] = with_intercepts(m) if intercepts else m
    return cache[key]

  return get


def read(path: str):
  """(metadata key -> value, tensor name -> gguf ReaderTensor) as the `gguf` package reads the file."""
  r = gguf.GGUFReader(path)
  fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
  return fields, {t.name: t for t in r.tensors}


def raw(a) -> np.ndarray:
  """A tensor's bytes, flat."""
  return np.ascontiguousarray(a).view(np.uint8).ravel()


def value(field):
  return field.contents()


def expected_tensors(model: Model) -> dict[str, np.ndarray]:
  """What the file must hold, computed here from the Hugging Face tensors (zero biases dropped, Q/K permuted)."""
  from jaxprune.io.mapping import params_to_tensors

  arch = architecture(model.spec)
  out = {}
  for hf, w in params_to_tensors(model.spec, model.params).items():
    w = np.asarray(w, np.float32)
    if hf.endswith(".bias") and not w.any():
      continue
    name = gguf_name(hf)
    if arch != "qwen2" and name.split(".")[-2] in ("attn_q", "attn_k"):
      layer = model.spec.layers[int(name.split(".")[1])]
      w = permute_rows(w, layer.num_heads if ".attn_q." in name else layer.num_kv_heads)
    out[name] = w
  return out


# --------------------------------------------------------------------------
# The permutation and the round trip through the gguf package's reader.


def test_permute_rows_is_the_inverse_of_the_readers_reverse_permute():
  w = np.arange(6 * 8 * 3, dtype=np.float32).reshape(6 * 8, 3)
  for n in (1, 2, 6):
    np.testing.assert_array_equal(reverse_permute(permute_rows(w, n), n), w)
    np.testing.assert_array_equal(permute_rows(reverse_permute(w, n), n), w)
  assert not np.array_equal(permute_rows(w, 2), w)


@pytest.mark.parametrize("kind,layout,intercepts,arch", [
    ("llama_mha", "dense", False, "llama"),
    ("llama_gqa", "uniform", True, "llama"),
    ("llama_bias", "per_layer", False, "deci"),
    ("llama_gqa", "per_layer", True, "deci"),
    ("qwen2", "dense", False, "qwen2"),
    ("qwen2", "uniform", False, "llama"),  # pruned heads: llama.cpp's qwen2 needs attention as wide as the model
    ("qwen2", "per_layer", True, "deci"),
])
def test_every_tensor_and_per_layer_array_round_trips(models, kind, layout, intercepts, arch, tmp_path):
  model = models(kind, layout, intercepts)
  info = save_gguf(model, str(tmp_path / "m.gguf"))
  assert info.architecture == arch and info.per_layer == (arch == "deci")
  fields, tensors = read(info.path)
  assert value(fields["general.architecture"]) == arch
  want = expected_tensors(model)
  assert sorted(tensors) == sorted(want)
  for name, w in want.items():
    t = tensors[name]
    assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
    np.testing.assert_array_equal(np.asarray(t.data).reshape(w.shape), w, err_msg=name)
  layers = model.spec.layers
  for key, sizes in (("feed_forward_length", [l.ffn_dim for l in layers]),
                     ("attention.head_count", [l.num_heads for l in layers]),
                     ("attention.head_count_kv", [l.num_kv_heads for l in layers])):
    got = value(fields[f"{arch}.{key}"])
    assert (list(got) if arch == "deci" else [got] * len(layers)) == sizes, key
  if intercepts:  # the intercepts survive; their all-zero siblings are left out
    assert "blk.0.attn_output.bias" in tensors and "blk.0.ffn_down.bias" in tensors
    assert "blk.0.ffn_up.bias" not in tensors and (kind == "qwen2") == ("blk.0.attn_q.bias" in tensors)
  assert info.exported_params == sum(w.size for w in want.values())


def test_uniform_llama_reads_back_into_jaxprune_unchanged(models, tmp_path):
  """jaxprune's own GGUF reader undoes the permutation: a pruned, tied model comes back bit for bit."""
  model = models("llama_gqa", "uniform")
  back = jaxprune.load(save_gguf(model, str(tmp_path / "m.gguf")).path)
  assert back.spec.layers == model.spec.layers and back.spec.tie_embeddings
  for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(model.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --------------------------------------------------------------------------
# transformers' own GGUF loader.


@pytest.mark.parametrize("kind,layout", [("llama_mha", "dense"), ("llama_gqa", "uniform"), ("qwen2", "dense")])
def test_uniform_exports_load_in_transformers(models, kind, layout, tmp_path):
  """transformers' GGUF loader gives the model transformers loads from the HF export: the same logits.

  Both are the same PyTorch float32 forward on the same float32 weights (the
  permutation only moves values), so they agree to the last bit; the HF export's
  parity with `jaxprune.logits` is tests/test_export.py's.
  """
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  model = models(kind, layout)
  info = save_gguf(model, str(tmp_path / "m.gguf"))
  save_hf(model, str(tmp_path / "hf"), tokenizer=False)
  load = transformers.AutoModelForCausalLM.from_pretrained
  from_gguf = load(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
  from_hf = load(str(tmp_path / "hf"), dtype=torch.float32).eval()
  with torch.no_grad():
    got = from_gguf(torch.as_tensor(TOKENS)).logits.numpy()
    want = from_hf(torch.as_tensor(TOKENS)).logits.numpy()
  np.testing.assert_array_equal(got, want)
  assert info.architecture == ("qwen2" if kind == "qwen2" else "llama")


# --------------------------------------------------------------------------
# Per-layer exports against llama.cpp's deci reader.


def test_per_layer_fields_are_what_deci_reads(models, tmp_path):
  model = models("llama_gqa", "per_layer", intercepts=True)
  spec, n = model.spec, model.spec.num_layers
  fields, tensors = read(save_gguf(model, str(tmp_path / "m.gguf")).path)
  u32 = gguf.GGUFValueType.UINT32
  # llama_model_base::load_hparams: required scalars (uint32), then arrays of exactly block_count int32/uint32.
  for key, want in (("block_count", n), ("context_length", spec.max_positions), ("embedding_length", spec.hidden_size)):
    assert fields[f"deci.{key}"].types == [u32] and value(fields[f"deci.{key}"]) == want, key
  for key in ("feed_forward_length", "attention.head_count", "attention.head_count_kv"):
    f = fields[f"deci.{key}"]
    assert f.types[0] == gguf.GGUFValueType.ARRAY and f.types[1] in (u32, gguf.GGUFValueType.INT32), key
    assert len(value(f)) == n, key
  # deci.cpp asserts n_embd_head_k == n_embd_head_v == n_rot; the head size is not hidden_size / head_count[0].
  H = spec.layers[0].head_dim
  for key in ("attention.key_length", "attention.value_length", "rope.dimension_count"):
    assert value(fields[f"deci.{key}"]) == H, key
  assert fields["deci.attention.layer_norm_rms_epsilon"].types == [gguf.GGUFValueType.FLOAT32]
  assert value(fields["deci.rope.freq_base"]) == pytest.approx(spec.rope.theta)
  # llama_model_deci::load_arch_tensors: names and shapes (ggml order, fastest dimension first).
  D, V = spec.hidden_size, spec.vocab_size
  want = {"token_embd.weight": [D, V], "output_norm.weight": [D]}  # tied: no output.weight, deci reuses token_embd
  for i, l in enumerate(spec.layers):
    q, kv, F = H * l.num_heads, H * l.num_kv_heads, l.ffn_dim
    want.update({f"blk.{i}.{k}": s for k, s in {
        "attn_norm.weight": [D], "attn_q.weight": [D, q], "attn_k.weight": [D, kv], "attn_v.weight": [D, kv],
        "attn_output.weight": [q, D], "attn_output.bias": [D], "ffn_norm.weight": [D],
        "ffn_gate.weight": [D, F], "ffn_up.weight": [D, F], "ffn_down.weight": [F, D], "ffn_down.bias": [D]}.items()})
  assert {k: list(map(int, t.shape)) for k, t in tensors.items()} == want
  assert [value(fields["deci.attention.head_count"])[i] for i in range(n)] == [l.num_heads for l in spec.layers]
  assert len({l.ffn_dim for l in spec.layers}) == n  # the fixture really has per-layer widths


# --------------------------------------------------------------------------
# Tensor types.


@pytest.mark.parametrize("ttype", ["f16", "bf16", "q8_0"])
def test_tensor_types(models, ttype, tmp_path):
  from gguf.quants import dequantize, quantize

  model = models("llama_gqa", "per_layer")
  info = save_gguf(model, str(tmp_path / "m.gguf"), dtype=ttype)
  _, tensors = read(info.path)
  Q = gguf.GGMLQuantizationType
  fallback = []
  for name, w in expected_tensors(model).items():
    t = tensors[name]
    if w.ndim == 1:  # norms and biases stay f32, as llama.cpp's converter keeps them
      assert t.tensor_type == Q.F32, name
      continue
    want = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[ttype]
    if ttype == "q8_0" and w.shape[-1] % 32:
      want = Q.F16
      fallback.append(name)
    assert t.tensor_type == want, name
    stored = quantize(w, want) if want != Q.F16 else w.astype(np.float16)
    np.testing.assert_array_equal(raw(t.data), raw(stored), name)
    # Each format's own rounding: half an f16/bf16 ulp, or half a q8_0 step (a block's max / 127) per weight.
    err = np.abs(dequantize(raw(t.data), want).reshape(w.shape) - w)
    step = {Q.F16: 2.0**-11, Q.BF16: 2.0**-8, Q.Q8_0: 1 / 127}[want]
    assert err.max() <= step * np.abs(w).max(), name
  assert info.f16_fallback == tuple(fallback)
  assert (ttype == "q8_0") == bool(fallback)  # layer 0 keeps 32 of 96 channels, layer 1 48: ffn_down of 48 falls back


# --------------------------------------------------------------------------
# The tokenizer.


@pytest.fixture(scope="module")
def smol_gguf():
  from jaxprune.io.locate import resolve
  from jaxprune.errors import CheckpointError

  try:
    return resolve("smollm2-135m").path
  except CheckpointError as e:
    pytest.skip(str(e))


def test_tokenizer_is_copied_from_the_source_gguf_with_its_types(smol_gguf, tmp_path):
  fields, source = tokenizer_fields(smol_gguf)
  assert source == smol_gguf
  ref = {k: f for k, f in gguf.GGUFReader(smol_gguf).fields.items() if k.startswith("tokenizer.")}
  assert sorted(k for k, *_ in fields) == sorted(ref)
  for key, val, vtype, sub in fields:
    types = ref[key].types
    assert vtype == types[0].name and (sub is None or sub == types[1].name), key
    assert val == ref[key].contents(), key
  # A directory pruned from it names it in report.json.
  (tmp_path / "report.json").write_text('{"model": "smollm2-135m"}')
  assert source_gguf(str(tmp_path)) == smol_gguf


def test_hf_bpe_tokenizer_gives_llama_cpp_tokens_and_merges(smol_gguf, tmp_path):
  """The HF tokenizer transformers builds from SmolLM2's GGUF converts back to the GGUF's own vocabulary."""
  from jaxprune.io.gguf import load_gguf_tokenizer, read_gguf

  load_gguf_tokenizer(smol_gguf).save_pretrained(str(tmp_path))
  got = {k: v for k, v, *_ in tokenizer_fields(str(tmp_path))[0]}
  ref = read_gguf(smol_gguf).fields
  for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
              "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
    assert got[key] == ref[key], key
  assert got["tokenizer.ggml.model"] == "gpt2"


# --------------------------------------------------------------------------
# What llama.cpp cannot run, and bad input, through the CLI.


def test_cli_writes_a_file_and_refuses_to_overwrite(tiny_dir, tmp_path):
  out = str(tmp_path / "m.gguf")
  r = badinput.run_cli("export", tiny_dir("llama_gqa"), "--format", "gguf", "--out", out, "--dtype", "q8_0")
  assert r.rc == 0, r.stderr
  assert '"architecture": "llama"' in r.stdout and '"tensor_type": "q8_0"' in r.stdout
  before = badinput.snapshot(str(tmp_path))
  r = badinput.run_cli("export", tiny_dir("llama_mha"), "--format", "gguf", "--out", out)
  badinput.assert_one_line_error(r, out, "already exists", "--force")
  badinput.assert_intact(before)
  assert sorted(os.listdir(tmp_path)) == ["m.gguf"]  # no temporary debris
  r = badinput.run_cli("export", tiny_dir("llama_mha"), "--format", "gguf", "--out", out, "--force")
  assert r.rc == 0 and value(read(out)[0]["llama.attention.head_count_kv"]) == 4


def test_progress_counts_every_piece(models, tmp_path):
  """The embeddings and each block are reported once, so the bar's time left spans the whole
  file (the CLI's start line: tests/test_bad_input_text.py)."""
  steps = []
  save_gguf(models("llama_gqa"), str(tmp_path / "a.gguf"), progress=steps.append)
  assert steps == [1] * (models("llama_gqa").spec.num_layers + 1)


def test_cli_refuses_a_directory_even_with_force(tiny_dir, tmp_path):
  (tmp_path / "d").mkdir()
  (tmp_path / "d" / "keep.txt").write_text("not jaxprune's")
  before = badinput.snapshot(str(tmp_path))
  r = badinput.run_cli("export", tiny_dir("llama_gqa"), "--format", "gguf", "--out", str(tmp_path / "d"), "--force")
  badinput.assert_one_line_error(r, "is a directory", "model.gguf")
  badinput.assert_intact(before)


def test_cli_q8_0_needs_gguf(tiny_dir, tmp_path):
  r = badinput.run_cli("export", tiny_dir("llama_gqa"), "--out", str(tmp_path / "x"), "--dtype", "q8_0")
  badinput.assert_one_line_error(r, "q8_0", "--format gguf")
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("kind,needles", [("gpt2", ["gpt2", "supported: gemma3, llama, mistral, qwen2, qwen3"]),
                                          ("mistral", ["sliding_window=8", "whole context"])])
def test_cli_refuses_what_llama_cpp_cannot_run(tiny_dir, kind, needles, tmp_path):
  r = badinput.run_cli("export", tiny_dir(kind), "--format", "gguf", "--out", str(tmp_path / "m.gguf"))
  badinput.assert_one_line_error(r, "cannot be written as GGUF", *needles)
  assert "writing" not in r.stderr  # refused before the export says it starts
  assert not os.listdir(tmp_path)


def test_uneven_groups_refused(models, tmp_path):
  model = prune_model(models("llama_gqa"), heads={0: [0, 1, 2]}, free_groups=True)
  with pytest.raises(ConfigError, match=r"layers \[0\] have uneven query-to-KV groups.*--free-groups"):
    save_gguf(model, str(tmp_path / "m.gguf"))
  with pytest.raises(UsageError, match="'q4_0' is not supported; choose one of f32, f16, bf16, q8_0"):
    save_gguf(models("llama_gqa"), str(tmp_path / "m.gguf"), dtype="q4_0")
  assert not os.listdir(tmp_path)


def test_failed_write_leaves_nothing(models, monkeypatch, tmp_path):
  import jaxprune.io.gguf_export as ge

  def boom(*a, **k):
    raise OSError("disk full")

  monkeypatch.setattr(ge, "_write", boom)
  with pytest.raises(OSError, match="disk full"):
    save_gguf(models("llama_gqa"), str(tmp_path / "m.gguf"))
  assert not os.listdir(tmp_path)

