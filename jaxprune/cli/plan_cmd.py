"""`jaxprune plan MODEL --mesh data=D,model=M`: the memory a pruning run will need, before running it.

Reads the model's config only (a config.json file is enough: no weights are
loaded) and estimates, for the same options `jaxprune prune` takes, the peak
memory per device and per host of the streamed run, with the term that
dominates each (`jaxprune.footprint`). Nothing is computed on devices, so a
70B config plans on a laptop; `--backend` and `--devices-per-host` describe
the machines the run is for.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from jaxprune.cli.prune_cmd import SOLVES
from jaxprune.cli.prune_inputs import joins_text, window_counts, without_generation
from jaxprune.cli.prune_options import add_config_options, resolve_config
from jaxprune.prune import presets


def add_parser(sub):
  p = sub.add_parser("plan", help="estimate the memory of a pruning run from the config alone",
                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("model", help="config.json, HF directory, .gguf file or built-in name (only the config is read)")
  p.add_argument("--mesh", default=None, metavar="data=D,model=M",
                 help="the run's device mesh (default: data=1,model=1)")
  p.add_argument("--calib-samples", type=int, default=None,
                 help="calibration windows of a text (default 128, joined by the preset's self-generated "
                 "share of them); a data-free preset's: its selfgen_samples")
  p.add_argument("--seq-len", type=int, default=128, help="tokens per window (default 128)")
  p.add_argument("--preset", default=None, choices=presets.names(), help="as for jaxprune prune (default: recommended)")
  p.add_argument("--config", default=None, metavar="FILE.yaml", help="as for jaxprune prune")
  p.add_argument("--backend", default=None, choices=("cpu", "gpu", "tpu"),
                 help="where the run's devices are (default: this machine's); on cpu, devices are host memory")
  p.add_argument("--devices-per-host", type=int, default=None,
                 help="devices each host drives (default: 4 on tpu, 8 on gpu, this machine's on cpu)")
  p.add_argument("--solves", default="auto", choices=SOLVES,
                 help="as for jaxprune prune (default auto: split on a gpu or tpu mesh with a model axis)")
  p.add_argument("--max-shard-size", default="200MB", help="as for jaxprune prune (default 200MB)")
  p.add_argument("--json", default=None, metavar="FILE", help="also write the estimate as JSON")
  add_config_options(p)
  return p


def run(args) -> int:
  from jaxprune import footprint, sharding
  from jaxprune.data import bos_prefix, check_seq_len
  from jaxprune.io.atomic import write_json
  from jaxprune.io.export import parse_size
  from jaxprune.io.resolve import read_spec
  from jaxprune.io.target import check_output, local_path

  if args.json:  # the estimate replaces an earlier one, never an input (e.g. the model's config.json)
    check_output(args.json, True, [local_path(args.model), args.config], kind="file")
  if args.sparsity is None and args.config is None:
    args.sparsity = "0.2"  # the budget does not change the peak: it is set by the dense block
  args.calib = None
  check_seq_len(args.seq_len)
  config, preset = resolve_config(args)
  spec, stored, loc = read_spec(args.model)
  # jaxprune's GGUF reader maps the file, and every tensor's pages are read once over the run.
  mapped = os.path.getsize(loc.path) if loc is not None and loc.kind == "gguf" else 0
  tokenizer = _load_tokenizer(args.model)  # the run holds it: it counts in the process's own memory
  config = config.check(spec)
  data, model = sharding.parse_mesh(args.mesh) if args.mesh else (1, 1)
  data = 1 if data is None else data
  # As `jaxprune prune` would draw them (a data-free preset generates its calibration).
  draws = window_counts(args.calib_samples, config, "selfgen" if preset in presets.DATAFREE else "text", data)
  args.calib_samples = sum(n for _, n in draws)
  generated = sum(n for source, n in draws if source == "selfgen")
  check_seq_len(args.seq_len, spec)  # as `jaxprune prune` checks it
  # The run feeds every window after the tokenizer's BOS where it adds one (Gemma): one more token each.
  window = args.seq_len + (len(bos_prefix(tokenizer)) if tokenizer is not None else 0)
  est = footprint.estimate(spec, config, samples=args.calib_samples, seq_len=window, data=data, model=model,
                           checkpoint_bytes=stored, backend=args.backend, local_devices=args.devices_per_host,
                           max_shard_bytes=parse_size(args.max_shard_size), mapped_bytes=mapped,
                           generated=generated, prefix=window - args.seq_len, fit=joins_text(draws),
                           solves=args.solves)
  print(f"{args.model}: {spec.num_layers} layers, hidden {spec.hidden_size}, preset {preset} "
        f"(method {config.method}), {args.calib_samples} x {args.seq_len} calibration tokens"
        + (f", each window fed after BOS ({window} tokens)" if window != args.seq_len else ""))
  print(footprint.table(est))
  if est.generation is not None and est.generation[0].bytes > est.device.bytes:
    print(f"note: the run's peak is its {generated} self-generated windows, sampled by the whole model on one device; "
          f"{without_generation(draws)}")
  if tokenizer is None:
    print("note: no tokenizer found next to the config; the run's (tens to hundreds of MB) is not counted")
  if args.json:
    write_json(args.json, {"model": args.model, "preset": preset, "config": dataclasses.asdict(config),
                           "calib_samples": args.calib_samples, "seq_len": args.seq_len, "window_tokens": window,
                           **est.to_json()}, force=True)
  return 0


def _load_tokenizer(model: str):
  """The tokenizer beside the model's config, or None where there is only a config."""
  from jaxprune.errors import JaxpruneError
  from jaxprune.io import load_tokenizer, resolve

  if os.path.isfile(os.path.expanduser(model)) and model.endswith(".json"):
    return None
  try:
    loc = resolve(model)
  except JaxpruneError:
    return None
  names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
  if loc.kind != "gguf" and not any(os.path.exists(os.path.join(loc.path, n)) for n in names):
    return None  # a config alone: loading nothing keeps the measured floor honest
  try:
    return load_tokenizer(model)
  except (JaxpruneError, OSError, ValueError):
    return None
