"""Baseline criteria against direct numpy computations; Taylor gradients against
torch autograd; every baseline through the pipeline and the CLI on tiny models."""

import dataclasses
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from jaxprune import criteria
from jaxprune.criteria import baselines
from jaxprune.criteria.stats import ModuleStats
from jaxprune.errors import UsageError
from jaxprune.models import adapter as A
from jaxprune.models import layers as L
from jaxprune.models import logits
from jaxprune.prune import PruneConfig, prune
from jaxprune.stats import moments
from tests import tiny
from tests.numerics import assert_within, assert_within_sum_bound, sensitivity_of, sum_bound

BASELINES = ["random", "l1", "l2", "wanda-sp", "flap", "taylor-element1", "taylor-element2", "taylor-vector"]
CFG = L.BlockConfig(norm="rms", eps=1e-6, act="silu", gated=True, rope=None, sliding_window=None, kv_map=None)
D, N, K, H, F = 8, 4, 2, 3, 5
KV = (0, 0, 1, 1)


def _tree(d):
  return {k: {n: jnp.asarray(v, jnp.float32) for n, v in sub.items()} for k, sub in d.items()}


def _attn(rng, bias=True):
  p = {"q": {"kernel": rng.normal(size=(D, N, H))}, "k": {"kernel": rng.normal(size=(D, K, H))},
       "v": {"kernel": rng.normal(size=(D, K, H))}, "o": {"kernel": rng.normal(size=(N, H, D))}}
  if bias:
    p["q"]["bias"] = rng.normal(size=(N, H))
    p["k"]["bias"] = rng.normal(size=(K, H))
    p["v"]["bias"] = rng.normal(size=(K, H))
    p["o"]["bias"] = rng.normal(size=(D,))
  return _tree(p)


def _mlp(rng, bias=True):
  p = {"gate": {"kernel": rng.normal(size=(D, F))}, "up": {"kernel": rng.normal(size=(D, F))},
       "down": {"kernel": rng.normal(size=(F, D))}}
  if bias:
    for k in p:
      p[k]["bias"] = rng.normal(size=(p[k]["kernel"].shape[1],))
  return _tree(p)


def _size(tree) -> int:
  return sum(int(np.size(v)) for sub in tree.values() for v in sub.values())


def _np(tree):
  return {k: {n: np.asarray(v, np.float64) for n, v in sub.items()} for k, sub in tree.items()}


def _owned(kind, p, u):
  """Per linear layer, the list of per-channel weight vectors unit u owns, and
  the weight of that layer in the unit (1, or 1/G for a KV head's share)."""
  if kind is A.ATTN:
    G = KV.count(KV[u])
    kv = KV[u]
    parts = [
        (1.0, [np.append(p["q"]["kernel"][:, u, c], p["q"]["bias"][u, c] if "bias" in p["q"] else []) for c in
               range(H)]),
        (1.0, [p["o"]["kernel"][u, c] for c in range(H)]),
    ]
    for k in ("k", "v"):
      parts.append((1.0 / G, [np.append(p[k]["kernel"][:, kv, c], p[k]["bias"][kv, c] if "bias" in p[k] else [])
                              for c in range(H)]))
    return parts
  parts = [(1.0, [np.append(p[k]["kernel"][:, u], p[k]["bias"][u] if "bias" in p[k] else [])]) for k in
           ("gate", "up")]
  return parts + [(1.0, [p["down"]["kernel"][u]])]


def _direct(kind, p, elem, post=lambda s: s):
  """Unit scores by explicit loops: sum over layers of weight * sum over channels of post(sum elem)."""
  n = N if kind is A.ATTN else F
  return np.array([sum(wt * sum(post(np.sum(elem(ch))) for ch in chans) for wt, chans in _owned(kind, p, u))
                   for u in range(n)])


@pytest.mark.parametrize("name,elem", [("l1", np.abs), ("l2", np.square)])
@pytest.mark.parametrize("kind", [A.ATTN, A.MLP])
def test_magnitude_scores_sum_what_a_unit_owns(name, elem, kind):
  rng = np.random.default_rng(0)
  p = _attn(rng) if kind is A.ATTN else _mlp(rng)
  got = criteria.get(name).score(kind, p, ModuleStats(kv_index=KV if kind is A.ATTN else None))
  want = _direct(kind, _np(p), elem)
  # Sums of nonnegative terms, no more than every weight of the module (tests/numerics.py, point 1).
  assert_within_sum_bound(got, want, want, _size(p) + 4, name)


def test_magnitude_heads_under_mha_own_their_whole_kv_head():
  rng = np.random.default_rng(1)
  p = _attn(rng, bias=False)
  p = {**p, "k": {"kernel": p["k"]["kernel"][:, [0, 0, 1, 1]]}, "v": {"kernel": p["v"]["kernel"][:, [0, 0, 1, 1]]}}
  q = _np(p)
  want = [sum(np.sum(q[k]["kernel"][:, i] ** 2) for k in "qkv") + np.sum(q["o"]["kernel"][i] ** 2) for i in range(N)]
  got = criteria.get("l2").score(A.ATTN, p, ModuleStats(kv_index=(0, 1, 2, 3)))
  assert_within_sum_bound(got, want, want, _size(p) + 4, "l2 mha")  # nonnegative terms


def _x2(kind, p, x):
  cfg = CFG
  h, _ = A.inner(kind, cfg, p, jnp.asarray(x, jnp.float32)[None], jnp.arange(x.shape[0])[None])
  return np.asarray(h[0], np.float64)


@pytest.mark.parametrize("kind", [A.ATTN, A.MLP])
def test_wanda_sp_and_flap_against_numpy(kind):
  rng = np.random.default_rng(2)
  p = _attn(rng) if kind is A.ATTN else _mlp(rng)
  x = rng.normal(size=(40, D))
  h = _x2(kind, p, x)  # [T, U2]
  stats = ModuleStats(hidden=moments.update(moments.init(h.shape[1]), jnp.asarray(h, jnp.float32)),
                      kv_index=KV if kind is A.ATTN else None)
  w2 = np.asarray(A.second_level(kind, p)[0], np.float64)  # [U2, D]
  width = H if kind is A.ATTN else 1
  wanda = np.mean(np.abs(w2), axis=1) * np.sqrt(np.mean(h ** 2, axis=0))
  fluc = np.var(h, axis=0) * np.sum(w2 ** 2, axis=1)
  if kind is A.ATTN:
    fluc = fluc ** 2  # FLAP squares the o_proj metric
  z = (fluc - fluc.mean()) / fluc.std(ddof=1)  # FLAP's `standarlization` (torch.std: unbiased)
  # Derived bounds (tests/numerics.py, point 1). Wanda-sp: nonnegative terms (40-token
  # sum of squares, D-term mean of |w|, a square root, the head's channels).
  want = wanda.reshape(-1, width).sum(1)
  n = 40 + D + width + 8
  assert_within_sum_bound(criteria.get("wanda-sp").score(kind, p, stats), want, want, n, "wanda-sp")
  # FLAP: var = E[h^2] - E[h]^2 cancels, so its error is bounded by gamma times
  # E[h^2] + E[|h|]^2 (times ||w2 row||^2); squaring (attention) doubles the relative part.
  var_abs = (np.mean(h ** 2, axis=0) + np.mean(np.abs(h), axis=0) ** 2) * np.sum(w2 ** 2, axis=1)
  fluc_abs = 2 * var_abs * np.sqrt(fluc) if kind is A.ATTN else var_abs
  assert_within_sum_bound(baselines.flap_metric(kind, p, stats), fluc, fluc_abs, n, "flap metric")
  # Standardizing: |dz| <= (2 + 1.1 |z|) max|dfluc| / std (mean and std move by at most
  # max|dfluc|, times sqrt(n/(n-1)) <= 1.1 for the std), plus its own rounding.
  dz = (2 + 1.1 * np.abs(z)) * np.max(sum_bound(fluc_abs, n)) / fluc.std(ddof=1) + sum_bound(1 + np.abs(z), 3 * len(z))
  assert_within(criteria.get("flap").score(kind, p, stats), z.reshape(-1, width).mean(1),
                dz.reshape(-1, width).max(1), "flap score")
  # Within a module, the same order as FLAP's UL-UM scores (sum over a head's channels).
  raw = fluc.reshape(-1, width).sum(1)
  np.testing.assert_array_equal(np.argsort(np.asarray(criteria.get("flap").score(kind, p, stats))), np.argsort(raw))


def test_activation_baselines_refuse_data_free_statistics():
  p = _mlp(np.random.default_rng(3))
  for name in ("wanda-sp", "flap"):
    with pytest.raises(UsageError, match="score_data 'calib' or 'random'"):
      criteria.get(name).score(A.MLP, p, ModuleStats(identity=True))


@pytest.mark.parametrize("kind", [A.ATTN, A.MLP])
def test_taylor_scores_against_numpy(kind):
  rng = np.random.default_rng(4)
  p = _attn(rng) if kind is A.ATTN else _mlp(rng)
  g = _tree({k: {n: rng.normal(size=v.shape) for n, v in sub.items()} for k, sub in p.items()})
  f = _tree({k: {n: rng.random(size=v.shape) for n, v in sub.items()} for k, sub in p.items()})
  stats = ModuleStats(grads=g, sq_grads=f, kv_index=KV if kind is A.ATTN else None)
  pn, gn, fn = _np(p), _np(g), _np(f)
  wg = {k: {n: pn[k][n] * gn[k][n] for n in pn[k]} for k in pn}
  mix = {k: {n: pn[k][n] * gn[k][n] - 0.5 * pn[k][n] ** 2 * fn[k][n] for n in pn[k]} for k in pn}
  identity = lambda s: s
  # Sums over the weights a unit owns (tests/numerics.py, point 1): element1 and element2
  # add nonnegative terms (each a few roundings); vector's signed sum is bounded by sum |w g|.
  n = _size(p) + 8
  e1 = _direct(kind, wg, np.abs)
  assert_within_sum_bound(criteria.get("taylor-element1").score(kind, p, stats), e1, e1, n, "taylor-element1")
  e2 = _direct(kind, mix, np.abs)
  assert_within_sum_bound(criteria.get("taylor-element2").score(kind, p, stats), e2, e2, n, "taylor-element2")
  assert_within_sum_bound(criteria.get("taylor-vector").score(kind, p, stats), _direct(kind, wg, identity, post=abs),
                          e1, n, "taylor-vector")
  with pytest.raises(UsageError, match="needs language-model gradients"):
    criteria.get("taylor-element2").score(kind, p, ModuleStats(grads=g))


def test_random_is_seeded_by_seed_layer_and_kind():
  p = _mlp(np.random.default_rng(5))
  s = lambda **kw: np.asarray(criteria.get("random").score(A.MLP, p, ModuleStats(**kw)))
  np.testing.assert_array_equal(s(seed=3, layer=1), s(seed=3, layer=1))
  assert not np.array_equal(s(seed=3, layer=1), s(seed=3, layer=2))
  assert not np.array_equal(s(seed=3, layer=1), s(seed=4, layer=1))
  a = _attn(np.random.default_rng(5))
  assert criteria.get("random").score(A.ATTN, a, ModuleStats(layer=1)).shape == (N,)


def test_registry_has_every_baseline_with_its_prepare():
  assert set(BASELINES) <= set(criteria.names())
  for name in BASELINES:
    assert (criteria.get(name).prepare is not None) == name.startswith("taylor")


# ---------------------------------------------------------------------------
# Gradients against torch autograd


def _windows(n=8, t=12, seed=0):
  return np.random.default_rng(seed).integers(0, tiny.VOCAB, size=(n, t)).astype(np.int32)


@pytest.mark.parametrize("kind", ["llama_gqa", "gpt2"])
def test_lm_gradients_match_torch_autograd(tiny_dir, kind):
  import torch

  path = tiny_dir(kind)
  m = jaxprune.load(path)
  win = _windows()
  out = baselines.lm_gradients(m, win, PruneConfig(batch_size=4), per_sample=True)
  ids = torch.as_tensor(win, dtype=torch.long)

  def torch_grads(hf):
    """Layer 1's dense gradient (mean next-token cross entropy over all windows) and its
    Fisher term (mean over windows of the squared gradient of each window's mean loss)."""
    blk = hf.transformer.h[1] if kind == "gpt2" else hf.model.layers[1]
    down = blk.mlp.c_proj.weight if kind == "gpt2" else blk.mlp.down_proj.weight
    hf.zero_grad()
    hf(ids, labels=ids).loss.backward()
    grads = [down.grad.numpy().copy() if kind == "gpt2" else down.grad.numpy().T.copy()]
    if kind != "gpt2":
      grads.append(blk.self_attn.q_proj.weight.grad.numpy().copy())
    fisher = 0
    for n in range(len(win)):
      hf.zero_grad()
      hf(ids[n:n + 1], labels=ids[n:n + 1]).loss.backward()
      fisher = fisher + down.grad.numpy().astype(np.float64) ** 2 / len(win)
    return [*grads, fisher if kind == "gpt2" else fisher.T]

  want = torch_grads(_hf(path, torch.float32))
  ours = [out["grads"][1]["mlp"]["down"]["kernel"]]
  if kind != "gpt2":
    ours.append(np.asarray(out["grads"][1]["attn"]["q"]["kernel"]).transpose(1, 2, 0).reshape(-1, m.spec.hidden_size))
  ours.append(out["sq_grads"][1]["mlp"]["down"]["kernel"])
  # Backward passes are deep float32 computations: the sensitivity bound (tests/numerics.py, point 2),
  # forward and backward perturbed, for JAX and PyTorch alike.
  sens = sensitivity_of(_hf(path, torch.float64), torch_grads, grad_rows=ids.numel())
  for i, (got, theirs, s) in enumerate(zip(ours, want, sens, strict=True)):
    s.check_engines(np.asarray(got), theirs, f"tiny {kind} " + ("fisher" if i == len(ours) - 1 else f"gradient {i}"))
  assert out["sq_grads"][0] is not None and "attn" in out["grads"][0]


def test_lm_gradients_keep_only_the_pruned_range(tiny_dir):
  m = jaxprune.load(tiny_dir("llama_gqa"))
  full = baselines.lm_gradients(m, _windows(), PruneConfig(batch_size=8))
  part = baselines.lm_gradients(m, _windows(), PruneConfig(batch_size=8, layers=(1, 2)))
  assert full["sq_grads"] is None and part["grads"][0] is None
  # The same loss differentiated with respect to fewer parameters: XLA may compile the two
  # programs differently, so they agree to float32 rounding, not bitwise. Both must meet the
  # sensitivity bound (tests/numerics.py, point 2) around the float64 gradient of that loss.
  import torch

  ids = torch.as_tensor(_windows(), dtype=torch.long)

  def up_grad(hf):
    hf.zero_grad()
    hf(ids, labels=ids).loss.backward()
    return hf.model.layers[1].mlp.up_proj.weight.grad.numpy().T.copy()

  want = up_grad(_hf(tiny_dir("llama_gqa"), torch.float32))
  sens = sensitivity_of(_hf(tiny_dir("llama_gqa"), torch.float64), up_grad, grad_rows=ids.numel())
  for name, g in (("part", part), ("full", full)):
    sens.check_engines(np.asarray(g["grads"][1]["mlp"]["up"]["kernel"]), want, f"tiny gradient {name} range")


def _hf(path, dtype):
  import transformers

  return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()


# ---------------------------------------------------------------------------
# Through the pipeline and the CLI


def _calib(n=16, t=16, seed=0):
  return np.random.default_rng(seed).integers(0, tiny.VOCAB, size=(n, t)).astype(np.int32)


@pytest.mark.parametrize("methods,extra", [
    (("random", "l1", "l2"), {}),
    (("wanda-sp", "flap"), dict(compensate=True)),
    (("taylor-element1", "taylor-vector"), {}),
    (("taylor-element2",), dict(reconstruct=True)),
])
def test_every_baseline_runs_through_the_pipeline(tiny_dir, methods, extra):
  m = jaxprune.load(tiny_dir("llama_gqa"))
  for method in methods:
    cfg = PruneConfig.preset("baseline", **{**dict(sparsity=0.3, method=method, batch_size=8), **extra})
    r = prune(m, _calib(), cfg)
    assert abs(r.report["params"]["ratio_of_pruned_blocks"] - 0.3) < 0.05, method
    assert np.all(np.isfinite(np.asarray(logits(r.model.spec, r.model.params, _calib(2, 10, seed=1)))))


@pytest.mark.parametrize("kind", ["gpt2", "llama_bias"])
def test_baselines_on_models_with_biases(tiny_dir, kind):
  m = jaxprune.load(tiny_dir(kind))
  for method in ("l1", "flap", "taylor-vector"):
    r = prune(m, _calib(), PruneConfig.preset("baseline", sparsity=0.3, method=method, compensate=method == "flap",
                                       batch_size=8))
    assert abs(r.report["params"]["ratio_of_pruned_blocks"] - 0.3) < 0.06, method
    assert np.all(np.isfinite(np.asarray(logits(r.model.spec, r.model.params, _calib(2, 10, seed=1)))))


def test_random_pipeline_is_reproducible_and_seeded(tiny_dir):
  m = jaxprune.load(tiny_dir("llama_mha"))
  cfg = PruneConfig.preset("baseline", sparsity=0.4, method="random", batch_size=8)
  kept = lambda c: [mod["kept"] for mod in prune(m, _calib(), c).report["modules"]]
  assert kept(cfg) == kept(cfg)
  assert kept(cfg) != kept(dataclasses.replace(cfg, seed=1))


def test_flap_with_uniform_attention_kept_and_adaptive(tiny_dir):
  m = jaxprune.load(tiny_dir("llama_gqa"))
  r = prune(m, _calib(), PruneConfig.preset("baseline", sparsity=0.2, method="flap", compensate=True,
                                     attn_sparsity=0.0, batch_size=8))
  assert all(mod["units_after"] == mod["units_before"] for mod in r.report["modules"] if mod["module"] == "attn")
  assert all("bias" in blk["mlp"]["down"] for blk in r.model.params["layers"])
  r = prune(m, _calib(), PruneConfig.preset("baseline", sparsity=0.3, method="flap", compensate=True,
                                     allocation="adaptive", batch_size=8))
  assert abs(r.report["params"]["ratio_of_pruned_blocks"] - 0.3) < 0.05


def test_cli_prune_with_a_baseline_method(tiny_dir, tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  from jaxprune.cli import main

  path = tmp_path / "model"
  shutil.copytree(tiny_dir("llama_gqa"), path)
  words = [f"w{i}" for i in range(tiny.VOCAB - 1)]
  backend = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
  backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(path)
  text = tmp_path / "text.txt"
  text.write_text(" ".join(np.random.default_rng(0).choice(words, size=600)))
  out = tmp_path / "out"
  rc = main(["prune", str(path), "--sparsity", "0.3", "--method", "taylor-element1", "--no-reconstruct",
             "--calib", str(text), "--calib-samples", "16", "--seq-len", "16", "--batch-size", "8",
             "--out", str(out)])
  assert rc == 0
  with open(os.path.join(out, "report.json")) as f:
    rep = json.load(f)
  assert rep["config"]["method"] == "taylor-element1" and rep["config"]["reconstruct"] is False
