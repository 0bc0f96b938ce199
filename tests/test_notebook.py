"""notebooks/quickstart.ipynb: valid nbformat 4 with cleared outputs, and its code runs.

The code cells are executed in order in one namespace (as a kernel would run them)
with JAXPRUNE_NOTEBOOK_QUICK=1, which shrinks the run to 8 calibration windows of 64
tokens, blocks 0:4 and 4 evaluation windows. The notebook's own asserts (the input
model is untouched, JAX and PyTorch logits agree, the export reloads) are the checks.
"""

import json
import os

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")
DATA = os.path.join(ROOT, "..", "shared", "data", "wikitext-2")


def _notebook() -> dict:
  with open(NOTEBOOK, encoding="utf-8") as f:
    return json.load(f)


def test_notebook_is_nbformat4_with_cleared_outputs():
  nb = _notebook()
  assert nb["nbformat"] == 4 and nb["nbformat_minor"] >= 5
  assert nb["metadata"]["kernelspec"]["language"] == "python"
  ids = [c["id"] for c in nb["cells"]]
  assert len(set(ids)) == len(ids)
  for c in nb["cells"]:
    assert c["cell_type"] in ("markdown", "code") and isinstance(c["source"], list)
    if c["cell_type"] == "code":
      assert c["outputs"] == [] and c["execution_count"] is None, f"cell {c['id']} has outputs; clear them"
  code = [c for c in nb["cells"] if c["cell_type"] == "code"]
  assert len(code) >= 8
  for c in code:  # every cell at least parses
    compile("".join(c["source"]), c["id"], "exec")


@pytest.mark.smollm2
@pytest.mark.xdist_group("smollm2")
def test_notebook_runs(monkeypatch):
  if not os.path.exists(os.path.join(DATA, "valid.txt")):
    pytest.skip(f"{DATA} is missing; the notebook reads WikiText-2 from ../shared/data")
  monkeypatch.setenv("JAXPRUNE_NOTEBOOK_QUICK", "1")
  monkeypatch.setenv("JAXPRUNE_ROOT", ROOT)
  monkeypatch.delenv("JAXPRUNE_DATA", raising=False)
  monkeypatch.chdir(ROOT)
  from jaxprune import criteria

  registered = dict(criteria.REGISTRY)
  ns = {"__name__": "__quickstart__"}
  try:
    for c in _notebook()["cells"]:
      if c["cell_type"] == "code":
        exec(compile("".join(c["source"]), f"quickstart.ipynb:{c['id']}", "exec"), ns)
  finally:
    criteria.REGISTRY.clear()  # the notebook's custom criterion stays out of other tests
    criteria.REGISTRY.update(registered)
  assert ns["QUICK"] and ns["calib"].shape == (8, 64) and ns["test"].shape == (4, 64)
  assert ns["report"]["config"]["layers"] == [0, 4] and len(ns["report"]["modules"]) == 8
  assert ns["pruned_ppl"].perplexity > ns["dense_ppl"].perplexity > 1
  assert ns["TRACES"] == ["attn", "mlp"]  # the custom criterion's kernel: one trace per module shape
  assert ns["diff"] < 1e-3
