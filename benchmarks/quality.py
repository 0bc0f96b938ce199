"""Side-by-side quality of every pruning method on SmolLM2-135M, in one pipeline.

Every run goes through `jaxprune.pipeline.prune` with the same calibration
windows (128 x 128 tokens drawn with seed 0 from WikiText-2 valid), the same
allocation code and the same evaluation (perplexity over the first 256
non-overlapping 128-token windows of WikiText-2 test, the protocol of the
reference figures below). Only the criterion and the settings in `RUNS` change.

The results go to a JSON file (every run: method, settings, parameters after,
perplexity, prune seconds, the pipeline report's params section) and a markdown
table next to it. The script resumes: runs already in the JSON (keyed by name
and ratio) are skipped unless --force, and the JSON is rewritten atomically
after each run, because the full table takes hours on a small CPU.

    python benchmarks/quality.py [--ratios 0.2 0.5] [--eval-windows 256] [--calib-samples 128]
                                 [--only NAME ...] [--force] [--out benchmarks/results/quality.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
DATA = os.path.join(ROOT, "..", "shared", "data", "wikitext-2")
MODEL = "smollm2-135m"
SEQ_LEN = 128

# Structures of the published reference runs on SmolLM2 (parameters after):
# at "20%" FLAP uniform and LLM-Pruner keep every attention head and 1229 of
# 1536 MLP channels per block (118.6M): sparsity 0.15 of the block parameters
# with attn_sparsity 0. At "50%" they keep 5 of 9 query heads (all KV heads)
# and 768 channels (85.9M); under the GQA rule (whole groups of equal size) we
# keep 6 heads (attn_sparsity 0.25) and let the MLP take the rest of the same
# parameter budget (sparsity 0.4583, about 725 channels).
AT_REF = dict(sparsity={0.2: 0.15, 0.5: 0.4583}, attn_sparsity={0.2: 0.0, 0.5: 0.25})
# The published tools run without reconstruction.
TOOL = dict(reconstruct=False)
# jaxprune's recommended recipe (chosen on held-out WikiText-2 *valid* windows,
# never on test; see README): the exact greedy output-approximation order,
# the paper's two-step reconstruction, refit of the kept channels with an
# intercept, small damping; at 20% only MLP channels go (attention heads of
# SmolLM2 come in 3-head KV groups, the smallest step is a third of a module),
# at 50% the reference structure's 6 of 9 heads are kept.
RECIPE = dict(method="goa-obs", attn_sparsity={0.2: 0.0, 0.5: 0.25}, reconstruct=True, refit=True, intercept=True,
              damping=1e-5)

# The runs: (name, PruneConfig keyword arguments, calibration source).
# Calibration: "valid" (WikiText-2 valid windows), "random" (uniform random
# token ids) or "selfgen" (text the model generates itself). `sparsity` is the
# --ratios entry unless given; a keyword given as {ratio: value} takes the
# value for that ratio, and the row is skipped at ratios it does not list.
# "@ref" rows have the parameter counts of the published reference runs.
RUNS = [
    ("dense", None, "valid"),
    # Baselines, run as their tools run them.
    ("flap-uniform", dict(method="flap", compensate=True, **TOOL), "valid"),
    ("flap-uniform@ref", dict(method="flap", compensate=True, **TOOL, **AT_REF), "valid"),
    ("flap-adaptive", dict(method="flap", compensate=True, allocation="adaptive", **TOOL), "valid"),
    ("wanda-sp", dict(method="wanda-sp", **TOOL), "valid"),
    ("wanda-sp@ref", dict(method="wanda-sp", **TOOL, **AT_REF), "valid"),
    ("taylor-element1", dict(method="taylor-element1", **TOOL), "valid"),
    ("taylor-element1@ref", dict(method="taylor-element1", **TOOL, **AT_REF), "valid"),
    ("taylor-element2", dict(method="taylor-element2", **TOOL), "valid"),
    ("taylor-vector", dict(method="taylor-vector", **TOOL), "valid"),
    ("random", dict(method="random", **TOOL), "valid"),
    ("random@ref", dict(method="random", **TOOL, **AT_REF), "valid"),
    ("l1", dict(method="l1", **TOOL), "valid"),
    ("l2", dict(method="l2", **TOOL), "valid"),
    ("l2@ref", dict(method="l2", **TOOL, **AT_REF), "valid"),
    # The paper's method, calibrated: jaxprune's recipe, and the same pipeline
    # settings with random channels (what the criterion is worth).
    ("goa-obs recipe", RECIPE, "valid"),
    ("goa-obs recipe@ref", dict(RECIPE, **AT_REF), "valid"),
    ("goa-obs recipe w/o reconstruct", dict(RECIPE, reconstruct=False), "valid"),
    ("random recipe", dict(RECIPE, method="random"), "valid"),
    ("goa", dict(method="goa", reconstruct=False), "valid"),
    ("goa+similarity", dict(method="goa", heads="similarity", reconstruct=False), "valid"),
    ("goa+reconstruct", dict(method="goa", reconstruct=True), "valid"),
    ("goa+refit", dict(method="goa", reconstruct=False, refit=True, intercept=True), "valid"),
    ("goa@ref", dict(method="goa", reconstruct=False, **AT_REF), "valid"),
    ("goa-energy@ref", dict(method="goa-energy", reconstruct=False, **AT_REF), "valid"),
    # The paper's method, data-free.
    ("goa data-free (S = I)", dict(method="goa", score_data="identity", reconstruct=False), "random"),
    ("goa data-free (random-token S)", dict(method="goa", reconstruct=False), "random"),
    ("goa data-free (self-generated)", dict(method="goa", score_data="random", reconstruct=True), "selfgen"),
]

# Published tools on SmolLM2, same calibration windows and protocol (issue figures).
REFERENCES = [
    ("FLAP uniform (UL-UM)", 0.2, 67.12, 118.63e6),
    ("FLAP adaptive (AL-AM)", 0.2, 73.73, 113.33e6),
    ("FLAP wanda_sp", 0.2, 67.28, 118.63e6),
    ("LLM-Pruner Taylor element1, blocks 4-27", 0.2, 71.93, 118.59e6),
    ("LLM-Pruner Taylor element1, all blocks", 0.2, 79.10, 118.55e6),
    ("LLM-Pruner random", 0.2, 156.33, 118.59e6),
    ("LLM-Pruner L2", 0.2, 1106.9, None),
    ("FLAP mag_sp (L2)", 0.2, 480017, None),
    ("FLAP uniform (UL-UM)", 0.5, 192.80, 85.89e6),
    ("FLAP adaptive (AL-AM)", 0.5, 472.33, 81.40e6),
    ("LLM-Pruner Taylor element1, all blocks", 0.5, 644.85, 85.85e6),
]


def resolve(kwargs: dict | None, ratio: float) -> dict | None:
  """The PruneConfig keywords of a row at `ratio`, or None when the row skips that ratio."""
  if kwargs is None:
    return {}
  out = {"sparsity": ratio}
  for k, v in kwargs.items():
    if isinstance(v, dict):
      if ratio not in v:
        return None
      v = v[ratio]
    out[k] = v
  return out


def key(name: str, ratio: float | None) -> str:
  return name if ratio is None else f"{name}|{ratio:g}"


class Data:
  """Model, tokenizer, windows and calibration sets, each built once, on first use."""

  def __init__(self, args):
    self.args = args
    self._model = self._tok = self._test = None
    self._calib = {}

  @property
  def model(self):
    import jaxprune
    if self._model is None:
      self._model = jaxprune.load(MODEL)
    return self._model

  @property
  def tokenizer(self):
    import jaxprune
    if self._tok is None:
      self._tok = jaxprune.load_tokenizer(MODEL)
    return self._tok

  @property
  def test(self):
    from jaxprune.data import eval_windows, read_text, tokenize
    if self._test is None:
      path = os.path.join(self.args.data, "test.txt")
      self._test = eval_windows(tokenize(self.tokenizer, read_text(path)), SEQ_LEN, self.args.eval_windows,
                                source=path)
    return self._test

  def calib(self, source: str):
    from jaxprune.data import read_text, sample_windows, tokenize
    from jaxprune.data.selfgen import random_tokens, self_generated
    n = self.args.calib_samples
    if source not in self._calib:
      t0 = time.perf_counter()
      if source == "valid":
        path = os.path.join(self.args.data, "valid.txt")
        w, _ = sample_windows(tokenize(self.tokenizer, read_text(path)), SEQ_LEN, n, seed=0, source=path)
      elif source == "random":
        w = random_tokens(self.model.spec.vocab_size, n, SEQ_LEN, seed=0)
      elif source == "selfgen":
        w = self_generated(self.model.spec, self.model.params, n, SEQ_LEN, seed=0)
      else:
        raise ValueError(f"unknown calibration source {source!r}; use valid, random or selfgen")
      self._calib[source] = (w, time.perf_counter() - t0)
    return self._calib[source]


def run_one(data: Data, name: str, kwargs: dict, source: str, ratio: float | None) -> dict:
  from jaxprune.eval import perplexity
  from jaxprune.pipeline import PruneConfig, prune

  model = data.model
  row = {"key": key(name, ratio), "name": name, "ratio": ratio, "calibration": source,
         "load_avg_start": os.getloadavg()[0]}
  if ratio is None:  # dense
    spec, params, n_params, prune_s, rep = model.spec, model.params, model.num_params, 0.0, None
    row.update(method="dense", settings={})
  else:
    calib, calib_s = data.calib(source)
    config = PruneConfig(**kwargs)
    result = prune(model, calib, config)
    spec, params, n_params = result.model.spec, result.model.params, result.model.num_params
    rep = result.report
    prune_s = rep["seconds"]["total"]
    row.update(method=config.method, settings={**kwargs, "calib": source}, calibration_seconds=calib_s,
               config=rep["config"], report_params=rep["params"], plan_seconds=rep["seconds"]["plan"],
               damping_retries=rep["damping_retries"],
               heads_kept=[l["num_heads"] for l in rep["layers"]], channels_kept=[l["ffn_dim"] for l in rep["layers"]])
  ppl = perplexity(spec, params, data.test)
  row.update(params_after=n_params, perplexity=ppl.perplexity, mean_nll=ppl.mean_nll, eval_windows=ppl.windows,
             eval_seconds=ppl.seconds, prune_seconds=prune_s, load_avg_end=os.getloadavg()[0])
  return row


def _fmt_settings(row: dict) -> str:
  s = dict(row.get("settings", {}))
  if not s:
    return ""
  s.pop("method", None)
  calib = s.pop("calib", None)
  parts = [f"{k}={v}" for k, v in s.items() if k != "sparsity"]
  if "sparsity" in s and s["sparsity"] != row["ratio"]:
    parts.insert(0, f"sparsity={s['sparsity']}")
  parts.append(f"calib={calib}")
  return ", ".join(parts)


def markdown(result: dict) -> str:
  runs = result["runs"]
  lines = [
      "# Pruning quality on SmolLM2-135M",
      "",
      f"Produced by `python benchmarks/quality.py`. Calibration: {result['protocol']['calibration']}. "
      f"Evaluation: {result['protocol']['evaluation']}. Ratios are fractions of the attention + MLP parameters "
      "of all 30 blocks; `@ref` rows match the parameter counts of the published reference runs. "
      "Prune seconds are wall time on a shared CPU (see the JSON for load averages).",
      "",
  ]
  ratios = sorted({r["ratio"] for r in runs if r["ratio"] is not None})
  dense = next((r for r in runs if r["ratio"] is None), None)
  for ratio in ratios:
    lines += [f"## {100 * ratio:g}% of block parameters", "",
              "| method | settings | parameters after | perplexity | prune s |", "|---|---|---:|---:|---:|"]
    if dense is not None:
      lines.append(f"| dense | | {dense['params_after'] / 1e6:.2f}M | {dense['perplexity']:.2f} | |")
    order = {name: i for i, (name, _, _) in enumerate(RUNS)}
    for r in sorted((r for r in runs if r["ratio"] == ratio), key=lambda r: order.get(r["name"], len(order))):
      lines.append(f"| {r['name']} | {_fmt_settings(r)} | {r['params_after'] / 1e6:.2f}M | "
                   f"{r['perplexity']:.2f} | {r['prune_seconds']:.0f} |")
    lines.append("")
  lines += ["## Reference figures (published tools on SmolLM2, same windows and protocol)", "",
            "| tool | ratio | parameters after | perplexity |", "|---|---:|---:|---:|"]
  for tool, ratio, ppl, n in REFERENCES:
    lines.append(f"| {tool} | {100 * ratio:g}% | {'' if n is None else f'{n / 1e6:.2f}M'} | {ppl:g} |")
  lines.append("")
  return "\n".join(lines)


def write_text(path: str, text: str) -> None:
  parent, name = os.path.split(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=parent)
  with os.fdopen(fd, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
  p.add_argument("--eval-windows", type=int, default=256)
  p.add_argument("--calib-samples", type=int, default=128)
  p.add_argument("--only", nargs="+", default=None, help="run only these row names (see RUNS)")
  p.add_argument("--force", action="store_true", help="rerun rows already in the JSON")
  p.add_argument("--data", default=DATA, help="directory with WikiText-2 valid.txt and test.txt")
  p.add_argument("--out", default=os.path.join(HERE, "results", "quality.json"))
  p.add_argument("--list", action="store_true", help="print the runs and exit")
  args = p.parse_args(argv)

  from jaxprune.io.atomic import write_json

  names = [r[0] for r in RUNS]
  if args.only:
    unknown = [n for n in args.only if n not in names]
    if unknown:
      p.error(f"unknown run names {unknown}; known: {names}")
  plan = []
  for name, kwargs, source in RUNS:
    if args.only and name not in args.only:
      continue
    for ratio in ([None] if kwargs is None else args.ratios):
      kw = resolve(kwargs, ratio) if ratio is not None else {}
      if kw is not None:
        plan.append((name, kw, source, ratio))
  if args.list:
    for name, kw, source, ratio in plan:
      print(f"{key(name, ratio):45s} calib={source:8s} {kw}")
    return 0

  result = {"runs": []}
  if os.path.exists(args.out):
    with open(args.out) as f:
      result = json.load(f)
  import jax

  result["model"] = MODEL
  result["protocol"] = {
      "calibration": f"{args.calib_samples} x {SEQ_LEN} tokens, WikiText-2 valid, sample_windows seed 0 "
                     "(data-free rows: random tokens or self-generated text, seed 0)",
      "evaluation": f"first {args.eval_windows} non-overlapping {SEQ_LEN}-token windows of WikiText-2 test",
  }
  result["environment"] = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__,
                           "backend": jax.default_backend()}
  done = {r["key"]: i for i, r in enumerate(result["runs"])}
  data = Data(args)
  for name, kw, source, ratio in plan:
    k = key(name, ratio)
    if k in done and not args.force:
      print(f"skip {k} (in {args.out}; --force reruns it)")
      continue
    print(f"run  {k} ...", flush=True)
    row = run_one(data, name, kw, source, ratio)
    print(f"     {k}: {row['params_after'] / 1e6:.2f}M params, perplexity {row['perplexity']:.2f}, "
          f"prune {row['prune_seconds']:.0f}s", flush=True)
    if k in done:
      result["runs"][done[k]] = row
    else:
      done[k] = len(result["runs"])
      result["runs"].append(row)
    write_json(args.out, result, force=True)
    write_text(os.path.splitext(args.out)[0] + ".md", markdown(result))
  if os.path.exists(args.out):
    write_text(os.path.splitext(args.out)[0] + ".md", markdown(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
