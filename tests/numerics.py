"""Derived numeric tolerances: bounds that hold on any x86-64 CPU, by construction.

Float32 kernels differ between CPUs (instruction set, GEMM blocking, FMA or not,
threads), so no bound in the suite may be fitted to the errors one machine shows, nor
measured against another library's float32 kernels on the machine at hand (that
yardstick moves with the CPU: issue 27). Two kinds of bound are used, and every
tolerance in the tests names which one it is.

1. A priori, for short computations (a sum, a Gram matrix, a criterion formula):
   a float32 sum of n terms, in any order, with or without FMA, satisfies
       |fl(sum) - sum| <= gamma(n) * sum(|terms|),   gamma(n) = n u / (1 - n u),
   u = 2^-24 the float32 unit roundoff (Higham, "Accuracy and Stability of
   Numerical Algorithms", 2nd ed., eq. 3.5 and Lemma 3.1). A chain of k such
   steps composes to gamma(n_1 + ... + n_k) when every term is nonnegative. These
   are worst cases, so they hold whatever order a CPU's kernel sums in.

2. The model's own sensitivity, for deep computations (a whole forward pass), where
   a priori bounds are astronomically loose. Backward-error view: a float32 forward
   pass is, to first order, the exact forward of the same graph in which every
   stored value (each weight, each activation written between operations) carries
   a relative error delta with |delta| <= u, and every n-term dot product carries a
   backward error on its inputs of about sqrt(n) u (Higham & Mary, "A new approach
   to probabilistic rounding error analysis", SISC 2019: independent, mean-zero
   roundings; blocked or SIMD sums only shorten the chains). Its error is then
   e = sum_i a_i delta_i, a linear image of the roundings, whatever kernel a CPU uses.

   `sensitivity` measures that linear map in float64 (transformers' eager model,
   forward hooks only in the tests): K runs, each with every weight of a dot product
   times (1 + sqrt(n_in) u xi), every other parameter (of an embedding table, the rows
   the tokens read) and every module's input and
   output times (1 + u xi), the attention matmuls' left operands times
   (1 + sqrt(n) u xi), softmax and norms given also a per-row factor
   (1 + sqrt(n) u xi) for their same-signed sums (a mean of squares, a denominator),
   and RoPE's angles pos * inv_freq turned by pos u xi (their absolute rounding),
   xi independent random signs. Random signs have variance 1, the largest of any
   distribution on [-1, 1], so for every output j the sample's standard deviation
   sigma_j bounds that of the real float32 error. S is the largest |perturbed -
   exact| over the K runs and all N outputs.

   The bound |f32 - exact| <= M S + floor with M = t / c:
   - t = sqrt(2 ln(2 N / DELTA)): by Hoeffding (bounded independent roundings) every
     one of the N outputs has |e_j| <= t sigma_j <= t sigma_max except with
     probability DELTA;
   - c = DELTA^(1/K) / sqrt(2/pi): the most sensitive output's perturbation is a sum
     of very many independent terms, nearly Gaussian, whose density is at most
     1/(sigma_max sqrt(2 pi)); so all K samples fall below c sigma_max with
     probability at most (c sqrt(2/pi))^K = DELTA, and S >= c sigma_max otherwise.
   With DELTA = 1e-6, K = 6 and N up to 1e8 logits, M = 65 (see `multiple`). The
   floor, FLOOR_ULPS roundings of the largest output, covers a perturbation that the
   first-order view misses when S is ~0 (a model whose logits do not depend on the
   inputs). Two float32 engines (JAX and PyTorch) then differ by at most
   2 (M S + floor). Nothing here is fitted: the bound moves only with the model
   and the inputs, never with the CPU.

   Gradients (`sensitivity_of` with grad_rows) are perturbed the same way in the
   backward pass: each gradient a leaf module passes back by sqrt(its output width) u,
   each parameter's gradient by sqrt(tokens) u. Inside attention (the backward of
   softmax and of its matmuls) only the forward perturbations reach the gradient, so
   there S may miss roundings of the backward pass alone; the measured ratios
   (benchmarks/tolerance_isa.py) stay two orders of magnitude below 1.

   The same multiple bounds reorderings: where a result (a pruning run on a mesh)
   is too long a computation to perturb, K runs of the same sums in other orders
   (permuted windows) are K samples of the rounding. Given the first run, each
   spread (another run minus the first) is a sample at one run's scale sigma, so
   their largest is >= c sigma; another ordering (the mesh) is within t sigma of
   exact, as is the first, so the two differ by at most 2 M times the largest
   spread (`reordering_bound`).

Set JAXPRUNE_TOLERANCE_LOG=FILE to append every check (observed error, bound and
their ratio) to FILE as JSON lines.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os

import numpy as np

U32 = 2.0**-24  # float32 unit roundoff
DELTA = 1e-6  # probability that one check of point 2 fails although the code is right
SAMPLES = 6  # perturbed float64 runs per sensitivity (K in point 2)
FLOOR_ULPS = 8.0  # roundings of the output's magnitude allowed even when S is ~0


def gamma(n: int | float) -> float:
  """Higham's gamma_n for float32: the worst-case relative error of an n-term sum."""
  nu = float(n) * U32
  if nu >= 1:
    raise ValueError(f"gamma({n}) is undefined: n * u >= 1")
  return nu / (1 - nu)


def multiple(outputs: int, samples: int = SAMPLES, delta: float = DELTA) -> float:
  """M of point 2: max_j |e_j| <= M * (largest of `samples` sampled |s_j|), except with probability ~delta."""
  t = math.sqrt(2 * math.log(2 * outputs / delta))
  c = delta**(1 / samples) / math.sqrt(2 / math.pi)
  return t / c


def sum_bound(abs_terms: np.ndarray, n: int) -> np.ndarray:
  """Elementwise worst-case error of float32 sums whose |terms| sum to `abs_terms` (n terms each)."""
  return gamma(n) * np.asarray(abs_terms, np.float64)


def assert_within(got, exact, bound, what: str, **extra):
  """|got - exact| <= bound elementwise, with the worst ratio in the message (and the log)."""
  got, exact = np.asarray(got, np.float64), np.asarray(exact, np.float64)
  assert got.shape == exact.shape, f"{what}: shape {got.shape} != {exact.shape}"
  bound = np.broadcast_to(np.asarray(bound, np.float64), got.shape) + 1e-300
  err = np.abs(got - exact)
  ratio = err / bound
  _log(what, float(err.max()), float(bound.max()), float(ratio.max()), **extra)
  assert ratio.max() <= 1.0, f"{what}: error {err.max():.3g} exceeds its derived bound (worst ratio {ratio.max():.3g})"


def assert_within_sum_bound(got, exact, abs_terms, n: int, what: str):
  """|got - exact| <= gamma(n) * abs_terms elementwise (point 1)."""
  assert_within(got, exact, sum_bound(abs_terms, n), f"{what} [gamma({n})]")


def reordering_bound(first, spreads) -> float:
  """Point 2 for reorderings: how far another ordering may move `first` (an array or a number),
  2 multiple(N, K) max|spreads| + floor, `spreads` the K differences between `first` and the
  same computation in other orders."""
  first = np.asarray(first, np.float64)
  spread = max(float(np.max(np.abs(s))) for s in spreads)
  return 2 * multiple(first.size, len(spreads)) * spread + FLOOR_ULPS * U32 * float(np.max(np.abs(first)))


def assert_reordering(got: float, first: float, spreads, what: str):
  """|got - first| <= reordering_bound(first, spreads)."""
  bound = reordering_bound(first, spreads)
  assert_within(got, first, bound, f"{what} [reordering, K={len(spreads)}]")


@dataclasses.dataclass(frozen=True)
class Sensitivity:
  """A model's float64 outputs on some inputs and how far float32 rounding may move them (point 2).

  Attributes:
    exact: float64 outputs of the unperturbed model.
    spread: S, the largest |perturbed - exact| over the sampled runs.
    samples: how many perturbed runs gave `spread`.
  """

  exact: np.ndarray
  spread: float
  samples: int

  @property
  def bound(self) -> float:
    """How far one float32 evaluation of these outputs may lie from `exact`."""
    floor = FLOOR_ULPS * U32 * float(np.max(np.abs(self.exact)))
    return multiple(self.exact.size, self.samples) * self.spread + floor

  def check(self, got32, what: str) -> float:
    """Asserts max |got32 - exact| <= bound; returns the error."""
    err = float(np.max(np.abs(np.asarray(got32, np.float64) - self.exact)))
    assert_within(err, 0.0, self.bound, f"{what} [sensitivity]", spread=self.spread)
    return err

  def check_pair(self, a32, b32, what: str) -> float:
    """Asserts two float32 evaluations (two engines, two batchings) differ by at most 2 bounds."""
    gap = float(np.max(np.abs(np.asarray(a32, np.float64) - np.asarray(b32, np.float64))))
    assert_within(gap, 0.0, 2 * self.bound, f"{what} [sensitivity, two float32 runs]", spread=self.spread)
    return gap

  def check_engines(self, jax32, torch32, what: str):
    """Parity of two float32 engines: each within the bound of exact, and of each other."""
    self.check(jax32, f"{what} jax")
    self.check(torch32, f"{what} torch")
    self.check_pair(jax32, torch32, what)


def sensitivity(model, tokens, samples: int = SAMPLES, seed: int = 0) -> Sensitivity:
  """Point 2's S for a transformers causal LM on `tokens` [B,T].

  Args:
    model: a path to load, or a torch model (copied to float64; a float64 one is used as it is,
      switched to eager attention).
    tokens: int token ids [B,T].
    samples: perturbed runs (K).
  """
  import torch

  with torch.no_grad():  # autograd would keep every layer's activations (~10 GB for SmolLM2)
    return sensitivity_of(_float64_model(model), lambda m: m(_ids(tokens)).logits, samples, seed)


def forward_bound(model, tokens) -> float:
  """How far one float32 forward of `model` (a path or a torch model) on `tokens` may lie from the
  exact logits (point 2). Two float32 forwards of the same function (a pruned model and its
  zeroed twin, two batch sizes) then differ by at most twice this."""
  return sensitivity(model, tokens).bound


def sensitivity_of(model64, run, samples: int = SAMPLES, seed: int = 0, grad_rows: int | None = None):
  """S of `run(model64)`, a float64 tensor or a list of them (then one Sensitivity each), the model
  perturbed as point 2 says. With `grad_rows` (tokens a weight gradient sums over), `run` may
  backpropagate: the backward pass's stored gradients and dot products are perturbed too."""
  import torch

  with _eager_softmax(None):
    first = run(model64)
  exact = [_numpy(t) for t in _as_list(first)]
  spread = [0.0] * len(exact)
  for k in range(samples):
    gen = torch.Generator().manual_seed(seed * 1000 + k)
    with _perturbed(model64, gen, grad_rows), _eager_softmax(gen), _perturbed_matmul(gen):
      outs = _as_list(run(model64))
    spread = [max(s, float(np.max(np.abs(_numpy(o) - e)))) for s, o, e in zip(spread, outs, exact, strict=True)]
  sens = [Sensitivity(e, s, samples) for e, s in zip(exact, spread, strict=True)]
  return sens if isinstance(first, (list, tuple)) else sens[0]


def _as_list(out) -> list:
  return list(out) if isinstance(out, (list, tuple)) else [out]


def _ids(tokens):
  import torch

  return torch.as_tensor(np.asarray(tokens), dtype=torch.long)


def _numpy(t) -> np.ndarray:
  return np.asarray(t.detach().numpy() if hasattr(t, "detach") else t, np.float64)


def _float64_model(model):
  """A float64 eager-attention copy of `model` (a path or a torch model)."""
  import torch
  import transformers

  if isinstance(model, str):
    model = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float64,
                                                              attn_implementation="eager")
  elif next(model.parameters()).dtype != torch.float64:
    model = copy.deepcopy(model).to(torch.float64)
  for m in model.modules():  # per-layer exports keep a config per layer
    cfg = getattr(m, "config", None)
    if cfg is not None and hasattr(cfg, "_attn_implementation"):
      cfg._attn_implementation = "eager"
  return model.eval()


def _signs(gen, shape):
  import torch

  return torch.randint(0, 2, tuple(shape), generator=gen, dtype=torch.float64) * 2 - 1


def _jitter(x, gen, scale: float):
  """x * (1 + scale * u * xi), xi random signs; non-float values pass through.

  The factor takes two values only, so it is picked per element from the two, computed as
  1 + scale * u * (+-1) in x's dtype: the same numbers, from the same draws of `gen` (randint's
  stream does not depend on its dtype), as forming the signs in float64 and the factor from them,
  without the four passes over every weight that made this most of a sensitivity's time.
  """
  import torch

  if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
    return x
  lo, hi = 1 + scale * U32 * torch.tensor([-1.0, 1.0], dtype=torch.float64).to(x.dtype)
  return x * torch.where(torch.randint(0, 2, tuple(x.shape), generator=gen, dtype=torch.bool), hi, lo)


def _row_jitter(x, gen):
  """x times one (1 + sqrt(n) u xi) per row: the rounding of a sum over the last axis, shared by the row."""
  import torch

  if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
    return x
  return x * (1 + math.sqrt(x.shape[-1]) * U32 * _signs(gen, (*x.shape[:-1], 1)).to(x.dtype))


def _fan_in(module) -> int:
  """The contraction length of a module's weight (Linear: in_features; GPT-2's Conv1D: rows)."""
  import torch

  if isinstance(module, torch.nn.Linear):
    return module.in_features
  if type(module).__name__ == "Conv1D":
    return module.weight.shape[0]
  return 1


@contextlib.contextmanager
def _perturbed(model, gen, grad_rows: int | None = None):
  """Hooks that perturb every leaf module's parameters, inputs and outputs, and every module's output;
  with `grad_rows`, also each gradient a leaf module passes back (a dot product over its output
  width) and each parameter's gradient (a sum over `grad_rows` tokens)."""
  handles = [] if grad_rows is None else _backward_hooks(model, gen, grad_rows)
  for module in model.modules():
    if "Rotary" in type(module).__name__:
      handles.append(module.register_forward_hook(lambda m, a, kw, out: _turn(out, a, kw, gen), with_kwargs=True))
      continue
    is_norm = "Norm" in type(module).__name__
    handles.append(module.register_forward_hook(lambda m, a, out, n=is_norm: _jitter_output(out, gen, n)))
    if not list(module.children()):
      handles.append(module.register_forward_pre_hook(lambda m, a: _enter_leaf(m, a, gen)))
      handles.append(module.register_forward_hook(lambda m, a, out: _leave_leaf(m)))
  try:
    yield
  finally:
    for h in handles:
      h.remove()
    for module in model.modules():
      _leave_leaf(module)


def _backward_hooks(model, gen, grad_rows: int) -> list:
  handles = []
  for module in model.modules():
    # An embedding's input is token ids: it passes no gradient back.
    if not list(module.children()) and not any(k in type(module).__name__ for k in ("Rotary", "Embedding")):
      width = module.out_features if hasattr(module, "out_features") else _fan_out(module)
      handles.append(module.register_full_backward_hook(
          lambda m, gin, gout, n=width: tuple(_jitter(g, gen, math.sqrt(n)) for g in gin)))
  for p in model.parameters():
    handles.append(p.register_hook(lambda g: _jitter(g, gen, math.sqrt(grad_rows))))
  return handles


def _fan_out(module) -> int:
  """The width a leaf module's input gradient sums over (GPT-2's Conv1D: its columns; else elementwise)."""
  return module.weight.shape[1] if type(module).__name__ == "Conv1D" else 1


def _enter_leaf(module, args, gen):
  """Swaps in perturbed parameters (kept until _leave_leaf) and perturbs the first input."""
  import torch

  if isinstance(module, torch.nn.Embedding):
    _enter_lookup(module, args[0], gen)
    return args
  saved = {}
  for name, p in module.named_parameters(recurse=False):
    saved[name] = p.data
    scale = math.sqrt(_fan_in(module)) if name == "weight" else 1.0
    p.data = _jitter(p.data, gen, scale)
  module._numerics_saved = saved
  return (_jitter(args[0], gen, 1.0), *args[1:]) if args else args


def _enter_lookup(module, ids, gen):
  """An embedding table's output is the rows its ids read, so only those are perturbed: each
  once, however often it is read (a stored value is rounded once), in place, and put back by
  _leave_leaf. Rows it does not read cannot move the output; perturbing every row was most of
  a sensitivity's time with Gemma 3's 262k-row table (read by 129 tokens). Its input, token
  ids, is exact."""
  import torch

  weight = module.weight.data
  rows = torch.unique(ids)
  module._numerics_rows = (rows, weight[rows])
  weight[rows] = _jitter(weight[rows], gen, 1.0)


def _leave_leaf(module):
  saved = module.__dict__.pop("_numerics_saved", None)
  for name, data in (saved or {}).items():
    getattr(module, name).data = data
  rows = module.__dict__.pop("_numerics_rows", None)
  if rows is not None:
    module.weight.data[rows[0]] = rows[1]


def _turn(out, args, kwargs, gen):
  """RoPE's (cos, sin) at angles theta (1 + u xi): the float32 angle pos * inv_freq is off by up to
  pos u (inv_freq <= 1), an absolute error that grows with the position."""
  cos, sin = out
  pos = (kwargs.get("position_ids") if "position_ids" in kwargs else args[1]).to(cos.dtype)
  turn = pos[..., None] * U32 * _signs(gen, cos.shape).to(cos.dtype)
  return cos - sin * turn, sin + cos * turn


def _jitter_output(out, gen, is_norm: bool):
  import torch

  if isinstance(out, torch.Tensor):
    out = _jitter(out, gen, 1.0)
    return _row_jitter(out, gen) if is_norm else out
  if isinstance(out, tuple) and not hasattr(out, "_fields"):
    return tuple(_jitter_output(o, gen, is_norm) if isinstance(o, torch.Tensor) else o for o in out)
  return out  # ModelOutput and caches: their tensors were perturbed where they were computed


@contextlib.contextmanager
def _eager_softmax(gen):
  """softmax in the input's dtype (transformers' eager Llama asks for float32, which would round the
  float64 reference), and with `gen` also perturbed: its input rounded twice (scale, mask), its
  output once, and its denominator, a same-signed sum, per row."""
  import torch

  original = torch.nn.functional.softmax

  def softmax(x, dim=None, _stacklevel=3, dtype=None):
    if gen is None:
      return original(x, dim=dim)
    p = original(_jitter(x, gen, 2.0), dim=dim)
    return _row_jitter(_jitter(p, gen, 1.0), gen)

  torch.nn.functional.softmax = softmax
  try:
    yield
  finally:
    torch.nn.functional.softmax = original


@contextlib.contextmanager
def _perturbed_matmul(gen):
  """Attention's matmuls (scores, probabilities times values) are not modules: their left
  operand gets the n-term dot product's backward error, sqrt(n) u."""
  import torch

  original = torch.matmul

  def matmul(a, b, **kw):
    return original(_jitter(a, gen, math.sqrt(a.shape[-1])), b, **kw)

  torch.matmul = matmul
  try:
    yield
  finally:
    torch.matmul = original


def nll_bound(logit_bound: float, positions: int, vocab: int, logit_scale: float) -> float:
  """Bound on a summed next-token NLL over `positions` tokens when every logit may be off by
  `logit_bound`: z_y - logsumexp(z) moves by at most 2 * logit_bound, and float32
  log-softmax adds gamma(vocab + 16) relative to |z_y| + |logsumexp| <= 2 (logit_scale + ln vocab)."""
  per_token = 2 * logit_bound + gamma(vocab + 16) * 2 * (logit_scale + np.log(vocab))
  return positions * per_token


def _log(what: str, observed: float, bound: float, ratio: float, **extra):
  path = os.environ.get("JAXPRUNE_TOLERANCE_LOG")
  if path:
    with open(path, "a") as f:
      f.write(json.dumps({"what": what, "observed": observed, "bound": bound, "ratio": ratio, **extra}) + "\n")
