"""Beyond the paper: does a short optax fit after pruning help? One row on SmolLM2.

Takes a model pruned by jaxprune's recipe (by default `runs/smollm2-20`, what
`scripts/main.sh` writes), trains a LoRA of the o/down projections (or only the
biases) with `jaxprune.heal` on the calibration windows (128 x 128 tokens of
WikiText-2 valid, seed 0, the windows `jaxprune prune` calibrates on), and
measures perplexity before and after on

* held-out WikiText-2 valid windows (disjoint from the training windows),
* WikiText-2 test, first 256 non-overlapping 128-token windows (the README's protocol),
* Tiny Shakespeare, first 256 windows (a second domain, never trained on).

The training-free result is the "before" column; "after" is beyond the paper.

    python benchmarks/heal.py [--base runs/smollm2-20] [--train lora] [--steps 300] [--batch-size 8]
                              [--out benchmarks/results/heal.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
DATA = os.path.join(ROOT, "..", "shared", "data")
SEQ_LEN = 128


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--base", default=os.path.join(ROOT, "runs", "smollm2-20"), help="pruned model directory")
  p.add_argument("--train", choices=("lora", "bias"), default="lora")
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--lr", type=float, default=None, help="default 1e-4 (lora), 1e-3 (bias)")
  p.add_argument("--eval-windows", type=int, default=256)
  p.add_argument("--dense", default=None, help="also measure this model (e.g. smollm2-135m) on the same windows")
  p.add_argument("--save", default=None, help="also write the healed model here (atomic)")
  p.add_argument("--out", default=os.path.join(HERE, "results", "heal.json"))
  args = p.parse_args(argv)

  import jax

  import jaxprune
  from benchmarks.machine import cpu_name
  from jaxprune.data import eval_windows, read_text, sample_windows, tokenize
  from jaxprune.eval import perplexity
  from jaxprune.heal import HealConfig, heal
  from jaxprune.io.atomic import write_json

  lr = args.lr if args.lr is not None else (1e-4 if args.train == "lora" else 1e-3)
  cfg = HealConfig(train=args.train, rank=args.rank, steps=args.steps, batch_size=args.batch_size, learning_rate=lr)
  model = jaxprune.load(args.base)
  tok = jaxprune.load_tokenizer(args.base)
  valid = tokenize(tok, read_text(os.path.join(DATA, "wikitext-2", "valid.txt")))
  train, idx = sample_windows(valid, SEQ_LEN, 128, seed=0)  # the calibration windows of `jaxprune prune`
  heldout, _ = sample_windows(valid, SEQ_LEN, 32, seed=1, exclude=idx)
  texts = {"wikitext2_test": os.path.join(DATA, "wikitext-2", "test.txt"),
           "shakespeare": os.path.join(DATA, "tinyshakespeare", "input.txt")}
  evals = {k: eval_windows(tokenize(tok, read_text(v)), SEQ_LEN, args.eval_windows, source=v)
           for k, v in texts.items()}

  def measure(spec, params):
    out = {"wikitext2_valid_heldout": perplexity(spec, params, heldout).perplexity}
    out.update({k: perplexity(spec, params, w).perplexity for k, w in evals.items()})
    return out

  dense = None
  if args.dense:
    d = jaxprune.load(args.dense)
    dense = {"model": args.dense, "params": d.num_params, "perplexity": measure(d.spec, d.params)}
    print("dense", dense, flush=True)
    del d

  t0 = time.perf_counter()
  before = measure(model.spec, model.params)
  eval_s = time.perf_counter() - t0
  print("before", before, flush=True)
  every = max(1, cfg.steps // 20)
  result = heal(model, train, None, cfg, progress=lambda s, l: (s % every == 0 or s == cfg.steps - 1) and
                print(f"step {s} loss {l:.4f}", flush=True))
  after = measure(model.spec, result.model.params)
  print("after", after, flush=True)
  if args.save:
    from jaxprune.io.export import save_hf
    save_hf(result.model, args.save, tokenizer=tok, force=True)

  report = {
      "what": "beyond the paper: optional healing (optax AdamW) of the training-free pruned model",
      "base": os.path.relpath(args.base, ROOT) if args.base.startswith(ROOT) else args.base,
      "base_params": model.num_params,
      "heal": {k: v for k, v in result.report.items() if k not in ("loss",)},
      "loss": result.report["loss"],
      "data": {"train": "WikiText-2 valid, 128 windows x 128 tokens, sample_windows seed 0 (the calibration windows)",
               "wikitext2_valid_heldout": "32 other WikiText-2 valid windows (seed 1, disjoint)",
               "wikitext2_test": f"first {len(evals['wikitext2_test'])} windows of WikiText-2 test",
               "shakespeare": f"first {len(evals['shakespeare'])} windows of Tiny Shakespeare (never trained on)"},
      "perplexity": {"training_free": before, "healed": after},
      "dense": dense,
      "seconds": {"heal": result.report["seconds"]["train"], "one_evaluation": eval_s},
      "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "jax": jax.__version__, "python": platform.python_version(),
                  "load_average": os.getloadavg()},
  }
  write_json(args.out, report, force=True)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
