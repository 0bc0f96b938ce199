"""The recipe's calibration: a text's windows joined by `selfgen_share` windows of the model's own
text (issue 32), drawn the same way by `jaxprune prune --calib FILE` and `data.selfgen.with_own_text`."""

import argparse
import json

import numpy as np
import pytest

import jaxprune
from jaxprune.cli.prune_inputs import calibration, window_counts
from jaxprune.data import bos_prefix, sample_windows, tokenize
from jaxprune.data import budget
from jaxprune.data.selfgen import own_text_count, per_text_that_fits, self_generated, with_own_text
from jaxprune.errors import UsageError
from jaxprune.prune import PruneConfig
from jaxprune.prune.streams import check_batches
from jaxprune.sharding import make_mesh
# The tiny LLaMA with a word tokenizer, its texts and the in-process command of test_cli_prune.
from tests.test_cli_prune import model_dir, run, texts  # noqa: F401

SEQ = 16


@pytest.mark.parametrize("n_data", [1, 2, 8])
@pytest.mark.parametrize("batch_size", [4, 8, 16])
@pytest.mark.parametrize("share", [0.25, 0.5, 1.0])
def test_the_share_is_the_most_windows_that_still_split_into_batches(share, batch_size, n_data):
  for n in range(1, 70):
    config = PruneConfig(selfgen_share=share, batch_size=batch_size)
    m = own_text_count(n, config, n_data)
    assert 0 <= m <= share * n

    def splits(k):
      b = min(batch_size, n + k)
      return b % n_data == 0 and (n + k) % b == 0

    assert m == 0 or splits(m)
    assert not any(splits(k) for k in range(m + 1, int(share * n) + 1))  # none larger does
  # The recipe's calibration set: 128 windows of a text and 64 of the model's own.
  assert own_text_count(128, PruneConfig()) == 64 and own_text_count(128, PruneConfig(selfgen_share=0)) == 0
  assert own_text_count(128, PruneConfig(batch_size=0)) == 0  # refused by check_batches, in one line


def test_a_bad_share_is_refused_before_any_work(model_dir):
  spec = jaxprune.load(model_dir).spec
  for bad in (-0.5, float("nan"), float("inf")):
    assert own_text_count(128, PruneConfig(selfgen_share=bad)) == 0  # nothing drawn on a value check() refuses
    with pytest.raises(UsageError, match="selfgen_share must be 0"):
      PruneConfig(selfgen_share=bad).check(spec)


def test_texts_of_the_share_fit_the_model_positions(model_dir):
  spec = jaxprune.load(model_dir).spec
  assert spec.max_positions == 64
  # 4 windows of 16 after BOS would be 65 positions: three fit.
  assert per_text_that_fits(spec, SEQ, 4, (0,)) == 3 and per_text_that_fits(spec, SEQ, 4) == 4
  assert per_text_that_fits(spec, 60, 4, (0,)) == 1 and per_text_that_fits(spec, 8, 2) == 2


def test_the_command_calibrates_on_the_text_and_its_share(capsys, model_dir, texts, tmp_path):
  text = texts["calib"]
  """`jaxprune prune --calib FILE` with the recipe: the text's windows, then the share of the
  model's own text, which is what `with_own_text` gives; the report names both; share 0: the text."""
  out = tmp_path / "mixed"
  code, _, err = run(capsys, "prune", model_dir, "--sparsity", "0.3", "--calib", text, "--calib-samples", "16",
                     "--seq-len", SEQ, "--batch-size", "8", "--out", out)
  assert code == 0, err
  cal = json.loads((out / "report.json").read_text())["calibration"]
  assert cal["sources"] == [text, "selfgen"] and cal["source_windows"] == [16, 8] and cal["windows"] == 24
  assert cal["source"] == f"{text} + selfgen"
  # `jaxprune report` rebuilds the run's first windows from the text, as the run drew them.
  code, _, err = run(capsys, "report", out, "--js-windows", "4")
  assert code == 0, err
  assert (out / "head_similarity.png").exists()

  model, tok = jaxprune.load(model_dir), jaxprune.load_tokenizer(model_dir)
  config = PruneConfig(batch_size=8)
  draws = window_counts(16, config, [text])
  assert draws == [(text, 16), ("selfgen", 8)]
  got = calibration(argparse.Namespace(seq_len=SEQ, show_progress=False), model, tok, config, draws)
  prefix = bos_prefix(tok)
  windows, _ = sample_windows(tokenize(tok, open(text).read()), SEQ, 16, seed=0, prefix=prefix)
  want = with_own_text(model.spec, model.params, windows, config, prefix=prefix)
  np.testing.assert_array_equal(got, want)
  own = self_generated(model.spec, model.params, 8, SEQ, seed=0, windows_per_text=per_text_that_fits(
      model.spec, SEQ, config.selfgen_windows_per_text, prefix), top_k=0, prefix=prefix)
  np.testing.assert_array_equal(want, np.concatenate([windows, own]))
  check_batches(len(got), config.batch_size, make_mesh())

  out0 = tmp_path / "text"
  code, _, err = run(capsys, "prune", model_dir, "--sparsity", "0.3", "--calib", text, "--calib-samples", "16",
                     "--seq-len", SEQ, "--batch-size", "8", "--selfgen-share", "0", "--out", out0)
  assert code == 0, err
  cal0 = json.loads((out0 / "report.json").read_text())["calibration"]
  assert cal0["windows"] == 16 and cal0["source"] == text and "sources" not in cal0
  # Presets that calibrate on the text alone draw no share; named sources are drawn as named.
  assert window_counts(16, PruneConfig.preset("paper"), [text]) == [(text, 16)]
  assert window_counts(16, config, [text, "selfgen"]) == [(text, 16), ("selfgen", config.selfgen_samples)]
  assert window_counts(16, config, "random") == [("random", 16)]


def test_a_model_too_large_to_generate_from_is_refused_before_any_work(capsys, model_dir, texts, tmp_path,
                                                                        monkeypatch):
  text = texts["calib"]
  from jaxprune.footprint import generation_model_bytes

  model = jaxprune.load(model_dir)
  need = generation_model_bytes(model.spec)
  assert need == model.num_params * 4  # a float32 checkpoint: every parameter at four bytes
  with pytest.raises(UsageError, match="--selfgen-share 0"):
    budget.check_generation_size(need, "pass --selfgen-share 0 to calibrate on the text alone",
                                 available=need - 1)
  budget.check_generation_size(need, "unused", available=need)
  # On an accelerator the model is sampled from its first device: that device's memory decides,
  # whatever the host has.
  with pytest.raises(UsageError, match="of the device that samples it; pass --selfgen-share 0"):
    budget.check_generation_size(need, "pass --selfgen-share 0", available=10 * need, device=need - 1)
  budget.check_generation_size(need, "unused", available=1, device=need)
  assert budget.device_bytes() is None  # a CPU's memory is the host's
  # The command: enough memory for the calibration streams, not for the whole model at once.
  streams = budget.calibration_bytes(24, SEQ, model.spec.hidden_size)
  assert streams < need - 1
  monkeypatch.setattr(budget, "available_bytes", lambda: need - 1)
  out = tmp_path / "refused"
  code, _, err = run(capsys, "prune", model_dir, "--sparsity", "0.3", "--calib", text, "--calib-samples", "16",
                     "--seq-len", SEQ, "--batch-size", "8", "--out", out)
  assert code == 2 and not out.exists()
  assert "Traceback" not in err and len(err.strip().splitlines()) == 1
  assert "holds the whole model in memory" in err and "--selfgen-share 0" in err
