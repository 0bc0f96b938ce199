"""Export to Hugging Face directories: PyTorch parity, exact round trips, refusals, atomic writes."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from jaxprune import cli, families
from jaxprune.errors import CheckpointError, ConfigError, UsageError
from jaxprune.io import export as export_mod
from jaxprune.io.atomic import atomic_dir, write_json
from jaxprune.io.export import save_hf
from jaxprune.io.target import MARKER
from jaxprune.model import Model
from jaxprune.spec import spec_from_params
from jaxprune.surgery import prune_model
from tests import tiny
from tests.numerics import sensitivity

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from jaxprune.pytorch import count_parameters, load_pruned, native_support  # noqa: E402

TOKENS = np.random.default_rng(0).integers(0, tiny.VOCAB, (2, 16))  # longer than mistral's window of 8


# --------------------------------------------------------------------------
# Helpers.


def prune_plan(model: Model, layout: str) -> Model:
  """dense | uniform (same sizes in every layer) | per_layer (sizes differ) | gpt2_heads (uniform head pruning)."""
  if layout == "dense":
    return model
  heads, channels = {}, {}
  for i, l in enumerate(model.spec.layers):
    G = l.num_heads // l.num_kv_heads
    half = ([g * G + j for g in range(l.num_kv_heads) for j in range(G // 2)] if G > 1
            else list(range(0, l.num_heads, 2)))
    if layout == "uniform":
      channels[i] = list(range(0, l.ffn_dim, 2))
      if model.spec.family != "gpt2":  # GPT-2 configs cannot say pruned heads: see gpt2_heads
        heads[i] = half
    elif layout == "gpt2_heads":
      heads[i] = half
    elif i == 0:
      heads[i], channels[i] = half, list(range(40))
    else:
      channels[i] = list(range(0, l.ffn_dim, 3))
  return prune_model(model, heads=heads, channels=channels)


def add_biases(model: Model, groups, seed: int = 0) -> Model:
  """The model with random biases added to the projections of `groups` (as reconstruction with an intercept)."""
  rng = np.random.default_rng(seed)
  blocks = []
  for blk in model.params["layers"]:
    blk = {k: dict(v) for k, v in blk.items()}
    for g in groups:
      for mod, proj in export_mod._BIAS_LEAVES[g]:
        k = blk[mod][proj]["kernel"]
        shape = k.shape[-1:] if proj in ("o", "down") else k.shape[1:]
        blk[mod][proj] = {**blk[mod][proj], "bias": jnp.asarray(rng.normal(size=shape), k.dtype)}
    blocks.append(blk)
  params = {**model.params, "layers": tuple(blocks)}
  return Model.checked(spec_from_params(model.spec, params), params, model.source)


def bias_size(spec, groups) -> int:
  """Parameters of the biases of `groups` over all layers."""
  per = {"qkv": lambda l: (l.num_heads + 2 * l.num_kv_heads) * l.head_dim, "o": lambda l: spec.hidden_size,
         "mlp": lambda l: (2 if spec.fam.gated_mlp else 1) * l.ffn_dim + spec.hidden_size}
  return sum(per[g](l) for g in groups for l in spec.layers)


def jax_logits(model: Model) -> np.ndarray:
  return np.asarray(jaxprune.logits(model.spec, model.params, TOKENS))


def torch_logits(tm) -> np.ndarray:
  with torch.no_grad():
    return tm(torch.as_tensor(TOKENS)).logits.float().numpy()


def assert_torch_parity(tm, model: Model, what: str = "tiny export"):
  """The exported model in PyTorch computes jaxprune's logits.

  A float64 copy of the PyTorch model is the reference and the model's sensitivity gives
  the bound (tests/numerics.py, point 2), so it holds whatever the CPU rounds like.
  """
  with torch.no_grad():
    sensitivity(tm, TOKENS).check_engines(jax_logits(model), torch_logits(tm), what)


def stock_load(path: str):
  return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def remote_load(path: str):
  """Stock transformers with the modeling file a per-layer export ships (`auto_map`)."""
  return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=True).eval()


def assert_same_model(a: Model, b: Model):
  assert a.spec == b.spec
  chex.assert_trees_all_equal_structs(a.params, b.params)
  chex.assert_trees_all_equal_dtypes(a.params, b.params)
  chex.assert_trees_all_equal(a.params, b.params, strict=True)


def torch_layer_sizes(tm, spec) -> list[tuple[int, int, int]]:
  """(query width N*H, key width K*H, MLP width F) of every torch layer."""
  out = []
  if spec.family == "gpt2":
    for blk in tm.transformer.h:
      w = blk.attn.c_attn.weight.shape[1] // 3
      out.append((w, w, blk.mlp.c_fc.weight.shape[1]))
  else:
    for layer in tm.model.layers:
      a = layer.self_attn
      out.append((a.q_proj.weight.shape[0], a.k_proj.weight.shape[0], layer.mlp.up_proj.weight.shape[0]))
  return out


def spec_sizes(spec) -> list[tuple[int, int, int]]:
  return [(l.num_heads * l.head_dim, l.num_kv_heads * l.head_dim, l.ffn_dim) for l in spec.layers]


@pytest.fixture(scope="module")
def models(tiny_dir):
  cache = {}

  def get(kind: str) -> Model:
    if kind not in cache:
      cache[kind] = jaxprune.load(tiny_dir(kind))
    return cache[kind]

  return get


def no_debris(parent: str, name: str) -> bool:
  return not [f for f in os.listdir(parent) if f.startswith(f".{name}.")]


# --------------------------------------------------------------------------
# Parity and round trips.


@pytest.mark.parametrize("layout", ["dense", "uniform", "per_layer"])
@pytest.mark.parametrize("kind", sorted(tiny.KINDS))
def test_export_parity_and_round_trip(models, kind, layout, tmp_path):
  model = prune_plan(models(kind), layout)
  out = str(tmp_path / "out")
  info = save_hf(model, out)
  cfg = json.load(open(os.path.join(out, "config.json")))

  assert info.per_layer == (layout == "per_layer") == ("per_layer_config" in cfg)
  assert info.stock == (layout != "per_layer")
  if layout != "dense" and kind != "gpt2":  # a plain config: reduced sizes, explicit head_dim
    # The top level holds the most common layer shape (ties: the first layer's), per_layer_config the rest.
    shapes = [(l.num_heads, l.num_kv_heads, l.head_dim, l.ffn_dim) for l in model.spec.layers]
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["intermediate_size"]) == \
        max(shapes, key=shapes.count)

  # transformers' own config classes read both forms, each layer at its size (so AutoTokenizer works too).
  hf_cfg = transformers.AutoConfig.from_pretrained(out)
  per_layer_heads = [c.num_attention_heads for c in hf_cfg.per_layer_config]
  assert per_layer_heads == [l.num_heads for l in model.spec.layers]

  tm = stock_load(out) if info.stock else load_pruned(out, dtype=torch.float32)
  if layout == "per_layer":
    assert tm.jaxprune_loader == "per_layer"
  assert torch_layer_sizes(tm, model.spec) == spec_sizes(model.spec)
  assert_torch_parity(tm, model)
  assert count_parameters(tm) == info.exported_params == model.num_params
  assert info.padded_params == 0
  # A per-layer export ships its modeling file: stock from_pretrained builds every layer at its size.
  assert ("auto_map" in cfg) == (layout == "per_layer") == os.path.exists(os.path.join(out, "modeling_jaxprune.py"))
  if layout == "per_layer":
    rm = remote_load(out)
    assert torch_layer_sizes(rm, model.spec) == spec_sizes(model.spec)
    assert_torch_parity(rm, model)
    assert count_parameters(rm) == model.num_params

  # JAX -> HF -> JAX is exact, through jaxprune.json and through config.json alone (writer and reader agree).
  assert_same_model(jaxprune.load(out), model)
  os.remove(os.path.join(out, "jaxprune.json"))
  assert_same_model(jaxprune.load(out), model)


def test_load_pruned_uses_native_path_for_plain_configs(models, tmp_path):
  out = str(tmp_path / "plain")
  save_hf(prune_plan(models("llama_gqa"), "uniform"), out)
  assert native_support(out)
  assert load_pruned(out).jaxprune_loader == "transformers"


def test_per_layer_model_generates(models, tmp_path):
  out = str(tmp_path / "pl")
  save_hf(prune_plan(models("llama_gqa"), "per_layer"), out)
  tm = load_pruned(out)
  ids = tm.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
  assert ids.shape == (1, 7)


def test_gpt2_uniform_head_pruning_goes_per_layer(models, tmp_path):
  """GPT-2 derives head_dim from n_embd/n_head, so pruned heads need per-layer n_head and load_pruned."""
  model = prune_plan(models("gpt2"), "gpt2_heads")
  out = str(tmp_path / "g")
  info = save_hf(model, out)
  cfg = json.load(open(os.path.join(out, "config.json")))
  assert info.per_layer and not info.stock
  assert cfg["n_head"] == 4 and all(v == {"n_head": 2} for v in cfg["per_layer_config"].values())
  assert_torch_parity(load_pruned(out, dtype=torch.float32), model)
  assert_torch_parity(remote_load(out), model)
  assert_same_model(jaxprune.load(out), model)


def test_heads_not_dividing_hidden_size(models, tmp_path):
  """transformers' LlamaConfig rejects 3 heads for hidden 64 even with head_dim: the heads go per layer."""
  model = prune_model(models("llama_mha"), heads={0: [0, 1, 3], 1: [0, 2, 3]})
  out = str(tmp_path / "h3")
  info = save_hf(model, out)
  cfg = json.load(open(os.path.join(out, "config.json")))
  assert info.per_layer and not info.stock and cfg["num_attention_heads"] == 4
  assert [c.num_attention_heads for c in transformers.AutoConfig.from_pretrained(out).per_layer_config] == [3, 3]
  assert_torch_parity(load_pruned(out, dtype=torch.float32), model)
  assert_torch_parity(remote_load(out), model)
  assert_same_model(jaxprune.load(out), model)


@pytest.mark.parametrize("kind,groups,model_type,padded", [
    ("llama_gqa", ("o",), "llama", ("qkv",)),
    ("llama_gqa", ("qkv",), "llama", ("o",)),
    ("llama_gqa", ("o", "mlp"), "llama", ("qkv",)),
    ("qwen2", ("o",), "llama", ()),
    ("qwen2", ("mlp",), "llama", ("o",)),
    ("gpt2", (), "gpt2", ()),
])
def test_biases_from_reconstruction(models, kind, groups, model_type, padded, tmp_path):
  model = add_biases(prune_plan(models(kind), "uniform"), groups)
  target = export_mod.hf_target(model.spec)
  assert (target.model_type, target.padded) == (model_type, padded)
  out = str(tmp_path / "b")
  info = save_hf(model, out)
  tm = stock_load(out)
  assert_torch_parity(tm, model)
  assert info.padded_params == bias_size(model.spec, padded)
  assert (info.padded_params > 0) == bool(padded)
  assert count_parameters(tm) == info.exported_params == model.num_params + info.padded_params
  assert_same_model(jaxprune.load(out), model)  # padded zeros are dropped again


@pytest.mark.parametrize("layout", ["uniform", "per_layer"])
@pytest.mark.parametrize("kind", ["gemma3", "qwen3"])
def test_mlp_biases_the_family_cannot_hold_go_through_the_modeling_file(models, kind, layout, tmp_path):
  """Gemma 3's and Qwen3's configs have no MLP bias, and no other family computes their block: the
  export keeps the family, writes `mlp_bias: true` and ships the modeling file that adds them."""
  model = add_biases(prune_plan(models(kind), layout), ("o", "mlp"))
  out = str(tmp_path / "b")
  info = save_hf(model, out)
  cfg = json.load(open(os.path.join(out, "config.json")))
  assert info.model_type == families.get(kind).model_type and cfg["mlp_bias"] is True
  assert not info.stock and "auto_map" in cfg and os.path.exists(os.path.join(out, "modeling_jaxprune.py"))
  padded = ("qkv",)  # the config's attention_bias covers q, k, v and o
  assert info.padded_params == bias_size(model.spec, padded)
  for tm in (remote_load(out), load_pruned(out, dtype=torch.float32)):
    assert tm.model.layers[0].mlp.down_proj.bias is not None
    assert_torch_parity(tm, model)
    assert count_parameters(tm) == info.exported_params == model.num_params + info.padded_params
  assert_same_model(jaxprune.load(out), model)
  # Stock transformers without the modeling file would drop the biases: it is not offered as the loader.
  assert "trust_remote_code=True" in info.loader


def test_mistral_without_window_and_with_bias_becomes_llama(models, tmp_path):
  base = models("mistral")
  model = add_biases(Model(dataclasses.replace(base.spec, sliding_window=None), base.params, base.source), ("o",))
  out = str(tmp_path / "m")
  info = save_hf(model, out)
  assert info.model_type == "llama"
  assert_torch_parity(stock_load(out), model)


def test_bf16_export(models, tmp_path):
  model = models("llama_gqa")
  out = str(tmp_path / "bf16")
  info = save_hf(model, out, dtype="bfloat16")
  assert info.dtype == "bfloat16" and json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
  tm = transformers.AutoModelForCausalLM.from_pretrained(out)
  assert next(tm.parameters()).dtype == torch.bfloat16
  back = jaxprune.load(out)
  cast = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), model.params)
  assert_same_model(back, Model(model.spec, cast))


def test_sharded_safetensors(models, tmp_path):
  model = prune_plan(models("llama_gqa"), "per_layer")
  out = str(tmp_path / "sh")
  info = save_hf(model, out, max_shard_size="20KB")
  assert "model.safetensors.index.json" in info.files and len(info.files) > 5
  assert_torch_parity(load_pruned(out, dtype=torch.float32), model)
  assert_same_model(jaxprune.load(out), model)


def _tiny_tokenizer():
  from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
  tok = Tokenizer(tok_models.WordLevel({f"w{i}": i for i in range(tiny.VOCAB)}, unk_token="w2"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w2", bos_token="w0", eos_token="w1")


def test_tokenizer_and_generation_config(models, tiny_dir, tmp_path):
  src = str(tmp_path / "src")
  shutil.copytree(tiny_dir("llama_gqa"), src)
  _tiny_tokenizer().save_pretrained(src)
  model = jaxprune.load(src)  # the export takes the tokenizer from model.source
  out = str(tmp_path / "out")
  assert save_hf(prune_plan(model, "uniform"), out).tokenizer
  tok = transformers.AutoTokenizer.from_pretrained(out)
  assert tok("w5 w7", add_special_tokens=False)["input_ids"] == [5, 7]
  gen = transformers.GenerationConfig.from_pretrained(out)
  assert (gen.bos_token_id, gen.eos_token_id) == (model.spec.bos_token_id, model.spec.eos_token_id)


def test_no_tokenizer_is_invented(models, tmp_path):
  """A source without tokenizer files gives an export without them (not an empty tokenizer)."""
  info = save_hf(models("qwen2"), str(tmp_path / "q"))
  assert not info.tokenizer
  assert not [f for f in os.listdir(tmp_path / "q") if f.startswith("tokenizer")]


# --------------------------------------------------------------------------
# Refusals.


def test_uneven_groups_refused_for_hf_but_kept_jax_only(models, tmp_path):
  model = prune_model(models("llama_gqa"), heads={0: [0, 1, 2]}, free_groups=True)
  assert model.spec.layers[0].kv_map is not None
  out = str(tmp_path / "u")
  with pytest.raises(ConfigError, match=r"layers \[0\] have uneven query-to-KV groups.*jax_only=True"):
    save_hf(model, out)
  assert not os.path.exists(out) and no_debris(str(tmp_path), "u")
  info = save_hf(model, out, jax_only=True)
  assert info.format == "jaxprune" and not os.path.exists(os.path.join(out, "config.json"))
  assert_same_model(jaxprune.load(out), model)
  with pytest.raises(CheckpointError, match="JAX-only export"):
    load_pruned(out)


def test_mistral_window_with_bias_refused(models, tmp_path):
  model = add_biases(models("mistral"), ("o",))
  out = str(tmp_path / "m")
  with pytest.raises(ConfigError, match="sliding_window=8"):
    save_hf(model, out)
  assert not os.path.exists(out)


def test_unsupported_family_refused(models, monkeypatch, tmp_path):
  # A family jaxprune computes but has no tensor table or transformers class for.
  gemma = dataclasses.replace(families.get("llama"), name="gemma", model_type="gemma", act="gelu_tanh",
                              architectures=(), table=None)
  monkeypatch.setitem(families._REGISTRY, "gemma", gemma)
  base = models("llama_gqa")
  model = Model(dataclasses.replace(base.spec, family="gemma"), base.params)
  out = str(tmp_path / "g")
  with pytest.raises(ConfigError, match="family 'gemma' cannot be exported; supported: gemma3, gpt2, llama, mistral, qwen2, qwen3"):
    save_hf(model, out)
  with pytest.raises(ConfigError, match="gemma"):
    save_hf(model, out, jax_only=True)
  assert not os.path.exists(out)


def test_load_pruned_corrupt_export(models, tmp_path):
  out = str(tmp_path / "c")
  save_hf(prune_plan(models("llama_gqa"), "per_layer"), out)
  f = os.path.join(out, "model.safetensors")
  with open(f, "r+b") as fh:
    fh.truncate(os.path.getsize(f) - 100)
  with pytest.raises(CheckpointError, match="truncated or corrupt"):
    load_pruned(out)
  os.remove(os.path.join(out, "config.json"))
  with pytest.raises(CheckpointError, match="has no config.json"):
    load_pruned(out)


def test_load_pruned_refuses_other_families(tmp_path):
  d = tmp_path / "bert"
  d.mkdir()
  (d / "config.json").write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises(ConfigError, match="model_type 'bert' is not supported by load_pruned"):
    load_pruned(str(d))


# --------------------------------------------------------------------------
# The command line and atomic writes.


def run_cli(capsys, *argv) -> tuple[int, str, str]:
  rc = cli.main(list(argv))
  captured = capsys.readouterr()
  return rc, captured.out, captured.err


def test_cli_export_hf_then_load(tiny_dir, tmp_path, capsys):
  out = str(tmp_path / "o")
  rc, stdout, _ = run_cli(capsys, "export", tiny_dir("llama_gqa"), "--format", "hf", "--out", out)
  assert rc == 0
  summary = json.loads(stdout.strip().splitlines()[-1])
  assert summary["loader"] == "transformers.AutoModelForCausalLM.from_pretrained"
  assert_same_model(jaxprune.load(out), jaxprune.load(tiny_dir("llama_gqa")))


def test_cli_refuses_existing_output_and_changes_nothing(tiny_dir, tmp_path, capsys):
  out = tmp_path / "taken"
  out.mkdir()
  (out / "keep.txt").write_text("precious")
  before = sorted(os.listdir(tmp_path))
  rc, _, err = run_cli(capsys, "export", tiny_dir("llama_gqa"), "--out", str(out))
  assert rc == 2
  assert err.count("\n") == 1 and "already exists; pass --force" in err
  assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
  assert sorted(os.listdir(tmp_path)) == before

  # --force replaces only what jaxprune wrote: this directory is the user's.
  rc, _, err = run_cli(capsys, "export", tiny_dir("llama_gqa"), "--out", str(out), "--force")
  assert rc == 2 and "was not written by jaxprune" in err
  assert os.listdir(out) == ["keep.txt"] and sorted(os.listdir(tmp_path)) == before
  os.remove(out / "keep.txt")
  os.rmdir(out)
  for _ in range(2):  # the second replaces the first, which carries jaxprune's marker
    rc, _, _ = run_cli(capsys, "export", tiny_dir("llama_gqa"), "--out", str(out), *(("--force",) if _ else ()))
    assert rc == 0
  assert "config.json" in os.listdir(out) and no_debris(str(tmp_path), "taken")


def _copy(tiny_dir, kind, dst) -> str:
  shutil.copytree(tiny_dir(kind), dst)
  return str(dst)


def test_cli_corrupt_input(tiny_dir, tmp_path, capsys):
  src = _copy(tiny_dir, "llama_gqa", tmp_path / "src")
  f = os.path.join(src, "model.safetensors")
  with open(f, "r+b") as fh:
    fh.truncate(os.path.getsize(f) // 2)
  out = str(tmp_path / "o")
  rc, _, err = run_cli(capsys, "export", src, "--out", out)
  assert rc == 2 and "truncated or corrupt" in err and err.count("\n") == 1
  assert not os.path.exists(out) and no_debris(str(tmp_path), "o")


def test_cli_partial_input(tiny_dir, tmp_path, capsys):
  from safetensors.numpy import load_file, save_file
  src = _copy(tiny_dir, "llama_gqa", tmp_path / "src")
  f = os.path.join(src, "model.safetensors")
  tensors = load_file(f)
  del tensors["model.layers.1.mlp.down_proj.weight"]
  save_file(tensors, f)
  out = str(tmp_path / "o")
  rc, _, err = run_cli(capsys, "export", src, "--out", out)
  assert rc == 2 and "missing tensors: model.layers.1.mlp.down_proj.weight" in err
  assert not os.path.exists(out)


def test_cli_unsupported_family(tmp_path, capsys):
  src = tmp_path / "bert"
  src.mkdir()
  (src / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
  out = str(tmp_path / "o")
  rc, _, err = run_cli(capsys, "export", str(src), "--out", out)
  assert rc == 2 and "model_type 'bert' is not supported" in err
  assert not os.path.exists(out)


def test_failed_write_leaves_nothing(models, monkeypatch, tmp_path):
  def boom(*a, **k):
    raise RuntimeError("disk full")

  monkeypatch.setattr(export_mod, "write_safetensors", boom)
  out = str(tmp_path / "o")
  with pytest.raises(RuntimeError, match="disk full"):
    save_hf(models("llama_gqa"), out)
  assert os.listdir(tmp_path) == []


def test_atomic_dir_force_keeps_old_until_success(tmp_path):
  out = tmp_path / "d"
  with atomic_dir(str(out)) as tmp:
    (pathlib.Path(tmp) / "old").write_text("1")
  with pytest.raises(ValueError):
    with atomic_dir(str(out), force=True) as tmp:
      open(os.path.join(tmp, "new"), "w").close()
      raise ValueError("fail")
  assert sorted(os.listdir(out)) == [MARKER, "old"] and os.listdir(tmp_path) == ["d"]
  with atomic_dir(str(out), force=True) as tmp:
    open(os.path.join(tmp, "new"), "w").close()
  assert sorted(os.listdir(out)) == [MARKER, "new"] and os.listdir(tmp_path) == ["d"]


def test_write_json(tmp_path):
  p = str(tmp_path / "r.json")
  write_json(p, {"a": 1})
  with pytest.raises(UsageError, match="already exists"):
    write_json(p, {"a": 2})
  assert json.load(open(p)) == {"a": 1}
  write_json(p, {"a": 2}, force=True)
  assert json.load(open(p)) == {"a": 2} and os.listdir(tmp_path) == ["r.json"]


def test_bad_dtype_and_shard_size(models, tmp_path):
  with pytest.raises(UsageError, match="dtype 'int8' is not supported"):
    save_hf(models("llama_gqa"), str(tmp_path / "x"), dtype="int8")
  with pytest.raises(UsageError, match="not a size"):
    save_hf(models("llama_gqa"), str(tmp_path / "x"), max_shard_size="lots")
  assert os.listdir(tmp_path) == []
