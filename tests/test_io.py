"""Hugging Face import: file layouts, dtypes, the key table both ways, and clear errors."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from jaxprune.errors import CheckpointError, ConfigError, ShapeError
from jaxprune.io import params_to_tensors, resolve, spec_from_hf_config, tensors_to_params
from jaxprune.io.hf import read_tensors, weight_files
from tests import tiny


def copy_model(src, dst) -> str:
  shutil.copytree(src, dst)
  return str(dst)


def assert_same_params(a, b):
  la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def edit_config(path, **changes):
  cfg_path = os.path.join(path, "config.json")
  with open(cfg_path) as f:
    cfg = json.load(f)
  cfg.update(changes)
  with open(cfg_path, "w") as f:
    json.dump(cfg, f)


# --------------------------------------------------------------------------
# Layouts and dtypes.


def test_sharded_safetensors_with_index(tiny_dir, tmp_path):
  model = tiny.build("llama_mha")
  model.save_pretrained(tmp_path, max_shard_size="40KB")
  assert os.path.exists(tmp_path / "model.safetensors.index.json")
  files = weight_files(str(tmp_path))
  assert len(files) > 1 and all(f.endswith(".safetensors") for f in files)
  assert_same_params(jaxprune.load(str(tmp_path)).params, jaxprune.load(tiny_dir("llama_mha")).params)


@pytest.mark.parametrize("kind", ["llama_gqa", "gpt2"])
def test_pytorch_model_bin(tiny_dir, tmp_path, kind):
  # transformers 5 always writes safetensors, so write the pickle the way older versions did.
  import torch

  model = tiny.build(kind)
  torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
  shutil.copy(os.path.join(tiny_dir(kind), "config.json"), tmp_path)
  assert weight_files(str(tmp_path)) == [str(tmp_path / "pytorch_model.bin")]
  assert_same_params(jaxprune.load(str(tmp_path)).params, jaxprune.load(tiny_dir(kind)).params)


def test_bf16_safetensors(tmp_path):
  import torch

  model = tiny.build("qwen2").to(torch.bfloat16)
  model.save_pretrained(tmp_path)
  m32 = jaxprune.load(str(tmp_path))
  m16 = jaxprune.load(str(tmp_path), dtype="bfloat16")
  assert {x.dtype for x in jax.tree.leaves(m32.params)} == {jnp.dtype(jnp.float32)}
  assert {x.dtype for x in jax.tree.leaves(m16.params)} == {jnp.dtype(jnp.bfloat16)}
  # bf16 -> f32 is exact, so the f32 load holds exactly the bf16 values.
  assert_same_params(m16.params, jax.tree.map(lambda x: x.astype(jnp.bfloat16), m32.params))
  want = model.model.embed_tokens.weight.detach().float().numpy()
  np.testing.assert_array_equal(np.asarray(m32.params["embed"]["embedding"]), want)


@pytest.mark.parametrize("kind", tuple(tiny.KINDS))
def test_key_table_round_trips(tiny_dir, kind):
  path = tiny_dir(kind)
  spec = jaxprune.load(path).spec
  tensors = read_tensors(weight_files(path))
  back = params_to_tensors(spec, tensors_to_params(spec, tensors))
  # Tied checkpoints may carry lm_head.weight as a copy of the embedding; GPT-2 carries mask buffers.
  expected = {k for k in tensors if not (k == "lm_head.weight" and spec.tie_embeddings) and ".attn.bias" not in k
              and "masked_bias" not in k}
  assert set(back) == expected
  for k in expected:
    np.testing.assert_array_equal(back[k], tensors[k], err_msg=k)


def test_spec_from_config(tiny_dir):
  spec = jaxprune.load(tiny_dir("llama_mqa")).spec
  assert spec.family == "llama" and spec.num_layers == 2 and spec.uniform
  assert (spec.layers[0].num_heads, spec.layers[0].num_kv_heads, spec.layers[0].head_dim) == (4, 1, 16)
  assert spec.rope.kind == "llama3" and spec.rope.factor == 8.0 and spec.rope.original_max_positions == 16
  assert jaxprune.load(tiny_dir("mistral")).spec.sliding_window == 8
  qwen = jaxprune.load(tiny_dir("qwen2")).spec
  assert qwen.qkv_bias and not qwen.o_bias
  gpt2 = jaxprune.load(tiny_dir("gpt2")).spec
  assert gpt2.fam.positions == "learned" and gpt2.act == "gelu_tanh" and gpt2.tie_embeddings


def test_per_layer_config_describes_pruned_models():
  cfg = {"model_type": "llama", "vocab_size": 10, "hidden_size": 16, "intermediate_size": 32,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "per_layer_config": {"1": {"num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 8}}}
  spec = spec_from_hf_config(cfg)
  assert [(l.num_heads, l.num_kv_heads, l.head_dim, l.ffn_dim) for l in spec.layers] == [(4, 2, 4, 32), (2, 1, 4, 8)]


# --------------------------------------------------------------------------
# Errors: each names the value, what was expected and the fix.


def test_missing_path():
  with pytest.raises(CheckpointError) as e:
    jaxprune.load("/no/such/model")
  assert "'/no/such/model' does not exist" in str(e.value)
  assert "Pass a Hugging Face model directory, a .gguf file" in str(e.value)


def test_directory_without_weights(tiny_dir, tmp_path):
  shutil.copy(os.path.join(tiny_dir("llama_mha"), "config.json"), tmp_path)
  with pytest.raises(CheckpointError) as e:
    jaxprune.load(str(tmp_path))
  msg = str(e.value)
  assert f"{tmp_path} holds no model weights" in msg
  assert "model.safetensors" in msg and "pytorch_model.bin" in msg  # what was looked for
  assert "save_pretrained" in msg  # the fix


def test_directory_that_is_not_a_model(tmp_path):
  (tmp_path / "notes.txt").write_text("hello")
  with pytest.raises(CheckpointError, match="has neither config.json nor a .gguf file"):
    jaxprune.load(str(tmp_path))


def test_truncated_safetensors(tiny_dir, tmp_path):
  path = copy_model(tiny_dir("llama_mha"), tmp_path / "m")
  f = os.path.join(path, "model.safetensors")
  with open(f, "r+b") as fh:
    fh.truncate(os.path.getsize(f) // 2)
  with pytest.raises(CheckpointError) as e:
    jaxprune.load(path)
  msg = str(e.value)
  assert f"{f} is not a readable safetensors file" in msg and "truncated" in msg and "Re-download" in msg


def test_index_naming_a_missing_shard(tmp_path):
  tiny.build("llama_mha").save_pretrained(tmp_path, max_shard_size="40KB")
  shards = sorted(p for p in os.listdir(tmp_path) if p.startswith("model-"))
  os.remove(tmp_path / shards[0])
  with pytest.raises(CheckpointError, match=f"names shards that are not in {tmp_path}: \\['{shards[0]}'\\]"):
    jaxprune.load(str(tmp_path))


def test_corrupt_config_json(tiny_dir, tmp_path):
  path = copy_model(tiny_dir("llama_mha"), tmp_path / "m")
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write('{"model_type": "llama", ')
  with pytest.raises(CheckpointError, match="config.json is not valid JSON .*truncated or corrupt"):
    jaxprune.load(path)


def test_config_whose_mlp_width_disagrees_with_the_weights(tiny_dir, tmp_path):
  path = copy_model(tiny_dir("llama_mha"), tmp_path / "m")
  edit_config(path, intermediate_size=100)
  with pytest.raises(ShapeError) as e:
    jaxprune.load(path)
  msg = str(e.value)
  assert "layers[0].mlp.up.kernel: shape (64, 96), but the config implies (64, 100)" in msg
  assert "Check that config.json belongs to these weights" in msg


def test_config_whose_head_count_disagrees_with_the_weights(tiny_dir, tmp_path):
  path = copy_model(tiny_dir("llama_gqa"), tmp_path / "m")
  edit_config(path, num_attention_heads=8, head_dim=16)  # q_proj really has 4 heads of 16
  with pytest.raises((ShapeError, CheckpointError)) as e:
    jaxprune.load(path)
  msg = str(e.value)
  assert "self_attn.q_proj.weight has shape (64, 64)" in msg
  assert "Check that config.json belongs to these weights" in msg


def test_unsupported_model_type(tiny_dir, tmp_path):
  path = copy_model(tiny_dir("llama_mha"), tmp_path / "m")
  edit_config(path, model_type="falcon")
  with pytest.raises(ConfigError) as e:
    jaxprune.load(path)
  assert "model_type 'falcon' is not supported; supported: llama, mistral, qwen2, gpt2" in str(e.value)


def test_unknown_config_key_is_refused(tiny_dir, tmp_path):
  path = copy_model(tiny_dir("llama_mha"), tmp_path / "m")
  edit_config(path, attn_logit_softcapping=30.0)
  with pytest.raises(ConfigError) as e:
    jaxprune.load(path)
  assert "['attn_logit_softcapping']" in str(e.value) and "remove them from config.json" in str(e.value)


@pytest.mark.parametrize("changes,needle", [
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}),
     "rope_type='yarn' is not supported; supported: default, linear, llama3"),
    (dict(hidden_act="relu"), "hidden_act='relu' is not supported; supported: silu"),
])
def test_unsupported_config_values(tiny_dir, tmp_path, changes, needle):
  path = copy_model(tiny_dir("llama_mha"), tmp_path / "m")
  edit_config(path, **changes)
  with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
    jaxprune.load(path)


def test_qwen2_sliding_window_is_refused():
  cfg = {"model_type": "qwen2", "vocab_size": 10, "hidden_size": 16, "intermediate_size": 32,
         "num_hidden_layers": 1, "num_attention_heads": 2, "use_sliding_window": True}
  with pytest.raises(ConfigError, match="use_sliding_window=True is not supported; supported: False"):
    spec_from_hf_config(cfg)


def test_missing_and_unexpected_tensors_are_named(tiny_dir):
  path = tiny_dir("llama_mha")
  spec = jaxprune.load(path).spec
  tensors = read_tensors(weight_files(path))
  del tensors["model.layers.1.mlp.down_proj.weight"]
  tensors["model.layers.0.self_attn.rotary.weight"] = np.zeros(3, np.float32)
  with pytest.raises(CheckpointError) as e:
    tensors_to_params(spec, tensors, source="ckpt")
  msg = str(e.value)
  assert "missing tensors: model.layers.1.mlp.down_proj.weight" in msg
  assert "unexpected tensors: model.layers.0.self_attn.rotary.weight" in msg
  assert "Check that the config belongs to these weights" in msg


def test_a_file_that_is_not_a_model(tmp_path):
  f = tmp_path / "weights.npz"
  f.write_bytes(b"\0" * 16)
  with pytest.raises(CheckpointError, match="is a file but not a .gguf; pass a Hugging Face model directory"):
    resolve(str(f))


def test_directory_without_tokenizer(tiny_dir):
  with pytest.raises(CheckpointError, match="has no usable tokenizer files .*copy the tokenizer"):
    jaxprune.load_tokenizer(tiny_dir("llama_mha"))


def test_io_modules_import_without_cycles():
  """No chain of imports among jaxprune.io's modules (lazy, in-function ones included) comes back
  to where it started: leaves (layout, locate) below the readers and writers, the dispatcher on top."""
  import glob
  import os
  import re

  import jaxprune.io

  root = os.path.dirname(jaxprune.io.__file__)
  graph = {}
  for path in glob.glob(os.path.join(root, "*.py")):
    name = os.path.basename(path)[:-3]
    if name == "__init__":
      continue
    text = open(path).read()
    graph[name] = set(re.findall(r"from jaxprune\.io\.(\w+) import|import jaxprune\.io\.(\w+)", text))
    graph[name] = {a or b for a, b in graph[name]} - {name}

  def visit(node, stack):
    assert node not in stack, "import cycle: " + " -> ".join([*stack, node])
    for nxt in graph.get(node, ()):
      visit(nxt, [*stack, node])

  for node in graph:
    visit(node, [])
  assert "orbax_io" in graph["resolve"] and "locate" in graph["export"]  # the graph was read
