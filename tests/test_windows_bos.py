"""The window rule for a model whose tokenizer adds BOS (issue 29): every window, for evaluation
and for calibration, is fed as `[BOS] + N` tokens and all N window tokens are scored; a
tokenizer that adds no BOS gives the windows it always did."""

import argparse
import shutil

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

import jaxprune
from jaxprune.cli import main
from jaxprune.data import bos_prefix, eval_windows, prefixed, sample_windows, text_windows, tokenize
from jaxprune.errors import UsageError
from jaxprune.eval import perplexity
from tests import tiny
from tests.numerics import assert_within
from tests.test_eval import _nll_bound, reference_nll

BOS = 0  # the tiny models' bos_token_id
WORDS = [f"w{i}" for i in range(tiny.VOCAB - 2)]  # ids 2..127; 0 and 1 are <s> and </s>
SEQ = 16


def save_tokenizer(path: str, adds_bos: str = "template") -> str:
  """A word-level tokenizer over WORDS with <s> = 0, </s> = 1, saved into `path`.

  adds_bos: "template" (a post-processor that puts <s> first, as Gemma's tokenizer.json),
  "flag" (transformers' add_bos_token=True) or "no" (the same vocabulary, nothing added).
  """
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  vocab = {"<s>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
  backend = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
  backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  if adds_bos == "template":
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
  extra = {"add_bos_token": True} if adds_bos == "flag" else {}
  PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="</s>",
                          **extra).save_pretrained(path)
  return path


def model_with(tiny_dir, tmp_path_factory, adds_bos: str) -> str:
  path = str(tmp_path_factory.mktemp(f"bos_{adds_bos}") / "model")
  shutil.copytree(tiny_dir("llama_gqa"), path)
  return save_tokenizer(path, adds_bos)


@pytest.fixture(scope="module")
def bos_dir(tiny_dir, tmp_path_factory):
  return model_with(tiny_dir, tmp_path_factory, "template")


@pytest.fixture(scope="module")
def plain_dir(tiny_dir, tmp_path_factory):
  return model_with(tiny_dir, tmp_path_factory, "no")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("text") / "words.txt"
  path.write_text(" ".join(np.random.default_rng(0).choice(WORDS, size=400)))
  return str(path)


def write_gguf_tokenizer(path: str, add_bos: bool | None) -> str:
  """A GGUF holding only a byte-level BPE vocabulary (<s> = 0), with tokenizer.ggml.add_bos_token
  set to `add_bos` (None: the field is absent)."""
  import gguf

  w = gguf.GGUFWriter(path, "llama")
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("default")
  w.add_token_list(["<s>", "</s>", "a", "b", "\u0120", "\u0120a", "ab"])
  w.add_token_types([3, 3, 1, 1, 1, 1, 1])
  w.add_token_merges(["\u0120 a", "a b"])
  w.add_bos_token_id(0)
  w.add_eos_token_id(1)
  if add_bos is not None:
    w.add_add_bos_token(add_bos)
  w.add_tensor("unused", np.zeros(4, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


@pytest.mark.parametrize("adds_bos,want", [("template", (BOS,)), ("flag", (BOS,)), ("no", ())])
def test_bos_prefix_is_read_from_the_hf_tokenizer(tmp_path, adds_bos, want):
  tok = PreTrainedTokenizerFast.from_pretrained(save_tokenizer(str(tmp_path), adds_bos))
  assert bos_prefix(tok) == want
  assert tok("w3 w4")["input_ids"] == [*want, 5, 6]  # the prefix is what encoding text puts first


@pytest.mark.parametrize("add_bos,want", [(True, (0,)), (False, ()), (None, ())])
def test_bos_prefix_of_a_gguf_follows_its_add_bos_token(tmp_path, add_bos, want):
  path = write_gguf_tokenizer(str(tmp_path / "tok.gguf"), add_bos)
  assert bos_prefix(jaxprune.load_tokenizer(path)) == want


def test_tokenizers_without_bos_give_the_empty_prefix(tmp_path):
  tok = PreTrainedTokenizerFast.from_pretrained(tiny.add_word_tokenizer(str(tmp_path)))
  assert tok.bos_token_id is None and bos_prefix(tok) == ()


@pytest.mark.smollm2
def test_smollm2_tokenizer_adds_no_bos():
  """SmolLM2's windows stay the stream's windows, so its figures do not move."""
  tok = jaxprune.load_tokenizer("smollm2-135m")
  assert tok.bos_token_id is not None and bos_prefix(tok) == ()


def test_text_windows_are_bos_then_the_stream_windows(bos_dir, plain_dir, text_file):
  plain_tok = jaxprune.load_tokenizer(plain_dir)
  stream = tokenize(plain_tok, open(text_file).read())
  plain = text_windows(text_file, plain_tok, SEQ, 5)
  # Without BOS: today's windows exactly, consecutive slices of the stream.
  np.testing.assert_array_equal(plain, stream[:5 * SEQ].reshape(5, SEQ))
  w = text_windows(text_file, jaxprune.load_tokenizer(bos_dir), SEQ, 5)
  assert w.shape == (5, 1 + SEQ) and w.dtype == np.int32
  assert (w[:, 0] == BOS).all()
  np.testing.assert_array_equal(w[:, 1:], plain)
  np.testing.assert_array_equal(w, eval_windows(stream, SEQ, 5, prefix=(BOS,)))


def test_perplexity_scores_all_window_tokens_the_first_from_bos(bos_dir, text_file):
  """N tokens scored a window, and the NLL is transformers' on [BOS] + window computed by hand:
  position 0 (BOS) predicts the window's first token, nothing predicts BOS."""
  m = jaxprune.load(bos_dir)
  w = text_windows(text_file, jaxprune.load_tokenizer(bos_dir), SEQ, 6)
  r = perplexity(m.spec, m.params, w, batch_size=4)
  assert (r.windows, r.tokens) == (6, 6 * SEQ)
  import torch
  import transformers

  hf = transformers.AutoModelForCausalLM.from_pretrained(bos_dir, dtype=torch.float32).eval()
  with torch.no_grad():
    logp = torch.log_softmax(hf(torch.as_tensor(w, dtype=torch.long)).logits.double(), -1).numpy()
  first = -logp[np.arange(len(w)), 0, w[:, 1]]  # the first window token, predicted from BOS
  rest = -np.take_along_axis(logp[:, 1:-1], w[:, 2:, None], axis=-1)[..., 0].sum(-1)
  by_hand = first + rest
  np.testing.assert_allclose(by_hand, reference_nll(bos_dir, w), rtol=1e-12)
  # The summed NLL's bound (tests/numerics.py), averaged over the scored tokens.
  bound = _nll_bound(bos_dir, w) * len(w) / r.tokens
  assert_within(np.array([r.mean_nll]), np.array([by_hand.sum() / r.tokens]), bound, "mean nll after BOS")


def run_cli(capsys, *argv):
  capsys.readouterr()
  code = main(list(argv))
  out, err = capsys.readouterr()
  assert code == 0, err
  return out


@pytest.mark.parametrize("which", ["bos", "plain"])
def test_cli_eval_feeds_windows_after_bos(capsys, bos_dir, plain_dir, text_file, which):
  path = bos_dir if which == "bos" else plain_dir
  out = run_cli(capsys, "eval", path, "--text", text_file, "--seq-len", str(SEQ), "--max-windows", "5",
                "--batch-size", "4", "--no-progress")
  m = jaxprune.load(path)
  want = perplexity(m.spec, m.params, text_windows(text_file, jaxprune.load_tokenizer(path), SEQ, 5), batch_size=4)
  ppl = float(next(l for l in out.splitlines() if l.startswith("perplexity")).split()[1])
  assert ppl == pytest.approx(want.perplexity, abs=5e-5 * (1 + 1e-9))  # printed to 4 decimals
  after = " after BOS" if which == "bos" else ""
  assert f"5 x {SEQ} tokens{after} (batch 4" in out
  assert f"tokens      {5 * SEQ if which == 'bos' else 5 * (SEQ - 1)} predicted" in out


def _calibration(path, calib, n=4):
  from jaxprune.cli.prune_inputs import calibration
  from jaxprune.prune import PruneConfig

  args = argparse.Namespace(seq_len=SEQ, show_progress=False)
  config = PruneConfig(seed=3, selfgen_top_k=1, selfgen_windows_per_text=1)
  return calibration(args, jaxprune.load(path), jaxprune.load_tokenizer(path), config, [(calib, n)])


@pytest.mark.parametrize("source", ["text", "random", "selfgen"])
def test_calibration_windows_carry_bos(bos_dir, plain_dir, text_file, source):
  """`jaxprune prune`'s calibration windows of every source: BOS then the N tokens the
  tokenizer without BOS gives (the same draw), which are today's windows."""
  calib = text_file if source == "text" else source
  plain = _calibration(plain_dir, calib)
  w = _calibration(bos_dir, calib)
  assert plain.shape == (4, SEQ) and w.shape == (4, 1 + SEQ) and (w[:, 0] == BOS).all()
  if source == "text":
    stream = tokenize(jaxprune.load_tokenizer(plain_dir), open(text_file).read())
    np.testing.assert_array_equal(plain, sample_windows(stream, SEQ, 4, seed=3)[0])
  if source != "selfgen":  # generated text after BOS is the model's continuation, not the plain windows
    np.testing.assert_array_equal(w[:, 1:], plain)


def test_self_generated_windows_after_bos(bos_dir):
  """Each text is sampled from BOS; every window is BOS and the next N tokens of its text."""
  from jaxprune.data.selfgen import self_generated

  m = jaxprune.load(bos_dir)
  w = self_generated(m.spec, m.params, 4, 8, seed=1, windows_per_text=2, prefix=(BOS,))
  texts = self_generated(m.spec, m.params, 2, 16, seed=1, prefix=(BOS,))  # the same 17-token texts
  assert w.shape == (4, 9) and texts.shape == (2, 17) and (w[:, 0] == BOS).all() and (texts[:, 0] == BOS).all()
  np.testing.assert_array_equal(w[0::2, 1:], texts[:, 1:9])
  np.testing.assert_array_equal(w[1::2, 1:], texts[:, 9:])
  with pytest.raises(UsageError, match="pass one of them"):
    self_generated(m.spec, m.params, 2, 8, prefix=(BOS,), first_token=5)


def test_prefixed_leaves_windows_without_a_prefix_alone():
  w = np.arange(12, dtype=np.int32).reshape(3, 4)
  assert prefixed(w, ()) is w
  np.testing.assert_array_equal(prefixed(w, (7,)), np.concatenate([np.full((3, 1), 7, np.int32), w], axis=1))
