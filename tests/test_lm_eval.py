"""lm-evaluation-harness backend (`--model jaxprune`) and `jaxprune eval --tasks`.

Fast tests run tiny random Llamas with a word-level tokenizer against direct
computations and against lm-eval's own `hf` backend; the SmolLM2 tests compare
`--model jaxprune` with `hf` on the exported model, dense and pruned, on local
tasks (task data cannot be downloaded here: the YAML and JSONL are written by
the tests).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import jaxprune
from jaxprune.cli import main
from jaxprune.errors import CheckpointError, UsageError
from tests import tiny

lm_eval = pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")
from lm_eval.api.instance import Instance  # noqa: E402

from jaxprune.eval import lm_eval as jl  # noqa: E402
from jaxprune.eval import scoring  # noqa: E402

WORDS = [f"w{i}" for i in range(tiny.VOCAB - 2)]  # ids 2..127; 0 and 1 are the models' BOS and EOS
WIKITEXT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext-2", "test.txt")
EPS32 = float(np.finfo(np.float32).eps)


def add_tokenizer(path: str) -> str:
  """A word-level tokenizer over WORDS with <s> = 0 and </s> = 1, the tiny models' BOS and EOS ids."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  vocab = {"<s>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
  backend = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
  backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
  PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                          unk_token="</s>").save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def model_dir(tiny_dir, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("lm_eval") / "llama_mha")
  shutil.copytree(tiny_dir("llama_mha"), path)
  return add_tokenizer(path)


@pytest.fixture(scope="module")
def model(model_dir):
  return jaxprune.load(model_dir)


def words(rng, n: int) -> str:
  return " ".join(rng.choice(WORDS, size=n))


def write_tasks(root, mc_items, documents) -> str:
  """A multiple-choice task `jp_mc` and a rolling-loglikelihood task `jp_roll` under `root` (lm-eval YAML + JSONL)."""
  root = str(root)
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "mc.jsonl"), "w") as f:
    for item in mc_items:
      f.write(json.dumps(item) + "\n")
  with open(os.path.join(root, "roll.jsonl"), "w") as f:
    for doc in documents:
      f.write(json.dumps({"text": doc}) + "\n")
  with open(os.path.join(root, "jp_mc.yaml"), "w") as f:
    f.write(f"""task: jp_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {os.path.join(root, "mc.jsonl")}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_target: label
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
  with open(os.path.join(root, "jp_roll.yaml"), "w") as f:
    f.write(f"""task: jp_roll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {os.path.join(root, "roll.jsonl")}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""")
  return root


@pytest.fixture(scope="module")
def tiny_tasks(tmp_path_factory):
  rng = np.random.default_rng(0)
  items = [{"question": words(rng, 5), "choices": [words(rng, int(rng.integers(1, 4))) for _ in range(3)],
            "label": int(rng.integers(0, 3))} for _ in range(8)]
  docs = [words(rng, n) for n in (20, 90, 40)]
  return write_tasks(tmp_path_factory.mktemp("tasks"), items, docs), items


REF_LEN = 64  # reference passes read one row of this length: one compilation for every request


def next_logits(m, seq) -> np.ndarray:
  """Logits [len(seq), V] of one sequence, from a single-row forward pass right-padded to REF_LEN tokens."""
  buf = np.zeros((1, REF_LEN), np.int32)
  buf[0, :len(seq)] = seq
  return np.asarray(jaxprune.logits(m.spec, m.params, buf), np.float64)[0, :len(seq)]


def direct(m, ctx, cont):
  """(sum of log p(cont | ctx), greedy) from `next_logits`, log-softmax in float64."""
  full = list(ctx) + list(cont)
  logits = next_logits(m, full[:-1])[-len(cont):]
  top = logits.max(-1, keepdims=True)
  lp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  return float(lp[np.arange(len(cont)), cont].sum()), bool((logits.argmax(-1) == cont).all())


# Padding and batching change only the shapes XLA reduces over, so the batched and the
# direct computation differ by float32 reassociation: a reduction over K <= 128 terms
# (D = 64, F = 96, V = 128 here) moves by at most K * eps ~ 1.5e-5 of its magnitude
# (Higham's dot-product bound), through two blocks and the head. rel = abs = 1e-4 covers
# that, while a slicing error (a shifted position, a padded token scored) changes a
# log-probability by O(1).
TINY_TOL = dict(rel=1e-4, abs=1e-4)


def test_continuation_logprobs_match_direct_forward(model):
  rng = np.random.default_rng(1)
  reqs = [(list(rng.integers(2, 128, int(c))), list(rng.integers(2, 128, int(n))))
          for c, n in zip(rng.integers(1, 40, 12), rng.integers(1, 6, 12))]
  # A continuation the model itself predicts greedily, so the greedy flag is also seen True.
  ctx = reqs[0][0]
  greedy = []
  for _ in range(3):
    greedy.append(int(np.argmax(next_logits(model, ctx + greedy)[-1])))
  reqs.append((ctx, greedy))
  before = scoring._target_logprobs._cache_size()
  got = scoring.continuation_logprobs(model.spec, model.params, reqs, batch_size=4)
  # 13 requests in 4 batches of 4 rows, padded to 16, 32 or 64 tokens: at most 3 shapes to compile.
  assert scoring._target_logprobs._cache_size() - before <= 3
  for (c, t), (lp, g) in zip(reqs, got):
    want_lp, want_g = direct(model, c, t)
    assert lp == pytest.approx(want_lp, **TINY_TOL)
    assert g == want_g
  assert got[-1][1] and not all(g for _, g in got)


def test_left_truncation_to_max_length(model):
  """A request longer than max_length + 1 tokens is scored on its last max_length + 1 tokens, as in lm-eval."""
  rng = np.random.default_rng(2)
  ctx, cont = list(rng.integers(2, 128, 40)), list(rng.integers(2, 128, 5))
  (lp, _), = scoring.continuation_logprobs(model.spec, model.params, [(ctx, cont)], max_length=20)
  assert lp == pytest.approx(direct(model, ctx[-(21 - 5):], cont)[0], **TINY_TOL)
  assert abs(lp - direct(model, ctx, cont)[0]) > 1e-3  # the truncation matters for this request
  with pytest.raises(UsageError, match="continuation has 25 tokens, more than max_length 20"):
    scoring.continuation_logprobs(model.spec, model.params, [(ctx, ctx[:25])], max_length=20)


def hf_backend(model_dir, **kw):
  from lm_eval.models.huggingface import HFLM

  return HFLM(pretrained=model_dir, dtype="float32", device="cpu", batch_size=4, max_length=32, **kw)


def assert_same_loglikelihoods(ours, theirs, rng, rolling_theirs=None):
  """Per-request loglikelihoods (with an empty context, a truncated one and multi-window rolling
  documents) of `ours` agree with lm-eval's hf backend `theirs` (`rolling_theirs` for the documents)."""
  pairs = [(words(rng, int(rng.integers(1, 30))), " " + words(rng, int(rng.integers(1, 4)))) for _ in range(10)]
  pairs += [("", words(rng, 3)), (words(rng, 40), " " + words(rng, 2))]  # empty context; truncated
  reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
  a, b = ours.loglikelihood(reqs), theirs.loglikelihood(reqs)
  for (la, ga), (lb, gb) in zip(a, b, strict=True):
    assert la == pytest.approx(lb, **TINY_TOL) and ga == gb
  docs = [Instance("loglikelihood_rolling", {}, (words(rng, n),), i) for i, n in enumerate((10, 70, 33))]
  ra, rb = ours.loglikelihood_rolling(docs), (rolling_theirs or theirs).loglikelihood_rolling(docs)
  assert ra == pytest.approx(rb, **TINY_TOL)  # 70 words at max_length 32: three windows


def test_same_requests_as_hf_backend(model_dir):
  ours = jl.JaxpruneLM(model_dir, batch_size=4, max_length=32)
  assert_same_loglikelihoods(ours, hf_backend(model_dir), np.random.default_rng(3))


def test_gemma3_with_bos_same_requests_as_hf_backend(tiny_dir, tmp_path):
  """A tiny Gemma 3 (sliding window 8 < max_length 32, one KV head, post-norms, attention and
  final soft-caps) whose tokenizer adds BOS: loglikelihood and generate_until agree with lm-eval's
  hf backend, which also puts BOS before every context and prompt. Rolling documents agree with
  hf told add_bos_token=False: hf would encode the document with its BOS and score that BOS
  after the prefix BOS (the one deliberate difference, in jaxprune.eval.lm_eval's docstring);
  without it both feed [BOS] + the text's tokens, as the perplexity windows are fed.

  TINY_TOL's bound holds here too: Gemma's widest reduction is the output projection's over
  4 heads x 32 = 128 values, and the soft-caps (tanh) shrink, not amplify, a logit error.
  """
  from tests.test_windows_bos import save_tokenizer

  path = str(tmp_path / "gemma3")
  shutil.copytree(tiny_dir("gemma3"), path)
  save_tokenizer(path, "template")
  ours = jl.JaxpruneLM(path, batch_size=4, max_length=32)
  assert ours.add_bos_token and ours.prefix_token_id == 0
  theirs = hf_backend(path)
  rng = np.random.default_rng(6)
  assert_same_loglikelihoods(ours, theirs, rng, rolling_theirs=hf_backend(path, add_bos_token=False))
  # BOS, 4 to 17 words and up to 12 new tokens: every row decodes past the window of 8.
  stops = [[], ["w7"], ["w12 w40"]]
  reqs = [Instance("generate_until", {}, (words(rng, n), {"until": stops[i % 3], "max_gen_toks": 12,
                                                         "do_sample": False}), i)
          for i, n in enumerate((4, 17, 9, 13, 6))]
  got = ours.generate_until(reqs)
  assert got == theirs.generate_until(reqs)
  assert sum(len(g.split()) for g in got) > 20  # real continuations were compared, not empty strings


@pytest.mark.parametrize("kind", ["llama_mha", "mistral", "gemma3", "qwen3"])
def test_greedy_generate_matches_full_forward(kind, tiny_dir):
  """mistral and gemma3: a sliding window of 8 inside the KV cache (gemma3: on every other layer,
  with one KV head, soft-caps and post-norms); qwen3: RMS norms on queries and keys."""
  m = jaxprune.load(tiny_dir(kind))
  rng = np.random.default_rng(4)
  prompts = [list(rng.integers(2, 128, n)) for n in (3, 11, 6)]
  gen = scoring.greedy_generate(m.spec, m.params, prompts, 12, eos_token_id=1)
  for p, g in zip(prompts, gen, strict=True):
    seq = list(p)
    while len(seq) - len(p) < 12 and seq[-1] != 1:
      seq.append(int(np.argmax(next_logits(m, seq)[-1])))
    want = seq[len(p):]
    assert g == (want[:-1] if want[-1] == 1 else want)
  assert len({tuple(g) for g in gen}) == 3


def test_generate_until_stops_at_strings_and_budget(model_dir, model):
  lm = jl.JaxpruneLM(model_dir, batch_size=2)
  rng = np.random.default_rng(5)
  prompts = [words(rng, n) for n in (4, 9, 6)]
  full = scoring.greedy_generate(model.spec, model.params, [lm.tok_encode(p) for p in prompts], 10)
  texts = [lm.tok_decode(g) for g in full]
  stop = lm.tok_decode(full[1][4:6])  # two words the second prompt generates at positions 4-5
  reqs = [Instance("generate_until", {}, (p, {"until": [stop], "max_gen_toks": 10, "do_sample": False}), i)
          for i, p in enumerate(prompts)]
  out = lm.generate_until(reqs)
  assert out == [t.split(stop)[0] for t in texts]
  assert out[1].strip() == lm.tok_decode(full[1][:4]) or stop in lm.tok_decode(full[1][:5])
  budget = lm.generate_until([Instance("generate_until", {}, (prompts[0], {"until": [], "max_gen_toks": 3}), 0)])
  assert budget == [lm.tok_decode(full[0][:3])]
  with pytest.raises(UsageError, match="do_sample=True"):
    lm.generate_until([Instance("generate_until", {}, (prompts[0], {"do_sample": True, "temperature": 0.7}), 0)])


def test_tokenizer_with_bos_scores_after_bos(model, model_dir, tmp_path):
  """A tokenizer that adds BOS makes add_bos_token default to True: a context is scored after
  BOS, and a rolling document is its tokens after one BOS (the prefix token), every one of them
  scored, as a perplexity window is. A tokenizer without BOS keeps add_bos_token False."""
  from transformers import PreTrainedTokenizerFast

  from tests.test_windows_bos import save_tokenizer

  tok = PreTrainedTokenizerFast.from_pretrained(save_tokenizer(str(tmp_path), "template"))
  lm = jl.JaxpruneLM(model=model, tokenizer=tok, batch_size=4)
  assert lm.add_bos_token and lm.prefix_token_id == 0
  assert jl.JaxpruneLM(model=model, tokenizer=model_dir, batch_size=4).add_bos_token is False
  rng = np.random.default_rng(5)
  ctx, cont, doc = words(rng, 6), " " + words(rng, 2), words(rng, 20)

  def ids(text):
    return tok(text, add_special_tokens=False)["input_ids"]

  (lp, _), = lm.loglikelihood([Instance("loglikelihood", {}, (ctx, cont), 0)])
  assert lp == pytest.approx(direct(model, [0, *ids(ctx)], ids(cont))[0], **TINY_TOL)
  roll, = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (doc,), 0)])
  assert roll == pytest.approx(direct(model, [0], ids(doc))[0], **TINY_TOL)


def test_registered_with_lm_eval():
  from lm_eval.api.registry import get_model

  assert get_model("jaxprune") is jl.JaxpruneLM
  assert get_model("hf").__name__ == "HFLM"  # the built-ins are still there


@pytest.mark.parametrize("args,needle", [
    (dict(batch_size="auto"), "batch_size must be a positive integer, got 'auto'"),
    (dict(revision="main"), "unknown model_args for --model jaxprune: revision"),
    (dict(max_length=0), "max_length must be a positive integer, got 0"),
])
def test_bad_model_args(model_dir, args, needle):
  with pytest.raises(UsageError, match=needle):
    jl.JaxpruneLM(model_dir, **args)


def test_missing_model_dir(tmp_path):
  with pytest.raises(CheckpointError):
    jl.JaxpruneLM(str(tmp_path / "nothing"))


def test_cli_tasks_table_and_json(model_dir, model, tiny_tasks, tmp_path, capsys):
  include, items = tiny_tasks
  out = str(tmp_path / "results.json")
  argv = ["eval", model_dir, "--tasks", "jp_mc,jp_roll", "--include-path", include, "--batch-size", "4",
          "--output", out]
  assert main(argv) == 0
  printed = capsys.readouterr().out
  assert "|jp_mc" in printed and "|jp_roll" in printed and "acc_norm" in printed
  saved = json.load(open(out))
  assert saved["config"]["model"] == "jaxprune" and saved["config"]["model_args"].startswith(f"pretrained={model_dir}")
  res = saved["results"]
  # Accuracy from the backend's own per-choice log-probabilities, computed here directly.
  tok = jaxprune.load_tokenizer(model_dir)
  hits = 0
  for it in items:
    ctx = tok.encode(it["question"])
    scores = [direct(model, ctx, tok.encode(it["question"] + " " + c)[len(ctx):])[0] for c in it["choices"]]
    hits += int(np.argmax(scores) == it["label"])
  assert res["jp_mc"]["acc,none"] == pytest.approx(hits / len(items))
  assert res["jp_roll"]["word_perplexity,none"] > 1
  assert main(argv) == 2 and "already exists" in capsys.readouterr().err  # never replaced without --force


@pytest.mark.parametrize("argv,needle", [
    ((), "nothing to evaluate; pass --text PATH"),
    (("--tasks", "no_such_task_xyz"), "unknown lm-eval task(s): no_such_task_xyz"),
    (("--tasks", "jp_mc", "--include-path", "/no/such/dir"), "--include-path /no/such/dir is not a directory"),
])
def test_cli_errors(model_dir, argv, needle, capsys):
  assert main(["eval", model_dir, *argv]) == 2
  err = capsys.readouterr().err
  assert needle in err and "Traceback" not in err


def test_lm_eval_command_line(model_dir, tiny_tasks):
  """The documented command: lm-eval's own CLI with `--model jaxprune`, in a fresh interpreter."""
  include, _ = tiny_tasks
  cmd = [sys.executable, "-m", "jaxprune.eval.lm_eval", "--model", "jaxprune", "--model_args",
         f"pretrained={model_dir},max_length=32", "--tasks", "jp_mc", "--include_path", include,
         "--batch_size", "4", "--limit", "2"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false"}
  r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300,
                     cwd=os.path.join(os.path.dirname(__file__), ".."))
  assert r.returncode == 0, r.stderr[-3000:]
  assert "jaxprune (" in r.stdout and "|jp_mc" in r.stdout


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M: `--model jaxprune` against lm-eval's `hf` backend on the exported model.

MC_ITEMS = [
    ("The capital of France is", [" Paris", " Madrid", " Rome", " Berlin"], 0),
    ("Water freezes at a temperature of", [" 100 degrees Celsius", " 0 degrees Celsius", " 50 degrees Celsius",
                                           " 37 degrees Celsius"], 1),
    ("The largest planet in the Solar System is", [" Mercury", " Mars", " Jupiter", " Venus"], 2),
    ("A week has", [" five days", " ten days", " three days", " seven days"], 3),
    ("The opposite of hot is", [" cold", " loud", " tall", " green"], 0),
    ("Bees make", [" steel", " honey", " glass", " paper"], 1),
    ("The sun rises in the", [" north", " south", " east", " west"], 2),
    ("Two plus two equals", [" seven", " nine", " one", " four"], 3),
]


def wikitext_documents(n: int = 3, chars: int = 400) -> list[str]:
  """The first `n` paragraphs of WikiText-2 test, each cut to about `chars` characters at a word boundary."""
  if not os.path.isfile(WIKITEXT):
    pytest.skip(f"{WIKITEXT} is missing")
  docs = []
  with open(WIKITEXT, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if len(line) > 200 and not line.startswith("="):
        docs.append(line[:chars].rsplit(" ", 1)[0])
        if len(docs) == n:
          break
  return docs


@pytest.fixture(scope="module")
def smol_tasks(tmp_path_factory):
  items = [{"question": q, "choices": c, "label": y} for q, c, y in MC_ITEMS]
  return write_tasks(tmp_path_factory.mktemp("smol_tasks"), items, wikitext_documents())


def evaluate_both(jax_model, hf_dir: str, include: str):
  """lm-eval's results (with samples) for `--model jaxprune` and `--model hf` on the two local tasks.

  hf runs with softmax_dtype=float64: its default float32 log-softmax over SmolLM2's
  49152-token vocabulary drifts by about 7e-6 per token (1.1e-3 on a 154-token
  WikiText-2 paragraph against a float64 run, where jaxprune's float32 logsumexp is
  within 5e-5), so with it the comparison measures the two forward passes, not hf's
  softmax rounding.
  """
  from lm_eval.tasks import TaskManager

  tm = TaskManager(include_path=include, include_defaults=False)  # the local tasks only: no 15k-file index
  runs = {}
  for name, model, args in (("jaxprune", *jax_model), ("hf", "hf", f"pretrained={hf_dir},dtype=float32,softmax_dtype=float64")):
    runs[name] = lm_eval.simple_evaluate(model=model, model_args=args, tasks=["jp_mc", "jp_roll"], task_manager=tm,
                                         batch_size=8, device="cpu", log_samples=True)
  return runs["jaxprune"], runs["hf"]


def keep_uniform(spec):
  """One query head of every KV group and 320 MLP channels go in every layer (as test_export_smollm2's plan)."""
  heads, channels = {}, {}
  for i, l in enumerate(spec.layers):
    G = l.num_heads // l.num_kv_heads
    heads[i] = [k * G + j for k in range(l.num_kv_heads) for j in range(G - 1)]
    channels[i] = list(range(l.ffn_dim - 320))
  return heads, channels


# Both engines compute float32 logits with differently ordered sums (XLA vs PyTorch/oneDNN);
# a token's log-probability moves by at most twice the largest logit error, which is about
# 1e-4 for SmolLM2 (test_export_smollm2 bounds it by 1e-3). Rounding errors of different
# tokens have random signs, so a sum over n tokens grows like sqrt(n) times the per-token
# error (under 3e-5 for either engine against float64): about 3e-4 for the ~100-token rolling
# documents and far less for the <= 5-token continuations, under the 1e-3 the issue asks for.
# Measured on this CPU: 1.9e-4 dense, 5.0e-4 pruned (pruning without reconstruction amplifies
# rounding in SmolLM2's outlier channels, as test_export_smollm2 notes).
SMOL_ABS = 1e-3


def compare_runs(ours, theirs):
  """Per-request agreement to SMOL_ABS and equal task metrics; returns the largest per-request gap."""
  worst = 0.0
  for task in ("jp_mc", "jp_roll"):
    a = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
    b = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
    assert len(a) == len(b) > 0
    for sa, sb in zip(a, b):
      for ra, rb in zip(sa["resps"], sb["resps"], strict=True):
        la, lb = ra[0][0] if task == "jp_mc" else ra[0], rb[0][0] if task == "jp_mc" else rb[0]
        worst = max(worst, abs(la - lb))
        assert la == pytest.approx(lb, abs=SMOL_ABS)
      if task == "jp_mc":
        lls = sorted(r[0][0] for r in sb["resps"])
        # Equal accuracies follow from the per-request bound unless two choices are within 2 * bound.
        if lls[-1] - lls[-2] > 2 * SMOL_ABS:
          assert sa["acc"] == sb["acc"] and sa["acc_norm"] == sb["acc_norm"]
  for m in ("acc,none", "acc_norm,none"):
    assert ours["results"]["jp_mc"][m] == theirs["results"]["jp_mc"][m]
  # word perplexity = exp(-sum ll / words): a gap of SMOL_ABS per document moves it by a factor
  # within exp(documents * SMOL_ABS / words).
  for m in ("word_perplexity,none", "byte_perplexity,none"):
    assert ours["results"]["jp_roll"][m] == pytest.approx(theirs["results"]["jp_roll"][m], rel=1e-4)
  return worst


@pytest.mark.smollm2
def test_smollm2_dense_matches_hf_backend(smol, smol_tasks, tmp_path):
  from jaxprune.io.export import save_hf

  out = str(tmp_path / "dense")
  save_hf(smol, out, dtype="float32")
  # jaxprune runs the model loaded from the built-in GGUF, with the GGUF's tokenizer (an LM object:
  # no second load); hf reads the export of the same weights.
  lm = jl.JaxpruneLM(model=smol, tokenizer=jaxprune.load_tokenizer(smol.source), batch_size=8)
  ours, theirs = evaluate_both((lm, None), out, smol_tasks)
  worst = compare_runs(ours, theirs)
  # Against a float64 run of the export, jaxprune's rolling log-likelihoods hold the same bound.
  tok = jaxprune.load_tokenizer(out)
  ref = transformers_float64(out)
  docs = sorted(ours["samples"]["jp_roll"], key=lambda s: s["doc_id"])
  for doc, sample in zip(wikitext_documents(), docs, strict=True):
    ids = torch.as_tensor([[tok.bos_token_id, *tok.encode(doc)]])
    with torch.inference_mode():
      lp = ref(ids).logits.log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None]).sum().item()
    assert sample["resps"][0][0] == pytest.approx(lp, abs=SMOL_ABS)
  print(f"\ndense: max |loglikelihood gap| jaxprune vs hf = {worst:.2e}; "
        f"acc {ours['results']['jp_mc']['acc,none']:.2f}")
  assert ours["results"]["jp_mc"]["acc,none"] > 0.25  # above chance on these easy items: a working model


def transformers_float64(path):
  import transformers

  return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()


@pytest.mark.smollm2
def test_smollm2_pruned_matches_hf_backend(smol, smol_tasks, tmp_path):
  from jaxprune.io.export import save_hf
  from jaxprune.surgery import prune_model

  pruned = prune_model(smol, *keep_uniform(smol.spec))
  out = str(tmp_path / "pruned")
  save_hf(pruned, out, dtype="float32")
  # Both read the export: `--model jaxprune --model_args pretrained=OUT` against `--model hf`.
  ours, theirs = evaluate_both(("jaxprune", f"pretrained={out}"), out, smol_tasks)
  worst = compare_runs(ours, theirs)
  print(f"\npruned: max |loglikelihood gap| jaxprune vs hf = {worst:.2e}")
  assert ours["config"]["model_num_parameters"] == pruned.num_params
