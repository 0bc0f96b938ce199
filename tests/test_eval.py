"""Perplexity and token windows."""

import math

import numpy as np
import pytest

import jaxprune
from jaxprune.data import eval_windows, read_text, sample_windows, tokenize
from jaxprune.errors import UsageError
from jaxprune.eval import perplexity, window_nll
from tests import tiny
from tests.numerics import assert_within, nll_bound, sensitivity


@pytest.fixture(scope="module")
def model(tiny_dir):
  return jaxprune.load(tiny_dir("llama_gqa"))


def windows(n=5, length=12, seed=0):
  return np.random.default_rng(seed).integers(0, tiny.VOCAB, size=(n, length)).astype(np.int32)


def reference_nll(path, w):
  """Summed next-token NLL per window from transformers' logits, in float64."""
  import torch
  import transformers

  hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  with torch.no_grad():
    logp = torch.log_softmax(hf(torch.as_tensor(w, dtype=torch.long)).logits.double(), -1).numpy()
  return -np.take_along_axis(logp[:, :-1], w[:, 1:, None], axis=-1)[..., 0].sum(-1)


def _nll_bound(path, w) -> float:
  """A window's summed NLL: float32 jaxprune against float32 transformers (tests/numerics.py)."""
  sens = sensitivity(path, w)
  return nll_bound(2 * sens.bound, w.shape[1] - 1, sens.exact.shape[-1], float(np.max(np.abs(sens.exact))))


def test_window_nll_matches_transformers(model, tiny_dir):
  w = windows()
  got = np.asarray(window_nll(model.spec, model.params, w))
  # Two float32 forwards, each within forward_bound of exact; 11 predicted tokens a window.
  assert_within(got, reference_nll(tiny_dir("llama_gqa"), w), _nll_bound(tiny_dir("llama_gqa"), w), "window nll")


def test_perplexity_is_exp_of_the_mean_token_nll(model, tiny_dir):
  w = windows()
  r = perplexity(model.spec, model.params, w, batch_size=2)
  nll = reference_nll(tiny_dir("llama_gqa"), w)
  assert (r.windows, r.tokens) == (5, 5 * 11)
  # The summed NLL's bound (see _nll_bound), averaged over tokens; exp turns it relative.
  bound = _nll_bound(tiny_dir("llama_gqa"), w) * len(w) / r.tokens
  assert r.mean_nll == pytest.approx(nll.sum() / r.tokens, abs=bound)
  assert r.perplexity == pytest.approx(math.exp(nll.sum() / r.tokens), rel=math.expm1(bound))
  assert r.seconds > 0 and r.tokens_per_second == pytest.approx(5 * 12 / r.seconds)


@pytest.mark.parametrize("batch_size", [1, 3, 5, 8])
def test_perplexity_does_not_depend_on_the_batch_size(model, tiny_dir, batch_size):
  # The last batch is padded; padding rows must not count (a padding row would move the
  # mean NLL by ~1/5 of it). Other batch shapes may compile to other float32 kernels, so
  # the two runs agree within twice one float32 forward's NLL bound, not bitwise.
  w = windows()
  ref = perplexity(model.spec, model.params, w, batch_size=5)
  got = perplexity(model.spec, model.params, w, batch_size=batch_size)
  assert got.mean_nll == pytest.approx(ref.mean_nll, abs=2 * _nll_bound(tiny_dir("llama_gqa"), w) * 5 / ref.tokens)


def test_progress_is_reported_per_window(model):
  seen = []
  perplexity(model.spec, model.params, windows(), batch_size=2, progress=seen.append)
  assert seen == [2, 2, 1]


def test_perplexity_errors(model):
  with pytest.raises(UsageError, match="batch_size must be positive, got 0"):
    perplexity(model.spec, model.params, windows(), batch_size=0)


def test_learned_positions_limit_the_window_length(tiny_dir):
  gpt2 = jaxprune.load(tiny_dir("gpt2"))  # n_positions = 64
  with pytest.raises(UsageError, match="windows of 65 tokens .* 64 positions.*--seq-len 64 or less"):
    perplexity(gpt2.spec, gpt2.params, windows(length=65), batch_size=2)


# --------------------------------------------------------------------------
# Windows.


class CharTokenizer:
  """Stands in for a transformers tokenizer: one id per character; marks special tokens."""

  def __call__(self, text, add_special_tokens=True):
    ids = [ord(c) % 100 for c in text]
    return {"input_ids": ([999] if add_special_tokens else []) + ids}


def test_tokenize_adds_no_special_tokens():
  ids = tokenize(CharTokenizer(), "abc")
  assert ids.dtype == np.int32 and ids.tolist() == [97, 98, 99]


def test_eval_windows_are_consecutive_and_non_overlapping():
  stream = np.arange(100, dtype=np.int32)
  w = eval_windows(stream, 8)
  assert w.shape == (12, 8) and np.array_equal(w.reshape(-1), stream[:96])
  assert eval_windows(stream, 8, max_windows=3).tolist() == stream[:24].reshape(3, 8).tolist()
  assert len(eval_windows(stream, 8, max_windows=1000)) == 12


@pytest.mark.parametrize("args,needle", [
    ((np.arange(10), 1), "seq_len must be at least 2 to predict anything, got 1"),
    ((np.arange(10), 16), "has 10 tokens, fewer than one window of 16; use a longer text or a smaller --seq-len"),
    ((np.arange(10), 4, 0), "max_windows must be positive, got 0"),
])
def test_eval_window_errors(args, needle):
  with pytest.raises(UsageError, match=needle.replace("(", r"\(")):
    eval_windows(*args)


def test_sample_windows_are_seeded_distinct_and_can_exclude():
  stream = np.arange(1000, dtype=np.int32)
  a, ia = sample_windows(stream, 10, 5, seed=0)
  b, ib = sample_windows(stream, 10, 5, seed=0)
  assert np.array_equal(a, b) and len(set(ia.tolist())) == 5 and np.all(np.diff(ia) > 0)
  assert np.array_equal(a, np.stack([stream[i * 10:(i + 1) * 10] for i in ia]))
  c, ic = sample_windows(stream, 10, 95, seed=1, exclude=ia)
  assert not set(ic.tolist()) & set(ia.tolist())
  with pytest.raises(UsageError, match="0 free windows of 10 tokens, but 1 were asked for"):
    sample_windows(stream, 10, 1, seed=0, exclude=np.arange(100))


def test_read_text_missing_file(tmp_path):
  with pytest.raises(UsageError, match=f"text file {tmp_path}/nope.txt does not exist; pass a path"):
    read_text(str(tmp_path / "nope.txt"))
