"""How the recipe is chosen: candidates scored on held-out calibration-domain windows, checked off-domain.

Every candidate prunes SmolLM2-135M with the same 128 x 128 calibration
windows of WikiText-2 *valid* (sample_windows, seed 0 unless --seed) and is
scored on:

  heldout      --heldout-windows other windows of WikiText-2 valid, disjoint
               from the calibration windows: what a choice is made on;
  heldout_selfgen
               as many windows of text the dense model generates itself
               (drawn as the data-free preset draws its text, seed + 1000, so
               never a calibration window): the model's own distribution, the
               stand-in for every text but WikiText that a choice is also made on;
  shakespeare  the first --check-windows windows of tinyshakespeare/input.txt:
               a text of another domain, never calibrated or chosen on, that a
               choice must also hold on before it becomes a default.

WikiText-2 *test* is never read here (it is what benchmarks/quality.py
reports). Rows go to a JSON file with the git commit and whether the tree was
dirty, and a markdown table next to it; the script resumes (rows already in the
JSON are skipped unless --force) and refuses rows of several commits unless
--allow-mixed.

    python benchmarks/selection.py [--only NAME ...] [--set NAME key=value ...] [--ratio 0.2] [--seed 0]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import quality  # noqa: E402  (the shared protocol: model, data paths, git state, atomic writes)

# (name, preset, PruneConfig fields over the preset, calibration source). The
# ratio is --ratio unless a row sets sparsity. The recipe rows spell out every
# recipe field over the `paper` preset, so they stay what they were when the
# recommended preset changes. OLD is the recommended recipe before this table
# (uniform, MLP channels only, reconstruction, measured covariance).
OLD = dict(method="goa-obs", allocation="uniform", attn_sparsity=0.0, reconstruct=True, refit=True, intercept=True,
           damping=1e-5, shrink=0.0, min_keep=0.0)
ADAPTIVE = dict(OLD, allocation="adaptive", reconstruct=False)
CANDIDATES = [
    ("dense", None, None, "valid"),
    ("flap uniform (MLP only)", "baseline", dict(method="flap", attn_sparsity=0.0), "valid"),
    ("flap adaptive", "baseline", dict(method="flap", allocation="adaptive"), "valid"),
    # FLAP uniform at the reference 50% structure (85.9M; run with --ratio 0.5).
    ("flap uniform@ref", "baseline", dict(method="flap", sparsity=0.4583, attn_sparsity=0.25), "valid"),
    # Covariance shrinkage, uniform structure, with and without the reconstruction before selection.
    ("goa-obs recipe, shrink 0 (the old default)", "paper", OLD, "valid"),
    ("goa-obs recipe, shrink 0.5", "paper", dict(OLD, shrink=0.5), "valid"),
    ("goa-obs recipe, shrink 0.75", "paper", dict(OLD, shrink=0.75), "valid"),
    ("goa-obs recipe, shrink 1", "paper", dict(OLD, shrink=1.0), "valid"),
    ("shrink 0.5, no reconstruct", "paper", dict(OLD, shrink=0.5, reconstruct=False), "valid"),
    ("shrink 0.75, no reconstruct", "paper", dict(OLD, shrink=0.75, reconstruct=False), "valid"),
    # Adaptive allocation by the goa-obs costs.
    ("adaptive, shrink 0.25, no reconstruct", "paper", dict(ADAPTIVE, shrink=0.25), "valid"),
    ("adaptive, shrink 0.5, no reconstruct", "paper", dict(ADAPTIVE, shrink=0.5), "valid"),
    ("adaptive, shrink 0.75, no reconstruct", "paper", dict(ADAPTIVE, shrink=0.75), "valid"),
    ("adaptive, shrink 0.25, no reconstruct, min_keep 0.25", "paper", dict(ADAPTIVE, shrink=0.25, min_keep=0.25),
     "valid"),
    ("adaptive, shrink 0.25, no reconstruct, min_keep 0.5", "paper", dict(ADAPTIVE, shrink=0.25, min_keep=0.5),
     "valid"),
    # Data-free: self-generated calibration.
    ("random, data-free (self-generated)", "baseline", dict(method="random", attn_sparsity=0.0), "selfgen"),
    ("data-free: adaptive, shrink 0.25, no reconstruct, min_keep 0.25", "paper",
     dict(ADAPTIVE, shrink=0.25, min_keep=0.25), "selfgen"),
    # Calibration that covers the model's whole distribution: WikiText-2 valid and self-generated
    # text (drawn as the data-free preset draws it) in one set, each weighing by its windows.
    # The recipe on the text alone: the default preset before its self-generated share.
    ("default preset, valid only", "recommended", dict(selfgen_share=0.0), "valid"),
    # The largest first: the smaller draws are its first windows.
    ("default preset, valid + 512 self-generated", "recommended", dict(quality.SELFGEN_TEXT, selfgen_samples=512),
     "valid+selfgen"),
    ("default preset, valid + 256 self-generated", "recommended", dict(quality.SELFGEN_TEXT, selfgen_samples=256),
     "valid+selfgen"),
    ("default preset, valid + 128 self-generated", "recommended", dict(quality.SELFGEN_TEXT, selfgen_samples=128),
     "valid+selfgen"),
]


def parse_set(items: list[str]) -> tuple[str, dict]:
  """(candidate name, PruneConfig fields) from `NAME key=value ...`, parsed as the CLI parses its options."""
  from jaxprune.cli.prune_options import config_values
  name, *pairs = items
  return name, config_values(dict(pair.partition("=")[::2] for pair in pairs), "--set")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--ratio", type=float, default=0.2)
  p.add_argument("--seed", type=int, default=0, help="calibration (and held-out) windows' seed")
  p.add_argument("--calib-samples", type=int, default=128)
  p.add_argument("--heldout-windows", type=int, default=64)
  p.add_argument("--check-windows", type=int, default=64)
  p.add_argument("--only", nargs="+", default=None, help="run only these candidate names")
  p.add_argument("--set", nargs="+", action="append", default=[], metavar="NAME key=value",
                 help="an extra candidate over the recommended preset (repeatable)")
  p.add_argument("--preset", default="recommended", help="preset of --set candidates")
  p.add_argument("--set-calib", default="valid", choices=("valid", "selfgen", "valid+selfgen"),
                 help="calibration of --set candidates: WikiText-2 valid, self-generated text, or both in one set")
  p.add_argument("--selfgen-samples", type=int, default=None,
                 help="self-generated windows of calib=selfgen rows (default: the candidate's selfgen_samples, "
                 "1024 in recommended-datafree; the held-out windows stay those of --calib-samples)")
  p.add_argument("--selfgen-first", type=lambda t: [int(x) for x in t.split(",")], default=None,
                 help="token id(s) self-generated texts start from, e.g. 0 or 1,0 (text i from the i-th mod k; "
                 "default: the model's BOS)")
  p.add_argument("--selfgen-cache", default=None, metavar="DIR",
                 help="keep self-generated windows in DIR (one .npy per seed and sampling), so that runs in "
                 "other processes reuse them instead of generating again")
  p.add_argument("--force", action="store_true")
  p.add_argument("--allow-mixed", action="store_true")
  p.add_argument("--out", default=os.path.join(HERE, "results", "selection.json"))
  args = p.parse_args(argv)

  import numpy as np

  from jaxprune.data import eval_windows, read_text, sample_windows, tokenize
  from jaxprune.eval import perplexity
  from jaxprune.io.atomic import write_json
  from jaxprune.prune import PruneConfig, prune

  cands = [c for c in CANDIDATES if not args.only or c[0] in args.only]
  for items in args.set:
    name, kw = parse_set(items)
    cands.append((name, args.preset, kw, args.set_calib))
  md_out = os.path.splitext(args.out)[0] + ".md"
  state = quality.git_state(exclude=(args.out, md_out))
  result = {"runs": []}
  if os.path.exists(args.out):
    with open(args.out) as f:
      result = json.load(f)
  keys = {quality.key(n, None if kw is None else args.ratio, args.seed) for n, _, kw, _ in cands}
  kept = [r for r in result["runs"] if not (args.force and r["key"] in keys)]
  others = quality.mixed_commits(kept, state["commit"])
  if others and not args.allow_mixed:
    p.error(f"{args.out} holds rows from commit(s) {', '.join(others)}, but HEAD is {state['commit']}; "
            "rerun them with --force, write to another --out, or pass --allow-mixed")
  result["runs"] = kept
  result["protocol"] = {
      "calibration": f"{args.calib_samples} x {quality.SEQ_LEN} tokens of WikiText-2 valid, seed {args.seed} "
                     "(calib=selfgen rows: as many self-generated tokens, sampled with that seed)",
      "heldout": f"{args.heldout_windows} other windows of WikiText-2 valid (disjoint from the calibration)",
      "heldout_selfgen": f"{args.heldout_windows} windows of text the dense model generates (the data-free "
                         f"preset's sampling, seed {args.seed + 1000})",
      "check": f"first {args.check_windows} windows of tinyshakespeare/input.txt (never chosen on)",
  }

  import jaxprune
  model = jaxprune.load(quality.MODEL)
  tok = jaxprune.load_tokenizer(quality.MODEL)
  valid_path = os.path.join(quality.DATA, "valid.txt")
  stream = tokenize(tok, read_text(valid_path))
  calib, idx = sample_windows(stream, quality.SEQ_LEN, args.calib_samples, seed=args.seed, source=valid_path)
  heldout, _ = sample_windows(stream, quality.SEQ_LEN, args.heldout_windows, seed=args.seed + 1000, exclude=idx,
                              source=valid_path)
  check = eval_windows(tokenize(tok, read_text(quality.SHAKESPEARE)), quality.SEQ_LEN, args.check_windows,
                       source=quality.SHAKESPEARE)
  done = {r["key"] for r in result["runs"]}
  selfgen = {}

  def n_selfgen(config):
    return args.selfgen_samples or config.selfgen_samples

  def calibration(source, config):
    if source == "valid":
      return calib
    if source == "valid+selfgen":
      return np.concatenate([calib, calibration("selfgen", config)])
    how = (n_selfgen(config), config.selfgen_windows_per_text, config.selfgen_top_k, config.selfgen_temperature)
    return generated(how, args.seed, args.selfgen_first)

  def generated(how, seed, first_token):
    """Self-generated windows: (count, windows a text, top-k, temperature), from `seed`."""
    key = how + (seed, None if first_token is None else tuple(first_token))
    # The first windows of a larger draw are those of a smaller one (self_generated): slice it.
    larger = [k for k in selfgen if k[1:] == key[1:] and k[0] > how[0]]
    if key not in selfgen and larger:
      selfgen[key] = selfgen[max(larger)][:how[0]]
    if key not in selfgen:  # once per process and sampling: generating is slower than most prunes
      from jaxprune.data.selfgen import self_generated
      cached = None
      if args.selfgen_cache:
        first = "bos" if first_token is None else "-".join(map(str, first_token))
        cached = os.path.join(args.selfgen_cache, f"selfgen_n{how[0]}_w{how[1]}_k{how[2]}_t{how[3]:g}_"
                              f"s{seed}_f{first}_l{quality.SEQ_LEN}.npy")
      # A larger cached draw of the same sampling holds this one as its first windows.
      bigger = sorted((int(os.path.basename(f).split("_")[1][1:]), f) for f in glob.glob(
          cached.replace(f"selfgen_n{how[0]}_", "selfgen_n*_"))) if cached else []
      bigger = [f for n, f in bigger if n >= how[0]]
      if bigger:
        selfgen[key] = np.load(bigger[0])[:how[0]]
      else:
        selfgen[key] = self_generated(model.spec, model.params, how[0], quality.SEQ_LEN, seed=seed,
                                      first_token=first_token, windows_per_text=how[1], top_k=how[2],
                                      temperature=how[3])
        if cached:
          os.makedirs(args.selfgen_cache, exist_ok=True)
          np.save(cached + ".tmp.npy", selfgen[key])
          os.replace(cached + ".tmp.npy", cached)
    return selfgen[key]

  def heldout_selfgen():
    """The dense model's own text, sampled as the data-free preset samples, never calibrated on."""
    d = PruneConfig.preset("recommended-datafree")
    return generated((args.heldout_windows, d.selfgen_windows_per_text, d.selfgen_top_k, d.selfgen_temperature),
                     args.seed + 1000, None)

  for name, preset, kw, source in cands:
    ratio = None if kw is None else args.ratio
    k = quality.key(name, ratio, args.seed)
    if k in done:
      print(f"skip {k}")
      continue
    t0 = time.perf_counter()
    if kw is None:
      spec, params, rep = model.spec, model.params, None
    else:
      config = PruneConfig.preset(preset, **{"sparsity": args.ratio, **kw, "seed": args.seed})
      res = prune(model, calibration(source, config), config)
      spec, params, rep = res.model.spec, res.model.params, res.report
    prune_s = time.perf_counter() - t0
    h, s = perplexity(spec, params, heldout), perplexity(spec, params, check)
    g = perplexity(spec, params, heldout_selfgen())
    n_calib = {"valid": args.calib_samples, "selfgen": n_selfgen(config) if kw is not None else 0,
               "valid+selfgen": args.calib_samples + (n_selfgen(config) if kw is not None else 0)}[source]
    row = {"key": k, "name": name, "preset": preset, "settings": kw or {}, "calibration": source, "ratio": ratio,
           "seed": args.seed, "calib_samples": n_calib,
           "params_after": int(sum(np.size(x) for x in __import__("jax").tree.leaves(params))),
           "heldout_perplexity": h.perplexity, "heldout_selfgen_perplexity": g.perplexity,
           "shakespeare_perplexity": s.perplexity, "prune_seconds": prune_s,
           "channels_kept": None if rep is None else [l["ffn_dim"] for l in rep["layers"]],
           "heads_kept": None if rep is None else [l["num_heads"] for l in rep["layers"]], **state}
    if source.endswith("selfgen"):  # what the self-generated windows start from (None: the model's BOS)
      first = args.selfgen_first
      row["selfgen_first"] = first[0] if first is not None and len(first) == 1 else first
      row["selfgen_windows_per_text"] = config.selfgen_windows_per_text
      row["selfgen_top_k"] = config.selfgen_top_k
      row["selfgen_temperature"] = config.selfgen_temperature
    print(f"{name}: {row['params_after'] / 1e6:.2f}M held-out {h.perplexity:.2f} held-out self-generated "
          f"{g.perplexity:.2f} Shakespeare {s.perplexity:.2f} ({prune_s:.0f}s)", flush=True)
    result["runs"].append(row)
    done.add(k)
    write_json(args.out, result, force=True)
    quality.write_text(md_out, markdown(result))
  return 0


def _cell(text: str) -> str:
  """Text for a markdown table cell (token names such as <|endoftext|> hold pipes)."""
  return text.replace("|", "\\|")


def _maybe(x) -> str:
  """A perplexity, or blank for rows made before it was measured."""
  return "" if x is None else f"{x:.2f}"


def markdown(result: dict) -> str:
  lines = ["# Recipe selection on SmolLM2-135M", "",
           "Produced by `python benchmarks/selection.py`. "
           f"Calibration: {result['protocol']['calibration']}. Chosen on: {result['protocol']['heldout']}. "
           f"Checked on: {result['protocol']['check']}."
           + (f" Also chosen on: {result['protocol']['heldout_selfgen']}." if "heldout_selfgen" in result["protocol"]
              else ""), "",
           "| candidate | preset | settings | ratio | parameters | held-out valid | held-out self-generated | "
           "Shakespeare | prune s | commit |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
  for r in result["runs"]:
    calib = r.get("calibration", "valid")
    if calib.endswith("selfgen") and r.get("selfgen_first") is not None:
      first = r["selfgen_first"]
      calib += f" from token {first}" if isinstance(first, int) else f" from tokens {'/'.join(map(str, first))}"
    if "selfgen" in calib and r.get("selfgen_windows_per_text", 1) > 1:
      calib += f", {r['selfgen_windows_per_text']} windows a text"
    if "selfgen" in calib and r.get("selfgen_top_k", 50) != 50:
      calib += f", top-k {r['selfgen_top_k'] or 'off'}"
    if "selfgen" in calib and r.get("selfgen_temperature", 1.0) != 1.0:
      calib += f", temperature {r['selfgen_temperature']:g}"
    if r.get("calib_samples", 128) != 128:
      calib += f", {r['calib_samples']} windows"
    s = ", ".join([f"{k}={v}" for k, v in r["settings"].items()] + [f"calib={calib}"])
    lines.append(f"| {_cell(r['name'])} | {r['preset'] or ''} | {s} | {r['ratio'] or ''} | {r['params_after'] / 1e6:.2f}M | "
                 f"{r['heldout_perplexity']:.2f} | {_maybe(r.get('heldout_selfgen_perplexity'))} | "
                 f"{r['shakespeare_perplexity']:.2f} | {r['prune_seconds']:.0f} | "
                 f"{(r.get('commit') or '?')[:8]}{'+dirty' if r.get('dirty') else ''} |")
  notes = [(r["name"], r["note"]) for r in result["runs"] if r.get("note")]
  if notes:
    lines += [""] + [f"- {name}: {note}." for name, note in notes]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  sys.exit(main())
