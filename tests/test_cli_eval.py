"""`jaxprune eval` and `jaxprune inspect`, run in-process on tiny models."""

import os
import re
import shutil

import pytest

import jaxprune
from jaxprune.cli import main
from jaxprune.data import eval_windows, tokenize
from jaxprune.eval import perplexity
from tests import tiny
import jax.numpy as jnp

@pytest.fixture(scope="module")
def model_dir(tiny_dir, tmp_path_factory):
  """A tiny Llama directory with a word-level tokenizer of its vocabulary size."""
  path = tmp_path_factory.mktemp("cli") / "model"
  shutil.copytree(tiny_dir("llama_gqa"), path)
  return tiny.add_word_tokenizer(str(path))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
  return tiny.write_words(str(tmp_path_factory.mktemp("text") / "text.txt"), 700)


def run_cli(capsys, *argv):
  capsys.readouterr()  # drop what fixtures printed (e.g. save_pretrained's progress bar)
  code = main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


def field(out: str, name: str) -> str:
  m = re.search(rf"^{name}\s+(.*)$", out, re.M)
  assert m, f"no {name!r} line in:\n{out}"
  return m.group(1)


def test_eval_prints_perplexity_windows_tokens_and_throughput(capsys, model_dir, text_file):
  code, out, err = run_cli(capsys, "eval", model_dir, "--text", text_file, "--seq-len", "32", "--max-windows", "10",
                           "--batch-size", "4")
  assert code == 0, err
  m = jaxprune.load(model_dir)
  stream = tokenize(jaxprune.load_tokenizer(model_dir), open(text_file).read())
  want = perplexity(m.spec, m.params, eval_windows(stream, 32, 10), batch_size=4)
  # The same jitted program on the same windows gives the same float32 result; the CLI
  # prints 4 decimals, so only that rounding (<= 5e-5) separates them.
  assert float(field(out, "perplexity")) == pytest.approx(want.perplexity, abs=5e-5 * (1 + 1e-9))
  assert field(out, "windows").startswith("10 x 32 tokens (batch 4, float32)")
  assert field(out, "tokens") == "310 predicted"
  assert re.fullmatch(r"[\d.]+ tokens/s \([\d.]+ s, including compilation\)", field(out, "throughput"))
  assert "eval" in err and "10/10" in err  # the tqdm bar, on stderr


def test_eval_uses_all_windows_by_default_and_bf16(capsys, model_dir, text_file):
  code, out, _ = run_cli(capsys, "eval", model_dir, "--text", text_file, "--seq-len", "64", "--dtype", "bfloat16",
                         "--no-progress")
  assert code == 0
  assert field(out, "windows").startswith("10 x 64 tokens (batch 8, bfloat16)")  # 700 words // 64
  # The CLI really evaluated in bfloat16: the library's bfloat16 perplexity of the same
  # windows, up to the printed 4 decimals (how close bfloat16 is to float32: test_models).
  m = jaxprune.load(model_dir)
  stream = tokenize(jaxprune.load_tokenizer(model_dir), open(text_file).read())
  want = perplexity(m.spec, m.astype(jnp.bfloat16).params, eval_windows(stream, 64, 10), batch_size=8)
  assert float(field(out, "perplexity")) == pytest.approx(want.perplexity, abs=5e-5 * (1 + 1e-9))
  f32 = run_cli(capsys, "eval", model_dir, "--text", text_file, "--seq-len", "64", "--no-progress")[1]
  assert float(field(out, "perplexity")) != float(field(f32, "perplexity"))


def test_inspect_prints_per_layer_shapes_and_counts(capsys, tiny_dir):
  code, out, _ = run_cli(capsys, "inspect", tiny_dir("llama_gqa"))
  assert code == 0
  m = jaxprune.load(tiny_dir("llama_gqa"))
  assert f"{m.num_params:,} total" in out
  assert "vocab 128, hidden 64, 2 layers, tied embeddings" in out
  rows = [l.split() for l in out.splitlines() if re.match(r"\s+\d+\s", l)]
  assert len(rows) == 2
  # layer heads kv head_dim ffn q k v o gate up down params
  assert rows[1] == ["1", "4", "2", "16", "96", "64x4x16", "64x2x16", "64x2x16", "4x16x64", "64x96", "64x96",
                     "96x64", f"{(64 * 64 * 2 + 64 * 32 * 2) + 3 * 64 * 96:,}"]


def test_inspect_gpt2_shows_biases_and_learned_positions(capsys, tiny_dir):
  code, out, _ = run_cli(capsys, "inspect", tiny_dir("gpt2"))
  assert code == 0 and "learned positions" in out and "biases: qkv, o, mlp" in out and "gate" not in out


# --------------------------------------------------------------------------
# Errors: exit status 2 and one line naming the value and the fix, no traceback.


def assert_one_line_error(code, err, *needles):
  assert code == 2
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  assert "Traceback" not in err
  for n in needles:
    assert n in lines[0], lines[0]


def test_missing_model(capsys, text_file):
  code, _, err = run_cli(capsys, "eval", "/no/such/dir", "--text", text_file)
  assert_one_line_error(code, err, "jaxprune eval: error: '/no/such/dir' does not exist",
                        "Pass a Hugging Face model directory")


def test_missing_text(capsys, model_dir, tmp_path):
  code, _, err = run_cli(capsys, "eval", model_dir, "--text", str(tmp_path / "missing.txt"))
  assert_one_line_error(code, err, f"text file {tmp_path}/missing.txt does not exist", "pass a path")


def test_directory_without_weights(capsys, tiny_dir, tmp_path, text_file):
  shutil.copy(os.path.join(tiny_dir("llama_gqa"), "config.json"), tmp_path)
  code, _, err = run_cli(capsys, "eval", str(tmp_path), "--text", text_file)
  assert_one_line_error(code, err, f"{tmp_path} holds no model weights", "save_pretrained")


def test_model_without_tokenizer(capsys, tiny_dir, text_file):
  code, _, err = run_cli(capsys, "eval", tiny_dir("llama_gqa"), "--text", text_file)
  assert_one_line_error(code, err, "has no usable tokenizer files", "copy the tokenizer")


def test_unsupported_model_type(capsys, tiny_dir, tmp_path):
  import json

  path = tmp_path / "m"
  shutil.copytree(tiny_dir("llama_mha"), path)
  cfg = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba"}))
  code, _, err = run_cli(capsys, "inspect", str(path))
  assert_one_line_error(code, err, "jaxprune inspect: error: model_type 'mamba' is not supported",
                        "supported: llama, mistral, qwen2, gpt2")


@pytest.mark.parametrize("args,needles", [
    (("--seq-len", "1"), ("--seq-len must be at least 2", "got 1")),
    (("--seq-len", "5000"), ("fewer than one window of 5000", "smaller --seq-len")),
    (("--max-windows", "0"), ("max_windows must be positive, got 0",)),
    (("--batch-size", "0"), ("--batch-size must be at least 1, got 0",)),
])
def test_bad_numbers(capsys, model_dir, text_file, args, needles):
  code, _, err = run_cli(capsys, "eval", model_dir, "--text", text_file, "--no-progress", *args)
  assert_one_line_error(code, err, *needles)


def test_window_longer_than_learned_positions(capsys, tiny_dir, model_dir, tmp_path, text_file):
  # A GPT-2 with the word-level tokenizer: its 64 positions cannot hold 65-token windows.
  path = tmp_path / "gpt2"
  shutil.copytree(tiny_dir("gpt2"), path)
  for f in os.listdir(model_dir):
    if f.startswith(("tokenizer", "special_tokens")):
      shutil.copy(os.path.join(model_dir, f), path)
  code, _, err = run_cli(capsys, "eval", str(path), "--text", text_file, "--seq-len", "65", "--no-progress")
  assert_one_line_error(code, err, "windows of 65 tokens are longer than the model's 64 positions",
                        "--seq-len 64 or less")
