"""What `jaxprune prune` reads besides the model: the calibration windows, and the checks on its inputs.

Every check here runs before the slow steps it protects (loading the model,
generating text), so bad input stops a run before any work.
"""

from __future__ import annotations

from jaxprune.errors import UsageError

CALIB_SPECIAL = ("selfgen", "random")
CALIB_SAMPLES = 128  # calibration windows of a text or random tokens (self-generated: the preset's selfgen_samples)


def sources(calib) -> list[str]:
  """--calib as a list of sources (one string, or the several that `jaxprune prune --calib A B` takes)."""
  return [calib] if isinstance(calib, str) else list(calib)


def describe(calib) -> str:
  """The calibration sources as the report states them: 'valid.txt', or 'valid.txt + selfgen'."""
  return " + ".join(sources(calib))


def window_counts(given: int | None, config, calib) -> list[int]:
  """Calibration windows a run draws from each --calib source: self-generated text, the
  config's selfgen_samples (--selfgen-samples); a text or random tokens, --calib-samples
  when given, else CALIB_SAMPLES. Alone, self-generated text also takes --calib-samples."""
  if given is not None and given < 1:
    raise UsageError(f"--calib-samples must be positive, got {given}")
  srcs = sources(calib)
  if given is not None and len(srcs) == 1:
    return [given]
  return [config.selfgen_samples if s == "selfgen" else given or CALIB_SAMPLES for s in srcs]


def calibration(args, model, tokenizer, config, counts: list[int]):
  """The calibration windows of every --calib source in turn, `counts[i]` of source i: a text file,
  the model's own text, or random tokens, each after the tokenizer's prefix (BOS where it adds one:
  [n, 1 + seq_len]; `data.bos_prefix`). Several sources are one set of windows, so each weighs in
  the statistics by its share of them."""
  import numpy as np

  parts = [_windows(source, args, model, tokenizer, config, n) for source, n in zip(sources(args.calib), counts)]
  return parts[0] if len(parts) == 1 else np.concatenate([np.asarray(p) for p in parts])


def _windows(source: str, args, model, tokenizer, config, n: int):
  from jaxprune.cli.progress import phase
  from jaxprune.data import bos_prefix, calibration_stream, sample_windows
  from jaxprune.data.selfgen import random_tokens, self_generated

  prefix = bos_prefix(tokenizer)
  if source == "selfgen":
    from jaxprune.io.lazy import materialize

    model = materialize(model)  # generation runs the whole model for every token
    # Minutes to an hour on a CPU: say so before the first batch compiles and runs.
    with phase(f"generating {n} calibration windows of {args.seq_len} tokens with the model itself (--calib FILE "
               "reads a text instead)", n, "self-generation", "win", args.show_progress) as update:
      return self_generated(model.spec, model.params, n, args.seq_len, seed=config.seed,
                            windows_per_text=config.selfgen_windows_per_text, top_k=config.selfgen_top_k,
                            temperature=config.selfgen_temperature, prefix=prefix, progress=update)
  if source == "random":
    return random_tokens(model.spec.vocab_size, n, args.seq_len, seed=config.seed, prefix=prefix)
  windows, _ = sample_windows(calibration_stream(source, tokenizer), args.seq_len, n, seed=config.seed,
                              source=source, prefix=prefix)
  return windows


def check_inputs(args, config, mesh):
  """The text files, window length and calibration size: checked before the model loads."""
  from jaxprune.data import check_seq_len
  from jaxprune.data.stream import check_file
  from jaxprune.prune import check_batches

  check_seq_len(args.seq_len)
  srcs = sources(args.calib)
  if len(set(srcs)) < len(srcs):
    raise UsageError(f"--calib names {describe(srcs)}, a source twice; name each once (--calib-samples and "
                     "--selfgen-samples set how many windows each gives)")
  for source in srcs:
    if source not in CALIB_SPECIAL:
      check_file(source, "calibration text")
  if args.eval_text is not None:
    check_file(args.eval_text, "--eval-text file")
    if args.eval_windows < 1:
      raise UsageError(f"--eval-windows must be positive, got {args.eval_windows}")
  counts = window_counts(args.calib_samples, config, args.calib)
  check_batches(sum(counts), config.batch_size, mesh)
  return counts


def check_model_inputs(args, spec, n: int) -> None:
  """What the model's sizes decide: the window length against its positions, the calibration
  streams against the memory there is (refused before they are allocated)."""
  from jaxprune.data import check_seq_len
  from jaxprune.data.budget import check_calibration_size

  check_seq_len(args.seq_len, spec)
  check_calibration_size(n, args.seq_len, spec.hidden_size)
