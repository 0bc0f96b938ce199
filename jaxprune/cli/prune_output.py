"""What `jaxprune prune` leaves behind: the run's report, the output directory, and the summary it prints."""

from __future__ import annotations

import json
import os
from typing import Any

from jaxprune.cli.prune_inputs import describe


def report(result, args, preset: str, draws: list[tuple[str, int]], *, calib_s: float, load_s: float,
           evaluation: dict, eval_windows: int) -> dict[str, Any]:
  """The pipeline's report with what only the command knows: the model, the preset, the
  calibration sources and their windows, the load time and the perplexities before and after."""
  out = dict(result.report)
  out["model"] = args.model
  out["preset"] = preset
  srcs = [s for s, _ in draws]
  out["calibration"] = {**out["calibration"], "source": describe(srcs), "seconds": calib_s}
  if len(srcs) > 1:
    out["calibration"]["sources"] = srcs
    out["calibration"]["source_windows"] = [n for _, n in draws]
  out["seconds"] = {**out["seconds"], "load": load_s}
  if evaluation:
    out["perplexity"] = {"text": args.eval_text, "windows": eval_windows, "seq_len": args.seq_len, **evaluation}
  return out


def write(args, model, tokenizer, report: dict, events: list[dict], dtype: str | None) -> None:
  """The pruned model, report.json and progress.jsonl in args.out, all renamed into place at once."""
  from jaxprune.cli.progress import writing
  from jaxprune.io.atomic import atomic_dir
  from jaxprune.io.export import hf_problems, save_hf

  with atomic_dir(args.out, force=args.force) as tmp:
    # Uneven GQA groups (--free-groups) have no Hugging Face config: weights + jaxprune.json only.
    with writing(args.out, model.spec.num_layers, args.show_progress) as step:
      save_hf(model, tmp, tokenizer=tokenizer, force=True, jax_only=bool(hf_problems(model.spec)), dtype=dtype,
              max_shard_size=args.max_shard_size, progress=step)
    with open(os.path.join(tmp, "report.json"), "w") as f:
      json.dump(report, f, indent=1)
    with open(os.path.join(tmp, "progress.jsonl"), "w") as f:
      for e in events:
        f.write(json.dumps(e) + "\n")


def summary(args, report: dict) -> None:
  """Parameters, perplexities and time, as a user reads them after the run."""
  p = report["params"]
  print(f"parameters: {p['before'] / 1e6:.2f}M -> {p['after'] / 1e6:.2f}M "
        f"({100 * p['ratio_of_pruned_blocks']:.1f}% of the pruned blocks, {100 * p['ratio_global']:.1f}% overall)")
  if "perplexity" in report:
    ppl = report["perplexity"]
    print(f"perplexity on {args.eval_text} ({ppl['windows']} windows of {args.seq_len}): "
          f"dense {ppl['dense']['perplexity']:.2f} -> pruned {ppl['pruned']['perplexity']:.2f}")
  sec = report["seconds"]
  ph = sec["phases"]
  split = ", ".join(f"{k} {ph[k]:.1f}s" for k in ("statistics", "advance", "solves", "scoring", "surgery", "plan",
                                                  "prepare", "compile") if ph.get(k))
  print(f"time: load {sec['load']:.1f}s, calibration {report['calibration']['seconds']:.1f}s, pruning "
        f"{sec['total']:.1f}s ({split}; {report['passes']['compiles']} compiles)")
  print(f"wrote {args.out} (model, report.json, progress.jsonl)")
