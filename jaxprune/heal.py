"""Optional healing after pruning (beyond the paper): a short optax fit of a few parameters.

The paper's method, and jaxprune's default path, are training-free. `heal` is
a separate, optional step that trains a small set of parameters of an already
pruned model on calibration windows, keeping everything else frozen:

* `train="bias"`: only the projection biases of the blocks (q/k/v/o and MLP
  biases; reconstruction with `--intercept` gives the LLaMA family o- and MLP
  biases). Norms, embeddings and kernels are frozen.
* `train="lora"`: a rank-r update `A @ B` of the attention output and MLP
  down-projection kernels of every block (the second level of the paper's
  depth-2 modules, where the reconstruction also acts). B starts at zero, so
  step 0 is the pruned model; at the end `A @ B` is added into the kernels, so
  the healed model has exactly the pruned model's shapes and config.

The loss is the mean next-token NLL of the windows (jaxprune's own forward
pass, `jax.grad` through it); the optimizer is optax's AdamW with global-norm
clipping and a warmup-cosine schedule. The run is deterministic for a seed.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from jaxprune.errors import UsageError
from jaxprune.eval.perplexity import perplexity, window_nll
from jaxprune.model import Model
from jaxprune.spec import Params

log = logging.getLogger(__name__)

TRAIN_MODES = ("bias", "lora")
LORA_TARGETS = ("o", "down")  # the output projections of attention and MLP


@dataclasses.dataclass(frozen=True)
class HealConfig:
  """What `heal` trains and how.

  Attributes:
    train: "bias" or "lora" (see the module docstring).
    rank: LoRA rank r.
    steps: optimizer steps.
    batch_size: windows per step (drawn from the training windows in a seeded
      order, one epoch after another).
    learning_rate: peak learning rate of the warmup-cosine schedule.
    warmup: fraction of the steps spent warming up.
    weight_decay: AdamW decoupled weight decay (on the trained parameters only).
    clip: global-norm gradient clipping.
    seed: LoRA initialisation and batch order.
  """

  train: str = "lora"
  rank: int = 8
  steps: int = 300
  batch_size: int = 8
  learning_rate: float = 1e-4
  warmup: float = 0.1
  weight_decay: float = 0.0
  clip: float = 1.0
  seed: int = 0

  def __post_init__(self):
    if self.train not in TRAIN_MODES:
      raise UsageError(f"train must be one of {', '.join(TRAIN_MODES)}, got {self.train!r}")
    for name in ("rank", "steps", "batch_size"):
      if getattr(self, name) < 1:
        raise UsageError(f"{name} must be a positive integer, got {getattr(self, name)}")
    if not self.learning_rate > 0:
      raise UsageError(f"learning_rate must be positive, got {self.learning_rate}")
    if not 0 <= self.warmup < 1:
      raise UsageError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")


@dataclasses.dataclass(frozen=True)
class HealResult:
  model: Model  # same spec and shapes as the input model
  report: dict[str, Any]


# --------------------------------------------------------------------------
# What is trained: a small pytree, merged into the frozen parameters.


def _is_block_bias(path: tuple[str, ...]) -> bool:
  return path[-1] == "bias" and path[0] in ("attn", "mlp")


def init_trainable(model: Model, cfg: HealConfig) -> dict:
  """The trained parameters: {layer: {path: array}} (bias) or {layer: {target: {"a", "b"}}} (lora)."""
  blocks = model.params["layers"]
  if cfg.train == "bias":
    out = {i: {"/".join(p): jnp.asarray(v, jnp.float32) for p, v in traverse_util.flatten_dict(b).items()
               if _is_block_bias(p)} for i, b in enumerate(blocks)}
    if not any(out.values()):
      raise UsageError("the model has no projection biases to train; prune with --intercept (which fits "
                       "o- and MLP biases), or use --train lora")
    return out
  key = jax.random.key(cfg.seed)
  out = {}
  for i, b in enumerate(blocks):
    layer = {}
    for t in LORA_TARGETS:
      kernel = b["attn"]["o"]["kernel"] if t == "o" else b["mlp"]["down"]["kernel"]
      in_shape, d_out = kernel.shape[:-1], kernel.shape[-1]
      key, sub = jax.random.split(key)
      # A ~ N(0, 1/fan_in) and B = 0 (LoRA's initialisation): the update starts at zero.
      a = jax.random.normal(sub, (*in_shape, cfg.rank), jnp.float32) / float(np.sqrt(np.prod(in_shape)))
      layer[t] = {"a": a, "b": jnp.zeros((cfg.rank, d_out), jnp.float32)}
    out[i] = layer
  return out


def merge(params: Params, trainable: dict, train: str) -> Params:
  """`params` with the trained parameters written in (bias) or added to the kernels (lora); same shapes."""
  blocks = []
  for i, b in enumerate(params["layers"]):
    flat = traverse_util.flatten_dict(b)
    if train == "bias":
      for name, v in trainable[i].items():
        path = tuple(name.split("/"))
        flat[path] = v.astype(flat[path].dtype)
    else:
      for t, ab in trainable[i].items():
        path = ("attn", "o", "kernel") if t == "o" else ("mlp", "down", "kernel")
        k = flat[path]
        delta = jnp.tensordot(ab["a"], ab["b"], axes=1)  # [..in, r] x [r, D] -> kernel's shape
        flat[path] = (k.astype(jnp.float32) + delta).astype(k.dtype)
    blocks.append(traverse_util.unflatten_dict(flat))
  return {**params, "layers": tuple(blocks)}


def count_trainable(trainable: dict) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(trainable)))


# --------------------------------------------------------------------------
# Training.


def _batches(n: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
  """Window indices [steps, batch_size]: seeded epochs over the n training windows."""
  rng = np.random.default_rng(seed)
  order = np.concatenate([rng.permutation(n) for _ in range(-(-steps * batch_size // n))])
  return order[:steps * batch_size].reshape(steps, batch_size)


def heal(model: Model, windows: np.ndarray, heldout: np.ndarray | None, cfg: HealConfig,
         progress: Callable[[int, float], None] | None = None) -> HealResult:
  """Trains `cfg.train` parameters of `model` on token windows; the rest stays frozen.

  Args:
    model: a (pruned) model; float32 parameters are recommended.
    windows: training windows [W, L] int32 (calibration text).
    heldout: windows [W', L] from the same text, disjoint from `windows`, for
      perplexity before and after (None: not measured).
    cfg: what to train and how.
    progress: called as progress(step, loss) after every step.

  Returns:
    A `HealResult`: the healed model (same spec and shapes) and a report with
    the loss curve and held-out perplexity before and after.
  """
  windows = np.asarray(windows, np.int32)
  if windows.ndim != 2 or windows.shape[1] < 2:
    raise UsageError(f"windows must be [W, L] token ids with L >= 2, got shape {windows.shape}")
  if cfg.batch_size > len(windows):
    raise UsageError(f"batch_size {cfg.batch_size} is larger than the {len(windows)} training windows; "
                     "use a smaller --batch-size or more --calib-samples")
  spec, frozen = model.spec, jax.tree.map(jnp.asarray, model.params)
  trainable = init_trainable(model, cfg)
  # A single step has no warmup: optax needs decay_steps > warmup_steps, and a warmup step's rate is 0.
  warmup = min(max(1, int(cfg.warmup * cfg.steps)), cfg.steps - 1)
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup_steps=warmup, decay_steps=cfg.steps,
                                                end_value=0.1 * cfg.learning_rate)
  tx = optax.chain(optax.clip_by_global_norm(cfg.clip), optax.adamw(schedule, weight_decay=cfg.weight_decay))
  opt_state = tx.init(trainable)
  predicted = windows.shape[1] - 1

  def loss_fn(trainable, frozen, tokens):
    return jnp.sum(window_nll(spec, merge(frozen, trainable, cfg.train), tokens)) / (tokens.shape[0] * predicted)

  # The frozen parameters are an argument, not a closure: closed-over arrays would be baked into the
  # compiled program as constants (slow to compile, and a second copy of the model in memory).
  @jax.jit
  def step(trainable, opt_state, frozen, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, tokens)
    # optax's Adam bias correction raises a Python float to an int32 step count, which JAX's strict
    # promotion (jaxprune's tests run under it) refuses; the optimizer update uses standard promotion.
    with jax.numpy_dtype_promotion("standard"):
      updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  before = None if heldout is None else perplexity(spec, frozen, heldout, batch_size=cfg.batch_size)
  losses = []
  start = time.perf_counter()
  for s, idx in enumerate(_batches(len(windows), cfg.batch_size, cfg.steps, cfg.seed)):
    trainable, opt_state, loss = step(trainable, opt_state, frozen, jnp.asarray(windows[idx]))
    losses.append(float(loss))
    if not np.isfinite(losses[-1]):
      raise UsageError(f"the training loss became {losses[-1]} at step {s}; use a smaller --lr "
                       f"(now {cfg.learning_rate})")
    if progress is not None:
      progress(s, losses[-1])
  train_s = time.perf_counter() - start
  healed = Model.checked(spec, merge(frozen, trainable, cfg.train), model.source)
  after = None if heldout is None else perplexity(spec, healed.params, heldout, batch_size=cfg.batch_size)

  report = {
      "beyond_paper": "optional healing by training; the paper's method and jaxprune's default are training-free",
      "config": dataclasses.asdict(cfg),
      "trained": {"mode": cfg.train, "parameters": count_trainable(trainable),
                  "targets": list(LORA_TARGETS) if cfg.train == "lora" else "block projection biases",
                  "model_parameters": model.num_params},
      "windows": {"train": int(len(windows)), "heldout": 0 if heldout is None else int(len(heldout)),
                  "seq_len": int(windows.shape[1])},
      "loss": losses,
      "seconds": {"train": train_s},
  }
  if heldout is not None:
    report["heldout_perplexity"] = {"before": before.perplexity, "after": after.perplexity}
  log.info("healed %s: loss %.4f -> %.4f in %d steps (%.1fs)", cfg.train, losses[0], losses[-1], cfg.steps, train_s)
  return HealResult(healed, report)


__all__ = ["HealConfig", "HealResult", "LORA_TARGETS", "TRAIN_MODES", "count_trainable", "heal", "init_trainable",
           "merge"]
