"""GGUF export of Qwen3 and Gemma 3 (llama.cpp's `qwen3` and `gemma3`), on tiny random models.

As tests/test_gguf_export.py does for the LLaMA family: the file read back by
jaxprune's own reader, the metadata and tensors checked against what llama.cpp's
`src/models/qwen3.cpp` and `gemma3.cpp` load, and transformers' GGUF loader
computing jaxprune's logits. Running the files in llama.cpp is
benchmarks/llama_cpp_gemma.py's job.
"""

import dataclasses
import os

import jax
import numpy as np
import pytest

import jaxprune
from jaxprune.errors import ConfigError
from jaxprune.io.gguf_export import save_gguf
from jaxprune.model import Model
from jaxprune.prune import PruneConfig, prune
from jaxprune.surgery import prune_model
from tests import badinput, tiny
from tests.numerics import sensitivity

gguf = pytest.importorskip("gguf")
TOKENS = np.random.default_rng(0).integers(0, tiny.VOCAB, (2, 16))  # twice the window of 8


def uniform(model: Model) -> Model:
  """Every layer keeps query heads 0 and 2 (of the 4; Gemma's one KV head stays) and every other channel."""
  spec = model.spec
  keep = [0, 1] if spec.layers[0].num_kv_heads > 1 else [0, 2]  # Qwen3: its first KV group
  return prune_model(model, heads={i: keep for i in range(spec.num_layers)},
                     channels={i: list(range(0, spec.layers[i].ffn_dim, 2)) for i in range(spec.num_layers)})


@pytest.fixture(scope="module")
def models(tiny_dir):
  cache = {}

  def get(kind: str, layout: str = "dense") -> Model:
    if (kind, layout) not in cache:
      m = jaxprune.load(tiny_dir(kind))
      cache[kind, layout] = uniform(m) if layout == "uniform" else m
    return cache[kind, layout]

  return get


def fields_and_tensors(path: str):
  r = gguf.GGUFReader(path)
  return r.fields, {t.name: t for t in r.tensors}


def _is_norm(path) -> bool:
  return any("norm" in str(getattr(k, "key", "")) for k in path)


# --------------------------------------------------------------------------
# jaxprune's reader gives the model back.


@pytest.mark.parametrize("kind,layout", [("qwen3", "dense"), ("qwen3", "uniform"), ("gemma3_cpp", "dense"),
                                         ("gemma3_cpp", "uniform")])
def test_reads_back_into_jaxprune_unchanged(models, kind, layout, tmp_path):
  """Every parameter bit for bit, but Gemma's norms: the file holds float32(w + 1), as llama.cpp's
  converter stores them, and the reader subtracts the 1, so each comes back as exactly
  float32(float32(w + 1) - 1): within half an ulp of 1 + w, the same scale (1 + w) to the last bit."""
  model = models(kind, layout)
  info = save_gguf(model, str(tmp_path / "m.gguf"))
  assert info.architecture == model.spec.family and not info.per_layer
  back = jaxprune.load(info.path)
  for field in ("layers", "sliding_window", "sliding_layers", "rope", "rope_local", "query_pre_attn_scalar",
                "final_softcap", "tie_embeddings", "qkv_bias"):
    assert getattr(back.spec, field) == getattr(model.spec, field), field
  offset = np.float32(model.spec.fam.norm_offset)
  got = dict(jax.tree_util.tree_leaves_with_path(back.params))
  leaves = jax.tree_util.tree_leaves_with_path(model.params)
  assert len(got) == len(leaves)
  for path, w in leaves:
    w = np.asarray(w, np.float32)
    want = (w + offset) - offset if offset and _is_norm(path) else w
    np.testing.assert_array_equal(np.asarray(got[path]), want, err_msg=jax.tree_util.keystr(path))
  if kind.startswith("gemma3"):  # the offset did change something: the test can tell
    assert any(_is_norm(p) and not np.array_equal(np.asarray(got[p]), np.asarray(w)) for p, w in leaves)


# --------------------------------------------------------------------------
# What llama.cpp loads.


def _shapes(spec, norms: tuple[str, ...]) -> dict[str, list[int]]:
  """Tensor name -> shape (ggml order) as llama_model_{qwen3,gemma3}::load_arch_tensors create them,
  every layer with layer 0's widths; a tensor the file holds beyond these fails llama.cpp's load."""
  D, V, l = spec.hidden_size, spec.vocab_size, spec.layers[0]
  H, q, kv, F = l.head_dim, l.head_dim * l.num_heads, l.head_dim * l.num_kv_heads, l.ffn_dim
  want = {"token_embd.weight": [D, V], "output_norm.weight": [D]}
  if not spec.tie_embeddings:
    want["output.weight"] = [D, V]
  for i in range(spec.num_layers):
    want.update({f"blk.{i}.{k}": s for k, s in {
        "attn_norm.weight": [D], "attn_q.weight": [D, q], "attn_k.weight": [D, kv], "attn_v.weight": [D, kv],
        "attn_output.weight": [q, D], "attn_q_norm.weight": [H], "attn_k_norm.weight": [H], "ffn_norm.weight": [D],
        "ffn_gate.weight": [D, F], "ffn_up.weight": [D, F], "ffn_down.weight": [F, D],
        **{n: [D] for n in norms}}.items()})
  return want


def test_qwen3_holds_what_llama_cpp_loads(models, tmp_path):
  model = models("qwen3", "uniform")
  fields, tensors = fields_and_tensors(save_gguf(model, str(tmp_path / "m.gguf")).path)
  assert fields["general.architecture"].contents() == "qwen3"
  assert {k: list(map(int, t.shape)) for k, t in tensors.items()} == _shapes(model.spec, ())
  l = model.spec.layers[0]
  for key, want in (("attention.head_count", 2), ("attention.head_count_kv", 1), ("feed_forward_length", 48),
                    ("attention.key_length", 16), ("rope.dimension_count", 16)):
    assert fields[f"qwen3.{key}"].contents() == want, key
  assert (l.num_heads, l.num_kv_heads, l.ffn_dim) == (2, 1, 48)
  # NEOX RoPE, as Hugging Face's: Q is written as it is, unpermuted.
  q = np.asarray(model.params["layers"][0]["attn"]["q"]["kernel"], np.float32)
  np.testing.assert_array_equal(np.asarray(tensors["blk.0.attn_q.weight"].data), q.reshape(q.shape[0], -1).T)


@pytest.mark.parametrize("kind,pattern", [("gemma3_cpp", [False, True, True]), ("gemma3_gguf", 6)])
def test_gemma3_holds_what_llama_cpp_loads(models, kind, pattern, tmp_path):
  model = models(kind)
  spec = model.spec
  fields, tensors = fields_and_tensors(save_gguf(model, str(tmp_path / "m.gguf")).path)
  T = gguf.GGUFValueType
  post = ("post_attention_norm.weight", "post_ffw_norm.weight")
  assert {k: list(map(int, t.shape)) for k, t in tensors.items()} == _shapes(spec, post)
  # llama_model_gemma3::load_arch_hparams: the window (uint32), its pattern (a period, or one flag a
  # layer: llama_model_base::load_swa_pattern), the sliding layers' RoPE base and the soft-cap (float32).
  f = lambda k: fields[f"gemma3.{k}"]  # noqa: E731
  assert f("attention.sliding_window").types == [T.UINT32] and f("attention.sliding_window").contents() == 8
  p = f("attention.sliding_window_pattern")
  assert p.types == ([T.UINT32] if isinstance(pattern, int) else [T.ARRAY, T.BOOL]) and p.contents() == pattern
  assert f("rope.freq_base_swa").types == [T.FLOAT32]
  assert f("rope.freq_base_swa").contents() == spec.rope_local.theta == (2e4 if kind == "gemma3_cpp" else 1e4)
  assert f("rope.freq_base").contents() == spec.rope.theta == 1e6
  assert ("gemma3.final_logit_softcapping" in fields) == (kind == "gemma3_cpp")
  assert f("attention.key_length").contents() == spec.layers[0].head_dim
  # The norms hold 1 + w, as the converter writes them.
  w = np.asarray(model.params["layers"][1]["attn"]["q_norm"]["scale"], np.float32)
  np.testing.assert_array_equal(np.asarray(tensors["blk.1.attn_q_norm.weight"].data), w + np.float32(1))


# --------------------------------------------------------------------------
# transformers' own GGUF loader.


@pytest.mark.parametrize("kind,layout", [("qwen3_gguf", "dense"), ("qwen3_gguf", "uniform"),
                                         ("gemma3_gguf", "dense"), ("gemma3_gguf", "uniform")])
def test_transformers_gguf_loader_computes_jaxprune_logits(models, kind, layout, tmp_path):
  """transformers undoes llama.cpp's layout (Gemma's +1 included) with its own code; its float32 forward
  and jaxprune's are then within the model's derived float32 bound (tests/numerics.py, point 2)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  model = models(kind, layout)
  save_gguf(model, str(tmp_path / "m.gguf"))
  tm = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf",
                                                         dtype=torch.float32).eval()
  assert tm.config.num_attention_heads == model.spec.layers[0].num_heads
  with torch.no_grad():
    want = tm(torch.as_tensor(TOKENS)).logits.numpy()
    sensitivity(tm, TOKENS).check_engines(np.asarray(jaxprune.logits(model.spec, model.params, TOKENS)), want,
                                          f"{kind} {layout} gguf")


# --------------------------------------------------------------------------
# What llama.cpp cannot run: refused in one line, nothing written.


def _calib():
  return np.random.default_rng(0).integers(0, tiny.VOCAB, size=(16, 16)).astype(np.int32)


def test_uniform_pruning_without_intercept_exports_and_with_it_is_refused(models, tmp_path):
  """The real pruning run: recommended-uniform keeps one shape, but its intercepts put biases on
  attn_output and ffn_down, which llama.cpp's qwen3 has no tensor for; --no-intercept exports."""
  cfg = PruneConfig.preset("recommended-uniform", sparsity=0.3, batch_size=8)
  with_bias = prune(models("qwen3"), _calib(), cfg).model
  with pytest.raises(ConfigError, match="attention-output and MLP biases .* llama.cpp's qwen3 reads only q/k/v "
                                        "biases; prune with --no-intercept"):
    save_gguf(with_bias, str(tmp_path / "a.gguf"))
  plain = prune(models("qwen3"), _calib(), PruneConfig.preset("recommended-uniform", sparsity=0.3, batch_size=8,
                                                              intercept=False)).model
  assert len({(l.num_heads, l.ffn_dim) for l in plain.spec.layers}) == 1
  assert plain.spec.layers[0].ffn_dim < models("qwen3").spec.layers[0].ffn_dim
  back = jaxprune.load(save_gguf(plain, str(tmp_path / "b.gguf")).path)
  for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(plain.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert sorted(os.listdir(tmp_path)) == ["b.gguf"]


@pytest.mark.parametrize("kind", ["qwen3", "gemma3_cpp"])
def test_per_layer_widths_are_refused(models, kind, tmp_path):
  """llama.cpp's qwen3 and gemma3 read per-layer head counts but create every layer's tensors with
  layer 0's widths (load_arch_tensors), so a per-layer model would not load."""
  model = prune_model(models(kind), channels={0: list(range(0, 96, 3))})
  with pytest.raises(ConfigError, match=r"layers differ in width \(\(heads, KV heads, MLP channels\): "
                                        r"\[.*\]\); llama.cpp's \w+ builds every layer with layer 0's, so prune "
                                        r"with --allocation uniform") as e:
    save_gguf(model, str(tmp_path / "m.gguf"))
  assert "\n" not in str(e.value) and not os.listdir(tmp_path)


def test_cli_refuses_a_gemma_query_scale_llama_cpp_does_not_compute(tiny_dir, tmp_path):
  r = badinput.run_cli("export", tiny_dir("gemma3"), "--format", "gguf", "--out", str(tmp_path / "m.gguf"))
  badinput.assert_one_line_error(r, "cannot be written as GGUF", "query_pre_attn_scalar=24", "32^-1/2")
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("pattern", [[True, False], "5"])
def test_reader_refuses_a_window_pattern_llama_cpp_would_not_read(models, monkeypatch, pattern, tmp_path):
  """A crafted `sliding_window_pattern` (flags for 2 of 3 layers, a string) gets one line naming the key."""
  import jaxprune.io.gguf_export as ge

  T = gguf.GGUFValueType

  def crafted(writer, spec, arch):
    writer.add_key_value("gemma3.attention.sliding_window", 8, T.UINT32)
    if isinstance(pattern, list):
      writer.add_key_value("gemma3.attention.sliding_window_pattern", pattern, T.ARRAY, T.BOOL)
    else:
      writer.add_key_value("gemma3.attention.sliding_window_pattern", pattern, T.STRING)

  monkeypatch.setattr(ge, "_family_meta", crafted)
  path = save_gguf(models("gemma3_cpp"), str(tmp_path / "m.gguf")).path
  r = badinput.run_cli("inspect", path)
  badinput.assert_one_line_error(r, "gemma3.attention.sliding_window_pattern", repr(pattern),
                                 "a period (an integer >= 0) or 3 per-layer flags")


@pytest.mark.parametrize("change", [dict(rope_local=None), {}])
def test_scaled_rope_on_sliding_layers_is_refused(models, change, tmp_path):
  """llama.cpp's gemma3 scales only the full-attention layers' RoPE (its sliding layers' scale is 1):
  a linear scaling reaching the sliding layers, theirs or the model's, is refused."""
  from jaxprune.spec import RopeSpec

  spec = models("gemma3_cpp").spec
  scaled = RopeSpec(1e6, "linear", 8.0)
  spec = dataclasses.replace(spec, rope=scaled, **(change or {"rope_local": RopeSpec(2e4, "linear", 2.0)}))
  with pytest.raises(ConfigError, match="sliding layers' RoPE scaling 'linear': llama.cpp's gemma3 scales only"):
    save_gguf(Model(spec, models("gemma3_cpp").params), str(tmp_path / "m.gguf"))
  assert not os.listdir(tmp_path)
  # The full-attention layers' scaling alone is written (rope.scaling.*) and exported.
  ok = dataclasses.replace(models("gemma3_cpp").spec, rope=scaled)
  fields, _ = fields_and_tensors(save_gguf(Model(ok, models("gemma3_cpp").params), str(tmp_path / "ok.gguf")).path)
  assert fields["gemma3.rope.scaling.type"].contents() == "linear"
  assert fields["gemma3.rope.scaling.factor"].contents() == 8.0
