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


def window_counts(given: int | None, config, calib, n_data: int = 1) -> list[tuple[str, int]]:
  """(source, windows) of every source a run draws from, in order. Self-generated text, the
  config's selfgen_samples (--selfgen-samples); a text or random tokens, --calib-samples when
  given, else CALIB_SAMPLES. Alone, self-generated text also takes --calib-samples. Text files
  alone are joined by the model's own text, `selfgen_share` windows per text window
  (`data.selfgen.own_text_count`, so that they still split into batches over `n_data` devices)."""
  from jaxprune.data.selfgen import own_text_count

  if given is not None and given < 1:
    raise UsageError(f"--calib-samples must be positive, got {given}")
  srcs = sources(calib)
  if given is not None and len(srcs) == 1:
    counts = [given]
  else:
    counts = [config.selfgen_samples if s == "selfgen" else given or CALIB_SAMPLES for s in srcs]
  draws = list(zip(srcs, counts))
  if not any(s in CALIB_SPECIAL for s in srcs):
    own = own_text_count(sum(counts), config, n_data)
    if own:
      draws.append(("selfgen", own))
  return draws


def joins_text(draws: list[tuple[str, int]]) -> bool:
  """Whether the run draws from a text file (self-generated windows then join it)."""
  return any(s not in CALIB_SPECIAL for s, _ in draws)


def without_generation(draws: list[tuple[str, int]]) -> str:
  """How a run that samples its own text would calibrate without sampling any: joined to a
  text, on the text alone; else on a text."""
  if joins_text(draws):
    return "--selfgen-share 0 calibrates on the text alone"
  return "--calib FILE calibrates on a text instead"


def calibration(args, model, tokenizer, config, draws: list[tuple[str, int]]):
  """The calibration windows of every (source, count) of `draws` in turn: a text file, the
  model's own text, or random tokens, each after the tokenizer's prefix (BOS where it adds one:
  [n, 1 + seq_len]; `data.bos_prefix`). Several sources are one set of windows, so each weighs in
  the statistics by its share of them."""
  import numpy as np

  parts = [_windows(source, args, model, tokenizer, config, n, draws) for source, n in draws]
  return parts[0] if len(parts) == 1 else np.concatenate([np.asarray(p) for p in parts])


def _windows(source: str, args, model, tokenizer, config, n: int, draws: list[tuple[str, int]]):
  from jaxprune.cli.progress import phase
  from jaxprune.data import bos_prefix, calibration_stream, sample_windows
  from jaxprune.data.selfgen import own_windows, random_tokens

  prefix = bos_prefix(tokenizer)
  if source == "selfgen":
    from jaxprune.io.lazy import materialize

    model = materialize(model)  # generation runs the whole model for every token
    # Minutes to an hour on a CPU: say so before the first batch compiles and runs.
    with phase(f"generating {n} calibration windows of {args.seq_len} tokens with the model itself "
               f"({without_generation(draws)})", n,
               "self-generation", "win", args.show_progress) as update:
      # Joining a text, its texts are cut to what the model's positions hold.
      return own_windows(model.spec, model.params, n, args.seq_len, config, prefix=prefix, fit=joins_text(draws),
                         progress=update)
  if source == "random":
    return random_tokens(model.spec.vocab_size, n, args.seq_len, seed=config.seed, prefix=prefix)
  windows, _ = sample_windows(calibration_stream(source, tokenizer), args.seq_len, n, seed=config.seed,
                              source=source, prefix=prefix)
  return windows


def check_inputs(args, config, mesh):
  """The text files, window length and calibration size, checked before the model loads; the
  (source, windows) the run draws (`window_counts`)."""
  from jaxprune import sharding
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
  draws = window_counts(args.calib_samples, config, args.calib, mesh.shape[sharding.DATA])
  check_batches(sum(n for _, n in draws), config.batch_size, mesh)
  return draws


def check_model_inputs(args, model, draws: list[tuple[str, int]]) -> None:
  """What the model's sizes decide: the window length against its positions, the calibration
  streams and the generation of its own text against the memory there is (refused before they
  are allocated)."""
  from jaxprune.data import check_seq_len
  from jaxprune.data.budget import check_calibration_size, check_generation_size
  from jaxprune.footprint import generation_model_bytes
  from jaxprune.io.lazy import is_lazy

  check_seq_len(args.seq_len, model.spec)
  check_calibration_size(sum(n for _, n in draws), args.seq_len, model.spec.hidden_size)
  srcs = [s for s, _ in draws]
  if "selfgen" in srcs and is_lazy(model.params):  # generation reads every block in at once
    check_generation_size(generation_model_bytes(model.spec), without_generation(draws))
