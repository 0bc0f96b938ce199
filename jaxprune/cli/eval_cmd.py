"""`jaxprune eval MODEL --text PATH | --tasks T1,T2`: perplexity on a text, zero-shot tasks through lm-eval."""

from __future__ import annotations

import argparse
import dataclasses
import sys


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """What `jaxprune eval` does, independent of argparse."""

  model: str
  text: str | None = None
  seq_len: int = 128
  max_windows: int | None = None
  batch_size: int = 8
  dtype: str = "float32"
  progress: bool = True
  # lm-evaluation-harness
  tasks: tuple[str, ...] = ()
  include_path: str | None = None
  limit: float | None = None
  num_fewshot: int | None = None
  output: str | None = None
  force: bool = False


def _limit(value: str) -> float | int:
  """lm-eval's --limit: a count of examples per task (1 or more) or a fraction of each task (below 1)."""
  try:
    v = float(value)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number of examples or a fraction, got {value!r}") from None
  return int(v) if v >= 1 and v == int(v) else v


def add_parser(subparsers) -> argparse.ArgumentParser:
  p = subparsers.add_parser(
      "eval", help="perplexity of a model on a text; zero-shot tasks through lm-eval",
      description="Perplexity on a text tokenized as one stream without special tokens and cut into "
      "non-overlapping windows (the paper's protocol; each fed after BOS where the model's tokenizer adds BOS), "
      "and/or lm-evaluation-harness tasks run in-process on the JAX model (--tasks; needs `pip install "
      "jaxprune[eval]`).")
  p.add_argument("model", help="built-in name (smollm2-135m), Hugging Face directory, .gguf file or Hub id")
  p.add_argument("--text", default=None, help="UTF-8 text file, e.g. ../shared/data/wikitext-2/test.txt")
  p.add_argument("--seq-len", type=int, default=128,
                 help="window length in tokens, a BOS the tokenizer adds not counted (default 128)")
  p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
  p.add_argument("--batch-size", type=int, default=8,
                 help="windows (perplexity) or lm-eval requests per forward pass (default 8)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="parameter and activation dtype; logits and log-softmax stay float32 (default float32)")
  p.add_argument("--no-progress", dest="progress", action="store_false", help="do not draw a progress bar")
  g = p.add_argument_group("zero-shot tasks (lm-evaluation-harness)")
  g.add_argument("--tasks", default=None,
                 help="comma-separated lm-eval task names, e.g. boolq,piqa,hellaswag,winogrande,arc_easy,"
                 "arc_challenge,openbookqa (datasets come from the Hugging Face hub)")
  g.add_argument("--include-path", default=None, help="directory of extra lm-eval task YAML files (local tasks)")
  g.add_argument("--limit", type=_limit, default=None,
                 help="examples per task: a count (N >= 1) or a fraction (< 1); for quick checks only")
  g.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per prompt (default: the task's)")
  g.add_argument("--output", default=None, help="write lm-eval's results as JSON to this file")
  g.add_argument("--force", action="store_true", help="replace an existing --output file")
  return p


def config_from_args(args) -> EvalConfig:
  tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip()) if args.tasks is not None else ()
  return EvalConfig(model=args.model, text=args.text, seq_len=args.seq_len, max_windows=args.max_windows,
                    batch_size=args.batch_size, dtype=args.dtype, progress=args.progress, tasks=tasks,
                    include_path=args.include_path, limit=args.limit, num_fewshot=args.num_fewshot,
                    output=args.output, force=args.force)


def load_model(name: str, dtype: str, bar: bool):
  """`jaxprune.load`, saying so while a GGUF file's tensors are dequantized."""
  import jaxprune
  from jaxprune.cli.progress import loading

  with loading(name, bar) as report:
    return jaxprune.load(name, dtype=dtype, progress=report)


def evaluate(cfg: EvalConfig, model=None):
  """Perplexity of `cfg.text`; returns (PerplexityResult, Model). Loads the model unless given."""
  from tqdm import tqdm

  import jaxprune
  from jaxprune.data import check_window_args, text_windows
  from jaxprune.data.stream import check_file
  from jaxprune.errors import UsageError
  from jaxprune.eval import perplexity

  if cfg.batch_size < 1:
    raise UsageError(f"--batch-size must be at least 1, got {cfg.batch_size}")
  check_window_args(cfg.seq_len, cfg.max_windows)
  check_file(cfg.text)  # before the (slower) model load, so a wrong path fails fast
  if model is None:
    model = load_model(cfg.model, cfg.dtype, cfg.progress)
  tokenizer = jaxprune.load_tokenizer(cfg.model)
  # Read only as far as the windows need: a corpus of gigabytes for --max-windows 4 reads one piece.
  windows = text_windows(cfg.text, tokenizer, cfg.seq_len, cfg.max_windows)
  with tqdm(total=len(windows), unit="win", desc="eval", disable=not cfg.progress, file=sys.stderr) as bar:
    result = perplexity(model.spec, model.params, windows, batch_size=cfg.batch_size, progress=bar.update,
                        finite=True)
  return result, model


def _task_manager(cfg: EvalConfig):
  """lm-eval's TaskManager for `cfg`, after checking that every task name is known (before the model loads)."""
  import os

  from jaxprune.errors import UsageError

  try:
    from lm_eval.tasks import TaskManager
  except ImportError:
    raise UsageError("--tasks needs lm-evaluation-harness, which is not installed; "
                     "run pip install 'jaxprune[eval]'") from None
  if cfg.include_path is not None and not os.path.isdir(cfg.include_path):
    raise UsageError(f"--include-path {cfg.include_path} is not a directory; pass the directory that holds the "
                     "task YAML files")
  if cfg.limit is not None and not cfg.limit > 0:
    raise UsageError(f"--limit must be positive, got {cfg.limit}; use a count (e.g. 100) or a fraction (e.g. 0.1)")
  tm = None
  if cfg.include_path is not None:
    # Indexing lm-eval's ~15k built-in task files takes seconds; when every task is a plain task of the
    # include path (which takes precedence over the built-ins anyway), its own index is enough.
    local = TaskManager(include_path=cfg.include_path, include_defaults=False)
    if all(t in local.all_subtasks for t in cfg.tasks):
      tm = local
  tm = tm or TaskManager(include_path=cfg.include_path)
  unknown = [t for t in cfg.tasks if not tm.match_tasks([t])]
  if unknown:
    raise UsageError(f"unknown lm-eval task(s): {', '.join(unknown)}; list the known ones with `lm_eval ls tasks`, "
                     "or pass --include-path DIR with their YAML")
  return tm


def zero_shot(cfg: EvalConfig, model, tokenizer, task_manager=None) -> dict:
  """lm-eval's results dict for `cfg.tasks` on `model` (run in-process through `JaxpruneLM`)."""
  import lm_eval

  from jaxprune.eval.lm_eval import JaxpruneLM

  tm = task_manager or _task_manager(cfg)
  lm = JaxpruneLM(model=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
  results = lm_eval.simple_evaluate(model=lm, tasks=list(cfg.tasks), task_manager=tm, limit=cfg.limit,
                                    num_fewshot=cfg.num_fewshot, log_samples=False)
  # An LM object leaves these blank; record what `lm_eval --model jaxprune` would have.
  results["config"].update(model="jaxprune", model_args=f"pretrained={cfg.model},dtype={cfg.dtype}",
                           batch_size=cfg.batch_size)
  return results


def run(args) -> int:
  cfg = config_from_args(args)
  from jaxprune.errors import UsageError

  if cfg.text is None and not cfg.tasks:
    raise UsageError("nothing to evaluate; pass --text PATH (perplexity), --tasks T1,T2 (lm-eval tasks), or both")
  if cfg.output is not None and not cfg.tasks:
    raise UsageError("--output saves lm-eval results; pass --tasks as well")
  model = tm = None
  if cfg.tasks:  # every cheap check before the model loads and perplexity runs
    from jaxprune.io.target import check_output, local_path
    if cfg.output is not None:
      check_output(cfg.output, cfg.force, [local_path(cfg.model), cfg.text], kind="file")
    if cfg.batch_size < 1:
      raise UsageError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    tm = _task_manager(cfg)
  if cfg.text is not None:
    r, model = evaluate(cfg)
    print(f"model       {cfg.model} ({model.source})")
    print(f"text        {cfg.text}")
    print(f"perplexity  {r.perplexity:.4f}")
    # A window fed after BOS (data.bos_prefix) has all its seq_len tokens predicted, a plain one all but the first.
    after = " after BOS" if r.tokens == r.windows * cfg.seq_len else ""
    print(f"windows     {r.windows} x {cfg.seq_len} tokens{after} (batch {cfg.batch_size}, {cfg.dtype})")
    print(f"tokens      {r.tokens} predicted")
    print(f"throughput  {r.tokens_per_second:.1f} tokens/s ({r.seconds:.2f} s, including compilation)")
  if cfg.tasks:
    import json

    import jaxprune
    from lm_eval.utils import handle_non_serializable, make_table

    from jaxprune.io.atomic import write_json

    if model is None:
      model = load_model(cfg.model, cfg.dtype, cfg.progress)
    results = zero_shot(cfg, model, jaxprune.load_tokenizer(cfg.model), tm)
    print(make_table(results))
    if results.get("groups"):
      print(make_table(results, "groups"))
    if cfg.output is not None:
      write_json(cfg.output, json.loads(json.dumps(results, default=handle_non_serializable)), force=cfg.force)
      print(f"results     {cfg.output}")
  return 0
