"""`jaxprune plan`: memory of a run from the config alone, on LLaMA-2 7B and 70B configs."""

import json
import os

import jax
import pytest
from transformers import LlamaConfig

import jaxprune
from jaxprune.cli import main
from jaxprune.prune import PruneConfig

LLAMA2 = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, torch_dtype="float16"),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=32000, torch_dtype="float16"),
}


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
  out = {}
  for name, kw in LLAMA2.items():
    d = tmp_path_factory.mktemp(f"llama2-{name}")
    LlamaConfig(**kw).save_pretrained(str(d))
    assert os.listdir(d) == ["config.json"]  # no weights to read
    out[name] = str(d)
  return out


def plan(capsys, tmp_path, model, *argv) -> tuple[dict, str]:
  js = tmp_path / f"plan{len(list(tmp_path.iterdir()))}.json"
  capsys.readouterr()
  assert main(["plan", model, "--json", str(js), *argv]) == 0
  return json.loads(js.read_text()), capsys.readouterr().out


def test_70b_on_a_v5e_slice_fits_16gb_per_chip(configs, capsys, tmp_path):
  est, out = plan(capsys, tmp_path, configs["70b"], "--mesh", "data=8,model=32", "--backend", "tpu")
  dev = est["device"]
  assert dev["bytes"] < 16e9
  assert sum(dev["terms"].values()) == dev["bytes"] and dev["dominant"] == max(dev["terms"], key=dev["terms"].get)
  assert f"dominated by {dev['dominant']}" in out and "per host" in out
  # The recipe's MLP statistics at 28672 channels: the Gram and cross moment with the
  # hidden size, as sums, compensation and one chunk's term, their rows split over the 32
  # chips of the model axis (the column, token and target sums replicated).
  F, D = 28672, 8192
  assert dev["terms"]["statistics"] == 3 * 4 * (F * (F + D) // 32 + F + 1 + D)
  # Kept split to the solves on the chips (`--solves auto` on a TPU): no host holds the Gram.
  assert not any("joined" in t or "float64 solves" in t for t in est["host"]["terms"])
  # X2 of the 128 x 128 calibration tokens and the 64 windows of the model's own text that join
  # them (selfgen_share 0.5): windows split over `data`, channels over `model`.
  assert dev["terms"]["X2"] == (128 + 64) * 128 * F * 4 // (8 * 32)
  # The pruning fits; the share that joins the text does not: it is sampled by the whole model,
  # 69B parameters in float32 (Llama-2-70B's head is untied), on one chip, and the plan says so.
  gen = est["generation"]["device"]
  D, F, V, L = 8192, 28672, 32000, 80
  block = 2 * D * D + 2 * D * (D // 8) + 3 * D * F + 2 * D
  assert gen["terms"]["whole model (float32, generating)"] == 4 * (L * block + 2 * V * D + D)
  # Beside the streamed model's own embedding and head, in the checkpoint's float16.
  assert gen["terms"]["embedding and head (as stored)"] == 2 * 2 * V * D and gen["bytes"] > 16e9
  assert "its 64 self-generated windows, sampled by the whole model on one device; --selfgen-share 0" in out
  alone, out = plan(capsys, tmp_path, configs["70b"], "--mesh", "data=8,model=32", "--backend", "tpu",
                    "--selfgen-share", "0")
  assert alone["generation"] is None and "self-generated" not in out and alone["device"]["bytes"] < dev["bytes"]


def test_sharding_divides_what_it_shards(configs, capsys, tmp_path):
  one, _ = plan(capsys, tmp_path, configs["7b"], "--mesh", "data=1,model=1", "--backend", "gpu")
  split, _ = plan(capsys, tmp_path, configs["7b"], "--mesh", "data=2,model=4", "--backend", "gpu")
  t1, t8 = one["device"]["terms"], split["device"]["terms"]
  assert t8["block (dense + pruned, float32)"] * 4 == pytest.approx(t1["block (dense + pruned, float32)"], rel=1e-6)
  assert t8["activation streams"] * 2 == t1["activation streams"]
  # The Gram statistics' rows split over `model`; what stays replicated is O(width).
  assert t8["statistics"] * 4 == pytest.approx(t1["statistics"], rel=1e-3)
  big, _ = plan(capsys, tmp_path, configs["70b"], "--mesh", "data=2,model=4", "--backend", "gpu")
  assert big["device"]["bytes"] > split["device"]["bytes"]


def test_metric_only_runs_need_no_gram(configs, capsys, tmp_path):
  rec, _ = plan(capsys, tmp_path, configs["7b"], "--backend", "gpu")
  flap, _ = plan(capsys, tmp_path, configs["7b"], "--backend", "gpu", "--method", "flap")
  assert flap["device"]["terms"]["statistics"] < rec["device"]["terms"]["statistics"] / 100
  assert flap["preset"] == "baseline"


def test_data_free_preset_plans_its_self_generated_windows(configs, capsys, tmp_path):
  """A data-free preset's run generates its selfgen_samples windows; the plan counts those."""
  rec, _ = plan(capsys, tmp_path, configs["7b"], "--backend", "gpu")
  free, out = plan(capsys, tmp_path, configs["7b"], "--backend", "gpu", "--preset", "recommended-datafree")
  n = PruneConfig.preset("recommended-datafree").selfgen_samples
  # The recipe's: 128 windows of a text and the 64 of its own text that join them.
  assert n > 192 and (rec["calib_samples"], free["calib_samples"]) == (192, n)
  assert f"{n} x 128 calibration tokens" in out
  # The activation streams hold every calibration window: the recipe given as many windows
  # (and the preset's absorb, whose target is one more stream) plans the same streams, and
  # more than with its own 128.
  same, _ = plan(capsys, tmp_path, configs["7b"], "--backend", "gpu", "--calib-samples", str(n), "--selfgen-share",
                 "0", "--absorb", str(PruneConfig.preset("recommended-datafree").absorb))
  streams = [p["device"]["terms"]["activation streams"] for p in (rec, free, same)]
  assert streams[1] == streams[2] > streams[0]
  mine, _ = plan(capsys, tmp_path, configs["7b"], "--backend", "gpu", "--preset", "recommended-datafree",
                 "--calib-samples", "64")
  assert mine["calib_samples"] == 64


def test_bad_mesh_is_refused(configs, capsys):
  assert main(["plan", configs["7b"], "--mesh", "data=two"]) == 2
  assert "--mesh" in capsys.readouterr().err


def test_nonpositive_window_count_is_refused(configs, capsys):
  assert main(["plan", configs["7b"], "--calib-samples", "0"]) == 2
  assert "--calib-samples must be positive, got 0" in capsys.readouterr().err


def test_gemma3_plan_counts_what_prune_feeds_and_keeps(tiny_dir, capsys, tmp_path):
  """A tiny Gemma 3 whose tokenizer adds BOS: the plan counts the windows `jaxprune prune` then
  feeds ([BOS] + seq_len tokens each), its activation streams are those windows' hidden states,
  and its block term (dense + pruned, both taken at the dense size) holds the blocks prune keeps."""
  import shutil

  import numpy as np

  from tests.test_windows_bos import WORDS, save_tokenizer

  model = str(tmp_path / "gemma3")
  save_tokenizer(shutil.copytree(tiny_dir("gemma3"), model), "template")
  calib = tmp_path / "words.txt"
  calib.write_text(" ".join(np.random.default_rng(0).choice(WORDS, size=600)))
  opts = ["--preset", "recommended-uniform", "--sparsity", "0.3", "--calib-samples", "16", "--seq-len", "16",
          "--batch-size", "8"]
  est, out = plan(capsys, tmp_path, model, *opts, "--backend", "cpu")
  assert "16 x 16 calibration tokens, each window fed after BOS (17 tokens)" in out
  assert main(["prune", model, *opts, "--calib", str(calib), "--out", str(tmp_path / "pruned"), "--no-progress"]) == 0
  report = json.loads((tmp_path / "pruned" / "report.json").read_text())
  fed = report["calibration"]
  assert (est["calib_samples"], est["window_tokens"]) == (fed["windows"], fed["seq_len"]) == (16, 17)
  terms, D = est["device"]["terms"], 64
  streams = 3 if report["streams"]["dense"] else 1  # pruned, dense and the dense module output
  assert terms["activation streams"] == streams * fed["windows"] * fed["seq_len"] * D * 4
  # The two layers have one dense shape, so the term is twice one dense block in float32; what
  # prune kept of each layer (its pruned block beside its dense one) fits in it.
  dense_block = report["params"]["pruned_blocks_before"] // 2
  assert terms["block (dense + pruned, float32)"] == 2 * 4 * dense_block
  pruned = jaxprune.load(str(tmp_path / "pruned"))
  kept = [sum(np.size(x) for x in jax.tree.leaves((blk["attn"], blk["mlp"]))) for blk in pruned.params["layers"]]
  assert sum(kept) == report["params"]["pruned_blocks_after"]
  assert all(4 * (dense_block + k) <= terms["block (dense + pruned, float32)"] for k in kept)
  assert max(kept) < dense_block  # each layer lost units


@pytest.mark.parametrize("stored", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["llama_gqa", "gemma3", "gpt2"])
def test_generation_terms_are_what_the_sampler_holds(tmp_path, kind, stored, monkeypatch):
  """The plan's self-generation phase against the sampler's own call: the parameters the command
  samples with (the streamed checkpoint read whole, every leaf float32, whatever its dtype), the
  KV cache `decode` makes for the batch and length it is called with, and what XLA compiles for
  that call."""
  import jax.numpy as jnp
  import numpy as np
  import torch

  from jaxprune import footprint
  from jaxprune.data import selfgen
  from jaxprune.io.lazy import materialize
  from jaxprune.models import decode
  from tests import tiny

  tiny.build(kind).to(getattr(torch, stored)).save_pretrained(str(tmp_path))
  model = materialize(jaxprune.load(str(tmp_path), lazy=True))
  calls = []
  real = selfgen._sample

  def spy(spec, params, keys, first, length, temperature, top_k):
    calls.append((params, keys, first, length, temperature, top_k))
    return real(spec, params, keys, first, length, temperature, top_k)

  monkeypatch.setattr(selfgen, "_sample", spy)
  config = PruneConfig()
  n, seq = 40, 8  # texts of four windows: ten texts, one batch
  windows = selfgen.own_windows(model.spec, model.params, n, seq, config, prefix=(1,), fit=True)
  assert windows.shape == (n, 1 + seq) and len(calls) == 1
  params, keys, first, length, temperature, top_k = calls[0]
  terms = footprint.generation_terms(model.spec, config, n, seq, prefix=1, fit=True)
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
  assert terms["whole model (float32, generating)"] == sum(x.nbytes for x in jax.tree.leaves(params))
  cache = jax.eval_shape(lambda: decode.init_cache(model.spec, keys.shape[0], length, jnp.float32))
  assert terms["KV cache (generating)"] == sum(x.size * 4 for x in jax.tree.leaves(cache))
  assert terms["logits (generating)"] == 2 * keys.shape[0] * model.spec.vocab_size * 4
  # XLA's account of the compiled call: its arguments are the model and a few scalars per text;
  # the cache lives in its buffers beside them.
  mem = real.lower(model.spec, params, keys, first, length, temperature, top_k).compile().memory_analysis()
  model_bytes = terms["whole model (float32, generating)"]
  assert model_bytes <= mem.argument_size_in_bytes <= model_bytes + 64 * keys.shape[0] + 64
  assert mem.temp_size_in_bytes + mem.output_size_in_bytes >= terms["KV cache (generating)"]
  # Planned for this backend, the plan compiles that very call on abstract shapes.
  monkeypatch.undo()
  compiled = footprint.compiled_generation_terms(model.spec, config, n, seq, prefix=1, fit=True)
  assert compiled == {"whole model (float32, generating)": mem.argument_size_in_bytes,
                      "sampler's buffers (compiled: KV cache, logits, ...)": mem.temp_size_in_bytes +
                      mem.output_size_in_bytes}


LLAMA3_405B = dict(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128,
                   num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                   torch_dtype="bfloat16")


@pytest.mark.parametrize("backend,mesh,chip", [("gpu", "data=1,model=8", 80e9), ("tpu", "data=4,model=16", 16e9)],
                         ids=["8xH100", "v5e-64"])
def test_405b_fits_with_its_statistics_split(tmp_path, capsys, backend, mesh, chip):
  """LLaMA-3-405B's config, the default recipe on its text alone (its self-generated share is
  sampled by the whole model on one device: 1.6 TB), fits 8 H100s (80 GB) and a v5e-64 slice
  (16 GB a chip) with the statistics kept split (`auto` on accelerators): each device holds its
  share of the split solve or sweep, and no device or host a joined Gram matrix. Joined, the
  GPUs each hold the whole Gram and its float64 solve, and TPU hosts the same."""
  from jaxprune import footprint

  LlamaConfig(**LLAMA3_405B).save_pretrained(str(tmp_path / "405b"))
  args = (str(tmp_path / "405b"), "--mesh", mesh, "--backend", backend, "--selfgen-share", "0")
  est, out = plan(capsys, tmp_path, *args)
  dev, host = est["device"], est["host"]
  assert dev["bytes"] < chip and "split solve or goa-obs sweep (row blocks)" in out
  F, D, m = 53248, 16384, int(mesh.split("model=")[1])
  nbytes = 4 if backend == "tpu" else 8
  split = max(footprint.split_solve_bytes(F, D, m, nbytes), footprint.split_sweep_bytes(4096, D, m, nbytes))
  assert dev["terms"].get("split solve or goa-obs sweep (row blocks)", split) == split
  assert not any("joined" in t or "float64 solves" in t for t in (*dev["terms"], *host["terms"]))
  joined, _ = plan(capsys, tmp_path, *args, "--solves", "joined")
  held = joined["device"]["terms"] if backend == "gpu" else joined["host"]["terms"]
  assert held["Gram joined (replicated)" if backend == "gpu" else "Gram joined (float32)"] == 4 * (F + 1) * (F + 1 + D)
  if backend == "gpu":
    assert joined["device"]["bytes"] > dev["bytes"]
