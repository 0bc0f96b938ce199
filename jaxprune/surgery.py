"""Pure, checked parameter surgery: keep a subset of heads or MLP channels.

Every function returns new arrays and a new `LayerSpec`; nothing is modified in
place. Indices must be sorted, unique and in range, and (for attention) fit the
GQA structure; errors list the offending indices.

GQA rule (docs/method.md section 1): removing a query head removes its W_Q columns,
q-bias and W_O rows; a KV head goes only when all of its query heads are gone.
By default every kept KV head must keep the same number of query heads, so the
result is still a plain Hugging Face config; `free_groups=True` allows uneven
groups, recorded in `LayerSpec.kv_map` (for JAX-only use).
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import placement
from jaxprune.errors import UsageError
from jaxprune.model import Model
from jaxprune.spec import LayerSpec, Params, spec_from_params


def check_indices(idx, n: int, what: str) -> np.ndarray:
  """`idx` as a sorted int array after checking it is sorted, unique, in range and non-empty."""
  idx = np.asarray(idx)
  if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
    raise UsageError(f"{what}: indices must be a 1-D integer sequence, got dtype {idx.dtype} shape {idx.shape}")
  if idx.size == 0:
    raise UsageError(f"{what}: at least one index must be kept (a module cannot lose all its {n} units)")
  bad = sorted(set(int(i) for i in idx if i < 0 or i >= n))
  if bad:
    raise UsageError(f"{what}: indices {bad} are out of range [0, {n})")
  dup = sorted(i for i, c in Counter(idx.tolist()).items() if c > 1)
  if dup:
    raise UsageError(f"{what}: indices {dup} appear more than once")
  if np.any(np.diff(idx) < 0):
    raise UsageError(f"{what}: indices must be sorted ascending, got {idx.tolist()}")
  return idx.astype(np.int32)




def _gather(v, idx, axis: int):
  """v[..., idx, ...] along `axis`. Arrays held by the host CPU are cut with numpy: an XLA
  gather would compile anew for every distinct kept count (every layer, under adaptive
  allocation), for a copy numpy makes at memory speed."""
  if placement.on_host(v):
    return jax.device_put(np.take(np.asarray(v), idx, axis=axis))  # jnp.asarray would compile a copy per shape
  return jnp.take(v, idx, axis=axis)


def _take(p: Params, idx, axes: dict[str, int]) -> Params:
  return {k: (_gather(v, idx, axes[k]) if k in axes else v) for k, v in p.items()}


def kept_kv_heads(layer: LayerSpec, heads: np.ndarray, free_groups: bool = False) -> tuple[np.ndarray, tuple | None]:
  """KV heads that survive when query heads `heads` are kept, and the new kv_map.

  Raises UsageError when groups would become uneven and `free_groups` is off.
  """
  kv_of = np.asarray(layer.kv_index)[heads]
  kv_keep = np.unique(kv_of)
  counts = Counter(kv_of.tolist())
  if not free_groups and len(set(counts.values())) > 1:
    raise UsageError(
        f"keeping query heads {heads.tolist()} leaves uneven KV groups (query heads per KV head: "
        f"{dict(sorted(counts.items()))}); keep the same number in every group, or pass free_groups=True "
        "(JAX-only models; Hugging Face configs cannot express uneven groups)")
  new_map = tuple(int(np.searchsorted(kv_keep, k)) for k in kv_of)
  return kv_keep.astype(np.int32), new_map


def prune_heads(block: Params, layer: LayerSpec, heads, *, free_groups: bool = False) -> tuple[Params, LayerSpec]:
  """Keeps query heads `heads` (and the KV heads they still use) of one block."""
  heads = check_indices(heads, layer.num_heads, "query heads")
  kv_keep, kv_map = kept_kv_heads(layer, heads, free_groups)
  a = block["attn"]
  attn = {
      **a,  # the q/k norms act on head_dim, shared by every head: kept whole
      "q": _take(a["q"], heads, {"kernel": 1, "bias": 0}),
      "k": _take(a["k"], kv_keep, {"kernel": 1, "bias": 0}),
      "v": _take(a["v"], kv_keep, {"kernel": 1, "bias": 0}),
      "o": _take(a["o"], heads, {"kernel": 0}),
  }
  new_layer = dataclasses.replace(layer, num_heads=len(heads), num_kv_heads=len(kv_keep), kv_map=kv_map).canonical()
  return {**block, "attn": attn}, new_layer


def prune_channels(block: Params, layer: LayerSpec, channels) -> tuple[Params, LayerSpec]:
  """Keeps MLP inner channels `channels` of one block."""
  channels = check_indices(channels, layer.ffn_dim, "MLP channels")
  m = block["mlp"]
  mlp = {k: _take(v, channels, {"kernel": 1, "bias": 0}) for k, v in m.items() if k != "down"}
  mlp["down"] = _take(m["down"], channels, {"kernel": 0})
  return {**block, "mlp": mlp}, dataclasses.replace(layer, ffn_dim=len(channels))


def prune_model(model: Model, heads: dict[int, np.ndarray] | None = None,
                channels: dict[int, np.ndarray] | None = None, *, free_groups: bool = False) -> Model:
  """A new Model keeping, per layer index, the given heads and channels (others untouched)."""
  heads, channels = heads or {}, channels or {}
  for i in set(heads) | set(channels):
    if not 0 <= i < model.spec.num_layers:
      raise UsageError(f"layer {i} is out of range [0, {model.spec.num_layers})")
  blocks, layers = list(model.params["layers"]), list(model.spec.layers)
  for i in range(len(blocks)):
    if i in heads:
      blocks[i], layers[i] = prune_heads(blocks[i], layers[i], heads[i], free_groups=free_groups)
    if i in channels:
      blocks[i], layers[i] = prune_channels(blocks[i], layers[i], channels[i])
  params = {**model.params, "layers": tuple(blocks)}
  spec = spec_from_params(model.spec.with_layers(layers), params)
  return Model.checked(spec, params, model.source)


def zero_heads(block: Params, layer: LayerSpec, heads) -> Params:
  """The block with the W_O rows of every query head not in `heads` zeroed (same shapes)."""
  heads = check_indices(heads, layer.num_heads, "query heads")
  mask = jnp.zeros(layer.num_heads, block["attn"]["o"]["kernel"].dtype).at[heads].set(1)
  o = dict(block["attn"]["o"], kernel=block["attn"]["o"]["kernel"] * mask[:, None, None])
  return {**block, "attn": {**block["attn"], "o": o}}


def zero_channels(block: Params, layer: LayerSpec, channels) -> Params:
  """The block with the down-projection rows of every channel not in `channels` zeroed."""
  channels = check_indices(channels, layer.ffn_dim, "MLP channels")
  mask = jnp.zeros(layer.ffn_dim, block["mlp"]["down"]["kernel"].dtype).at[channels].set(1)
  down = dict(block["mlp"]["down"], kernel=block["mlp"]["down"]["kernel"] * mask[:, None])
  return {**block, "mlp": {**block["mlp"], "down": down}}

