"""What every criterion receives: the statistics of one module."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxprune.spec import Params
from jaxprune.stats.moments import Diag, Moments


@dataclasses.dataclass(frozen=True)
class ModuleStats:
  """Calibration statistics of one module (pruned stream unless stated).

  Attributes:
    inputs: Moments of the normalized module input x (augmented Gram: S, mean,
      count); only for criteria that declare the `inputs` need (or none).
    hidden: statistics of the second level's input X2 (attention: per-head value
      outputs, flattened [N*H]; MLP: act(gate) * up, [F]): full Moments for
      criteria that need the Gram or cross moment, else a `Diag` (mean, sq_mean,
      variance), which Moments also expose.
    first: {first-level kernel name: Diag of its pre-activations x a_j + a0_j}
      (MLP; criteria that declare `first_sq`).
    js: [N, N] mean Jensen-Shannon divergence between head attention maps, or None.
    grads: gradient of the language-model loss w.r.t. the module's parameters, or None.
    sq_grads: summed squared per-sample gradients (Fisher diagonal), or None.
    identity: data-free variant (a): criteria use S = I instead of measured moments.
    kv_index: for attention, the KV head each query head reads.
    damping: the ridge delta of the run's solves (for criteria that solve).
    intercept: whether the run's solves fit a bias.
    layer: the block index (with `seed`, for seeded random scores).
    seed: the run's seed.
    n_remove: how many units the caller can remove, lowest scores first (None: any
      number). A criterion may rank only that far, as long as those n_remove units
      and their order are what a full ranking gives and every other unit scores
      above them (`goa-obs` stops its sweep there).
  """

  inputs: Moments | None = None
  hidden: Moments | Diag | None = None
  first: dict[str, Diag] | None = None
  js: jax.Array | None = None
  grads: Params | None = None
  sq_grads: Params | None = None
  identity: bool = False
  kv_index: tuple[int, ...] | None = None
  damping: float = 1e-3
  intercept: bool = False
  layer: int = 0
  seed: int = 0
  n_remove: int | None = None


jax.tree_util.register_dataclass(ModuleStats, data_fields=["inputs", "hidden", "first", "js", "grads", "sq_grads"],
                                 meta_fields=["identity", "kv_index", "damping", "intercept", "layer", "seed",
                                              "n_remove"])


def augmented_S(stats: ModuleStats, d: int) -> jax.Array:
  """E[[x 1]^T [x 1]] (d+1, d+1); the identity (no mean, E[1] = 1) in the data-free case."""
  if stats.identity:
    return jnp.eye(d + 1, dtype=jnp.float32)
  return stats.inputs.xx / stats.inputs.count
