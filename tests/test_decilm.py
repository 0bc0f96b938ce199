"""`jaxprune export --format decilm`: the DeciLM (nemotron-nas) config that vLLM and TensorRT-LLM load.

The config is checked the way vLLM's nemotron_nas model reads it (through the config
class the export ships, by attribute), the weights against the plain HF export, and the
model that config describes, rebuilt from it in transformers' LLaMA modules, against
jaxprune's logits.
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest

import jaxprune
from jaxprune.errors import ConfigError
from jaxprune.io.decilm import decilm_config, decilm_problems, ffn_mult, vllm_ffn_width
from jaxprune.io.export import save_hf
from jaxprune.surgery import prune_model
from tests import tiny
from tests.badinput import assert_intact, assert_one_line_error, run_cli, snapshot
from tests.numerics import sensitivity

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOKENS = np.random.default_rng(0).integers(0, tiny.VOCAB, (2, 16))


@pytest.fixture(scope="module")
def gqa(tiny_dir):
  return jaxprune.load(tiny_dir("llama_gqa"))


def mlp_pruned(model, widths):
  """`model` with the first widths[i] MLP channels of layer i kept (MLP-only pruning: heads untouched)."""
  return prune_model(model, channels={i: list(range(w)) for i, w in enumerate(widths)})


def vllm_reading(path: str) -> list[dict]:
  """Per layer, the sizes vLLM's nemotron_nas builds from the exported config (its own rules)."""
  cfg = transformers.AutoConfig.from_pretrained(path, trust_remote_code=True)
  out = []
  for block in cfg.block_configs:
    ffn = block.ffn
    width = vllm_ffn_width(ffn.ffn_mult, cfg.hidden_size) if hasattr(ffn, "ffn_mult") else ffn.intermediate_size
    out.append({"num_heads": cfg.num_attention_heads, "head_dim": cfg.head_dim, "ffn_dim": width,
                "num_kv_heads": cfg.num_attention_heads // block.attention.n_heads_in_group})
  return out


def spec_reading(spec) -> list[dict]:
  return [{"num_heads": l.num_heads, "head_dim": l.head_dim, "ffn_dim": l.ffn_dim, "num_kv_heads": l.num_kv_heads}
          for l in spec.layers]


def rebuilt_from_config(path: str):
  """The LLaMA model the DeciLM config describes, in transformers' modules, with the exported weights."""
  from safetensors.torch import load_file

  cfg = json.load(open(os.path.join(path, "config.json")))
  blocks = cfg["block_configs"]
  base = transformers.LlamaConfig(
      **{k: cfg[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "head_dim", "hidden_act",
                             "max_position_embeddings", "rms_norm_eps", "rope_parameters", "tie_word_embeddings")},
      num_attention_heads=cfg["num_attention_heads"],
      num_key_value_heads=cfg["num_attention_heads"] // blocks[0]["attention"]["n_heads_in_group"],
      intermediate_size=blocks[0]["ffn"]["intermediate_size"])
  model = transformers.LlamaForCausalLM(base).eval()
  for layer, block in zip(model.model.layers, blocks):
    own = copy.deepcopy(base)
    own.intermediate_size = block["ffn"]["intermediate_size"]
    own.num_key_value_heads = cfg["num_attention_heads"] // block["attention"]["n_heads_in_group"]
    layer.mlp = transformers.models.llama.modeling_llama.LlamaMLP(own)
    layer.self_attn = transformers.models.llama.modeling_llama.LlamaAttention(own, layer.self_attn.layer_idx)
  state = load_file(os.path.join(path, "model.safetensors"))
  model.load_state_dict(state, strict=not cfg["tie_word_embeddings"])
  if cfg["tie_word_embeddings"]:
    model.tie_weights()
  return model.float().eval()


def assert_logits_match(tm, model, what: str):
  """`tm` computes `model`'s jaxprune logits, within the model's own float32 sensitivity (tests/numerics.py,
  point 2)."""
  ours = np.asarray(jaxprune.logits(model.spec, model.params, TOKENS))
  with torch.no_grad():
    sensitivity(tm, TOKENS).check_engines(ours, tm(torch.as_tensor(TOKENS)).logits.float().numpy(), what)


# --------------------------------------------------------------------------
# The FFN width rule.


def test_ffn_mult_rule_matches_hand_computed_widths():
  # 2 * 1.3125 * 8192 / 3 = 7168 exactly; 2 * 5.25 * 8192 / 3 = 28672 (LLaMA-3-70B's width).
  assert vllm_ffn_width(1.3125, 8192) == 7168
  assert vllm_ffn_width(5.25, 8192) == 28672
  # Not a multiple of 256: rounded up to the next one.
  assert vllm_ffn_width(1.0, 576) == 512  # int(384) -> 512
  assert ffn_mult(7168, 8192) == 1.3125


@pytest.mark.parametrize("hidden", [576, 2048, 8192])
def test_ffn_mult_round_trips_exactly_for_multiples_of_256_only(hidden):
  for width in range(1, 4 * hidden, 37):
    mult = ffn_mult(width, hidden)
    if width % 256:
      assert mult is None, width
    else:
      assert mult is not None and vllm_ffn_width(mult, hidden) == width, width


# --------------------------------------------------------------------------
# What vLLM reads, the weights, the numbers.


@pytest.mark.parametrize("widths", [(40, 48), (48, 48)])
def test_config_fields_as_vllm_reads_them(gqa, widths, tmp_path):
  model = mlp_pruned(gqa, widths)
  info = save_hf(model, str(tmp_path / "d"), decilm=True)
  cfg = json.load(open(tmp_path / "d" / "config.json"))
  assert cfg["architectures"] == ["DeciLMForCausalLM"] and cfg["model_type"] == "nemotron-nas"
  assert [b["ffn"]["intermediate_size"] for b in cfg["block_configs"]] == list(widths)
  assert vllm_reading(str(tmp_path / "d")) == spec_reading(model.spec)
  assert info.model_type == "nemotron-nas" and "configuration_decilm.py" in info.files
  assert "vllm serve" in info.loader


def test_uniform_head_pruning_keeps_one_head_count(gqa, tmp_path):
  # One query head of each KV group removed in every layer: 2 heads, 2 KV groups, everywhere.
  model = prune_model(gqa, heads={0: [0, 2], 1: [1, 3]}, channels={0: list(range(64))})
  save_hf(model, str(tmp_path / "d"), decilm=True)
  reading = vllm_reading(str(tmp_path / "d"))
  assert reading == spec_reading(model.spec)
  assert {r["num_heads"] for r in reading} == {2}


def test_weights_are_the_hf_exports_and_jaxprune_reads_them_back(gqa, tmp_path):
  from safetensors.numpy import load_file

  model = mlp_pruned(gqa, (40, 48))
  save_hf(model, str(tmp_path / "hf"))
  save_hf(model, str(tmp_path / "deci"), decilm=True)
  a, b = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(tmp_path / "deci" / "model.safetensors"))
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  back = jaxprune.load(str(tmp_path / "deci"))
  assert back.spec == model.spec


def test_model_the_config_describes_computes_jaxprunes_logits(gqa, tmp_path):
  model = mlp_pruned(gqa, (40, 56))
  save_hf(model, str(tmp_path / "d"), decilm=True)
  assert_logits_match(rebuilt_from_config(str(tmp_path / "d")), model, "decilm export")


# --------------------------------------------------------------------------
# Models DeciLM cannot hold: None from the API, one line from the CLI, nothing written.


def test_per_layer_heads_have_no_decilm_config(gqa):
  model = prune_model(gqa, heads={0: [0, 2]})
  assert decilm_config(model.spec) is None
  assert "query-head counts [2, 4]" in decilm_problems(model.spec)[0]
  with pytest.raises(ConfigError, match="query-head counts"):
    save_hf(model, "/nonexistent/never-written", decilm=True)


@pytest.mark.parametrize("kind,needle", [("llama_bias", "biases"), ("gpt2", "LLaMA-only"), ("qwen2", "LLaMA-only"),
                                         ("mistral", "sliding_window=8")])
def test_cli_refuses_what_decilm_cannot_hold(tiny_dir, kind, needle, tmp_path):
  src = tiny_dir(kind)
  before = snapshot(src)
  out = tmp_path / "out"
  r = run_cli("export", src, "--format", "decilm", "--out", str(out))
  assert_one_line_error(r, "DeciLM", needle, "--format hf")
  assert_intact(before)
  assert not out.exists() and os.listdir(tmp_path) == []


def test_cli_refuses_per_layer_heads(gqa, tmp_path):
  src = str(tmp_path / "src")
  save_hf(prune_model(gqa, heads={0: [0, 2]}), src)
  before = snapshot(src)
  r = run_cli("export", src, "--format", "decilm", "--out", str(tmp_path / "out"))
  assert_one_line_error(r, "query-head counts", "MLP channels")
  assert_intact(before)
  assert not (tmp_path / "out").exists()


def test_cli_writes_decilm(gqa, tmp_path):
  src = str(tmp_path / "src")
  save_hf(mlp_pruned(gqa, (40, 48)), src)
  r = run_cli("export", src, "--format", "decilm", "--out", str(tmp_path / "out"))
  assert r.rc == 0, r.stderr
  summary = json.loads(r.stdout.strip().splitlines()[-1])
  assert summary["model_type"] == "nemotron-nas" and "vllm serve" in summary["loader"]
  assert vllm_reading(str(tmp_path / "out")) == spec_reading(jaxprune.load(src).spec)


def test_llama3_rope_is_written_in_both_forms(tiny_dir, tmp_path):
  model = mlp_pruned(jaxprune.load(tiny_dir("llama_mqa")), (40, 48))
  cfg = decilm_config(model.spec)
  rope = model.spec.rope
  assert cfg["rope_parameters"]["rope_type"] == cfg["rope_scaling"]["rope_type"] == "llama3"
  assert cfg["rope_scaling"]["factor"] == rope.factor and cfg["rope_theta"] == rope.theta
  save_hf(model, str(tmp_path / "d"), decilm=True)
  assert_logits_match(rebuilt_from_config(str(tmp_path / "d")), model, "llama3 decilm")
