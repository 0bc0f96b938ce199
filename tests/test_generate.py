"""The KV-cache decoder against the full forward, the sampler, and `jaxprune generate`."""

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from jaxprune import surgery
from jaxprune.cli import main
from jaxprune.generate import SampleConfig, filter_top_p, generate, pick
from jaxprune.models import decode
from tests import tiny

# Cached and full logits run the same float32 operations; only the reduction
# shapes differ (keys over the cache's L slots instead of the T positions, one
# query row at a time instead of T), so XLA may sum in another order. Masked
# slots add exact zeros (exp(finfo.min - max) underflows to 0). Reassociating a
# dot product of n terms changes it by at most about n * eps * sum|terms|; the
# widest reduction here is n = 96 (the MLP), so with eps = 2^-23 one dot moves
# by <= 1.2e-5 relative, and the two blocks' ~10 chained dots of these tiny
# models (|logits| < 2) stay below 1e-4 even in that worst case. A wrong cache
# slot, position or mask moves the logits by O(0.1).
ATOL = 1e-4


def _model(tiny_dir, kind):
  return jaxprune.load(tiny_dir(kind))


def _tokens(T, seed=0, B=2):
  return np.random.default_rng(seed).integers(0, tiny.VOCAB, (B, T)).astype(np.int32)


@pytest.mark.parametrize("kind", list(tiny.KINDS))
def test_cached_decoder_equals_full_forward(tiny_dir, kind):
  m = _model(tiny_dir, kind)
  # 20 tokens: longer than Mistral's sliding window of 8, so the window mask must act in
  # both the prefill (5 tokens) and the 15 single-token steps; 24 cache slots leave 4 never written.
  toks = _tokens(20)
  full = np.asarray(jaxprune.logits(m.spec, m.params, toks))
  cached = np.asarray(decode.cached_logits(m.spec, m.params, toks, prefix=5, length=24))
  assert cached.shape == full.shape
  np.testing.assert_allclose(cached, full, rtol=0, atol=ATOL)


def test_cached_decoder_on_layers_of_different_widths(tiny_dir):
  """A pruned model: layer 0 keeps one KV group (2 of 4 heads), layer 1 keeps 48 of 96 channels."""
  m = surgery.prune_model(_model(tiny_dir, "llama_gqa"), heads={0: np.array([2, 3])},
                          channels={1: np.arange(0, 96, 2)})
  assert m.spec.layers[0].num_kv_heads == 1 and m.spec.layers[1].ffn_dim == 48
  toks = _tokens(12, seed=1)
  full = np.asarray(jaxprune.logits(m.spec, m.params, toks))
  np.testing.assert_allclose(np.asarray(decode.cached_logits(m.spec, m.params, toks, prefix=3)), full, rtol=0,
                             atol=ATOL)


def test_greedy_follows_the_argmax_of_the_full_forward(tiny_dir):
  m = _model(tiny_dir, "qwen2")
  prompt = _tokens(6, seed=2)
  new = generate(m.spec, m.params, prompt, SampleConfig(max_new_tokens=8, temperature=0))
  assert new.shape == (2, 8)
  # Causal model: the logits at position t of the whole sequence are those the sampler saw.
  lg = np.asarray(jaxprune.logits(m.spec, m.params, np.concatenate([prompt, new], axis=1)))
  np.testing.assert_array_equal(new, lg[:, 5:-1].argmax(-1))


def test_same_seed_same_tokens_other_seed_other_tokens(tiny_dir):
  m = _model(tiny_dir, "qwen2")
  prompt = _tokens(4, seed=3)
  cfg = SampleConfig(max_new_tokens=16, temperature=1.0, top_p=1.0, seed=7)
  a = generate(m.spec, m.params, prompt, cfg)
  b = generate(m.spec, m.params, prompt, cfg)
  c = generate(m.spec, m.params, prompt, SampleConfig(max_new_tokens=16, temperature=1.0, top_p=1.0, seed=8))
  np.testing.assert_array_equal(a, b)
  # The tiny model's next-token distributions are nearly uniform over 128 tokens, so two
  # seeds agreeing on all 32 draws has probability far below 1e-20.
  assert (a != c).any()


def test_eos_stops_generation(tiny_dir):
  m = _model(tiny_dir, "qwen2")
  prompt = _tokens(4, seed=4, B=1)
  free = generate(m.spec, m.params, prompt, SampleConfig(max_new_tokens=10, temperature=0))[0]
  stop = int(free[3])
  first = int(np.flatnonzero(free == stop)[0])  # the stop token may appear before position 3
  got = generate(m.spec, m.params, prompt, SampleConfig(max_new_tokens=10, temperature=0, stop=(stop,)))[0]
  np.testing.assert_array_equal(got, free[:first + 1])


def test_top_p_keeps_exactly_the_nucleus():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]], jnp.float32))
  kept = lambda p: np.flatnonzero(np.isfinite(np.asarray(filter_top_p(logits, p))[0])).tolist()
  assert kept(0.7) == [0, 1]  # mass before token 2 is 0.8 >= 0.7
  assert kept(0.85) == [0, 1, 2]
  assert kept(0.01) == [0]  # the most likely token always stays
  assert kept(0.999) == [0, 1, 2, 3]
  # Sampling under top_p = 0.7 draws only from {0, 1}, token 0 with probability 0.5 / 0.8.
  keys = jax.random.split(jax.random.key(0), 4000)
  draws = np.asarray(jax.vmap(lambda k: pick(logits, k, jnp.float32(1.0), False, 0.7, 0)[0])(keys))
  assert set(draws.tolist()) == {0, 1}
  # 5 standard deviations of a binomial proportion over 4000 draws.
  assert abs((draws == 0).mean() - 0.625) < 5 * np.sqrt(0.625 * 0.375 / 4000)


def test_bad_sampling_settings_are_refused(tiny_dir):
  m = _model(tiny_dir, "qwen2")
  with pytest.raises(jaxprune.UsageError, match="top_p must lie in"):
    generate(m.spec, m.params, _tokens(3), SampleConfig(top_p=0))
  with pytest.raises(jaxprune.UsageError, match="exceeds the model's 64 positions"):
    generate(m.spec, m.params, _tokens(60), SampleConfig(max_new_tokens=10))


@pytest.fixture(scope="module")
def word_model(tiny_dir, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("gen") / "model")
  shutil.copytree(tiny_dir("llama_gqa"), path)
  return tiny.add_word_tokenizer(path)


def _cli(capsys, *argv):
  capsys.readouterr()
  code = main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def test_generate_cli_prints_the_greedy_continuation(capsys, word_model):
  code, out, err = _cli(capsys, "generate", word_model, "--prompt", "w3 w5 w7", "--max-new-tokens", "6",
                        "--temperature", "0")
  assert code == 0, err
  m = jaxprune.load(word_model)
  tok = jaxprune.load_tokenizer(word_model)
  ids = tok("w3 w5 w7")["input_ids"]
  new = generate(m.spec, m.params, [ids], SampleConfig(max_new_tokens=6, temperature=0, stop=(m.spec.eos_token_id,)))
  assert out.strip() == tok.decode(new[0], skip_special_tokens=True).strip()
  assert len(out.split()) >= 1 and all(w in tiny.WORDS for w in out.split())


def test_generate_cli_refuses_chat_without_a_template(capsys, word_model):
  code, _, err = _cli(capsys, "generate", word_model, "--prompt", "w3", "--chat")
  assert code == 2 and "chat template" in err and "Traceback" not in err


def test_generate_options_are_sample_config_and_its_defaults():
  """SampleConfig is the one definition: its fields are the options, its defaults the run's."""
  from jaxprune.cli import build_parser
  from jaxprune.cli.generate_cmd import config_from_args

  parse = lambda *a: config_from_args(build_parser().parse_args(["generate", "m", "--prompt", "p", *a]))
  assert parse().sample == SampleConfig()
  got = parse("--temperature", "0", "--top-k", "5", "--seed", "3", "--max-new-tokens", "7", "--top-p", "1")
  assert got.sample == SampleConfig(max_new_tokens=7, temperature=0.0, top_p=1.0, top_k=5, seed=3)
  helps = {a.dest: a.help for a in build_parser()._subparsers._group_actions[0].choices["generate"]._actions}
  for f in dataclasses.fields(SampleConfig):
    if f.name != "stop":  # set from the tokenizer and the model
      assert helps[f.name] == f"{f.metadata['help']} (default: {f.default:g})", f.name


@pytest.mark.parametrize("argv,needles", [
    (("--temperature", "warm"), ("option --temperature", "temperature='warm' is not a number")),
    (("--max-new-tokens", "1.5"), ("option --max-new-tokens", "max_new_tokens='1.5' is not a number", "an integer")),
    (("--top-p", "0"), ("top_p must lie in (0, 1]",)),
])
def test_bad_sampling_options_are_one_line_errors(word_model, argv, needles):
  from tests.badinput import assert_intact, assert_one_line_error, run_cli, snapshot

  before = snapshot(word_model)
  assert_one_line_error(run_cli("generate", word_model, "--prompt", "w3", *argv), *needles)
  assert_intact(before)


# ---------------------------------------------------------------------------
# Self-generated calibration (jaxprune.data.selfgen)


def test_self_generated_text_is_the_models_own_top_k_choice(tiny_dir):
  """With top_k=1 every token of a self-generated text is an argmax of the full forward's
  logits at the position before it (within the decoder's ATOL: ties may go either way)."""
  from jaxprune.data.selfgen import self_generated

  m = _model(tiny_dir, "llama_gqa")
  w = self_generated(m.spec, m.params, 3, 16, seed=0, top_k=1, first_token=5)
  assert w.shape == (3, 16) and (w[:, 0] == 5).all()
  lg = np.asarray(jaxprune.logits(m.spec, m.params, w))
  picked = np.take_along_axis(lg[:, :-1], w[:, 1:, None], axis=-1)[..., 0]
  assert (picked >= lg[:, :-1].max(-1) - ATOL).all()


def test_self_generation_never_copies_the_kv_cache_per_token(tiny_dir):
  """The caches lie as attention's matmuls read them ([B,K,L,H]), so the compiled sampling
  loop neither transposes nor copies an array the size of a layer's cache at each token
  (with [B,L,K,H] it did both, for every layer's keys and values)."""
  from jaxprune.data import selfgen
  from tests import hlo

  m = _model(tiny_dir, "llama_gqa")
  B, L = 4, 64
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(B))
  text = selfgen._sample.lower(m.spec, m.params, keys, jnp.zeros((B,), jnp.int32), L, jnp.float32(1.0),
                               0).compile().as_text()
  layer = m.spec.layers[0]
  cache = B * layer.num_kv_heads * L * layer.head_dim
  assert "while" in text
  assert [(op, shape) for op, shape in hlo.loop_ops(text, ("copy", "transpose")) if np.prod(shape) >= cache] == []


def test_self_generated_windows_do_not_depend_on_the_batch(tiny_dir):
  """Text i is drawn with its own key: the same windows whatever the batch size, the first
  windows of a larger n are those of a smaller one, and another seed gives other text."""
  from jaxprune.data.selfgen import self_generated

  m = _model(tiny_dir, "qwen2")
  a = self_generated(m.spec, m.params, 6, 12, seed=3, batch_size=4)
  np.testing.assert_array_equal(a, self_generated(m.spec, m.params, 6, 12, seed=3, batch_size=6))
  np.testing.assert_array_equal(a[:4], self_generated(m.spec, m.params, 4, 12, seed=3, batch_size=2))
  assert not np.array_equal(a, self_generated(m.spec, m.params, 6, 12, seed=4))


def test_windows_per_text_cuts_longer_texts_into_consecutive_windows(tiny_dir):
  """Windows 3k..3k+2 of windows_per_text=3 are text k (sampled at 3 x seq_len) cut in three,
  so the windows starting a text are every third."""
  from jaxprune.data.selfgen import self_generated

  m = _model(tiny_dir, "llama_gqa")
  w = self_generated(m.spec, m.params, 5, 8, seed=1, windows_per_text=3, first_token=7)
  texts = self_generated(m.spec, m.params, 2, 24, seed=1, first_token=7)
  assert w.shape == (5, 8)
  np.testing.assert_array_equal(w, texts.reshape(6, 8)[:5])
  assert (w[[0, 3], 0] == 7).all()


def test_texts_alternate_between_several_first_tokens(tiny_dir):
  """With first_token=(a, b) text i starts with a for even i and b for odd i, and is the text i
  that starting every text with that token gives (text i keeps its key)."""
  from jaxprune.data.selfgen import self_generated

  m = _model(tiny_dir, "llama_gqa")
  w = self_generated(m.spec, m.params, 5, 8, seed=2, first_token=(5, 7), batch_size=2)
  np.testing.assert_array_equal(w[:, 0], [5, 7, 5, 7, 5])
  np.testing.assert_array_equal(w[0::2], self_generated(m.spec, m.params, 5, 8, seed=2, first_token=5)[0::2])
  np.testing.assert_array_equal(w[1::2], self_generated(m.spec, m.params, 5, 8, seed=2, first_token=7)[1::2])


@pytest.mark.parametrize("kw,match", [(dict(windows_per_text=0), "positive number of windows"),
                                      (dict(first_token=(1, -1)), r"token ids in \[0, "),
                                      (dict(first_token=10**6), r"token ids in \[0, "),
                                      (dict(windows_per_text=1000), "exceed the model's"),
                                      (dict(temperature=0.0), "temperature must be positive")])
def test_self_generated_rejects_bad_options(tiny_dir, kw, match):
  from jaxprune.data.selfgen import self_generated
  from jaxprune.errors import UsageError

  m = _model(tiny_dir, "llama_gqa")
  with pytest.raises(UsageError, match=match):
    self_generated(m.spec, m.params, 2, 8, **kw)
