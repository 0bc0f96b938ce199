"""What `jaxprune prune` reads besides the model: the calibration windows, and the checks on its inputs.

Every check here runs before the slow steps it protects (loading the model,
generating text), so bad input stops a run before any work.
"""

from __future__ import annotations

from jaxprune.errors import UsageError

CALIB_SPECIAL = ("selfgen", "random")
CALIB_SAMPLES = 128  # calibration windows of a text or random tokens (self-generated: the preset's selfgen_samples)


def window_count(given: int | None, config, selfgen: bool) -> int:
  """Calibration windows a run draws: --calib-samples when given, else the config's
  selfgen_samples for self-generated text and CALIB_SAMPLES for any other source."""
  if given is not None:
    if given < 1:
      raise UsageError(f"--calib-samples must be positive, got {given}")
    return given
  return config.selfgen_samples if selfgen else CALIB_SAMPLES


def calibration(args, model, tokenizer, config, n: int):
  """`n` calibration windows [n, seq_len] of --calib: a text file, the model's own text, or random tokens,
  each after the tokenizer's prefix (BOS where it adds one: [n, 1 + seq_len]; `data.bos_prefix`)."""
  from jaxprune.cli.progress import phase
  from jaxprune.data import bos_prefix, calibration_stream, sample_windows
  from jaxprune.data.selfgen import random_tokens, self_generated

  prefix = bos_prefix(tokenizer)
  if args.calib == "selfgen":
    from jaxprune.io.lazy import materialize

    model = materialize(model)  # generation runs the whole model for every token
    # Minutes to an hour on a CPU: say so before the first batch compiles and runs.
    with phase(f"generating {n} calibration windows of {args.seq_len} tokens with the model itself (--calib FILE "
               "reads a text instead)", n, "self-generation", "win", args.show_progress) as update:
      return self_generated(model.spec, model.params, n, args.seq_len, seed=config.seed,
                            windows_per_text=config.selfgen_windows_per_text, top_k=config.selfgen_top_k,
                            temperature=config.selfgen_temperature, prefix=prefix, progress=update)
  if args.calib == "random":
    return random_tokens(model.spec.vocab_size, n, args.seq_len, seed=config.seed, prefix=prefix)
  windows, _ = sample_windows(calibration_stream(args.calib, tokenizer), args.seq_len, n, seed=config.seed,
                              source=args.calib, prefix=prefix)
  return windows


def check_inputs(args, config, mesh):
  """The text files, window length and calibration size: checked before the model loads."""
  from jaxprune.data import check_seq_len
  from jaxprune.data.stream import check_file
  from jaxprune.prune import check_batches

  check_seq_len(args.seq_len)
  if args.calib not in CALIB_SPECIAL:
    check_file(args.calib, "calibration text")
  if args.eval_text is not None:
    check_file(args.eval_text, "--eval-text file")
    if args.eval_windows < 1:
      raise UsageError(f"--eval-windows must be positive, got {args.eval_windows}")
  n = window_count(args.calib_samples, config, args.calib == "selfgen")
  check_batches(n, config.batch_size, mesh)
  return n


def check_model_inputs(args, spec, n: int) -> None:
  """What the model's sizes decide: the window length against its positions, the calibration
  streams against the memory there is (refused before they are allocated)."""
  from jaxprune.data import check_seq_len
  from jaxprune.data.budget import check_calibration_size

  check_seq_len(args.seq_len, spec)
  check_calibration_size(n, args.seq_len, spec.hidden_size)
