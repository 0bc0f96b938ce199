"""Tiny random Qwen3 and Gemma 3 models through jaxprune's GGUF export in a real llama.cpp: logits.

    nice -n 5 python benchmarks/llama_cpp_tiny.py   # writes benchmarks/results/llama_cpp_tiny.json

What Gemma-3-270M does not exercise (benchmarks/llama_cpp_gemma.py) and Qwen3 at all: a window
on layers no period describes (written as per-layer flags), a local RoPE base other than 10k,
the logit soft-cap, q/k norms without Gemma's offset. Protocol: tests/tiny.py's "qwen3" and
"gemma3_cpp" models (seed 0) with the vocabulary of a real GGUF (SmolLM2-135M's 49152 tokens,
Gemma-3-270M's 262144), whose tokenizer the export copies (llama.cpp needs one; the logits do
not depend on it), dense and pruned to one shape in every layer (tests/test_gguf_export_qk_norm.py's
`uniform`), exported at f32 and run in llama.cpp (benchmarks/llama_cpp.py's build, one thread,
f32 KV cache). Two sequences of 32 random tokens (four times the window of 8), each fed alone from
an empty cache with every position's logits returned, against `jaxprune.logits` on the same
tokens. Reported: max |llama.cpp - jaxprune| over max |logit|; and, as controls that the
comparison can fail, the same against jaxprune with one piece changed (Gemma: no window, the
global RoPE base on the sliding layers, no soft-cap, the window on every layer; Qwen3: q/k norm
scales of 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from llama_cpp_gemma import _llama_cpp_bench  # noqa: E402
from quality import git_state  # noqa: E402
from tests import tiny  # noqa: E402
from tests.test_gguf_export_qk_norm import uniform  # noqa: E402

KINDS = {"qwen3": "smollm2-135m", "gemma3_cpp": "gemma3-270m"}  # tiny kind -> the GGUF lending its tokenizer
LENGTH, SEQUENCES = 32, 2


def llama_cpp_logits(binding, path: str, tokens: np.ndarray) -> np.ndarray:
  f32 = binding.GGML_TYPE_F32
  T = tokens.shape[1]
  llm = binding.Llama(model_path=path, n_ctx=T, n_batch=T, n_ubatch=T, logits_all=True, n_threads=1,
                      n_threads_batch=1, type_k=f32, type_v=f32, verbose=False)
  out = []
  for row in tokens:
    llm.reset()
    llm.eval([int(t) for t in row])
    out.append(np.array(llm.scores[:T], np.float32))
  del llm
  return np.stack(out)


def controls(model) -> dict:
  """The same model computing something else, one piece changed: what the comparison must tell apart."""
  import jax
  import jax.numpy as jnp

  from jaxprune.model import Model

  spec = model.spec
  if spec.sliding_window is None:  # Qwen3: q/k norm scales of 1
    layers = tuple(jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.ones_like(x) if "q_norm" in jax.tree_util.keystr(p) or "k_norm" in jax.tree_util.keystr(p)
        else x, blk) for blk in model.params["layers"])
    return {"q/k norm scales of 1": Model(spec, {**model.params, "layers": layers}, model.source)}
  changed = {"no window": dict(sliding_window=None), "global RoPE base on the sliding layers": dict(rope_local=None),
             "no logit soft-cap": dict(final_softcap=None),
             "window on every layer": dict(sliding_layers=tuple(range(spec.num_layers)))}
  return {name: Model(dataclasses.replace(spec, **c), model.params, model.source) for name, c in changed.items()}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--cache", default=os.path.expanduser("~/.cache/jaxprune/llama.cpp"))
  ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "llama_cpp_tiny.json"))
  args = ap.parse_args(argv)
  import tempfile

  import jaxprune
  from jaxprune.io.atomic import write_json
  from jaxprune.io.gguf_export import save_gguf
  from jaxprune.io.locate import resolve
  from jaxprune.model import Model

  lc = _llama_cpp_bench()
  sdist, bin_dir = lc.build(args.cache, ("llama",))
  binding = lc.llama_binding(sdist, bin_dir)
  rows = {}
  with tempfile.TemporaryDirectory() as tmp:
    for kind, lender in KINDS.items():
      source = resolve(lender).path
      vocab = jaxprune.load(source, lazy=True).spec.vocab_size
      tiny.build(kind, vocab=vocab).save_pretrained(os.path.join(tmp, kind))
      dense = jaxprune.load(os.path.join(tmp, kind))
      tokens = np.random.default_rng(0).integers(0, vocab, (SEQUENCES, LENGTH))
      for layout, model in (("dense", dense), ("uniform", uniform(dense))):
        model = Model(model.spec, model.params, source)  # the tokenizer comes from `source`
        info = save_gguf(model, os.path.join(tmp, f"{kind}-{layout}.gguf"), force=True)
        got = llama_cpp_logits(binding, info.path, tokens)
        want = np.asarray(jaxprune.logits(model.spec, model.params, tokens))
        scale = float(np.abs(want).max())
        others = {name: np.asarray(jaxprune.logits(m.spec, m.params, tokens)) for name, m in controls(model).items()}
        rows[f"{kind} {layout}"] = {
            "architecture": info.architecture, "tokenizer_from": lender, "vocab": vocab,
            "layers": [dataclasses.asdict(l) for l in model.spec.layers],
            "max_abs_logit": scale,
            "relative_max_difference": float(np.abs(got - want).max()) / scale,
            "controls_relative_max_difference": {n: float(np.abs(got - o).max()) / scale for n, o in others.items()},
        }
        print(kind, layout, {k: v for k, v in rows[f"{kind} {layout}"].items() if "difference" in k}, flush=True)
  write_json(args.out, {"benchmark": "llama_cpp_tiny", "protocol": __doc__.split("\n\n", 2)[2].strip(),
                        "tokens": [SEQUENCES, LENGTH], "llama_cpp": os.path.basename(sdist), "rows": rows,
                        **git_state(ROOT, exclude=(args.out,))}, force=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
