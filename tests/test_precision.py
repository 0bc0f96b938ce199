"""`PruneConfig.matmul_precision` (issue 31): the stated precision reaches every kernel the run
compiles, is reported, and on CPU changes no bit of a result."""

import dataclasses
import hashlib
import json
import os

import jax
import numpy as np
import pytest

import jaxprune
from jaxprune import sharding
from jaxprune.errors import UsageError
from jaxprune.models import layers as L
from jaxprune.prune import PruneConfig, prune, streams
from jaxprune.prune import checkpoint as run_checkpoint
from jaxprune.prune.config import MatmulPrecision
from jaxprune.stats import passes
from tests import tiny
from tests.badinput import assert_one_line_error, run_cli

CALIB = np.random.default_rng(0).integers(1, tiny.VOCAB, size=(16, 16), dtype=np.int32)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  return jaxprune.load(tiny.save("llama_gqa", str(tmp_path_factory.mktemp("precision") / "model"), layers=3))


def _bits(result) -> list[bytes]:
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(result.model.params)]


def _kept(result) -> list:
  return [(r["layer"], r["module"], r["kept"]) for r in result.report["modules"]]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="only CPUs compute float32 dots in float32 at every "
                    "precision; elsewhere the settings differ by design")
def test_on_cpu_every_precision_gives_the_same_bits(model):
  # The default moved from the backend's default to `highest`; on CPU that must move no result.
  runs = {p: prune(model, CALIB, PruneConfig(sparsity=0.4, batch_size=8, matmul_precision=p))
          for p in MatmulPrecision}
  want = runs[MatmulPrecision.HIGHEST]
  for p, r in runs.items():
    assert _kept(r) == _kept(want), p
    assert _bits(r) == _bits(want), p


def test_the_run_traces_under_the_stated_precision_and_reports_it(model):
  seen = set()
  progress = lambda event: seen.add(jax.config.jax_default_matmul_precision)
  before = jax.config.jax_default_matmul_precision
  r = prune(model, CALIB, PruneConfig(sparsity=0.4, batch_size=8, matmul_precision="high"), progress=progress)
  assert seen == {"high"}
  assert jax.config.jax_default_matmul_precision == before  # evaluation after the run keeps its own
  assert json.loads(json.dumps(r.report))["config"]["matmul_precision"] == "high"
  assert PruneConfig().matmul_precision is MatmulPrecision.HIGHEST


def _dot_precisions(model, precision: str) -> list[str]:
  """The precision of every dot in the lowered block pass (the forward that makes X2 and the targets)."""
  mesh = sharding.make_mesh()
  x = streams.embed_stream(model.spec, model.params, streams.chunks(CALIB, 8, mesh, "calibration"), mesh)
  with jax.default_matmul_precision(precision):
    text = passes.block_pass.lower(L.block_config(model.spec, 0), model.params["layers"][0], x,
                                   streams.positions(CALIB.shape[1])).as_text()
  return [line.split("precision = ")[1].split("]")[0] + "]" if "precision = " in line else "none"
          for line in text.splitlines() if "dot_general" in line]


def test_the_precision_is_part_of_the_compiled_kernel(model):
  highest, default = _dot_precisions(model, "highest"), _dot_precisions(model, "default")
  assert highest and set(highest) == {"[HIGHEST, HIGHEST]"}
  assert len(default) == len(highest) and not any("HIGHEST" in p for p in default)


def test_a_kernel_compiled_under_one_precision_is_not_reused_under_another():
  traces = []

  @jax.jit
  def f(a):
    traces.append(jax.config.jax_default_matmul_precision)
    return a @ a

  a = np.ones((4, 4), np.float32)
  for p in ("default", "highest", "default", "highest"):
    with jax.default_matmul_precision(p):
      f(a)
  assert traces == ["default", "highest"]  # one trace per precision, then each from the cache


class _Stop(Exception):
  pass


def _stop_after_block_0(event):
  if event == {"event": "block", "layer": 0}:  # block 0 is durable: the checkpoint holds a state
    raise _Stop


def test_a_checkpoint_written_before_the_field_is_refused_in_one_line(model, tmp_path):
  config, d = PruneConfig(sparsity=0.4, batch_size=8), str(tmp_path / "ckpt")
  with pytest.raises(_Stop):
    prune(model, CALIB, config, checkpoint=d, progress=_stop_after_block_0)
  # The digest an older jaxprune wrote: the same config without the field.
  old = {k: v for k, v in dataclasses.asdict(config).items() if k != "matmul_precision"}
  path = os.path.join(d, run_checkpoint.STATE)
  with open(path) as f:
    state = json.load(f)
  state["fingerprint"]["config"] = hashlib.sha256(json.dumps(old, sort_keys=True, default=str).encode()).hexdigest()[:16]
  with open(path, "w") as f:
    json.dump(state, f)
  with pytest.raises(UsageError, match="different config") as e:
    prune(model, CALIB, config, checkpoint=d)
  assert "\n" not in str(e.value)


def test_an_unknown_precision_is_one_line_naming_the_choices(tmp_path):
  with pytest.raises(UsageError, match="matmul_precision='tf32' is not one of highest, high, default"):
    PruneConfig(matmul_precision="tf32")
  r = run_cli("prune", "smollm2-135m", "--out", str(tmp_path / "out"), "--matmul-precision", "tf32")
  assert_one_line_error(r, "tf32", "highest")
  assert not os.path.exists(tmp_path / "out")
