"""SmolLM2-135M, dense and pruned, exported to Hugging Face and run in PyTorch.

Pruned models come from `jaxprune.surgery` with a fixed keep rule: the same
sizes in every layer (a plain config for stock transformers) or sizes that vary
by layer (per_layer_config, loaded by stock transformers with the modeling file the
export ships, `trust_remote_code=True`, or by `jaxprune.pytorch.load_pruned`).
"""

from __future__ import annotations

import math
import os
import re

import jax
import numpy as np
import pytest

import jaxprune
from jaxprune import cli
from jaxprune.data import eval_windows, tokenize
from jaxprune.eval import perplexity
from jaxprune.io.export import save_hf
from jaxprune.io.orbax_io import save_orbax
from jaxprune.surgery import prune_model
from tests.numerics import assert_within, gamma, sensitivity

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from jaxprune.pytorch import count_parameters, load_pruned  # noqa: E402

pytestmark = pytest.mark.smollm2

TEXT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext-2", "test.txt")
# Two windows: the parity bound is derived from the model's sensitivity on these very tokens
# (tests/numerics.py), so it holds for any count; each window costs seven float64 SmolLM2 runs.
SEQ_LEN, WINDOWS = 128, 2


def keep_plan(spec, layout: str):
  """Heads and channels to keep: 'uniform' (about 20% of block weights go in every layer) or 'per_layer'."""
  heads, channels = {}, {}
  for i, l in enumerate(spec.layers):
    G = l.num_heads // l.num_kv_heads
    if layout == "uniform":
      g, f = G - 1, l.ffn_dim - 320
    else:  # 3, 2 or 1 heads per group and a width that changes with depth
      g, f = G - i % G, l.ffn_dim - 64 * (i % 7) - 128
    heads[i] = [k * G + j for k in range(l.num_kv_heads) for j in range(g)]
    channels[i] = list(range(f))
  return heads, channels


@pytest.fixture(scope="module")
def windows(smol):
  if not os.path.isfile(TEXT):
    pytest.skip(f"{TEXT} is missing")
  with open(TEXT, encoding="utf-8") as f:
    text = f.read(100_000)
  stream = tokenize(jaxprune.load_tokenizer(smol.source), text)
  return eval_windows(stream, SEQ_LEN, WINDOWS)


@pytest.fixture(scope="module", params=["dense", "uniform", "per_layer"])
def exported(request, smol, tmp_path_factory):
  layout = request.param
  model = smol if layout == "dense" else prune_model(smol, *keep_plan(smol.spec, layout))
  out = str(tmp_path_factory.mktemp("smollm2") / layout)
  info = save_hf(model, out, dtype="float32")
  # Stock transformers in every case: a per-layer export runs the modeling file it ships.
  tm = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                         trust_remote_code=not info.stock).eval()
  return layout, model, info, tm, out


def torch_logits(tm, tokens) -> np.ndarray:
  with torch.inference_mode():
    return tm(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def test_config_form(exported):
  layout, model, info, tm, out = exported
  assert info.per_layer == (layout == "per_layer") and info.stock == (layout != "per_layer")
  assert model.spec.uniform == (layout != "per_layer")
  if layout == "per_layer":
    assert type(tm).__name__ == "JaxpruneLlamaForCausalLM"  # from the export's modeling_jaxprune.py
    sizes = lambda m: [(l.self_attn.q_proj.out_features, l.mlp.up_proj.out_features) for l in m.model.layers]
    assert sizes(tm) == sizes(load_pruned(out)) == [(l.num_heads * l.head_dim, l.ffn_dim) for l in model.spec.layers]
  if layout == "uniform":
    assert (tm.config.num_attention_heads, tm.config.num_key_value_heads, tm.config.intermediate_size) == (6, 3, 1216)


@pytest.fixture(scope="module")
def parity(exported, windows):
  """The export's float32 logits in JAX and PyTorch against its float64 run and the model's
  sensitivity S (tests/numerics.py, point 2), reduced to what the tests need (the full logits
  are ~100 MB per copy, so none is kept)."""
  layout, model, _, tm, out = exported
  sens = sensitivity(load_pruned(out, dtype=torch.float64, attn_implementation="eager"), windows)
  got = np.asarray(jaxprune.logits(model.spec, model.params, windows))
  theirs = torch_logits(tm, windows)
  errors = dict(err_jax=float(np.max(np.abs(got - sens.exact))), err_torch=float(np.max(np.abs(theirs - sens.exact))),
                gap=float(np.max(np.abs(got.astype(np.float64) - theirs))), spread=sens.spread, bound=sens.bound,
                exact_max=float(np.max(np.abs(sens.exact))))
  del sens
  # For the perplexity test: transformers' perplexity and each position's largest logit gap.
  logits = torch.as_tensor(theirs[:, :-1])
  nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                          torch.as_tensor(windows[:, 1:].reshape(-1), dtype=torch.long))
  gaps = np.abs(got[:, :-1] - theirs[:, :-1]).max(-1).astype(np.float64)
  return dict(errors=errors, torch_ppl=math.exp(float(nll)), gaps=gaps)


def test_logit_parity(exported, parity):
  """JAX's and PyTorch's float32 logits lie within the bound the model's own sensitivity
  gives (tests/numerics.py, point 2), on whatever CPU and kernels this runs.

  A fixed bound cannot hold across models: pruned SmolLM2 carries large residual
  outliers, so 30 layers amplify float32 rounding to ~1e-3. S measures that
  amplification in float64, independently of any float32 kernel.
  """
  layout, e = exported[0], parity["errors"]
  what = f"smollm2 export {layout}"
  for engine in ("jax", "torch"):
    assert_within(e[f"err_{engine}"], 0.0, e["bound"], f"{what} {engine} [sensitivity]", spread=e["spread"],
                  exact_max=e["exact_max"], err_torch=e["err_torch"])
  assert_within(e["gap"], 0.0, 2 * e["bound"], f"{what} [sensitivity, two float32 runs]", spread=e["spread"])
  print(f"\n{layout}: max |logit error| vs float64: JAX {e['err_jax']:.2e}, PyTorch {e['err_torch']:.2e}, "
        f"S {e['spread']:.2e}, derived bound {e['bound']:.2e}; JAX-PyTorch gap {e['gap']:.2e}")


def test_parameter_counts(exported):
  _, model, info, tm, _ = exported
  assert count_parameters(tm) == info.exported_params == model.num_params
  assert info.padded_params == 0


@pytest.fixture(scope="module")
def reloaded(exported):
  """The export read back by jaxprune (once per layout: two tests compare it)."""
  return jaxprune.load(exported[4])


def test_round_trip_exact(exported, reloaded):
  model, back = exported[1], reloaded
  assert back.spec == model.spec
  for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(model.params), strict=True):
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_perplexity_matches_transformers(exported, windows, parity, reloaded):
  layout, model, back = exported[0], exported[1], reloaded
  ours = perplexity(model.spec, model.params, windows, batch_size=WINDOWS).perplexity
  assert perplexity(back.spec, back.params, windows, batch_size=WINDOWS).perplexity == ours
  theirs = parity["torch_ppl"]
  # Derived bound: a token's NLL z_y - logsumexp(z) moves by at most 2 max_v |dz_v| when
  # the logits move by dz, so the mean NLL moves by at most the mean over positions of
  # that, and the perplexity by expm1 of it; plus float32 rounding of the two means.
  gaps = parity["gaps"]
  rel = math.expm1(2 * gaps.mean()) + gamma(gaps.size) * 4
  print(f"\n{layout}: perplexity jaxprune {ours:.4f}, transformers {theirs:.4f}, derived rel bound {rel:.2e}")
  assert theirs == pytest.approx(ours, rel=rel)


def test_tokenizer_exported(exported, smol):
  _, _, info, _, out = exported
  assert info.tokenizer
  text = "The pruned model still speaks PyTorch."
  ours = jaxprune.load_tokenizer(smol.source)(text)["input_ids"]
  assert transformers.AutoTokenizer.from_pretrained(out)(text)["input_ids"] == ours
  assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == smol.spec.eos_token_id


def test_cli_eval_reads_the_export(exported, windows, capsys):
  """`jaxprune eval OUT` loads both config forms (and the tokenizer written beside them)."""
  _, model, _, _, out = exported
  argv = ["eval", out, "--text", TEXT, "--seq-len", str(SEQ_LEN), "--max-windows", str(WINDOWS), "--no-progress"]
  assert cli.main(argv) == 0
  printed = float(re.search(r"perplexity\s+([0-9.]+)", capsys.readouterr().out).group(1))
  ours = perplexity(model.spec, model.params, windows, batch_size=WINDOWS).perplexity
  assert printed == pytest.approx(ours, rel=1e-5)


def test_orbax_round_trip(exported, tmp_path):
  _, model, _, _, _ = exported
  out = save_orbax(model, str(tmp_path / "ck"))
  back = jaxprune.load(out)
  assert back.spec == model.spec
  for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(model.params), strict=True):
    assert np.array_equal(np.asarray(a), np.asarray(b))
