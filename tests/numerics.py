"""Derived numeric tolerances: bounds that hold on any x86-64 CPU.

Float32 kernels differ between CPUs (instruction set, GEMM blocking, FMA or not), so
no bound in the suite may be fitted to the errors one machine happens to show. Two
kinds of bound are used, and every tolerance in the tests names which one it is.

1. A priori, for short computations (a sum, a Gram matrix, a criterion formula):
   a float32 sum of n terms, in any order, with or without FMA, satisfies
       |fl(sum) - sum| <= gamma(n) * sum(|terms|),   gamma(n) = n u / (1 - n u),
   u = 2^-24 the float32 unit roundoff (Higham, "Accuracy and Stability of
   Numerical Algorithms", 2nd ed., eq. 3.5 and Lemma 3.1). A chain of k such
   steps composes to gamma(n_1 + ... + n_k) when every term is nonnegative. These
   are worst cases, so they hold whatever order a CPU's kernel sums in.

2. A float64 yardstick, for deep computations (a whole forward pass), where a priori
   bounds are astronomically loose. The same model run in float64 is the reference;
   PyTorch's float32 run, measured in the same process on the same CPU, gives the
   float32 error growth of this network on this CPU, e_ref = max|torch32 - ref64|.
   jaxprune's float32 error must stay within FACTOR * e_ref (plus a floor of a few
   roundings of the output's magnitude, for when PyTorch happens to be nearly exact).
   Why FACTOR = 4: both engines evaluate the same graph in float32, so to first
   order each error is J @ delta, the per-operation rounding errors delta carried
   through the same Jacobians J. Per operation the two engines differ only in the
   order they accumulate an n-term dot product: 8- or 16-lane SIMD blocks (XLA's
   dot emitter, oneDNN, Eigen) against each other or against a sequential sum. For
   independent roundings the error of a sum scales with the square root of the
   longest sequential chain, so lane widths of 1 vs 8 change it by at most sqrt(8)
   = 2.8; 4 leaves room for the maximum over many outputs. When the CPU rounds
   differently both errors move together, so the bound moves with them.
   Since |jax - torch| <= |jax - ref| + |torch - ref|, the direct gap between the
   two float32 engines is then at most (FACTOR + 1) * e_ref + floor.

Set JAXPRUNE_TOLERANCE_LOG=FILE to append every yardstick check (observed error,
bound and their ratio) to FILE as JSON lines.
"""

from __future__ import annotations

import json
import os

import numpy as np

U32 = 2.0**-24  # float32 unit roundoff
FACTOR = 4.0  # see point 2 of the module docstring
FLOOR_ULPS = 8.0  # roundings of the output's magnitude allowed even when the yardstick is ~0


def gamma(n: int | float) -> float:
  """Higham's gamma_n for float32: the worst-case relative error of an n-term sum."""
  nu = float(n) * U32
  if nu >= 1:
    raise ValueError(f"gamma({n}) is undefined: n * u >= 1")
  return nu / (1 - nu)


def sum_bound(abs_terms: np.ndarray, n: int) -> np.ndarray:
  """Elementwise worst-case error of float32 sums whose |terms| sum to `abs_terms` (n terms each)."""
  return gamma(n) * np.asarray(abs_terms, np.float64)


def assert_within(got, exact, bound, what: str):
  """|got - exact| <= bound elementwise, with the worst ratio in the message (and the log)."""
  got, exact = np.asarray(got, np.float64), np.asarray(exact, np.float64)
  assert got.shape == exact.shape, f"{what}: shape {got.shape} != {exact.shape}"
  bound = np.broadcast_to(np.asarray(bound, np.float64), got.shape) + 1e-300
  err = np.abs(got - exact)
  ratio = err / bound
  _log(what, float(err.max()), float(bound.max()), float(ratio.max()))
  assert ratio.max() <= 1.0, f"{what}: error {err.max():.3g} exceeds its derived bound (worst ratio {ratio.max():.3g})"


def assert_within_sum_bound(got, exact, abs_terms, n: int, what: str):
  """|got - exact| <= gamma(n) * abs_terms elementwise (point 1)."""
  assert_within(got, exact, sum_bound(abs_terms, n), f"{what} [gamma({n})]")


def yardstick_errors(got32, other32, ref64) -> dict:
  """The errors point 2 compares: of got32 and of other32 (the yardstick engine) against
  ref64, the bound FACTOR * err_other + floor, and the direct gap between the two."""
  ref = np.asarray(ref64, np.float64)
  got, other = np.asarray(got32), np.asarray(other32)
  e_got = float(np.max(np.abs(got - ref)))
  e_ref = float(np.max(np.abs(other - ref)))
  floor = FLOOR_ULPS * U32 * float(np.max(np.abs(ref)))
  gap = float(np.max(np.abs(got.astype(np.float64) - other)))
  bound = FACTOR * e_ref + floor
  return dict(err_jax=e_got, err_torch=e_ref, floor=floor, bound=bound, ratio=e_got / bound, gap=gap,
              gap_bound=(FACTOR + 1) * e_ref + floor)


def check_yardstick(errors: dict, what: str) -> dict:
  """Asserts point 2 on yardstick_errors' result (and logs it)."""
  e = errors
  _log(what, e["err_jax"], e["bound"], e["ratio"], gap=e["gap"])
  assert e["err_jax"] <= e["bound"], (
      f"{what}: jaxprune's float32 error vs float64 is {e['err_jax']:.3g}, above {FACTOR:g} x PyTorch's float32 "
      f"error {e['err_torch']:.3g} + floor {e['floor']:.3g}")
  return e


def float32_yardstick(got32, other32, ref64, what: str) -> dict:
  """Checks point 2: max|got32 - ref64| <= FACTOR * max|other32 - ref64| + floor.

  Args:
    got32: jaxprune's float32 result.
    other32: the yardstick engine's float32 result (PyTorch) for the same inputs.
    ref64: the same computation in float64.
  Returns:
    dict with the errors, the bound and their ratio (also logged, see module docstring).
  """
  return check_yardstick(yardstick_errors(got32, other32, ref64), what)


def _log(what: str, observed: float, bound: float, ratio: float, **extra):
  path = os.environ.get("JAXPRUNE_TOLERANCE_LOG")
  if path:
    with open(path, "a") as f:
      f.write(json.dumps({"what": what, "observed": observed, "bound": bound, "ratio": ratio, **extra}) + "\n")


def torch_logits_pair(path: str, tokens) -> tuple[np.ndarray, np.ndarray]:
  """transformers' float32 and float64 logits of the HF model at `path` (the yardstick's two runs)."""
  import torch
  import transformers

  out = []
  for dtype in (torch.float32, torch.float64):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()
    with torch.no_grad():
      out.append(model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy().astype(np.float64))
  return out[0], out[1]


def forward_bound(path: str, tokens, pair=None) -> float:
  """How far a float32 forward of the model at `path` may lie from the exact logits.

  Point 2's bound for one float32 engine, FACTOR * e_ref + floor, with e_ref
  PyTorch's float32 error measured now on this CPU. Two float32 forwards of the
  same function (a pruned model and its zeroed twin, two batch sizes) then differ by
  at most twice this.
  """
  t32, t64 = pair if pair is not None else torch_logits_pair(path, tokens)
  return FACTOR * float(np.max(np.abs(t32 - t64))) + FLOOR_ULPS * U32 * float(np.max(np.abs(t64)))


def nll_bound(logit_bound: float, positions: int, vocab: int, logit_scale: float) -> float:
  """Bound on a summed next-token NLL over `positions` tokens when every logit may be off by
  `logit_bound`: z_y - logsumexp(z) moves by at most 2 * logit_bound, and float32
  log-softmax adds gamma(vocab + 16) relative to |z_y| + |logsumexp| <= 2 (logit_scale + ln vocab)."""
  per_token = 2 * logit_bound + gamma(vocab + 16) * 2 * (logit_scale + np.log(vocab))
  return positions * per_token
