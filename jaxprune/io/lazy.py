"""Models whose blocks stay in their checkpoint until a block is needed (streaming).

`load(..., lazy=True)` reads the embeddings, the final norm and the LM head, and
checks every tensor's name against the family's table, but leaves the blocks on
disk: `params["layers"]` is a `LazyBlocks`, a sequence that reads block i (in
the checkpoint's dtype, safetensors' `safe_open` reading only that block's
tensors, GGUF dequantizing only them), checks its shapes against the spec and
upcasts that block alone to float32. A pruning run then holds only the blocks it
is working on, whatever the size of the model (`jaxprune.prune`). On a mesh
with a `model` axis, `LazyBlocks.placed` builds each block's arrays from the
slices each process's devices hold, read from memory-mapped safetensors files
(`safetensors_views`), so no process reads what it does not hold.

Code that walks a parameter tree with `jax.tree` sees a `LazyBlocks` as one
leaf; the functions that accept lazy models (the pipeline, `perplexity`,
`save_hf`, `count_params`, `check_params`) go through it block by block, and
`materialize` turns a lazy model into an ordinary one for everything else.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxprune.errors import CheckpointError, ShapeError
from jaxprune.io.mapping import require_finite
from jaxprune.model import Model
from jaxprune.spec import ModelSpec, Params, layer_shapes


def _shape_tree(tree, dtype) -> Params:
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(tuple(s), dtype), tree, is_leaf=lambda x: isinstance(x, tuple))


class LazyBlocks(Sequence):
  """Blocks read on demand by `read(i) -> block tree` (numpy or jax leaves).

  `shapes[i]` is block i's tree of `jax.ShapeDtypeStruct` (what `count_params`
  and `check_params` read without loading anything); every block read is checked
  against it. The last `cache` blocks read are kept: the layer loop reads each
  dense block once and keeps its pruned version itself.
  """

  def __init__(self, read: Callable[[int], Params], shapes: Sequence[Params], dtype=jnp.float32, cache: int = 1,
               source: str = "checkpoint", views: Callable[[int], Params] | None = None,
               restore: Callable[[int, Params], Params] | None = None):
    self._read = read
    # Block i as views of the checkpoint file that read nothing until indexed (safetensors,
    # memory-mapped), so that `placed` reads only the slices this process's devices hold.
    self._views = views
    # Or a reader that places block i by a tree of shardings itself (Orbax's sharded restore).
    self._restore = restore
    self.shapes = tuple(shapes)
    self.dtype = jnp.dtype(dtype)
    self.source = source
    self._cache: collections.OrderedDict[int, Params] = collections.OrderedDict()
    self._size = cache
    self._ahead: dict[int, concurrent.futures.Future] = {}  # `prefetch`: block -> its read under way
    self._pool: concurrent.futures.ThreadPoolExecutor | None = None
    self.reads = 0  # blocks read from disk so far (a test of the streaming's cost)
    self.prefetched = 0  # of which read ahead, in the background
    self.values_read = 0  # parameter values `placed` read for this process's devices

  def __len__(self) -> int:
    return len(self.shapes)

  def __getitem__(self, i: int):
    n = len(self)
    if not -n <= i < n:
      raise IndexError(f"block {i} of a {n}-block model")
    i = i % n
    if i in self._cache:
      self._cache.move_to_end(i)
      return self._cache[i]
    ahead = self._ahead.pop(i, None)
    blk = self._checked(i, ahead.result() if ahead is not None else self._read(i))
    self.reads += 1
    self.prefetched += ahead is not None
    # The block alone is upcast (in XLA), never the whole model.
    return self._keep(i, jax.tree.map(lambda x: jnp.asarray(x).astype(self.dtype), blk))

  def prefetch(self, i: int) -> None:
    """Starts reading block i (as stored) in a background thread, so that its read overlaps
    the work on the block before it; the next `self[i]` takes it. One read runs ahead at a
    time: a block asked for earlier and not taken is dropped (so memory holds at most one
    block beyond the cache)."""
    if not 0 <= i < len(self) or i in self._cache or i in self._ahead:
      return
    for j in list(self._ahead):
      self._ahead.pop(j).cancel()
    if self._pool is None:
      self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="jaxprune-prefetch")
    self._ahead[i] = self._pool.submit(self._read, i)

  def _checked(self, i: int, blk: Params) -> Params:
    want = traverse_util.flatten_dict(self.shapes[i], sep=".")
    have = traverse_util.flatten_dict(blk, sep=".")
    bad = [f"{k}: {tuple(np.shape(have[k])) if k in have else 'missing'}, expected {want[k].shape}"
           for k in want if k not in have or tuple(np.shape(have[k])) != want[k].shape]
    bad += [f"{k}: unexpected" for k in have if k not in want]
    if bad:
      raise ShapeError(f"{self.source}: block {i} does not match the model description ({'; '.join(bad[:5])}). "
                       "Check that the config belongs to these weights.")
    return blk

  def _keep(self, i: int, blk: Params) -> Params:
    self._cache[i] = blk
    while len(self._cache) > self._size:
      self._cache.popitem(last=False)
    return blk

  def placed(self, i: int, shardings: Callable[[Params], Params]) -> Params:
    """Block i as global arrays laid out by `shardings(block) -> tree of NamedShardings`,
    each process reading (and upcasting) only the slices its own devices hold.

    With memory-mapped views (safetensors) or a sharded restore (Orbax) that is all this
    process reads of the block; other checkpoints (GGUF) are read whole and sliced.
    """
    i = i % len(self)
    if i in self._cache:
      self._cache.move_to_end(i)
      return self._cache[i]
    if self._restore is not None:
      blk = self._checked(i, self._restore(i, shardings(self.shapes[i])))
      self.reads += 1
      # What this process's devices hold, each slice once (replicas over `data` share one).
      self.values_read += sum(s.data.size for x in jax.tree.leaves(blk) for s in x.addressable_shards
                              if s.replica_id == 0)
      return self._keep(i, blk)
    raw = self._checked(i, (self._views or self._read)(i))
    self.reads += 1

    def one(path, x, sh):
      parts = {}  # devices holding the same slice (replicas over `data`) share one read

      def piece(idx):
        key = tuple((s.start, s.stop, s.step) for s in idx)
        if key not in parts:
          part = np.asarray(x[idx])
          # Views were not checked when the block was built (that would read all of it).
          require_finite(part, f"block {i} {jax.tree_util.keystr(path)}", self.source)
          parts[key] = part.astype(self.dtype)  # exact: a float widening
          self.values_read += parts[key].size
        return parts[key]
      return jax.make_array_from_callback(tuple(np.shape(x)), sh, piece)

    return self._keep(i, jax.tree_util.tree_map_with_path(one, raw, shardings(raw)))


def block_shapes(spec: ModelSpec, dtype=jnp.float32) -> list[Params]:
  """Every block's tree of `jax.ShapeDtypeStruct`, from the spec alone."""
  return [_shape_tree(layer_shapes(spec, l), dtype) for l in spec.layers]


def is_lazy(params: Params) -> bool:
  return isinstance(params.get("layers"), LazyBlocks)


def materialize(model: Model) -> Model:
  """`model` with every block read into memory (a lazy model's blocks, once)."""
  if not is_lazy(model.params):
    return model
  layers = model.params["layers"]
  top = {k: jax.tree.map(lambda x: x.astype(layers.dtype), v) for k, v in model.params.items() if k != "layers"}
  return Model(model.spec, {**top, "layers": tuple(layers)}, model.source)


def lazy_model(spec: ModelSpec, keys: Sequence[str], get: Callable[[str], np.ndarray], source: str,
               dtype=jnp.float32, view: Callable[[str], np.ndarray] | None = None) -> Model:
  """A Model whose blocks are read through `get(hf_key)` when used; the rest is read now.

  `keys` are every tensor name of the checkpoint: they are checked against the family's
  table first, so a checkpoint with missing or unexpected tensors fails before any work.
  `view(hf_key)`, where the format allows it, is the tensor as a view of the file that reads
  only what is indexed (`LazyBlocks.placed`).
  """
  from jaxprune.io.mapping import block_params, check_keys, key_renames, table, top_params, untie_distinct_head

  names = key_renames(table(spec), keys)
  original = {v: k for k, v in names.items()}
  read = lambda key: get(original[key])
  spec = untie_distinct_head(spec, original, read, source)
  check_keys(spec, original, lambda k: not np.any(read(k)), source)
  # The embeddings and head stay in the checkpoint's dtype (a quarter of a 7B model's size at
  # float32); what reads them casts rows or products to float32 (`embed_f32`, the head's einsum).
  top = jax.tree.map(jnp.asarray, top_params(spec, read, source))
  views = None
  if view is not None:
    # Views read nothing until sliced: `LazyBlocks.placed` checks each slice as it reads it.
    views = lambda i: block_params(spec, i, lambda key: view(original[key]), source, check_finite=False)
  blocks = LazyBlocks(lambda i: block_params(spec, i, read, source),
                      block_shapes(spec, dtype), dtype, source=source, views=views)
  return Model(spec, {**top, "layers": blocks}, source=os.path.abspath(source))


# --------------------------------------------------------------------------
# Readers: every tensor name of a checkpoint, and a function reading one tensor.


# safetensors dtype names -> numpy (bfloat16 from ml_dtypes, which JAX ships).
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def safetensors_views(files: Sequence[str]) -> Callable[[str], np.ndarray]:
  """`view(key)`: the tensor as a read-only `np.memmap` of its file (the format is a JSON
  header, then each tensor's bytes, C order, little-endian, at the header's offsets), so
  indexing it reads only the pages of that slice."""
  import json
  import struct

  import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

  where: dict[str, tuple[str, int, dict]] = {}
  for f in files:
    with open(f, "rb") as fh:
      n = struct.unpack("<Q", fh.read(8))[0]
      header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    where.update({k: (f, 8 + n, v) for k, v in header.items()})

  def view(key: str) -> np.ndarray:
    f, base, info = where[key]
    start, end = info["data_offsets"]
    dtype = np.dtype(_ST_DTYPES[info["dtype"]]).newbyteorder("<")
    shape = tuple(info["shape"])
    if end == start:
      return np.zeros(shape, dtype)
    return np.memmap(f, dtype=dtype, mode="r", offset=base + start, shape=shape)

  return view


def safetensors_reader(files: Sequence[str]) -> tuple[list[str], Callable[[str], np.ndarray]]:
  """(keys, get) over safetensors files; `get` opens the file holding the key and reads that tensor only."""
  from safetensors import SafetensorError, safe_open

  where: dict[str, str] = {}
  for f in files:
    try:
      with safe_open(f, framework="numpy") as st:
        where.update({k: f for k in st.keys()})
    except (SafetensorError, OSError, ValueError) as e:
      raise CheckpointError(f"{f} is not a readable safetensors file ({e}); it is probably truncated or corrupt. "
                            "Re-download or re-export it.") from None

  def get(key: str) -> np.ndarray:
    try:
      with safe_open(where[key], framework="numpy") as st:
        return st.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as e:
      raise CheckpointError(f"{where[key]}: tensor {key} could not be read ({e}); the file may be truncated") from None

  return list(where), get


def can_stream(files: Sequence[str]) -> bool:
  """Whether these weight files can be read a tensor at a time (safetensors can; pickles cannot)."""
  return all(f.endswith(".safetensors") for f in files)
