"""`jaxprune export SRC --out OUT`: write a model as a Hugging Face directory, an Orbax checkpoint or a GGUF file."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from jaxprune.errors import UsageError

FORMATS = {
    "hf": "Hugging Face directory (config.json, safetensors, tokenizer) that PyTorch loads",
    "jaxprune": "the same files without config.json, for models transformers cannot express (uneven GQA groups)",
    "orbax": "Orbax checkpoint of the parameters plus jaxprune.json",
    "gguf": "one GGUF file for llama.cpp (llama/qwen2/qwen3/gemma3 when every layer has the same shape, deci for "
            "LLaMA-family per-layer widths); --dtype f32 (default), f16, bf16 or q8_0",
    "decilm": "the hf files with a DeciLM (nemotron-nas) config that vLLM and TensorRT-LLM load; only for LLaMA "
              "models with the same query heads in every layer and no intercept (MLP-channel or KV-group pruning)",
}
DTYPES = ("float32", "bfloat16", "float16", "f32", "f16", "bf16", "q8_0")
_SHORT = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}  # GGUF's names, accepted by every format


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
      "export", help="export a model (dense or pruned) for PyTorch, llama.cpp (GGUF) or as an Orbax checkpoint",
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="formats:\n" + "\n".join(f"  {k:9s} {v}" for k, v in FORMATS.items()))
  p.add_argument("source", help="model to export: a directory (HF, jaxprune or orbax), a .gguf, or a built-in name")
  p.add_argument("--out", required=True,
                 help="output directory, or file for --format gguf (must not exist unless --force)")
  p.add_argument("--format", choices=sorted(FORMATS), default="hf", help="output format (default: hf)")
  p.add_argument("--dtype", choices=DTYPES, default=None,
                 help="dtype of the written weights (default: as loaded, float32); f32/f16/bf16 name the same "
                 "dtypes; q8_0 (llama.cpp's 8-bit blocks) only with --format gguf")
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

  if cfg.dtype == "q8_0" and cfg.format != "gguf":
    raise UsageError(f"--dtype q8_0 is a GGUF tensor type, but --format is {cfg.format}; pass --format gguf, or "
                     "choose --dtype float32, bfloat16 or float16")
  if cfg.format == "gguf":
    from jaxprune.io.gguf_export import refuse_directory
    refuse_directory(cfg.out)
  source = local_path(cfg.source)
  check_output(cfg.out, cfg.force, [source], need_bytes=size_on_disk(source),
               kind="file" if cfg.format == "gguf" else "dir")  # before the (slow) load
  bar = sys.stderr.isatty()
  with loading(cfg.source, bar) as report:
    model = load(cfg.source, progress=report)
  dtype = _SHORT.get(cfg.dtype, cfg.dtype) if cfg.format != "gguf" else cfg.dtype
  if cfg.format == "gguf":
    from jaxprune.io.gguf_export import refuse_model, save_gguf
    refuse_model(model.spec)  # before the line saying the file is being written
    with writing(cfg.out, model.spec.num_layers, bar) as step:
      info = save_gguf(model, cfg.out, dtype=cfg.dtype, force=cfg.force, progress=step)
    summary = {**dataclasses.asdict(info), "loader": "llama.cpp (llama-cli -m FILE)"}
  elif cfg.format == "orbax":
    from jaxprune.io.orbax_io import save_orbax
    # Orbax writes the tree in one call, with no steps to count: the start line alone.
    print(f"writing {cfg.out}: an Orbax checkpoint of {model.num_params} parameters", file=sys.stderr, flush=True)
    path = save_orbax(model, cfg.out, dtype=dtype, force=cfg.force)
    summary = {"path": path, "format": "orbax", "num_params": model.num_params, "loader": "jaxprune.load"}
  else:
    from jaxprune.io.export import save_hf
    with writing(cfg.out, model.spec.num_layers, bar) as step:
      info = save_hf(model, cfg.out, dtype=dtype, force=cfg.force, jax_only=cfg.format == "jaxprune",
                     max_shard_size=cfg.max_shard_size, progress=step, decilm=cfg.format == "decilm")
    summary = {k: v for k, v in dataclasses.asdict(info).items() if k != "files"}
    summary["loader"] = info.loader
  print(json.dumps(summary))
  return 0
