"""Side-by-side quality of every pruning method on SmolLM2-135M, in one pipeline.

Every run goes through `jaxprune.prune.prune` with the same calibration
windows (128 x 128 tokens drawn from WikiText-2 valid with the row's seed), the
same allocation code and the same evaluation: perplexity over the first 256
non-overlapping 128-token windows of WikiText-2 test (the protocol of the
reference figures below) and of Shakespeare (`tinyshakespeare/input.txt`, a
second domain that no choice is ever tuned on: a recipe must hold there too).
Only the preset, the settings in `RUNS` and the seed change.

The results go to a JSON file (every run: method, preset, settings, seed,
parameters after, both perplexities, prune seconds, the pipeline report's
params section, and the git commit with whether the tree was dirty) and a
markdown table next to it, where rows run with several seeds show mean +/- std.
The script resumes: runs already in the JSON (keyed by name, ratio and seed) are
skipped unless --force, and the JSON is rewritten atomically after each run,
because the full table takes hours on a small CPU. It refuses to put rows of
different commits in one table unless --allow-mixed.

    python benchmarks/quality.py [--ratios 0.2 0.5] [--seeds 0,1,2] [--eval-windows 256] [--calib-samples 128]
                                 [--only NAME ...] [--force] [--allow-mixed] [--out benchmarks/results/quality.json]
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
SHAKESPEARE = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare", "input.txt")
MODEL = "smollm2-135m"  # the model of rows without a "model" field, and the default of --model
MODELS = ("smollm2-135m", "gemma3-270m")  # the built-in models a row can run on
SEQ_LEN = 128

# Structures of the published reference runs on SmolLM2 (parameters after):
# at "20%" FLAP uniform and LLM-Pruner keep every attention head and 1229 of
# 1536 MLP channels per block (118.6M): sparsity 0.15 of the block parameters
# with attn_sparsity 0. At "50%" they keep 5 of 9 query heads (all KV heads)
# and 768 channels (85.9M); under the GQA rule (whole groups of equal size) we
# keep 6 heads (attn_sparsity 0.25) and let the MLP take the rest of the same
# parameter budget (sparsity 0.4583, about 725 channels).
AT_REF = dict(sparsity={0.2: 0.15, 0.5: 0.4583}, attn_sparsity={0.2: 0.0, 0.5: 0.25})

# jaxprune's recipe as docs/results.md measured it (chosen on held-out
# WikiText-2 *valid* windows, never on test), spelled out over the
# `paper` preset so that these rows stay what they were when the recommended
# preset changes: the exact greedy output-approximation order, the paper's
# two-step reconstruction, refit of the kept channels with an intercept, small
# damping; at 20% only MLP channels go (attention heads of SmolLM2 come in
# 3-head KV groups, the smallest step is a third of a module), at 50% the
# reference structure's 6 of 9 heads are kept.
RECIPE = dict(method="goa-obs", attn_sparsity={0.2: 0.0, 0.5: 0.25}, reconstruct=True, refit=True, intercept=True,
              damping=1e-5)

# How the data-free preset draws its text, for baselines calibrated on that same text (spelled
# out, so that these rows stay what they were when the defaults change).
SELFGEN_TEXT = dict(selfgen_top_k=0, selfgen_windows_per_text=4, selfgen_samples=1024)

# The runs: (name, preset, PruneConfig keyword arguments over the preset,
# calibration source). Presets are jaxprune.prune.presets': "paper" holds
# PruneConfig's defaults from before the presets, so rows over it are the rows
# they always were; "baseline" runs a published tool as that tool does.
# Calibration: "valid" (WikiText-2 valid windows), "random" (uniform random
# token ids), "selfgen" (text the model generates itself) or "valid+selfgen"
# (both in one set, the text's windows first). `sparsity` is the
# --ratios entry unless given; a keyword given as {ratio: value} takes the
# value for that ratio, and the row is skipped at ratios it does not list.
# "@ref" rows have the parameter counts of the published reference runs.
RUNS = [
    ("dense", None, None, "valid"),
    # What `jaxprune prune --calib valid.txt` does without recipe options: the text's windows
    # joined by the preset's self-generated share of them (selfgen_share).
    ("default preset", "recommended", {}, "valid"),
    ("default preset, uniform shape", "recommended-uniform", {}, "valid"),
    # Its share with all of the stream's error taken back: held-out best at 50% (selection_mixture.md).
    ("default preset, absorb 1", "recommended", dict(absorb=1.0), "valid"),
    # The default preset as it stood at 1b8115c, calibrated on the text alone.
    ("default preset before the self-generated share", "recommended", dict(selfgen_share=0.0), "valid"),
    # The default preset as it stood at 501cdeb / 3c17690, before `absorb`.
    ("default preset before absorb", "recommended", dict(absorb=0.0, selfgen_share=0.0), "valid"),
    ("default preset, data-free", "recommended-datafree", {}, "selfgen"),
    # Issue 32's candidate, before it became the default: the calibration text and 64 windows the
    # model generates itself, drawn as the data-free preset draws its text, in one set
    # (benchmarks/results/selection_mixture.md); the same windows as the default's share.
    ("default preset, valid + 64 self-generated", "recommended", dict(SELFGEN_TEXT, selfgen_samples=64),
     "valid+selfgen"),
    # The data-free preset as it stood at 4e8431a (1024 windows, shrinkage 0.5, before `absorb`).
    ("data-free preset before, no absorb", "recommended-datafree", dict(absorb=0.0), "selfgen"),
    # The data-free preset as it stood at b9e31b0 (512 windows, shrinkage 0.25).
    ("data-free preset before, 512 windows, shrink 0.25", "recommended-datafree",
     dict(selfgen_samples=512, shrink=0.25, absorb=0.0), "selfgen"),
    # Baselines, run as their tools run them.
    ("flap-uniform", "baseline", dict(method="flap"), "valid"),
    ("flap-uniform@ref", "baseline", dict(method="flap", **AT_REF), "valid"),
    ("flap-adaptive", "baseline", dict(method="flap", allocation="adaptive"), "valid"),
    # FLAP on the data-free preset's self-generated windows (the same text, drawn the same way).
    ("flap-uniform, data-free", "baseline", dict(method="flap", **SELFGEN_TEXT), "selfgen"),
    ("flap-adaptive, data-free", "baseline", dict(method="flap", allocation="adaptive", **SELFGEN_TEXT), "selfgen"),
    ("wanda-sp", "baseline", dict(method="wanda-sp"), "valid"),
    ("wanda-sp@ref", "baseline", dict(method="wanda-sp", **AT_REF), "valid"),
    ("taylor-element1", "baseline", dict(method="taylor-element1"), "valid"),
    ("taylor-element1@ref", "baseline", dict(method="taylor-element1", **AT_REF), "valid"),
    ("taylor-element2", "baseline", dict(method="taylor-element2"), "valid"),
    ("taylor-vector", "baseline", dict(method="taylor-vector"), "valid"),
    ("random", "baseline", dict(method="random"), "valid"),
    ("random@ref", "baseline", dict(method="random", **AT_REF), "valid"),
    ("l1", "baseline", dict(method="l1"), "valid"),
    ("l2", "baseline", dict(method="l2"), "valid"),
    ("l2@ref", "baseline", dict(method="l2", **AT_REF), "valid"),
    # The paper's method, calibrated: jaxprune's recipe, and the same pipeline
    # settings with random channels (what the criterion is worth).
    ("goa-obs recipe", "paper", RECIPE, "valid"),
    ("goa-obs recipe@ref", "paper", dict(RECIPE, **AT_REF), "valid"),
    ("goa-obs recipe w/o reconstruct", "paper", dict(RECIPE, reconstruct=False), "valid"),
    ("random recipe", "paper", dict(RECIPE, method="random"), "valid"),
    ("goa", "paper", dict(reconstruct=False), "valid"),
    ("goa+similarity", "paper", dict(heads="similarity", reconstruct=False), "valid"),
    ("goa+reconstruct", "paper", {}, "valid"),  # the `paper` preset as it stands
    ("goa+refit", "paper", dict(reconstruct=False, refit=True, intercept=True), "valid"),
    ("goa@ref", "paper", dict(reconstruct=False, **AT_REF), "valid"),
    ("goa-energy@ref", "paper", dict(method="goa-energy", reconstruct=False, **AT_REF), "valid"),
    # The paper's method, data-free.
    ("goa data-free (S = I)", "paper", dict(score_data="identity", reconstruct=False), "random"),
    ("goa data-free (random-token S)", "paper", dict(reconstruct=False), "random"),
    ("goa data-free (self-generated)", "paper-datafree", {}, "selfgen"),  # the `paper-datafree` preset
    # The same with each layer's rounding carried to the next, as PruneConfig rounded
    # before uniform allocation gave every layer one shape: the row that stood at 914.80.
    ("goa data-free (self-generated), carried rounding", "paper-datafree", dict(rounding="carry"), "selfgen"),
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


def key(name: str, ratio: float | None, seed: int | None = None, model: str = MODEL) -> str:
  """Row key: the dense row has neither ratio nor seed (it uses no calibration); rows of
  another model than SmolLM2 are prefixed by its name (SmolLM2's keys are the old ones)."""
  base = name if ratio is None else f"{name}|{ratio:g}|seed{seed}"
  return base if model == MODEL else f"{model}/{base}"


def parse_seeds(text: str) -> list[int]:
  try:
    seeds = [int(t) for t in text.split(",") if t.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers such as 0,1,2, got {text!r}") from None
  if not seeds or len(set(seeds)) != len(seeds):
    raise argparse.ArgumentTypeError(f"--seeds needs distinct integers such as 0,1,2, got {text!r}")
  return seeds


def git_state(root: str = ROOT, exclude=()) -> dict:
  """{"commit": HEAD's sha (None outside a git checkout), "dirty": whether tracked or
  untracked files differ from it, the `exclude` paths (this script's outputs) aside,
  "dirty_files": which (the first 20)}.

  Read-only: `--no-optional-locks` keeps `git status` from refreshing the index.
  """
  import subprocess

  def git(*argv):  # not stripped: a porcelain line starts with its status columns, blank or not
    return subprocess.run(["git", "-C", root, "--no-optional-locks", *argv], capture_output=True, text=True,
                          check=True).stdout.rstrip("\n")

  try:
    commit = git("rev-parse", "HEAD")
  except (OSError, subprocess.CalledProcessError):
    return {"commit": None, "dirty": None}
  specs = ["."]
  for path in exclude:
    rel = os.path.relpath(os.path.abspath(path), root)
    if not rel.startswith(".."):
      specs.append(f":(exclude){rel}")
  try:
    changed = [line[3:] for line in git("status", "--porcelain", "--", *specs).splitlines()]
  except subprocess.CalledProcessError:
    return {"commit": commit, "dirty": None}
  return {"commit": commit, "dirty": bool(changed), "dirty_files": changed[:20]}


def mixed_commits(rows: list[dict], commit: str | None) -> list[str]:
  """The commits other than `commit` that `rows` come from (None: rows without one)."""
  return sorted({str(r.get("commit")) for r in rows if r.get("commit") != commit})


class Data:
  """Model, tokenizer, evaluation windows and calibration sets, each built once, on first use."""

  def __init__(self, args):
    self.args = args
    self.name = getattr(args, "model", MODEL)
    self._model = self._tok = None
    self._texts = {}
    self._calib = {}

  @property
  def model(self):
    import jaxprune
    if self._model is None:
      self._model = jaxprune.load(self.name)
    return self._model

  @property
  def tokenizer(self):
    import jaxprune
    if self._tok is None:
      self._tok = jaxprune.load_tokenizer(self.name)
    return self._tok

  @property
  def prefix(self) -> tuple[int, ...]:
    """What every window is fed after: BOS where the tokenizer adds it (jaxprune.data.bos_prefix)."""
    from jaxprune.data import bos_prefix
    return bos_prefix(self.tokenizer)

  def texts(self) -> dict:
    """{"wikitext2": windows, "shakespeare": windows}: the first --eval-windows windows of each text."""
    from jaxprune.data import eval_windows, read_text, tokenize
    if not self._texts:
      for name, path in (("wikitext2", os.path.join(self.args.data, "test.txt")),
                         ("shakespeare", self.args.shakespeare)):
        self._texts[name] = eval_windows(tokenize(self.tokenizer, read_text(path)), SEQ_LEN, self.args.eval_windows,
                                         source=path, prefix=self.prefix)
    return self._texts

  def calib(self, source: str, seed: int, windows_per_text: int = 1, top_k: int = 50, temperature: float = 1.0,
            samples: int = 128):
    """The calibration windows (and the seconds they took); self-generated ones are sampled
    as the run's config says (how many, windows cut from each text, top-k, temperature)."""
    import numpy as np

    from jaxprune.data import read_text, sample_windows, tokenize
    from jaxprune.data.selfgen import random_tokens, self_generated
    if source == "valid+selfgen":  # one set: the text's windows, then the self-generated ones
      (v, tv), (g, tg) = self.calib("valid", seed), self.calib("selfgen", seed, windows_per_text, top_k, temperature,
                                                                 samples)
      return np.concatenate([v, g]), tv + tg
    n = samples if source == "selfgen" else self.args.calib_samples
    k = (source, seed) + ((n, windows_per_text, top_k, temperature) if source == "selfgen" else ())
    if k not in self._calib:
      t0 = time.perf_counter()
      if source == "valid":
        path = os.path.join(self.args.data, "valid.txt")
        w, _ = sample_windows(tokenize(self.tokenizer, read_text(path)), SEQ_LEN, n, seed=seed, source=path,
                              prefix=self.prefix)
      elif source == "random":
        w = random_tokens(self.model.spec.vocab_size, n, SEQ_LEN, seed=seed, prefix=self.prefix)
      elif source == "selfgen":
        w = self_generated(self.model.spec, self.model.params, n, SEQ_LEN, seed=seed,
                           windows_per_text=windows_per_text, top_k=top_k, temperature=temperature,
                           prefix=self.prefix)
      else:
        raise ValueError(f"unknown calibration source {source!r}; use valid, random, selfgen or valid+selfgen")
      self._calib[k] = (w, time.perf_counter() - t0)
    return self._calib[k]


def run_one(data: Data, name: str, preset: str | None, kwargs: dict, source: str, ratio: float | None,
            seed: int) -> dict:
  import numpy as np

  from jaxprune.data.selfgen import own_text_count
  from jaxprune.eval import perplexity
  from jaxprune.prune import PruneConfig, prune

  model = data.model
  row = {"key": key(name, ratio, seed, data.name), "model": data.name, "name": name, "ratio": ratio,
         "calibration": source,
         "load_avg_start": os.getloadavg()[0]}
  if ratio is None:  # dense
    spec, params, n_params, prune_s, rep = model.spec, model.params, model.num_params, 0.0, None
    row.update(method="dense", settings={}, preset=None, seed=None)
  else:
    # The seed draws the calibration windows and seeds the run's random choices.
    config = PruneConfig.preset(preset, **kwargs, seed=seed)
    calib, calib_s = data.calib(source, seed, config.selfgen_windows_per_text, config.selfgen_top_k,
                                config.selfgen_temperature, config.selfgen_samples)
    own = own_text_count(len(calib), config) if source == "valid" else 0
    if own:  # the text's windows joined by the model's own, as `jaxprune prune --calib FILE` draws them
      (g, tg) = data.calib("selfgen", seed, config.selfgen_windows_per_text, config.selfgen_top_k,
                           config.selfgen_temperature, own)
      calib, calib_s = np.concatenate([calib, g]), calib_s + tg
      row["selfgen_windows"] = own
    result = prune(model, calib, config)
    spec, params, n_params = result.model.spec, result.model.params, result.model.num_params
    rep = result.report
    prune_s = rep["seconds"]["total"]
    row.update(method=config.method, preset=preset, seed=seed, settings={**kwargs, "calib": source},
               calibration_seconds=calib_s, config=rep["config"], report_params=rep["params"],
               plan_seconds=rep["seconds"]["plan"], damping_retries=rep["damping_retries"],
               heads_kept=[l["num_heads"] for l in rep["layers"]], channels_kept=[l["ffn_dim"] for l in rep["layers"]])
  evals = {name: perplexity(spec, params, w) for name, w in data.texts().items()}
  ppl, shk = evals["wikitext2"], evals["shakespeare"]
  row.update(params_after=n_params, perplexity=ppl.perplexity, mean_nll=ppl.mean_nll, eval_windows=ppl.windows,
             shakespeare_perplexity=shk.perplexity, shakespeare_mean_nll=shk.mean_nll,
             shakespeare_windows=shk.windows, eval_seconds=ppl.seconds + shk.seconds, prune_seconds=prune_s,
             load_avg_end=os.getloadavg()[0])
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
  if row.get("preset"):
    parts.insert(0, f"preset {row['preset']}")
  parts.append(f"calib={calib}" + (f" + {row['selfgen_windows']} self-generated (its share)"
                                   if row.get("selfgen_windows") else ""))
  return ", ".join(parts)


def _stat(values: list[float]) -> str:
  """`x` for one seed, `mean +/- std (n)` (sample std) for several."""
  import statistics
  if len(values) == 1:
    return f"{values[0]:.2f}"
  return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (n={len(values)})"


def _commit(row: dict) -> str:
  c = row.get("commit")
  return ("?" if c is None else c[:8]) + ("+dirty" if row.get("dirty") else "")


TITLES = {"smollm2-135m": "SmolLM2-135M (30 blocks)", "gemma3-270m": "Gemma-3-270M (18 blocks; windows fed after BOS)"}


def markdown(result: dict) -> str:
  runs = result["runs"]
  commits = sorted({_commit(r) for r in runs})
  models = [m for m in MODELS if any(r.get("model", MODEL) == m for r in runs)]
  lines = [
      "# Pruning quality on " + " and ".join(TITLES[m].split(" (")[0] for m in models),
      "",
      f"Produced by `python benchmarks/quality.py` at commit {', '.join(commits) or '?'}. "
      f"Calibration: {result['protocol']['calibration']}. "
      f"Evaluation: {result['protocol']['evaluation']}. Ratios are fractions of the attention + MLP parameters "
      "of all blocks; `@ref` rows match the parameter counts of the published reference runs. Rows run with "
      "several calibration seeds show mean ± sample std. Prune seconds are wall time on a shared CPU (see the JSON "
      "for load averages).",
      "",
  ]
  mixed = len(commits) > 1
  for model in models:
    lines += _model_tables([r for r in runs if r.get("model", MODEL) == model], TITLES[model], mixed)
  lines += ["## Reference figures (published tools on SmolLM2, same windows and protocol)", "",
            "| tool | ratio | parameters after | perplexity |", "|---|---:|---:|---:|"]
  for tool, ratio, ppl, n in REFERENCES:
    lines.append(f"| {tool} | {100 * ratio:g}% | {'' if n is None else f'{n / 1e6:.2f}M'} | {ppl:g} |")
  lines.append("")
  return "\n".join(lines)


def _model_tables(runs: list[dict], title: str, mixed: bool) -> list[str]:
  """One model's rows: a table per ratio, the dense row first, then the runs in RUNS' order."""
  lines = []
  ratios = sorted({r["ratio"] for r in runs if r["ratio"] is not None})
  dense = next((r for r in runs if r["ratio"] is None), None)
  head = "| method | settings | parameters after | WikiText-2 test | Shakespeare | prune s |"
  rule = "|---|---|---:|---:|---:|---:|"
  if mixed:
    head, rule = head + " commit |", rule + "---|"
  for ratio in ratios:
    lines += [f"## {title}: {100 * ratio:g}% of block parameters", "", head, rule]
    if dense is not None:
      lines.append(f"| dense | | {dense['params_after'] / 1e6:.2f}M | {dense['perplexity']:.2f} | "
                   f"{_fmt_opt(dense.get('shakespeare_perplexity'))} | |" + (f" {_commit(dense)} |" if mixed else ""))
    order = {name: i for i, (name, _, _, _) in enumerate(RUNS)}
    groups: dict[str, list[dict]] = {}
    for r in runs:
      if r["ratio"] == ratio:
        groups.setdefault(r["name"], []).append(r)
    for name in sorted(groups, key=lambda n: order.get(n, len(order))):
      rs = sorted(groups[name], key=lambda r: r.get("seed") or 0)
      shk = [r["shakespeare_perplexity"] for r in rs if r.get("shakespeare_perplexity") is not None]
      params = sum(r["params_after"] for r in rs) / len(rs)
      line = (f"| {name} | {_fmt_settings(rs[0])} | {params / 1e6:.2f}M | {_stat([r['perplexity'] for r in rs])} | "
              f"{_stat(shk) if shk else ''} | {sum(r['prune_seconds'] for r in rs) / len(rs):.0f} |")
      if mixed:
        line += f" {', '.join(sorted({_commit(r) for r in rs}))} |"
      lines.append(line)
    lines.append("")
  return lines


def _fmt_opt(x) -> str:
  return "" if x is None else f"{x:.2f}"


def write_text(path: str, text: str) -> None:
  parent, name = os.path.split(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=parent)
  with os.fdopen(fd, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", choices=MODELS, default=MODEL,
                 help=f"the built-in model to prune (default {MODEL}); other models' rows are keyed '<model>/<row>'")
  p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
  p.add_argument("--seeds", type=parse_seeds, default=[0],
                 help="calibration seeds, e.g. 0,1,2 (each row runs once per seed; the table shows mean ± std)")
  p.add_argument("--eval-windows", type=int, default=256, help="windows of each evaluation text (default 256)")
  p.add_argument("--calib-samples", type=int, default=128)
  p.add_argument("--only", nargs="+", default=None, help="run only these row names (see RUNS)")
  p.add_argument("--force", action="store_true", help="rerun rows already in the JSON")
  p.add_argument("--allow-mixed", action="store_true",
                 help="let the table hold rows from different git commits (refused otherwise)")
  p.add_argument("--data", default=DATA, help="directory with WikiText-2 valid.txt and test.txt")
  p.add_argument("--shakespeare", default=SHAKESPEARE, help="second-domain evaluation text (never calibrated on)")
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
  for name, preset, kwargs, source in RUNS:
    if args.only and name not in args.only:
      continue
    if kwargs is None:
      plan.append((name, preset, {}, source, None, None))
      continue
    for ratio in args.ratios:
      kw = resolve(kwargs, ratio)
      if kw is not None:
        plan += [(name, preset, kw, source, ratio, seed) for seed in args.seeds]
  if args.list:
    for name, preset, kw, source, ratio, seed in plan:
      print(f"{key(name, ratio, seed, args.model):50s} calib={source:8s} preset={preset} {kw}")
    return 0

  md_out = os.path.splitext(args.out)[0] + ".md"
  state = git_state(exclude=(args.out, md_out))
  result = {"runs": []}
  if os.path.exists(args.out):
    with open(args.out) as f:
      result = json.load(f)
  done = {r["key"]: i for i, r in enumerate(result["runs"])}
  # Rows that stay as they are must come from this commit, or the table would
  # compare code that differs in ways nobody can see.
  rerun = {key(name, ratio, seed, args.model) for name, _, _, _, ratio, seed in plan} if args.force else set()
  kept = [r for r in result["runs"] if r["key"] not in rerun]
  others = mixed_commits(kept, state["commit"])
  if others and not args.allow_mixed:
    p.error(f"{args.out} holds rows from commit(s) {', '.join(others)}, but HEAD is {state['commit']}; rerun them "
            f"(--force, with --only for a subset), write to another --out, or pass --allow-mixed to mix commits")
  import jax

  result.pop("model", None)  # before rows named their model, the file held one
  result["models"] = sorted({r.get("model", MODEL) for r in result["runs"]} | {args.model})
  result["protocol"] = {
      "calibration": f"{args.calib_samples} x {SEQ_LEN} tokens, WikiText-2 valid, sample_windows with the row's "
                     "seed (data-free rows: random tokens, or as many windows of self-generated text as the preset's "
                     "selfgen_samples, with that seed)",
      "evaluation": f"first {args.eval_windows} non-overlapping {SEQ_LEN}-token windows of WikiText-2 test and of "
                    "tinyshakespeare/input.txt",
  }
  result["environment"] = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__,
                           "backend": jax.default_backend()}
  data = Data(args)
  for name, preset, kw, source, ratio, seed in plan:
    k = key(name, ratio, seed, args.model)
    if k in done and not args.force:
      print(f"skip {k} (in {args.out}; --force reruns it)")
      continue
    print(f"run  {k} ...", flush=True)
    row = run_one(data, name, preset, kw, source, ratio, seed)
    row.update(state)
    print(f"     {k}: {row['params_after'] / 1e6:.2f}M params, perplexity {row['perplexity']:.2f} (WikiText-2), "
          f"{row['shakespeare_perplexity']:.2f} (Shakespeare), prune {row['prune_seconds']:.0f}s", flush=True)
    if k in done:
      result["runs"][done[k]] = row
    else:
      done[k] = len(result["runs"])
      result["runs"].append(row)
    write_json(args.out, result, force=True)
    write_text(md_out, markdown(result))
  if os.path.exists(args.out):
    write_text(md_out, markdown(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
