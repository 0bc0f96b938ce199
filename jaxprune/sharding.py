"""Meshes and shardings by logical axis names.

Parameters are tagged with logical names (embed, heads, kv_heads, head_dim,
mlp, vocab) derived from the parameter tree's structure, and one rules table
maps names to mesh axes. A dimension whose size the mesh axis does not divide
is replicated, with a warning, rather than failing. Calibration activations are
sharded over the `data` axis; statistics are sums, kept per `data` shard while
a pass runs and reduced once at its end (`split_batch`, `sum_shards`), which
makes them the single-device result up to summation order.
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxprune.errors import UsageError

log = logging.getLogger(__name__)

try:
  shard_map = jax.shard_map
except AttributeError:  # JAX before 0.7 has it under experimental only
  from jax.experimental.shard_map import shard_map  # type: ignore[no-redef]

DATA = "data"
MODEL = "model"

#: logical axis -> mesh axis (None: replicated).
DEFAULT_RULES: dict[str, str | None] = {
    "batch": DATA,
    "embed": None,
    "heads": MODEL,
    "kv_heads": MODEL,
    "head_dim": None,
    "mlp": MODEL,
    "vocab": MODEL,
    "positions": None,
    # Activations and statistics (`ACTIVATION_AXES`).
    "chunks": None,
    "length": None,
    "features": MODEL,
    "columns": MODEL,
}

# Logical axes of what the engine computes, named like the parameters' and placed by the same
# rules: a calibration stream [chunks, batch, T, D] as it is stored (positions and features
# replicated, left unnamed); a module's hidden input X2 [chunks, batch, T, F] inside a kernel;
# the rows of its Gram sums (X2's features), alone or under a leading per-`data`-shard axis; a
# solve's right-hand side and solution [rows, columns].
ACTIVATION_AXES: dict[str, tuple[str | None, ...]] = {
    "stream": ("chunks", "batch"),
    "hidden": ("chunks", "batch", "length", "features"),
    "shards": ("batch",),
    "gram": ("features", None),
    "gram_shards": ("batch", "features", None),
    "solution": (None, "columns"),
}

# Logical axes of each leaf, keyed by (module, projection, leaf) suffix of its path.
_LEAF_AXES = {
    ("q", "kernel"): ("embed", "heads", "head_dim"),
    ("q", "bias"): ("heads", "head_dim"),
    ("k", "kernel"): ("embed", "kv_heads", "head_dim"),
    ("k", "bias"): ("kv_heads", "head_dim"),
    ("v", "kernel"): ("embed", "kv_heads", "head_dim"),
    ("v", "bias"): ("kv_heads", "head_dim"),
    ("o", "kernel"): ("heads", "head_dim", "embed"),
    ("o", "bias"): ("embed",),
    ("gate", "kernel"): ("embed", "mlp"),
    ("gate", "bias"): ("mlp",),
    ("up", "kernel"): ("embed", "mlp"),
    ("up", "bias"): ("mlp",),
    ("down", "kernel"): ("mlp", "embed"),
    ("down", "bias"): ("embed",),
    ("embed", "embedding"): ("vocab", "embed"),
    ("pos_embed", "embedding"): ("positions", "embed"),
    ("lm_head", "kernel"): ("embed", "vocab"),
    # Qwen3's and Gemma's RMSNorm of each query and key head: one scale over head_dim, shared by every
    # head. Every other norm (Gemma's post-norms too) scales the model width: the default below.
    ("q_norm", "scale"): ("head_dim",),
    ("k_norm", "scale"): ("head_dim",),
}


def make_mesh(data: int | None = None, model: int = 1, devices: Sequence | None = None) -> Mesh:
  """A (data, model) mesh over `devices` (default: all); data defaults to the rest.

  Devices are laid out by `jax.experimental.mesh_utils`, which puts the `model` axis on
  the closest devices of a TPU or GPU topology.
  """
  from jax.experimental import mesh_utils

  devices = list(jax.devices() if devices is None else devices)
  if data is None:
    data = len(devices) // model
  if data * model > len(devices) or data < 1 or model < 1:
    raise ValueError(f"a {data}x{model} mesh needs {data * model} devices; {len(devices)} are available")
  try:
    grid = mesh_utils.create_device_mesh((data, model), devices[:data * model])
  except (ValueError, NotImplementedError, AssertionError):  # topologies it does not know: in order
    grid = np.asarray(devices[:data * model]).reshape(data, model)
  return Mesh(grid, (DATA, MODEL))


def parse_mesh(text: str) -> tuple[int | None, int]:
  """'data=2,model=4' (either part optional) -> (data or None, model)."""
  sizes: dict[str, int] = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, _, value = part.partition("=")
    if name not in (DATA, MODEL) or not value.isdigit() or int(value) < 1 or name in sizes:
      raise UsageError(f"--mesh {text!r}: expected comma-separated data=D and model=M with positive sizes, "
                       "e.g. data=2,model=4")
    sizes[name] = int(value)
  return sizes.get(DATA), sizes.get(MODEL, 1)


def place(tree, mesh: Mesh):
  """A block (or any parameter subtree) sharded over the mesh's `model` axis by logical names.

  With a model axis of 1 the tree is returned as it is (jit replicates it). Dimensions the
  axis does not divide, as pruned widths often are, are replicated.
  """
  if mesh.shape.get(MODEL, 1) == 1:
    return tree
  return jax.device_put(tree, param_shardings(tree, mesh, quiet=True))


def logical_axes(params) -> dict:
  """A tree like `params` whose leaves are tuples of logical axis names."""

  def tag(path, leaf):
    keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
    axes = _LEAF_AXES.get(tuple(keys[-2:]))
    if axes is None:  # norms: scale/bias over the model width
      axes = ("embed",) * np.ndim(leaf)
    return axes

  return jax.tree_util.tree_map_with_path(tag, params)


def spec_for(shape, axes: Sequence[str], mesh: Mesh, rules: Mapping[str, str | None] = DEFAULT_RULES,
             quiet: bool = False) -> P:
  """PartitionSpec for one array; non-dividing or already-used mesh axes are replicated (with a
  warning, unless `quiet`)."""
  out, used = [], set()
  for size, name in zip(shape, axes):
    ax = rules.get(name)
    if ax is None or ax in used or mesh.shape.get(ax, 1) == 1:
      out.append(None)
      continue
    if size % mesh.shape[ax]:
      (log.debug if quiet else log.warning)("dimension %s of size %d is not divisible by mesh axis %r (%d); replicating it", name, size, ax,
                  mesh.shape[ax])
      out.append(None)
      continue
    out.append(ax)
    used.add(ax)
  return P(*out)


def param_shardings(params, mesh: Mesh, rules: Mapping[str, str | None] = DEFAULT_RULES, quiet: bool = False):
  """NamedShardings for every leaf of `params` (`quiet`: replicated dimensions are not warned about)."""
  axes = logical_axes(params)
  return jax.tree.map(lambda x, a: NamedSharding(mesh, spec_for(np.shape(x), a, mesh, rules, quiet)), params, axes)


def activation_spec(name: str, mesh: Mesh, rules: Mapping[str, str | None] = DEFAULT_RULES,
                    drop: Sequence[str] = ()) -> P:
  """PartitionSpec of activation `name` (`ACTIVATION_AXES`) by `rules`; logical axes in `drop`
  (e.g. a dimension the mesh axis does not divide) replicated. Sizes are the caller's to
  check: the engine chunks streams so that `data` divides every batch."""
  return P(*(None if a is None or a in drop else rules.get(a) for a in ACTIVATION_AXES[name]))


def shard_params(params, mesh: Mesh, rules: Mapping[str, str | None] = DEFAULT_RULES):
  return jax.device_put(params, param_shardings(params, mesh, rules))


def stream_sharding(mesh: Mesh) -> NamedSharding:
  """Activations stored as [chunks, batch, T, D]: the batch axis over `data`."""
  return NamedSharding(mesh, activation_spec("stream", mesh))


def gram_rows(mesh: Mesh | None, d: int, shards: bool = False) -> NamedSharding | None:
  """How the running sums of d-wide Gram statistics split: their rows (the input's features)
  over `model`, so each device adds a 1/M share of X^T X, X^T Y and their compensation.
  None without a model axis or when it does not divide d (the sums stay replicated). With
  `shards`, the layout of per-`data`-shard sums (`split_batch`): a leading axis over `data`."""
  m = 1 if mesh is None else mesh.shape.get(MODEL, 1)
  if m == 1 or d % m:
    return None
  return NamedSharding(mesh, activation_spec("gram_shards" if shards and data_shards(mesh) > 1 else "gram", mesh))


# Per-shard sums. Statistics are sums over the calibration tokens, whose batch is
# split over `data`. Summing a chunk's tokens straight into replicated totals makes
# XLA all-reduce every chunk's term over `data`: a Gram matrix's worth of traffic per
# chunk. Instead each `data` shard keeps its own running sums (a leading axis of
# size D laid out over `data`, so every device adds only its own tokens, with no
# communication), and `sum_shards` reduces them once per module.


def data_shards(mesh: Mesh | None) -> int:
  """The number of `data` shards of a stream's batch (1 without a mesh)."""
  return 1 if mesh is None else mesh.shape.get(DATA, 1)


def split_batch(x, mesh: Mesh):
  """Inside a jitted kernel: x [B, ...] (batch over `data`) as [D, B/D, ...], each device's
  own windows in its row of the leading axis."""
  n = data_shards(mesh)
  x = x.reshape(n, x.shape[0] // n, *x.shape[1:])
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, activation_spec("shards", mesh)))


def laid_out_shards(tree, mesh: Mesh | None):
  """Inside a jitted kernel: per-shard sums (leading axis D) with that axis over `data`
  (as they are with one data shard, which keeps no such axis)."""
  if data_shards(mesh) == 1:
    return tree
  spec = NamedSharding(mesh, activation_spec("shards", mesh))
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, spec), tree)


def stack_shards(tree, mesh: Mesh | None):
  """Inside a jitted kernel: `tree` (zero sums) repeated once per `data` shard (as it is with one)."""
  n = data_shards(mesh)
  if n == 1:
    return tree
  return laid_out_shards(jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), tree), mesh)


def sum_shards(tree, mesh: Mesh | None):
  """Inside a jitted kernel: per-shard sums added up, one all-reduce over `data` per array
  (as they are with one data shard)."""
  if data_shards(mesh) == 1:
    return tree
  return jax.tree.map(lambda x: jnp.sum(x, axis=0), tree)


def laid_out_stream(x, mesh: Mesh | None, features: bool = False):
  """Inside a jitted kernel: stream `x` [C, B, T, F] with its batch axis over `data` and, with
  `features`, its last axis over `model` where that divides it (an explicit output sharding;
  as it is without a mesh)."""
  if mesh is None:
    return x
  m = mesh.shape.get(MODEL, 1)
  split = features and m > 1 and x.shape[-1] % m == 0
  spec = activation_spec("hidden", mesh, drop=() if split else ("features",))
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def laid_out_replicated(tree, mesh: Mesh | None):
  """Inside a jitted kernel: every array of `tree` replicated over `mesh` (as it is without one)."""
  if mesh is None:
    return tree
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P())), tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())

