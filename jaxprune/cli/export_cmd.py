"""`jaxprune export SRC --out OUT`: write a model as a Hugging Face directory or an Orbax checkpoint."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

FORMATS = {
    "hf": "Hugging Face directory (config.json, safetensors, tokenizer) that PyTorch loads",
    "jaxprune": "the same files without config.json, for models transformers cannot express (uneven GQA groups)",
    "orbax": "Orbax checkpoint of the parameters plus jaxprune.json",
}


@dataclasses.dataclass(frozen=True)
class ExportConfig:
  source: str
  out: str
  format: str = "hf"
  dtype: str | None = None
  force: bool = False
  max_shard_size: str = "5GB"


def add_parser(subparsers) -> argparse.ArgumentParser:
  p = subparsers.add_parser(
      "export", help="export a model (dense or pruned) for PyTorch or as an Orbax checkpoint",
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="formats:\n" + "\n".join(f"  {k:9s} {v}" for k, v in FORMATS.items()))
  p.add_argument("source", help="model to export: a directory (HF, jaxprune or orbax), a .gguf, or a built-in name")
  p.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
  p.add_argument("--format", choices=sorted(FORMATS), default="hf", help="output format (default: hf)")
  p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                 help="dtype of the written weights (default: as loaded, float32)")
  p.add_argument("--force", action="store_true", help="replace an existing output that jaxprune wrote (only once the new "
                 "one is complete)")
  p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file for --format hf (default: 5GB)")
  return p


def run(args) -> int:
  cfg = ExportConfig(source=args.source, out=args.out, format=args.format, dtype=args.dtype, force=args.force,
                     max_shard_size=args.max_shard_size)
  return export(cfg)


def export(cfg: ExportConfig) -> int:
  from jaxprune.cli.progress import loading, writing
  from jaxprune.io.resolve import load
  from jaxprune.io.target import check_output, local_path, size_on_disk

  source = local_path(cfg.source)
  check_output(cfg.out, cfg.force, [source], need_bytes=size_on_disk(source))  # before the (slow) load
  bar = sys.stderr.isatty()
  with loading(cfg.source, bar) as report:
    model = load(cfg.source, progress=report)
  if cfg.format == "orbax":
    from jaxprune.io.orbax_io import save_orbax
    path = save_orbax(model, cfg.out, dtype=cfg.dtype, force=cfg.force)
    summary = {"path": path, "format": "orbax", "num_params": model.num_params, "loader": "jaxprune.load"}
  else:
    from jaxprune.io.export import save_hf
    with writing(cfg.out, model.spec.num_layers, bar) as step:
      info = save_hf(model, cfg.out, dtype=cfg.dtype, force=cfg.force, jax_only=cfg.format == "jaxprune",
                     max_shard_size=cfg.max_shard_size, progress=step)
    summary = {k: v for k, v in dataclasses.asdict(info).items() if k != "files"}
    summary["loader"] = info.loader
  print(json.dumps(summary))
  return 0
