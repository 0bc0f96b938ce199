"""The headline rows of `quality.json`, re-run: a fingerprint of what the engine computes.

Run it on two versions of jaxprune (before and after an engine change, the
older one through PYTHONPATH), then compare: every module's kept heads and
channels must be the same (compared by digest) and both perplexities agree to
1e-6 relative, so that a reshaped engine is shown to compute the same pruning.

    PYTHONPATH=/path/to/old/checkout python benchmarks/engine_parity.py --out /tmp/before.json
    python benchmarks/engine_parity.py --out /tmp/after.json
    python benchmarks/engine_parity.py --compare /tmp/before.json /tmp/after.json \
        --report benchmarks/results/engine_parity.json

The protocol is `quality.py`'s (SmolLM2-135M, seed 0, 128 x 128 calibration
tokens, the first 256 windows of 128 tokens of WikiText-2 test and of Tiny
Shakespeare), and so are the rows' settings. Self-generated calibration text
is made by `jaxprune.data.selfgen`, not by the engine, and 1024 windows of it
take half an hour on two cores, so it is cached under ~/.cache/jaxprune/parity,
keyed by that module's code (its syntax tree without docstrings, so a reworded
docstring does not regenerate) and the sampling settings: both versions prune on
the same windows. Runs resume: rows already in --out are skipped.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
_PATH = list(sys.path)
sys.path.insert(0, HERE)
import quality  # noqa: E402  (the rows and the protocol)

# quality.py puts this checkout first on sys.path; the version under test is whichever
# jaxprune PYTHONPATH (or the environment) names.
sys.path[:] = _PATH

# (quality.py row name, ratio): the rows the README and docs/results.md quote.
HEADLINE = [  # cheapest first: a run cut short still compares the most rows
    ("default preset", 0.2),
    ("flap-uniform", 0.2),
    ("flap-adaptive", 0.2),
    ("wanda-sp", 0.2),
    ("goa+reconstruct", 0.2),
    ("default preset, uniform shape", 0.2),
    ("default preset", 0.5),
    ("goa data-free (self-generated)", 0.2),
    ("default preset, data-free", 0.2),
]
SEED = 0
RTOL = 1e-6
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "jaxprune", "parity")


def _engine():
  """The engine of the jaxprune under test. Chosen by what its package holds, not by trying
  imports: in an environment with another checkout installed editable, setuptools' finder
  serves a module the tested checkout lacks (jaxprune.prune) from the installed one."""
  import jaxprune
  if os.path.isdir(os.path.join(os.path.dirname(jaxprune.__file__), "prune")):
    from jaxprune.prune import PruneConfig, prune
  else:  # versions before the jaxprune.prune package
    from jaxprune.pipeline import PruneConfig, prune
  return PruneConfig, prune


def check_one_checkout() -> None:
  """Every jaxprune module loaded comes from the checkout under test (no mixed versions)."""
  import jaxprune
  root = os.path.dirname(os.path.abspath(jaxprune.__file__))
  strays = sorted(n for n, m in list(sys.modules.items()) if (n == "jaxprune" or n.startswith("jaxprune."))
                  and getattr(m, "__file__", None) and not os.path.abspath(m.__file__).startswith(root + os.sep))
  if strays:
    raise SystemExit(f"engine_parity: modules {strays[:5]} come from another checkout than {root}; "
                     "run from a directory outside both checkouts with PYTHONPATH naming the one to test")


def digest(values) -> str:
  return hashlib.sha256(json.dumps([int(v) for v in values]).encode()).hexdigest()[:16]


def code_digest(path: str) -> str:
  """Digest of a module's syntax tree with its docstrings removed."""
  tree = ast.parse(open(path, encoding="utf-8").read())
  for node in ast.walk(tree):
    body = getattr(node, "body", None)
    if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
        and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
      node.body = body[1:] or [ast.Pass()]
  return hashlib.sha256(ast.dump(tree).encode()).hexdigest()[:12]


class CachedData(quality.Data):
  """quality.Data whose self-generated windows are kept on disk between versions."""

  def calib(self, source, seed, windows_per_text=1, top_k=50, temperature=1.0, samples=128):
    if source != "selfgen":
      return super().calib(source, seed, windows_per_text, top_k, temperature, samples)
    import jaxprune.data.selfgen as selfgen
    code = code_digest(selfgen.__file__)
    path = os.path.join(CACHE, f"selfgen-{code}-s{seed}-n{samples}-w{windows_per_text}-k{top_k}-t{temperature}.npy")
    if os.path.exists(path):
      return np.load(path), 0.0
    windows, seconds = super().calib(source, seed, windows_per_text, top_k, temperature, samples)
    os.makedirs(CACHE, exist_ok=True)
    np.save(path + ".tmp.npy", np.asarray(windows))
    os.replace(path + ".tmp.npy", path)
    return windows, seconds


def run_row(data, name: str, ratio: float) -> dict:
  from jaxprune.eval import perplexity
  PruneConfig, prune = _engine()
  check_one_checkout()
  _, preset, kwargs, source = next(r for r in quality.RUNS if r[0] == name)
  kwargs = quality.resolve(kwargs, ratio)
  config = PruneConfig.preset(preset, **kwargs, seed=SEED)
  calib, _ = data.calib(source, SEED, config.selfgen_windows_per_text, config.selfgen_top_k,
                        config.selfgen_temperature, config.selfgen_samples)
  res = prune(data.model, calib, config)
  kept = {f"{m['layer']}.{m['module']}": m["kept"] for m in res.report["modules"]}
  evals = {t: perplexity(res.model.spec, res.model.params, w) for t, w in data.texts().items()}
  check_one_checkout()
  return {"name": name, "ratio": ratio, "seed": SEED, "params": int(res.model.num_params),
          "kept_digest": {m: digest(k) for m, k in kept.items()},
          "kept_count": {m: len(k) for m, k in kept.items()},
          "perplexity": {t: float(e.perplexity) for t, e in evals.items()},
          "prune_seconds": res.report["seconds"]["total"], "commit": _commit()}


def _commit() -> str | None:
  """The commit of the jaxprune under test (the checkout PYTHONPATH names, not this script's)."""
  import jaxprune
  return quality.git_state(os.path.dirname(os.path.dirname(os.path.abspath(jaxprune.__file__))))["commit"]


def run(out_path: str, only) -> None:
  args = argparse.Namespace(data=quality.DATA, shakespeare=quality.SHAKESPEARE, eval_windows=256, calib_samples=128)
  data = CachedData(args)
  rows = json.load(open(out_path)) if os.path.exists(out_path) else {}
  for name, ratio in HEADLINE:
    k = quality.key(name, ratio, SEED)
    if k in rows or (only and name not in only):
      continue
    rows[k] = run_row(data, name, ratio)
    r = rows[k]
    print(f"{k}: {r['params']} params, ppl {r['perplexity']['wikitext2']:.4f} / {r['perplexity']['shakespeare']:.4f}, "
          f"{r['prune_seconds']:.0f}s", flush=True)
    with open(out_path + ".tmp", "w") as f:
      json.dump(rows, f, indent=1)
    os.replace(out_path + ".tmp", out_path)


def compare(a_path: str, b_path: str, report: str | None) -> int:
  a, b = json.load(open(a_path)), json.load(open(b_path))
  recorded = {r["key"]: r for r in json.load(open(os.path.join(HERE, "results", "quality.json")))["runs"]}
  out, bad = [], 0
  for k in [quality.key(n, r, SEED) for n, r in HEADLINE]:
    if k not in a or k not in b:
      out.append({"row": k, "ok": False, "missing": [p for p, d in ((a_path, a), (b_path, b)) if k not in d]})
      bad += 1
      continue
    ra, rb = a[k], b[k]
    modules = [m for m in ra["kept_digest"] if ra["kept_digest"][m] != rb["kept_digest"].get(m)]
    rel = {t: abs(ra["perplexity"][t] - rb["perplexity"][t]) / ra["perplexity"][t] for t in ra["perplexity"]}
    ok = not modules and set(ra["kept_digest"]) == set(rb["kept_digest"]) and ra["params"] == rb["params"] and \
        max(rel.values()) <= RTOL
    bad += not ok
    q = recorded.get(k, {})
    out.append({"row": k, "ok": ok, "commits": [ra.get("commit"), rb.get("commit")], "modules_differing": modules, "params": [ra["params"], rb["params"]],
                "perplexity_before": ra["perplexity"], "perplexity_after": rb["perplexity"], "relative_difference": rel,
                "quality_json": {"wikitext2": q.get("perplexity"), "shakespeare": q.get("shakespeare_perplexity"),
                                 "commit": q.get("commit")},
                "prune_seconds": [ra["prune_seconds"], rb["prune_seconds"]]})
    print(f"{'ok ' if ok else 'BAD'} {k}: modules differing {len(modules)}, ppl "
          f"{ra['perplexity']['wikitext2']:.6f}/{ra['perplexity']['shakespeare']:.6f} vs "
          f"{rb['perplexity']['wikitext2']:.6f}/{rb['perplexity']['shakespeare']:.6f} "
          f"(rel {max(rel.values()):.1e})")
  if report:
    doc = {"protocol": __doc__.split("\n\n")[3].replace("\n", " "), "rtol": RTOL, "before": a_path, "after": b_path,
           "all_ok": bad == 0, "rows": out}
    with open(report + ".tmp", "w") as f:
      json.dump(doc, f, indent=1)
    os.replace(report + ".tmp", report)
  return 1 if bad else 0


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", help="JSON of this version's rows (resumed when it exists)")
  ap.add_argument("--only", nargs="*", help="row names to run (default: every headline row)")
  ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
  ap.add_argument("--report", help="with --compare: write the comparison here")
  args = ap.parse_args(argv)
  if args.compare:
    return compare(*args.compare, args.report)
  if not args.out:
    ap.error("--out PATH is required unless --compare")
  run(args.out, args.only)
  return 0


if __name__ == "__main__":
  sys.exit(main())
