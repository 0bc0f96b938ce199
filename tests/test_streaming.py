"""Streaming: models read block by block (jaxprune.io.lazy) prune, evaluate and export exactly as
models held in memory, reading each block once; a streamed run's memory does not grow with depth."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import jaxprune
from jaxprune.errors import CheckpointError, ShapeError
from jaxprune.eval.perplexity import perplexity
from jaxprune.io.export import save_hf
from jaxprune.io.lazy import LazyBlocks, materialize
from jaxprune.prune import PruneConfig, prune
from jaxprune.spec import count_params
from tests import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data", "wikitext-2", "valid.txt")


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
  """kind -> a tiny 3-block model saved in bfloat16 as sharded safetensors (an index and several files)."""
  import torch

  cache = {}

  def get(kind):
    if kind not in cache:
      path = str(tmp_path_factory.mktemp(kind))
      tiny.build(kind, layers=3).to(torch.bfloat16).save_pretrained(path, max_shard_size="40KB")
      cache[kind] = path
    return cache[kind]

  return get


def _calib(n=16, T=16, seed=0):
  return np.random.default_rng(seed).integers(0, tiny.VOCAB, size=(n, T)).astype(np.int32)


def _exported(model, path):
  save_hf(model, path, tokenizer=False, force=True)
  out = {}
  for f in sorted(os.listdir(path)):
    if f.endswith(".safetensors"):
      out.update(load_file(os.path.join(path, f)))
  return out


def test_lazy_load_reads_nothing_until_a_block_is_used(bf16_dir):
  path = bf16_dir("llama_gqa")
  assert "model.safetensors.index.json" in os.listdir(path)
  eager, lazy = jaxprune.load(path), jaxprune.load(path, lazy=True)
  blocks = lazy.params["layers"]
  assert isinstance(blocks, LazyBlocks) and blocks.reads == 0
  # Sizes come from the spec: counting or checking reads nothing.
  assert lazy.num_params == eager.num_params == count_params(eager.params) and blocks.reads == 0
  # The embeddings keep the checkpoint's dtype; a block is upcast when read, exactly.
  assert lazy.params["embed"]["embedding"].dtype == jax.numpy.bfloat16
  for i in (0, 2, -1):
    for a, b in zip(jax.tree.leaves(eager.params["layers"][i]), jax.tree.leaves(blocks[i]), strict=True):
      assert b.dtype == np.float32
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert blocks.reads == 2  # the last block was cached after blocks[2]
  full = materialize(lazy)
  for a, b in zip(jax.tree.leaves(eager.params), jax.tree.leaves(full.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_block_read_ahead_is_read_in_the_background_and_equals_the_read_one(bf16_dir):
  import threading

  path = bf16_dir("llama_gqa")
  eager, blocks = jaxprune.load(path), jaxprune.load(path, lazy=True).params["layers"]
  read, threads = blocks._read, []

  def spy(i):
    threads.append((i, threading.current_thread().name))
    return read(i)

  blocks._read = spy
  blocks.prefetch(1)
  got = blocks[1]
  assert threads == [(1, "jaxprune-prefetch_0")]  # not this thread
  for a, b in zip(jax.tree.leaves(eager.params["layers"][1]), jax.tree.leaves(got), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  blocks.prefetch(1)  # cached: nothing to read
  blocks.prefetch(2)
  blocks.prefetch(0)  # block 2's read is dropped: one read runs ahead at a time
  assert list(blocks._ahead) == [0]
  blocks[0]
  assert (blocks.reads, blocks.prefetched) == (2, 2)
  blocks[2]  # read here, now
  assert (blocks.reads, blocks.prefetched) == (3, 2) and threads[-1] == (2, threading.current_thread().name)


@pytest.mark.parametrize("kind", ["llama_gqa", "gpt2"])
def test_placed_blocks_read_only_their_slices_and_equal_the_read_ones(bf16_dir, kind):
  """`LazyBlocks.placed` on a model axis of 4: each leaf laid out as `sharding.place` lays out
  the block read whole, with the same values (bfloat16 widened exactly), from memory-mapped
  safetensors; distinct slices are read once, replicas over `data` share them."""
  from jaxprune import sharding

  path = bf16_dir(kind)
  eager = jaxprune.load(path)
  blocks = jaxprune.load(path, lazy=True).params["layers"]
  mesh = sharding.make_mesh(2, 4)
  got = blocks.placed(1, lambda b: sharding.param_shardings(b, mesh, quiet=True))
  want = sharding.place(eager.params["layers"][1], mesh)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
    assert b.dtype == np.float32 and b.sharding == a.sharding
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # One process holds the whole mesh: every value is read exactly once.
  assert blocks.values_read == sum(np.size(x) for x in jax.tree.leaves(want))


def test_placed_orbax_blocks_are_restored_onto_the_mesh(bf16_dir, tmp_path):
  """A lazily opened Orbax checkpoint places a block by Orbax's sharded restore: each leaf
  comes back laid out as `sharding.place` lays out the block read whole, in float32 (widened
  exactly from bfloat16), and every slice of the mesh is counted once."""
  from jaxprune import sharding
  from jaxprune.io.orbax_io import save_orbax

  src = str(tmp_path / "orbax")
  save_orbax(jaxprune.load(bf16_dir("llama_gqa")), src, dtype="bfloat16", tokenizer=False)
  eager = jaxprune.load(bf16_dir("llama_gqa"))
  blocks = jaxprune.load(src, lazy=True).params["layers"]
  mesh = sharding.make_mesh(2, 4)
  got = blocks.placed(2, lambda b: sharding.param_shardings(b, mesh, quiet=True))
  want = sharding.place(eager.params["layers"][2], mesh)
  assert any(sharding.MODEL in jax.tree.leaves(tuple(x.sharding.spec)) for x in jax.tree.leaves(want))
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
    assert b.dtype == np.float32 and b.sharding == a.sharding
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert blocks.reads == 1 and blocks.values_read == sum(np.size(x) for x in jax.tree.leaves(want))


@pytest.mark.parametrize("kind", ["llama_gqa", "qwen2", "gpt2"])
@pytest.mark.parametrize("preset,extra", [
    ("recommended", {}),
    ("paper", {}),
    ("baseline", dict(method="flap", allocation="adaptive")),
])
def test_streamed_prune_is_bit_identical_to_in_memory(bf16_dir, tmp_path, kind, preset, extra):
  path = bf16_dir(kind)
  calib = _calib()
  cfg = PruneConfig.preset(preset, sparsity=0.3, batch_size=8, **extra)
  want = prune(jaxprune.load(path), calib, cfg)
  want_t = _exported(want.model, str(tmp_path / "eager"))
  want_ppl = perplexity(want.model.spec, want.model.params, calib).mean_nll
  for ckpt in (None, str(tmp_path / "ckpt")):
    lazy = jaxprune.load(path, lazy=True)
    # Reads before the run (another's: generation, evaluation) are not counted as the run's.
    lazy.params["layers"].reads, lazy.params["layers"].prefetched = 100, 40
    got = prune(lazy, calib, cfg, checkpoint=ckpt)
    # Each dense block is read once by the layer loop, and once more by an adaptive plan; a
    # checkpoint's fingerprint hashes the files and reads no block.
    passes = 2 if cfg.allocation == "adaptive" else 1
    assert lazy.params["layers"].reads == 100 + 3 * passes
    # Every read but the first ran ahead, while the block before it was worked on.
    assert got.report["streaming"] == {"block_reads": 3 * passes, "read_ahead": 3 * passes - 1}
    assert isinstance(got.model.params["layers"], LazyBlocks)  # the pruned blocks stay in their files
    assert got.report["params"] == want.report["params"] and got.report["layers"] == want.report["layers"]
    assert perplexity(got.model.spec, got.model.params, calib).mean_nll == want_ppl
    got_t = _exported(got.model, str(tmp_path / f"lazy{ckpt is not None}"))
    assert got_t.keys() == want_t.keys()
    for k in want_t:
      np.testing.assert_array_equal(got_t[k], want_t[k], err_msg=k)


def test_streamed_export_holds_one_shard_and_loads_in_transformers(bf16_dir, tmp_path):
  import torch
  import transformers

  path = bf16_dir("llama_gqa")
  lazy = jaxprune.load(path, lazy=True)
  out = str(tmp_path / "out")
  info = save_hf(lazy, out, tokenizer=False, max_shard_size="60KB", dtype="bfloat16")
  with open(os.path.join(out, "model.safetensors.index.json")) as f:
    shards = {}
    for k, v in json.load(f)["weight_map"].items():
      shards.setdefault(v, set()).add(k.split(".")[2] if k.startswith("model.layers.") else "top")
  # A block is never split across shards, and every shard is within the limit or is one block.
  assert len(shards) > 1
  for name, blocks in shards.items():
    size = os.path.getsize(os.path.join(out, name))
    assert size <= 60_000 + 4096 or len(blocks) == 1, (name, size, blocks)
  for blocks in shards.values():
    assert all(sum(b in s for s in shards.values()) == 1 for b in blocks)
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  assert sum(p.numel() for p in hf.parameters()) == info.exported_params == lazy.num_params
  ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
  for (k, a), (_, b) in zip(ref.state_dict().items(), hf.state_dict().items()):
    torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_lazy_checkpoint_problems_are_named(bf16_dir, tmp_path):
  import shutil

  src = bf16_dir("llama_mha")
  bad = str(tmp_path / "bad")
  shutil.copytree(src, bad)
  with open(os.path.join(bad, "config.json")) as f:
    cfg = json.load(f)
  cfg["intermediate_size"] += 8  # the blocks' weights no longer fit the config
  with open(os.path.join(bad, "config.json"), "w") as f:
    json.dump(cfg, f)
  lazy = jaxprune.load(bad, lazy=True)  # names all match: nothing is read yet
  with pytest.raises(ShapeError, match=r"block 0 does not match .*mlp.up.kernel: \(64, 96\), expected \(64, 104\)"):
    lazy.params["layers"][0]
  cfg["num_hidden_layers"] = 4  # a block the files lack: refused before any block is read
  with open(os.path.join(bad, "config.json"), "w") as f:
    json.dump(cfg, f)
  with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.3\."):
    jaxprune.load(bad, lazy=True)


# ---------------------------------------------------------------------------
# Memory: a streamed run holds a block at a time, so its peak does not grow with depth.


def _peak_rss(cmd) -> int:
  """Peak resident bytes of one child process (its own, from wait4)."""
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  out = proc.stdout.read()
  _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  assert proc.returncode == 0, out[-3000:]
  return usage.ru_maxrss * 1024


@pytest.mark.slow
def test_streamed_run_memory_does_not_grow_with_depth(tmp_path):
  """Two synthetic LLaMA checkpoints of one width, 2 and 14 blocks (bfloat16, 100 MB shards), pruned
  by `jaxprune prune`: the deeper model adds 12 blocks (660 MB at float32) and the run's peak RSS
  may grow by at most a quarter of that. An engine holding the model would add at least all of it."""
  from jaxprune.io.synthetic import num_params, write_llama

  if not os.path.exists(DATA):
    pytest.skip(f"{DATA} not found")
  try:  # SmolLM2's tokenizer, so that WikiText-2 tokenizes as it does for SmolLM2
    tok = jaxprune.load_tokenizer("smollm2-135m")
  except CheckpointError as e:
    pytest.skip(str(e))
  width = dict(hidden=1024, ffn=3584, heads=16, kv_heads=4, vocab=tok.vocab_size, shard_bytes=100 * 10**6)
  peaks, sizes = {}, {}
  for layers in (2, 14):
    src = str(tmp_path / f"llama{layers}")
    cfg = write_llama(src, layers=layers, tokenizer=tok, **width)
    sizes[layers] = 4 * num_params(cfg)
    out = str(tmp_path / f"out{layers}")
    peaks[layers] = _peak_rss([sys.executable, "-m", "jaxprune", "--no-compile-cache", "prune", src,
                               "--sparsity", "0.2", "--preset", "baseline", "--method", "flap",
                               "--allocation", "uniform", "--calib", DATA, "--calib-samples", "8",
                               "--max-shard-size", "100MB", "--out", out, "--no-progress"])
    with open(os.path.join(out, "report.json")) as f:
      assert json.load(f)["params"]["ratio_of_pruned_blocks"] == pytest.approx(0.2, abs=0.01)
  added = sizes[14] - sizes[2]
  grew = peaks[14] - peaks[2]
  assert grew <= 0.25 * added, (f"peak RSS {peaks[2] / 2**20:.0f} MiB (2 blocks) -> {peaks[14] / 2**20:.0f} MiB "
                                f"(14 blocks): +{grew / 2**20:.0f} MiB for {added / 2**20:.0f} MiB of float32 blocks")



def test_lazy_load_refuses_a_truncated_shard_before_any_work(bf16_dir, tmp_path):
  import shutil

  src = str(tmp_path / "src")
  shutil.copytree(bf16_dir("llama_gqa"), src)
  shard = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))[-1]
  with open(os.path.join(src, shard), "r+b") as f:
    f.truncate(os.path.getsize(os.path.join(src, shard)) - 100)
  with pytest.raises(CheckpointError, match=f"{shard} is not a readable safetensors file.*truncated"):
    jaxprune.load(src, lazy=True)


def test_orbax_checkpoint_streams_block_by_block(bf16_dir, tmp_path):
  from jaxprune.io.orbax_io import save_orbax

  src = str(tmp_path / "orbax")
  save_orbax(jaxprune.load(bf16_dir("llama_gqa")), src, dtype="bfloat16", tokenizer=False)
  eager, lazy = jaxprune.load(src, dtype=np.float32), jaxprune.load(src, lazy=True)
  blocks = lazy.params["layers"]
  assert isinstance(blocks, LazyBlocks) and blocks.reads == 0
  assert lazy.params["embed"]["embedding"].dtype == jax.numpy.bfloat16  # restored as stored
  calib = _calib()
  cfg = PruneConfig.preset("paper", sparsity=0.3, batch_size=8)
  want, got = prune(eager, calib, cfg), prune(lazy, calib, cfg)
  assert blocks.reads == 3 and got.report["params"] == want.report["params"]
  for a, b in zip(jax.tree.leaves(materialize(want.model).params), jax.tree.leaves(materialize(got.model).params),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # On a model axis the dense blocks come straight from Orbax's sharded restore, and the run
  # is the in-memory run on the same mesh, bit for bit.
  from jaxprune import sharding
  mesh = sharding.make_mesh(2, 4)
  lazy = jaxprune.load(src, lazy=True)
  want, got = prune(eager, calib, cfg, mesh=mesh), prune(lazy, calib, cfg, mesh=mesh)
  assert lazy.params["layers"].values_read > 0
  for a, b in zip(jax.tree.leaves(materialize(want.model).params), jax.tree.leaves(materialize(got.model).params),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_blocks_written_shard_by_shard_give_the_same_model(bf16_dir, tmp_path):
  """With blocks_dir each finished block is an Orbax checkpoint that every process writes its own
  shards of (nothing gathered): on a 2 x 4 mesh in one process the run is the in-memory run bit
  for bit, one copy of every pruned value is written, and a directory holding another run's
  blocks is refused before any work."""
  from jaxprune import sharding
  from jaxprune.errors import UsageError

  path = bf16_dir("llama_gqa")
  calib = _calib()
  cfg = PruneConfig.preset("recommended", sparsity=0.3, batch_size=8)
  mesh = sharding.make_mesh(2, 4)
  want = prune(jaxprune.load(path), calib, cfg, mesh=mesh)
  blocks_dir = str(tmp_path / "blocks")
  got = prune(jaxprune.load(path, lazy=True), calib, cfg, mesh=mesh, blocks_dir=blocks_dir)
  assert sorted(os.listdir(blocks_dir)) == ["block_0000", "block_0001", "block_0002"]
  assert all(os.path.isdir(os.path.join(blocks_dir, b, "ocdbt.process_0")) for b in os.listdir(blocks_dir))
  pruned = materialize(got.model).params
  assert got.report["block_values_written"] == sum(np.size(x) for x in jax.tree.leaves(pruned["layers"]))
  for a, b in zip(jax.tree.leaves(materialize(want.model).params), jax.tree.leaves(pruned), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(UsageError, match="already holds pruned blocks"):
    prune(jaxprune.load(path, lazy=True), calib, cfg, mesh=mesh, blocks_dir=blocks_dir)
