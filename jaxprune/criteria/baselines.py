"""Baseline criteria (docs/method.md section 7) behind the one criterion signature.

Every baseline is `score(kind, module_params, stats) -> f32[units]` (lowest
removed first), so it runs through the same pipeline, allocation and
evaluation as the paper's method. Each follows the convention of the tool it
stands for, so that numbers are comparable:

  random            uniform scores, seeded by (run seed, layer, module kind).
  l1 / l2           LLM-Pruner's `MagnitudeImportance(p)`: sum of |w|^p over
                    every weight the unit owns (p=2: the squared L2 norm, which
                    ranks like the norm).
  wanda-sp          FLAP's `prune_wanda_sp`: on the second level only,
                    mean over outputs of |W2[j, :]| times sqrt(E[x2_j^2]) per
                    input channel j of o_proj / down_proj; a head sums its H
                    channels.
  flap              FLAP's `WIFV` metric: Var[x2_j] * ||W2[j, :]||^2 per
                    channel, squared for attention channels (as FLAP does for
                    o_proj), standardized over the module's channels and
                    averaged over a head's (FLAP's AL-AM scores; within a
                    module the same order as its UL-UM head sums). The bias
                    compensation is the pipeline's `compensate=True` (on by
                    default for --method flap in the CLI).
  taylor-element1   LLM-Pruner `param_first`: sum over the unit's weights of |w g|.
  taylor-element2   LLM-Pruner `param_mix` (its "Element2", the README's
                    default): sum of |w g - 1/2 w^2 F|, F = mean over
                    calibration samples of the squared per-sample gradient.
  taylor-vector     LLM-Pruner `vectorize`: per linear layer and per channel,
                    |sum of w g| over that channel's weights, summed over the
                    unit's channels and layers.

What a unit owns. An MLP channel j: column j of W_gate and W_up (and their
bias entries), row j of W_down. A query head i: its W_Q columns q[:, i, :]
(and q-bias), its W_O rows o[i]; and, under GQA, a 1/G share of its KV head
(the k and v columns and biases), G being the number of query heads that read
that KV head. Under MHA this is exactly LLM-Pruner's head group (q, k, v, o);
under GQA the shares of a group's heads add up to the whole KV head, which is
what leaves the model when the group goes, and a constant share does not
change the choice of heads inside a group. (The o-projection bias serves the
whole module and belongs to no unit.) Biases count as owned weights for the
magnitude and Taylor scores; LLM-Pruner ignores biases, which LLaMA-family
models do not have anyway.

Taylor gradients are computed once, on the dense model, by the criterion's
`prepare` hook (`jax.grad` of the mean next-token cross entropy over the
calibration windows, accumulated batch by batch), as LLM-Pruner does; the
greedy pipeline then scores each module's current weights against them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.criteria.registry import register
from jaxprune.criteria.stats import ModuleStats
from jaxprune.errors import UsageError
from jaxprune.models import adapter as A
from jaxprune.models import layers as L
from jaxprune.models.forward import block_step, embed, head, head_params
from jaxprune.spec import ModelSpec, Params

F32 = jnp.float32

# ---------------------------------------------------------------------------
# Sums over what a unit owns


def _channel_sums(kind: A.ModuleKind, p: Params, elem) -> dict[str, jax.Array]:
  """Per linear layer, `elem(key, leaf, w)` summed over each output (first level)
  or input (second level) channel's weights, biases included.

  Returns attention: {"q": [N,H], "k": [K,H], "v": [K,H], "o": [N,H]};
  MLP: {"gate": [F], "up": [F], "down": [F]} (no "gate" for GPT-2).
  """
  out = {}
  for k in kind.first_keys(p):
    s = jnp.sum(elem(k, "kernel", p[k]["kernel"]), axis=0)  # [D,n,H] -> [n,H]; [D,F] -> [F]
    if "bias" in p[k]:
      s = s + elem(k, "bias", p[k]["bias"])
    out[k] = s
  k = kind.second_key
  out[k] = jnp.sum(elem(k, "kernel", p[k]["kernel"]), axis=-1)  # [N,H,D] -> [N,H]; [F,D] -> [F]
  return out


def _kv_of(p: Params, stats: ModuleStats) -> np.ndarray:
  N, K = p["q"]["kernel"].shape[1], p["k"]["kernel"].shape[1]
  if stats.kv_index is not None:
    return np.asarray(stats.kv_index, np.int32)
  return (np.arange(N) // (N // K)).astype(np.int32)


def _unit_sums(kind: A.ModuleKind, p: Params, stats: ModuleStats, elem, post=lambda s: s) -> jax.Array:
  """Score of each unit: `post` of every channel sum, added over the unit's
  channels and layers; a query head adds 1/G of its KV head's (see module doc)."""
  sums = {k: post(v.astype(F32)) for k, v in _channel_sums(kind, p, elem).items()}
  if kind is not A.ATTN:
    return sum(sums.values())
  kv = _kv_of(p, stats)
  size = np.bincount(kv, minlength=p["k"]["kernel"].shape[1]).astype(np.float32)
  own = jnp.sum(sums["q"], axis=-1) + jnp.sum(sums["o"], axis=-1)
  shared = jnp.sum(sums["k"], axis=-1) + jnp.sum(sums["v"], axis=-1)  # [K]
  return own + shared[kv] / jnp.asarray(size[kv])


def _f32(x):
  return x.astype(F32)


# ---------------------------------------------------------------------------
# Data-free baselines


@register("random", needs=(), description="uniform random scores, seeded by (seed, layer, module)")
def random_scores(kind: A.ModuleKind, p: Params, stats: ModuleStats):
  """Uniform random scores, reproducible from (stats.seed, stats.layer, kind)."""
  rng = np.random.default_rng([stats.seed, stats.layer, 0 if kind is A.ATTN else 1])
  return jnp.asarray(rng.random(A.num_units(kind, p)), F32)


@register("l1", needs=(), description="L1 norm of all weights a unit owns (LLM-Pruner MagnitudeImportance p=1)")
def l1(kind: A.ModuleKind, p: Params, stats: ModuleStats):
  """sum |w| over the unit's weights (heads: plus 1/G of their KV head's)."""
  return _unit_sums(kind, p, stats, lambda k, leaf, w: jnp.abs(_f32(w)))


@register("l2", needs=(), description="squared L2 norm of all weights a unit owns (LLM-Pruner MagnitudeImportance p=2)")
def l2(kind: A.ModuleKind, p: Params, stats: ModuleStats):
  """sum w^2 over the unit's weights (heads: plus 1/G of their KV head's)."""
  return _unit_sums(kind, p, stats, lambda k, leaf, w: jnp.square(_f32(w)))


# ---------------------------------------------------------------------------
# Activation-aware baselines (FLAP's code: second level only)


def _second_level_rows(kind: A.ModuleKind, p: Params) -> jax.Array:
  """W2 with one row per X2 channel: [N*H, D] (heads) or [F, D]."""
  return _f32(A.second_level(kind, p)[0])


def _need_hidden(stats: ModuleStats, name: str):
  if stats.hidden is None:
    raise UsageError(f"criterion {name!r} needs calibration statistics of the second level's input "
                     f"(score_data 'identity' has none); use score_data 'calib' or 'random'")


def _per_unit(kind: A.ModuleKind, p: Params, per_channel: jax.Array) -> jax.Array:
  """[U2] channel values -> [units] sums (heads: H channels each)."""
  return per_channel.reshape(A.num_units(kind, p), -1).sum(axis=-1)


@register("wanda-sp", needs=("hidden_sq",), description="FLAP's wanda_sp: mean|W2 row| * sqrt(E[x2^2]) per second-level channel")
def wanda_sp(kind: A.ModuleKind, p: Params, stats: ModuleStats):
  """mean_d |W2[j, d]| * sqrt(E[x2_j^2]) per channel j of X2, summed over a head's channels."""
  _need_hidden(stats, "wanda-sp")
  w = _second_level_rows(kind, p)
  metric = jnp.mean(jnp.abs(w), axis=-1) * jnp.sqrt(stats.hidden.sq_mean)
  return _per_unit(kind, p, metric)


def flap_metric(kind: A.ModuleKind, p: Params, stats: ModuleStats) -> jax.Array:
  """FLAP's per-channel metric [U2]: Var[x2_j] * ||W2[j, :]||^2, squared for attention
  (FLAP: `W_metric = WIFV ** 2` for o_proj)."""
  _need_hidden(stats, "flap")
  w = _second_level_rows(kind, p)
  metric = stats.hidden.variance * jnp.sum(jnp.square(w), axis=-1)
  return jnp.square(metric) if kind is A.ATTN else metric


@register("flap", needs=("hidden_var",), description="FLAP's fluctuation metric Var[x2] ||W2 row||^2, standardized per module "
          "(use with compensate)", prescaled=True)
def flap(kind: A.ModuleKind, p: Params, stats: ModuleStats):
  """FLAP's AL-AM score: the per-channel metric standardized over the module's
  channels (mean 0, unbiased std 1, as FLAP's `standarlization`), averaged over
  a head's channels.

  Per module this is an increasing affine map of the raw metric (of its sum
  over a head's channels), so uniform allocation removes exactly what FLAP's
  UL-UM removes; adaptive allocation then ranks units of all layers on FLAP's
  per-layer standardized scale. (Standardizing raw scores over all layers
  instead lets a few outlier layers decide: on SmolLM2 at 20% that emptied
  the early layers' attention and gave perplexity 557 where FLAP has 73.7.)
  """
  m = flap_metric(kind, p, stats)
  sd = jnp.std(m, ddof=1)
  z = (m - jnp.mean(m)) / jnp.where(sd > 0, sd, 1.0)
  return _per_unit(kind, p, z) / A.unit_width(kind, p)


# ---------------------------------------------------------------------------
# LLM-Pruner Taylor scores


def _grad_leaf(tree: Params | None, k: str, leaf: str, like):
  """The gradient leaf for parameter (k, leaf), zeros if absent (e.g. a bias
  fitted by reconstruction that the dense model did not have)."""
  if tree is not None and k in tree and leaf in tree[k] and tree[k][leaf].shape == like.shape:
    return _f32(tree[k][leaf])
  return jnp.zeros(like.shape, F32)


def _need_grads(stats: ModuleStats, name: str, second: bool = False):
  if stats.grads is None or (second and stats.sq_grads is None):
    raise UsageError(f"criterion {name!r} needs language-model gradients from its prepare() step; run it through "
                     "jaxprune.prune.prune (with uniform allocation) or pass them in ModuleStats.grads"
                     + (" and .sq_grads" if second else ""))


@functools.partial(jax.jit, static_argnames=("spec", "start", "stop", "per_sample"))
def _grad_batch(spec: ModelSpec, diff: tuple, frozen: Params, tokens, *, start: int, stop: int, per_sample: bool):
  """Gradients w.r.t. the blocks [start, stop) for one batch of windows [B, T].

  Returns (g, g2): g = gradient of the summed next-token NLL of the batch;
  g2 = sum over windows of the squared gradient of each window's *mean* NLL
  (LLM-Pruner's per-sample Fisher term), or None.
  """

  def nll_sum(diff, toks):
    layers = frozen["layers"][:start] + tuple(diff) + frozen["layers"][stop:]
    params = {**frozen, "layers": layers}
    pos = jnp.arange(toks.shape[-1], dtype=jnp.int32)[None]
    x = embed(spec, params, toks, pos)
    for i, blk in enumerate(layers):
      x, _ = block_step(L.block_config(spec, i), blk, x, pos)
    logits = head(L.block_config(spec, 0), head_params(params), x[:, :-1]).astype(F32)
    picked = jnp.take_along_axis(logits, toks[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(jax.nn.logsumexp(logits, axis=-1) - picked)

  if not per_sample:
    return jax.grad(nll_sum)(diff, tokens), None

  n_pred = tokens.shape[1] - 1

  def one(carry, toks):
    g_sum, g2_sum = carry
    g = jax.grad(nll_sum)(diff, toks[None])  # gradient of this window's summed NLL
    g_sum = jax.tree.map(jnp.add, g_sum, g)
    g2_sum = jax.tree.map(lambda a, b: a + jnp.square(b / n_pred), g2_sum, g)
    return (g_sum, g2_sum), None

  zeros = jax.tree.map(jnp.zeros_like, diff)
  (g, g2), _ = jax.lax.scan(one, (zeros, zeros), tokens)
  return g, g2


def lm_gradients(model, windows: np.ndarray, config, per_sample: bool = False) -> dict:
  """Gradients of the dense model's language-model loss w.r.t. the pruned blocks.

  loss = mean next-token cross entropy over all calibration windows (as
  LLM-Pruner's `model(x, labels=x).loss` over its example batch). Batches of
  `config.batch_size` windows are summed in f32, so memory holds one batch's
  activations and one gradient (plus the accumulators), never per-window
  gradients. Only block parameters in `config`'s block range are
  differentiated; other entries are None.

  Returns:
    {"grads": tuple over layers of block dicts (or None), "sq_grads": the same
    with the Fisher diagonal F = mean over windows of (d mean-NLL_n / dw)^2 when
    `per_sample`, else None}.
  """
  windows = np.asarray(windows, np.int32)
  S, T = windows.shape
  start, stop = config.block_range(model.spec)
  params = jax.tree.map(lambda x: jnp.asarray(x, F32), model.params)
  frozen = {k: v for k, v in params.items() if k != "layers"}
  frozen["layers"] = tuple(params["layers"])
  diff = tuple(params["layers"][start:stop])
  B = max(1, min(config.batch_size, S))
  g_acc = g2_acc = None
  for b in range(0, S, B):
    g, g2 = _grad_batch(model.spec, diff, frozen, jnp.asarray(windows[b:b + B]), start=start, stop=stop,
                        per_sample=per_sample)
    g_acc = g if g_acc is None else jax.tree.map(jnp.add, g_acc, g)
    if per_sample:
      g2_acc = g2 if g2_acc is None else jax.tree.map(jnp.add, g2_acc, g2)
  scale = 1.0 / (S * (T - 1))
  grads = jax.tree.map(lambda x: x * scale, g_acc)

  def per_layer(trees):
    strip = [{k: blk[k] for k in ("attn", "mlp")} for blk in trees]
    return tuple([None] * start + strip + [None] * (model.spec.num_layers - stop))

  out = {"grads": per_layer(grads), "sq_grads": None}
  if per_sample:
    out["sq_grads"] = per_layer(jax.tree.map(lambda x: x / S, g2_acc))
  return out


def _prepare_first(model, windows, config):
  return lm_gradients(model, windows, config, per_sample=False)


def _prepare_second(model, windows, config):
  return lm_gradients(model, windows, config, per_sample=True)


@register("taylor-element1", needs=("grads",), prepare=_prepare_first,
          description="LLM-Pruner Taylor element1: sum |w g| over the unit's weights")
def taylor_element1(kind: A.ModuleKind, p: Params, stats: ModuleStats):
  """sum over the unit's weights of |w * g| (LLM-Pruner `param_first`)."""
  _need_grads(stats, "taylor-element1")
  return _unit_sums(kind, p, stats, lambda k, leaf, w: jnp.abs(_f32(w) * _grad_leaf(stats.grads, k, leaf, w)))


@register("taylor-element2", needs=("grads", "sq_grads"), prepare=_prepare_second,
          description="LLM-Pruner Taylor element2: sum |w g - w^2 F / 2| (Fisher from per-sample gradients)")
def taylor_element2(kind: A.ModuleKind, p: Params, stats: ModuleStats):
  """sum over the unit's weights of |w g - 1/2 w^2 F| (LLM-Pruner `param_mix`)."""
  _need_grads(stats, "taylor-element2", second=True)

  def elem(k, leaf, w):
    w = _f32(w)
    return jnp.abs(w * _grad_leaf(stats.grads, k, leaf, w) - 0.5 * jnp.square(w) * _grad_leaf(stats.sq_grads, k,
                                                                                                leaf, w))

  return _unit_sums(kind, p, stats, elem)


@register("taylor-vector", needs=("grads",), prepare=_prepare_first,
          description="LLM-Pruner Taylor vector: |sum w g| per layer and channel, summed over the unit")
def taylor_vector(kind: A.ModuleKind, p: Params, stats: ModuleStats):
  """sum over the unit's layers and channels of |sum of w * g over the channel| (LLM-Pruner `vectorize`)."""
  _need_grads(stats, "taylor-vector")
  return _unit_sums(kind, p, stats, lambda k, leaf, w: _f32(w) * _grad_leaf(stats.grads, k, leaf, w), post=jnp.abs)
