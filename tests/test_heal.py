"""jaxprune.heal and `jaxprune heal`: optional bias / LoRA training after pruning (beyond the paper)."""

import json
import shutil

import jax
import numpy as np
import pytest

import jaxprune
from jaxprune.cli import main
from jaxprune.heal import HealConfig, heal
from jaxprune.surgery import prune_model
from tests import tiny

L = 16  # tokens per window


def _windows(n, seed):
  # Tokens from a skewed distribution over 16 ids: a random model is far from it, and both a bias of the
  # MLP output and a LoRA can move the logits towards it, so the loss has somewhere to go.
  p = np.arange(16, 0, -1, dtype=np.float64) ** 2
  return np.random.default_rng(seed).choice(16, size=(n, L), p=p / p.sum()).astype(np.int32)


@pytest.fixture(scope="module")
def pruned(tiny_dir):
  """A tiny LLaMA with biases, pruned to different sizes per layer."""
  dense = jaxprune.load(tiny_dir("llama_bias"))
  return prune_model(dense, {0: [2, 3]}, {0: list(range(0, 96, 2)), 1: list(range(70))})


def _leaves(params):
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.mark.parametrize("train,lr,changed", [
    ("lora", 1e-2, {"['attn']['o']['kernel']", "['mlp']['down']['kernel']"}),
    ("bias", 3e-2, {"['attn']['q']['bias']", "['attn']['k']['bias']", "['attn']['v']['bias']",
                    "['attn']['o']['bias']", "['mlp']['up']['bias']", "['mlp']['gate']['bias']",
                    "['mlp']['down']['bias']"}),
])
def test_heal_lowers_the_loss_and_trains_only_its_parameters(pruned, train, lr, changed):
  cfg = HealConfig(train=train, steps=24, batch_size=4, learning_rate=lr, seed=0)
  r = heal(pruned, _windows(16, 0), _windows(8, 1), cfg)
  loss = r.report["loss"]
  assert len(loss) == 24 and all(np.isfinite(loss))
  assert np.mean(loss[-4:]) < np.mean(loss[:4])
  h = r.report["heldout_perplexity"]
  assert h["after"] < h["before"]
  # Same description and shapes; every leaf outside the trained set is bit-identical.
  assert r.model.spec == pruned.spec
  before, after = _leaves(pruned.params), _leaves(r.model.params)
  assert set(before) == set(after)
  trained = {k for k in before if any(k.endswith(c) for c in changed) and k.startswith("['layers']")}
  assert trained and r.report["trained"]["parameters"] > 0
  for k in before:
    assert after[k].shape == before[k].shape and after[k].dtype == before[k].dtype, k
    if k in trained:
      assert not np.array_equal(after[k], before[k]), f"{k} did not train"
    else:
      np.testing.assert_array_equal(after[k], before[k], err_msg=k)


def test_heal_is_deterministic_for_a_seed(pruned):
  cfg = HealConfig(train="lora", steps=6, batch_size=4, learning_rate=1e-2, seed=3)
  a = heal(pruned, _windows(16, 0), None, cfg)
  b = heal(pruned, _windows(16, 0), None, cfg)
  c = heal(pruned, _windows(16, 0), None, HealConfig(**{**cfg.__dict__, "seed": 4}))
  assert a.report["loss"] == b.report["loss"]
  for x, y in zip(jax.tree.leaves(a.model.params), jax.tree.leaves(b.model.params), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert a.report["loss"] != c.report["loss"]  # another seed: another LoRA init and batch order


def test_heal_refuses_bad_settings(tiny_dir, pruned):
  with pytest.raises(jaxprune.UsageError, match="no projection biases"):
    heal(jaxprune.load(tiny_dir("llama_gqa")), _windows(8, 0), None, HealConfig(train="bias", steps=1))
  with pytest.raises(jaxprune.UsageError, match="batch_size 32 is larger than the 8"):
    heal(pruned, _windows(8, 0), None, HealConfig(steps=1, batch_size=32))
  with pytest.raises(jaxprune.UsageError, match="train must be one of"):
    HealConfig(train="full")


def test_heal_command_writes_a_model_with_the_pruned_shapes(capsys, tiny_dir, tmp_path):
  model_dir = tmp_path / "model"
  shutil.copytree(tiny_dir("llama_bias"), model_dir)
  tiny.add_word_tokenizer(str(model_dir))
  text = tiny.write_words(str(tmp_path / "calib.txt"), 600, seed=1)
  out = tmp_path / "healed"
  argv = ["heal", str(model_dir), "--calib", text, "--out", str(out), "--steps", "3", "--batch-size", "4",
          "--calib-samples", "8", "--heldout", "4", "--seq-len", "16", "--no-progress"]
  assert main(argv) == 0, capsys.readouterr().err
  assert "held-out perplexity" in capsys.readouterr().out
  report = json.loads((out / "heal.json").read_text())
  assert len(report["loss"]) == 3 and set(report["heldout_perplexity"]) == {"before", "after"}
  assert report["windows"] == {"train": 8, "heldout": 4, "seq_len": 16}
  healed, dense = jaxprune.load(str(out)), jaxprune.load(str(model_dir))
  assert healed.spec.layers == dense.spec.layers and healed.num_params == dense.num_params
  # An existing output is kept without --force.
  stamp = (out / "heal.json").stat().st_mtime_ns
  assert main(argv) == 2
  assert "already exists" in capsys.readouterr().err and (out / "heal.json").stat().st_mtime_ns == stamp
