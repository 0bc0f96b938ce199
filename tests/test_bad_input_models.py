"""Bad model inputs and exports (issue 27, items 3, 4, 9, 10, 12): one error line, nothing lost, nothing hung.

Each case crafts a tiny input, runs the CLI on it and asserts, through tests/badinput.py, the
exit code, one `error:` line naming what was wrong, no traceback, and that every file that
existed is intact. The positive cases (a tied config with a distinct head, remote code in the
input's tokenizer) assert what jaxprune computes or writes instead.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import struct

import numpy as np
import pytest

from tests import tiny
from tests.badinput import assert_intact, assert_one_line_error, run_cli, run_cli_process, snapshot

WEIGHTS = "model.safetensors"


@pytest.fixture
def model(tiny_dir, tmp_path):
  """A private copy of a tiny tied GQA llama with a word tokenizer, free to damage."""
  path = str(tmp_path / "model")
  shutil.copytree(tiny_dir("llama_gqa"), path)
  return tiny.add_word_tokenizer(path)


@pytest.fixture
def text(tmp_path):
  return tiny.write_words(str(tmp_path / "text.txt"), 400)


def edit_tensors(path: str, edit) -> None:
  """Rewrites the model's safetensors after `edit(tensors)` changed the dict in place."""
  from safetensors.numpy import load_file, save_file

  f = os.path.join(path, WEIGHTS)
  tensors = load_file(f)
  edit(tensors)
  save_file(tensors, f, metadata={"format": "pt"})


def shard(path: str, entry: str) -> None:
  """Makes the model sharded: its one weight file becomes the shard that the index names `entry`."""
  from safetensors.numpy import load_file

  keys = list(load_file(os.path.join(path, WEIGHTS)))
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": {k: entry for k in keys}}, f)


def check(before, *args, needles=(), rc=2, process=False, timeout=120):
  """Runs `jaxprune ARGS` and asserts the one-line error and that every file is intact."""
  r = run_cli_process(*args, timeout=timeout) if process else run_cli(*args)
  line = assert_one_line_error(r, *needles, rc=rc)
  assert_intact(before)
  return line


# --------------------------------------------------------------------------
# Crafted GGUF files: nothing read past the file, nothing allocated from a crafted count.


def _s(text: str) -> bytes:
  b = text.encode()
  return struct.pack("<Q", len(b)) + b


def _kv_str(key: str, value: str) -> bytes:
  return _s(key) + struct.pack("<I", 8) + _s(value)


def _kv_u32(key: str, value: int) -> bytes:
  return _s(key) + struct.pack("<II", 4, value)


def crafted_gguf(path, fields=(), tensors=(), n_tensors=None, n_fields=None) -> str:
  """A GGUF v3 file written byte by byte: `tensors` are (name, dims fastest-first, ggml type, offset)."""
  fields = [_kv_str("general.architecture", "llama"), *fields]
  b = b"GGUF" + struct.pack("<IQQ", 3, len(tensors) if n_tensors is None else n_tensors,
                            len(fields) if n_fields is None else n_fields)
  b += b"".join(fields)
  for name, dims, qtype, offset in tensors:
    b += _s(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, qtype, offset)
  with open(path, "wb") as f:
    f.write(b + bytes(64))
  return str(path)


@pytest.fixture
def gguf_file(tmp_path):
  from tests.test_gguf import write_gguf

  path = tmp_path / "tiny.gguf"
  write_gguf(path, tiny.build("llama_mha"))
  return str(path)


def test_gguf_truncated(gguf_file):
  with open(gguf_file, "rb") as f:
    data = f.read()
  with open(gguf_file, "wb") as f:
    f.write(data[:len(data) // 2])
  check(snapshot(gguf_file), "inspect", gguf_file, needles=(gguf_file, "truncated", "Re-download"))


def test_gguf_wrong_magic(gguf_file):
  with open(gguf_file, "r+b") as f:
    f.write(b"GGML")
  check(snapshot(gguf_file), "inspect", gguf_file, needles=("GGUF magic", "b'GGML'"))


@pytest.mark.parametrize("counts", [dict(n_tensors=2**62), dict(n_fields=2**62)], ids=["tensors", "fields"])
def test_gguf_absurd_counts(tmp_path, counts):
  f = crafted_gguf(tmp_path / "count.gguf", **counts)
  check(snapshot(f), "inspect", f, needles=("damaged GGUF header", "past the end of the file"))


def test_gguf_absurd_array_length(tmp_path):
  # An array of 2^40 uint32: struct would build a 4 TB result if asked before the size check.
  huge = _s("llama.huge") + struct.pack("<IIQ", 9, 4, 2**40)
  f = crafted_gguf(tmp_path / "array.gguf", fields=[huge])
  check(snapshot(f), "inspect", f, needles=("damaged GGUF header",))


def test_gguf_absurd_shape(tmp_path):
  # 2^40 x 2^40 float32: the byte count overflows int64 (it wrapped before) and must be compared exactly.
  f = crafted_gguf(tmp_path / "shape.gguf", tensors=[("token_embd.weight", (2**40, 2**40), 0, 0)])
  check(snapshot(f), "inspect", f, needles=("token_embd.weight", "but the file has"))


def test_gguf_offset_past_the_end(tmp_path):
  f = crafted_gguf(tmp_path / "offset.gguf", tensors=[("token_embd.weight", (4,), 0, 10**12)])
  check(snapshot(f), "inspect", f, needles=("truncated: tensor token_embd.weight",))


def test_gguf_unknown_quantization(tmp_path):
  f = crafted_gguf(tmp_path / "qtype.gguf", tensors=[("token_embd.weight", (4,), 999, 0)])
  check(snapshot(f), "inspect", f, needles=("ggml type id 999", "upgrade gguf"))


def test_gguf_unknown_architecture(tmp_path):
  f = str(tmp_path / "arch.gguf")
  with open(crafted_gguf(f), "r+b") as fh:  # "llama" -> "llamb", same length, so the header stays valid
    data = fh.read().replace(b"llama", b"llamb")
    fh.seek(0)
    fh.write(data)
  check(snapshot(f), "inspect", f, needles=("GGUF architecture 'llamb' is not supported",))


def test_gguf_missing_metadata(tmp_path):
  f = crafted_gguf(tmp_path / "meta.gguf", tensors=[("token_embd.weight", (4,), 0, 0)])
  check(snapshot(f), "inspect", f, needles=("llama.attention.head_count is missing", "positive integer"))


def test_gguf_zero_alignment(tmp_path):
  f = crafted_gguf(tmp_path / "align.gguf", fields=[_kv_u32("general.alignment", 0)],
                   tensors=[("token_embd.weight", (4,), 0, 0)])
  check(snapshot(f), "inspect", f, needles=("general.alignment is 0",))


# --------------------------------------------------------------------------
# Safetensors index entries: regular files inside the model directory only.


def test_index_entry_with_dotdot(model, tmp_path):
  shard(model, "../outside.safetensors")
  os.rename(os.path.join(model, WEIGHTS), tmp_path / "outside.safetensors")
  check(snapshot(str(tmp_path)), "inspect", model, needles=("'../outside.safetensors'", "inside"))


def test_index_entry_with_absolute_path(model, tmp_path):
  outside = str(tmp_path / "outside.safetensors")
  shard(model, outside)
  os.rename(os.path.join(model, WEIGHTS), outside)
  check(snapshot(str(tmp_path)), "inspect", model, needles=(repr(outside), "relative"))


def test_index_entry_symlink_escaping(model, tmp_path):
  outside = str(tmp_path / "outside.safetensors")
  shard(model, "link.safetensors")
  os.rename(os.path.join(model, WEIGHTS), outside)
  os.symlink(outside, os.path.join(model, "link.safetensors"))
  check(snapshot(str(tmp_path)), "inspect", model, needles=("'link.safetensors'", "symlink", "outside"))


def test_index_entry_that_is_a_fifo(model, tmp_path):
  # Opening a FIFO for reading blocks until a writer comes: a child process with a timeout
  # turns a hang into a failure instead of a stuck suite.
  shard(model, "pipe.safetensors")
  os.remove(os.path.join(model, WEIGHTS))
  os.mkfifo(os.path.join(model, "pipe.safetensors"))
  check(snapshot(str(tmp_path)), "inspect", model, needles=("'pipe.safetensors'", "not a regular file"),
        process=True)


def test_gguf_path_that_is_a_fifo(tmp_path):
  f = str(tmp_path / "pipe.gguf")
  os.mkfifo(f)
  check(snapshot(str(tmp_path)), "inspect", f, needles=(f, "neither a regular file nor a directory"), process=True)


@pytest.mark.parametrize("content", [b"\xff\xfe{}", b"[1, 2]"], ids=["not-utf8", "a-list"])
def test_config_json_that_is_not_an_object(model, tmp_path, content):
  with open(os.path.join(model, "config.json"), "wb") as f:
    f.write(content)
  check(snapshot(str(tmp_path)), "inspect", model, needles=("config.json",))


# --------------------------------------------------------------------------
# PyTorch pickles that are not state dicts.


def _bin_model(model: str, write) -> str:
  os.remove(os.path.join(model, WEIGHTS))
  write(os.path.join(model, "pytorch_model.bin"))
  return model


def test_bin_holding_a_dict_of_ints(model, tmp_path):
  import torch

  _bin_model(model, lambda f: torch.save({"model.embed_tokens.weight": 1, "step": 2}, f))
  check(snapshot(str(tmp_path)), "inspect", model,
        needles=("pytorch_model.bin does not hold a PyTorch state dict", "'model.embed_tokens.weight' is a int"))


def test_bin_holding_a_list(model, tmp_path):
  import torch

  _bin_model(model, lambda f: torch.save([torch.zeros(2)], f))
  check(snapshot(str(tmp_path)), "inspect", model, needles=("does not hold a PyTorch state dict", "a list"))


def test_bin_of_random_bytes(model, tmp_path):
  def write(f):
    with open(f, "wb") as fh:
      fh.write(np.random.default_rng(0).bytes(4096))

  _bin_model(model, write)
  check(snapshot(str(tmp_path)), "inspect", model, needles=("pytorch_model.bin could not be read by torch.load",))


# --------------------------------------------------------------------------
# NaN and Inf weights: refused when read, eagerly (eval, inspect) or block by block (prune).


def _poison(model: str, key: str, value: float, at=(3, 5)) -> None:
  def edit(t):
    t[key] = t[key].copy()
    t[key][at] = value
  edit_tensors(model, edit)


def test_nan_weight_refused_by_eval(model, text, tmp_path):
  _poison(model, "model.layers.1.mlp.down_proj.weight", np.nan)
  line = check(snapshot(str(tmp_path)), "eval", model, "--text", text, "--max-windows", "1",
               needles=("model.layers.1.mlp.down_proj.weight", "holds NaN", "(3, 5)"))
  assert "perplexity" not in line


def test_inf_weight_refused_by_eval(model, text, tmp_path):
  _poison(model, "model.embed_tokens.weight", -np.inf)
  check(snapshot(str(tmp_path)), "eval", model, "--text", text, "--max-windows", "1",
        needles=("model.embed_tokens.weight", "holds Inf"))


def test_nan_weight_in_a_streamed_block_refused_by_prune(model, text, tmp_path):
  # prune streams blocks from the checkpoint: block 1's NaN is found when block 1 is read.
  _poison(model, "model.layers.1.self_attn.o_proj.weight", np.nan)
  out = str(tmp_path / "out")
  check(snapshot(str(tmp_path)), "prune", model, "--sparsity", "0.3", "--calib", text, "--calib-samples", "8",
        "--seq-len", "16", "--batch-size", "8", "--out", out, "--no-checkpoint",
        needles=("model.layers.1.self_attn.o_proj.weight", "holds NaN"))
  assert not os.path.exists(out)


def test_nan_weight_in_a_placed_block_is_named(model):
  # On a mesh, blocks are read slice by slice from memory-mapped views: each slice is checked.
  import jaxprune
  from jaxprune import sharding
  from jaxprune.errors import CheckpointError

  _poison(model, "model.layers.1.mlp.up_proj.weight", np.nan, at=(90, 7))
  blocks = jaxprune.load(model, lazy=True).params["layers"]
  mesh = sharding.make_mesh(2, 4)
  blocks.placed(0, lambda b: sharding.param_shardings(b, mesh, quiet=True))  # an intact block reads fine
  with pytest.raises(CheckpointError, match=r"block 1 \['mlp'\]\['up'\]\['kernel'\] holds NaN"):
    blocks.placed(1, lambda b: sharding.param_shardings(b, mesh, quiet=True))


def test_nan_weight_in_an_orbax_checkpoint(model, tmp_path):
  import jaxprune
  from jaxprune.errors import CheckpointError
  from jaxprune.io.orbax_io import save_orbax

  m = jaxprune.load(model)
  layers = list(m.params["layers"])
  layers[1] = {**layers[1], "mlp": {**layers[1]["mlp"], "down": {"kernel": layers[1]["mlp"]["down"]["kernel"]
                                                                 .at[2, 3].set(np.nan)}}}
  out = str(tmp_path / "orbax")
  save_orbax(jaxprune.Model(m.spec, {**m.params, "layers": tuple(layers)}, m.source), out, tokenizer=False)
  check(snapshot(str(tmp_path)), "inspect", out, needles=("['layers'][1]['mlp']['down']['kernel']", "NaN or Inf"))
  blocks = jaxprune.load(out, lazy=True).params["layers"]
  blocks[0]  # an intact block restores fine
  with pytest.raises(CheckpointError, match=r"layers\[1\]\['mlp'\]\['down'\]\['kernel'\] holds NaN"):
    blocks[1]


# --------------------------------------------------------------------------
# Exports.


def test_float16_export_of_overflowing_weights(model, tmp_path):
  _poison(model, "model.layers.0.mlp.up_proj.weight", 1.0e5)
  out = str(tmp_path / "out")
  check(snapshot(str(tmp_path)), "export", model, "--out", out, "--dtype", "float16",
        needles=("model.layers.0.mlp.up_proj.weight", "100000", "65504", "--dtype bfloat16"))
  assert not os.path.exists(out)
  assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no temporary left behind


# The GGUF names of the poisoned tensor; q8_0's limit is its float16 block scale (max / 127).
@pytest.mark.parametrize("ttype,value,needles", [
    ("f16", 1.0e5, ("blk.0.ffn_up.weight", "100000", "65504", "--dtype bfloat16")),
    ("bf16", 3.4e38, ("blk.0.ffn_up.weight", "3.4e+38", "bfloat16", "--dtype float32")),
    ("q8_0", 1.0e7, ("blk.0.ffn_up.weight", "1e+07", "8.31901e+06", "--dtype bf16")),
])
def test_gguf_export_of_overflowing_weights(model, tmp_path, ttype, value, needles):
  _poison(model, "model.layers.0.mlp.up_proj.weight", value)
  out = str(tmp_path / "m.gguf")
  check(snapshot(str(tmp_path)), "export", model, "--format", "gguf", "--out", out, "--dtype", ttype, needles=needles)
  assert not os.path.exists(out)
  assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


def test_export_drops_the_inputs_remote_code(model, tmp_path, caplog):
  cfg_path = os.path.join(model, "tokenizer_config.json")
  with open(cfg_path) as f:
    cfg = json.load(f)
  cfg.update(auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}, trust_remote_code=True)
  with open(cfg_path, "w") as f:
    json.dump(cfg, f)
  with open(os.path.join(model, "tokenization_evil.py"), "w") as f:
    f.write("raise SystemExit('third-party code ran')\n")
  before = snapshot(str(tmp_path))
  out = str(tmp_path / "out")
  with caplog.at_level(logging.WARNING):
    r = run_cli("export", model, "--out", out)
  assert r.rc == 0 and "Traceback" not in r.stderr, r.stderr
  assert_intact(before)
  with open(os.path.join(out, "tokenizer_config.json")) as f:
    written = json.load(f)
  assert "auto_map" not in written and "trust_remote_code" not in written
  assert written["tokenizer_class"] == cfg["tokenizer_class"]  # the rest of the tokenizer is kept
  assert not [n for n in os.listdir(out) if n.endswith(".py")]
  for name in os.listdir(out):
    if name.endswith(".json"):
      with open(os.path.join(out, name)) as f:
        assert "tokenization_evil" not in f.read(), name
  drops = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
  assert len(drops) == 1 and "auto_map" in drops[0] and "tokenizer_config.json" in drops[0], drops


# --------------------------------------------------------------------------
# A tied config whose checkpoint holds a distinct LM head: loaded untied, as transformers does.


def _distinct_head(model: str) -> np.ndarray:
  head = np.random.default_rng(1).normal(0, 0.2, (tiny.VOCAB, 64)).astype(np.float32)
  edit_tensors(model, lambda t: t.update({"lm_head.weight": head}))
  return head


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "streamed"])
def test_tied_config_with_a_distinct_head_matches_transformers(model, lazy):
  import jaxprune
  from jaxprune.models import logits
  from jaxprune.io.lazy import materialize
  from tests.numerics import sensitivity

  head = _distinct_head(model)
  m = materialize(jaxprune.load(model, lazy=lazy))
  assert not m.spec.tie_embeddings
  np.testing.assert_array_equal(np.asarray(m.params["lm_head"]["kernel"]), head.T)
  ids = np.random.default_rng(0).integers(0, tiny.VOCAB, (2, 16)).astype(np.int32)
  # transformers' float64 run of the same directory is exact; the bound is tests/numerics.py's point 2.
  sens = sensitivity(model, ids)
  err = sens.check(np.asarray(logits(m.spec, m.params, ids)), "tied config, distinct head")
  # The tied model (the embedding as the head) is far off: the comparison can tell them apart.
  tied_spec = dataclasses.replace(m.spec, tie_embeddings=True)
  tied = np.asarray(logits(tied_spec, {k: v for k, v in m.params.items() if k != "lm_head"}, ids), np.float64)
  assert float(np.max(np.abs(tied - sens.exact))) > 100 * max(err, sens.bound)


def test_tied_config_with_the_embedding_as_head_stays_tied(model):
  import jaxprune

  edit_tensors(model, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
  assert jaxprune.load(model).spec.tie_embeddings


# --------------------------------------------------------------------------
# A mistyped local path never goes to the Hub.


@pytest.mark.parametrize("name", ["./my-modle", "/data/model", "~/models/my-modle", "models/x.gguf",
                                  "models/sub/dir", "my-modle", "org/name.safetensors"])
def test_mistyped_path_is_not_sent_to_the_hub(name, tmp_path, monkeypatch):
  import huggingface_hub

  def no_hub(*a, **k):
    raise AssertionError(f"{name!r} was sent to the Hub")

  monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
  monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
  for cmd in (("inspect", name), ("plan", name)):
    r = run_cli(*cmd, cwd=str(tmp_path))
    assert_one_line_error(r, "no such file or directory", repr(name), "typo")


def test_hub_ids_still_go_to_the_hub(monkeypatch):
  import huggingface_hub

  asked = []

  def offline(repo_id, **k):
    asked.append(repo_id)
    raise OSError("offline")

  monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
  r = run_cli("inspect", "HuggingFaceTB/SmolLM2-135M")
  assert_one_line_error(r, "'HuggingFaceTB/SmolLM2-135M' is not a local path", "Hugging Face Hub")
  assert asked == ["HuggingFaceTB/SmolLM2-135M"]
