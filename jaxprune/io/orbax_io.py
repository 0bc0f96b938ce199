"""Orbax checkpoints of jaxprune models: parameters (sharded or not) plus the spec.

Layout of a checkpoint directory:

    params/          an orbax StandardCheckpointer checkpoint of `Model.params`
    jaxprune.json    {"format": 1, "spec": ModelSpec.to_json(), "weights": "orbax"}
    tokenizer files  (when the model's source has a tokenizer)

Arrays sharded over a mesh are saved shard by shard; restoring takes target
shardings, which need not match the ones used to save (orbax reads the slices
each device needs), so a model saved on 8 devices restores on 1 and vice versa.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from jaxprune.errors import CheckpointError, ShapeError, UsageError
from jaxprune.io.atomic import atomic_dir, check_target, dump_json
from jaxprune.io.export import resolve_tokenizer
from jaxprune.io.layout import PARAMS_DIR, SPEC_FILE, SPEC_FORMAT, cast_finite, is_orbax_dir, parse_dtype
from jaxprune.io.remote_code import save_tokenizer
from jaxprune.model import Model
from jaxprune.spec import ModelSpec, param_shapes

log = logging.getLogger(__name__)

WEIGHTS = "orbax"

#: Target shardings: a pytree of `Sharding` shaped like the parameters, or f(keystr_path, shape) -> Sharding.
ShardingsArg = Union[Callable[[str, tuple[int, ...]], Sharding], Any]


def save_orbax(model: Model, out: str, *, dtype=None, force: bool = False, tokenizer=None) -> str:
  """Writes `model` (parameters as they are sharded now, and its spec) to `out`, atomically.

  Args:
    dtype: 'float32', 'bfloat16' or 'float16' to cast to first (default: as is).
    force: replace an existing `out`.
    tokenizer: as in `save_hf` (None: the one of `model.source`, False: none).

  Returns:
    The absolute path written.
  """
  import orbax.checkpoint as ocp

  final = check_target(out, force)
  params = jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jnp.asarray(x), model.params)
  if dtype is not None:
    np_dtype = parse_dtype(dtype)[1]
    params = jax.tree_util.tree_map_with_path(lambda p, x: cast_finite(x, np_dtype, jax.tree_util.keystr(p)), params)
  tok = resolve_tokenizer(model, tokenizer)
  with atomic_dir(final, force) as tmp:
    ckptr = ocp.StandardCheckpointer()
    try:
      ckptr.save(os.path.join(tmp, PARAMS_DIR), params)
      ckptr.wait_until_finished()
    finally:
      ckptr.close()
    dump_json(os.path.join(tmp, SPEC_FILE), {"format": SPEC_FORMAT, "spec": model.spec.to_json(), "weights": WEIGHTS})
    if tok is not None:
      save_tokenizer(tok, tmp)
  log.info("wrote orbax checkpoint %s (%d parameters)", final, model.num_params)
  return final


def _is_shape(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def _read_spec(path: str) -> ModelSpec:
  from jaxprune.io.hf import read_json
  d = read_json(os.path.join(path, SPEC_FILE))
  if d.get("format") != SPEC_FORMAT or d.get("weights") != WEIGHTS or "spec" not in d:
    raise CheckpointError(
        f"{path}/{SPEC_FILE} does not describe an orbax checkpoint (format {d.get('format')!r}, weights "
        f"{d.get('weights')!r}; expected format {SPEC_FORMAT}, weights {WEIGHTS!r}). Re-save it with save_orbax")
  return ModelSpec.from_json(d["spec"])


def _stored_dtypes(ckptr, params_dir: str) -> dict[str, np.dtype]:
  """keystr(path) -> dtype of every array in the checkpoint."""
  md = ckptr.metadata(params_dir)
  tree = getattr(getattr(md, "item_metadata", md), "tree", md)
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "dtype") and hasattr(x, "shape"))[0]
  return {jax.tree_util.keystr(p): (np.dtype(m.dtype), tuple(m.shape)) for p, m in leaves}


def _target_shardings(shapes, shardings, mesh: Mesh | None):
  """A tree like `shapes` with a Sharding per leaf."""
  if shardings is not None and mesh is not None:
    raise UsageError("load_orbax takes shardings= or mesh=, not both; pass shardings built on the mesh")
  if callable(shardings):
    return jax.tree_util.tree_map_with_path(lambda p, s: shardings(jax.tree_util.keystr(p), s), shapes,
                                            is_leaf=_is_shape)
  if shardings is not None:
    return shardings
  default = NamedSharding(mesh, PartitionSpec()) if mesh is not None else SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda s: default, shapes, is_leaf=_is_shape)


def load_orbax(path: str, dtype=None, *, shardings: ShardingsArg = None, mesh: Mesh | None = None,
               lazy: bool = False) -> Model:
  """Restores a `save_orbax` checkpoint as a `Model`.

  Args:
    path: the checkpoint directory.
    dtype: cast every array to this dtype while restoring (default: as stored).
    shardings: where each array goes: a pytree of `jax.sharding.Sharding`
      shaped like the parameters, or `f(keystr_path, shape) -> Sharding`.
    mesh: shorthand for replicating every array over `mesh`.
      Without either, arrays land on the default device, uncommitted (usable with any mesh).
    lazy: restore only the embeddings, norm and head now (in the stored dtype)
      and each block when it is used, by orbax's partial restore
      (`jaxprune.io.lazy`); `dtype` is then the blocks' (default float32).

  Raises:
    CheckpointError: the directory is missing, partial or corrupt.
  """
  import orbax.checkpoint as ocp

  path = os.path.abspath(os.path.expanduser(path))
  if not is_orbax_dir(path):
    raise CheckpointError(f"{path} is not an orbax checkpoint written by jaxprune (it needs {PARAMS_DIR}/ and "
                          f"{SPEC_FILE}); pass a directory written by save_orbax or `jaxprune export --format orbax`")
  spec = _read_spec(path)
  shapes = param_shapes(spec)
  params_dir = os.path.join(path, PARAMS_DIR)
  ckptr = ocp.StandardCheckpointer()
  try:
    try:
      stored = _stored_dtypes(ckptr, params_dir)
    except Exception as e:  # noqa: BLE001 -- orbax raises many types for damaged metadata
      raise CheckpointError(f"{params_dir} has unreadable orbax metadata ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); the checkpoint is partial or corrupt. "
                            "Re-save it") from None
    want = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_shape)[0]}
    missing = sorted(set(want) - set(stored))
    extra = sorted(set(stored) - set(want))
    wrong = sorted(k for k in set(want) & set(stored) if stored[k][1] != want[k])
    if missing or extra or wrong:
      raise ShapeError(f"{params_dir} does not match its {SPEC_FILE}: missing {missing[:5]}, unexpected "
                       f"{extra[:5]}, wrong shapes {wrong[:5]}. The checkpoint is partial or from another model")
    if lazy:
      return _lazy_orbax(spec, path, params_dir, stored, dtype)
    targets = _target_shardings(shapes, shardings, mesh)
    cast = None if dtype is None else jnp.dtype(dtype)

    def abstract(p, shape, sharding):
      k = jax.tree_util.keystr(p)
      return jax.ShapeDtypeStruct(shape, cast or stored[k][0], sharding=sharding)

    target = jax.tree_util.tree_map_with_path(abstract, shapes, targets, is_leaf=_is_shape)
    try:
      params = ckptr.restore(params_dir, target)
    except Exception as e:  # noqa: BLE001 -- tensorstore and orbax raise many types for missing chunks
      raise _unrestorable(params_dir, e) from None
  finally:
    ckptr.close()
  if shardings is None and mesh is None:
    # Orbax commits what it restores to a device; a model placed nowhere in particular must
    # be usable with any mesh (the pipeline shards the activations over all devices).
    params = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), params)
  return Model.checked(spec, _finite(params, "", path), source=path)


def _finite(tree, prefix: str, source: str):
  """`tree`, after checking that every restored array is finite (as the safetensors and GGUF
  readers check every tensor they read): a NaN weight would make every logit NaN."""
  for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not bool(jnp.all(jnp.isfinite(x))):
      raise CheckpointError(f"{source}: parameter {prefix}{jax.tree_util.keystr(p)} holds NaN or Inf; the checkpoint "
                            "is damaged. Re-save it from an intact model")
  return tree


def _unrestorable(params_dir: str, e: Exception) -> CheckpointError:
  return CheckpointError(f"{params_dir} could not be restored ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); the checkpoint is partial or corrupt. "
                         "Re-save it")


def _partial_restore(params_dir: str, item, shardings=None):
  """The arrays of `item` (a subtree of the checkpoint's, with None for what is skipped),
  each cast to its `item` dtype, on the first device or laid out by `shardings` (a tree like
  `item`; orbax then reads only the slices this process's devices hold)."""
  import orbax.checkpoint as ocp

  if shardings is None:
    shardings = jax.tree.map(lambda s: SingleDeviceSharding(jax.devices()[0]), item)
  args = jax.tree.map(lambda s, sh: ocp.ArrayRestoreArgs(sharding=sh, dtype=s.dtype), item, shardings)
  ckptr = ocp.PyTreeCheckpointer()
  try:
    return ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True))
  except Exception as e:  # noqa: BLE001 -- tensorstore and orbax raise many types for missing chunks
    raise _unrestorable(params_dir, e) from None
  finally:
    ckptr.close()


def _lazy_orbax(spec: ModelSpec, path: str, params_dir: str, stored, dtype) -> Model:
  from jaxprune.io.lazy import LazyBlocks, block_shapes

  shapes = param_shapes(spec)

  def abstract(p, shape):
    return jax.ShapeDtypeStruct(shape, stored[jax.tree_util.keystr(p)][0])

  target = jax.tree_util.tree_map_with_path(abstract, shapes, is_leaf=_is_shape)
  blocks = list(target.pop("layers"))
  # Host copies: restored arrays are committed to one device, and the pipeline places its own.
  top = _finite(jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), _partial_restore(params_dir, target)), "", path)
  n = len(blocks)

  def only(i, x):
    # The checkpoint's tree with block i's entry `x` and nothing else (a partial restore).
    return {"layers": [x if j == i else None for j in range(n)]}

  def read(i):
    blk = jax.tree.map(np.asarray, _partial_restore(params_dir, only(i, blocks[i]))["layers"][i])
    return _finite(blk, f"layers[{i}]", path)

  dtype = jnp.dtype(dtype or jnp.float32)
  shapes_in_dtype = block_shapes(spec, dtype)

  def restore(i, shardings):
    # The block straight onto the mesh in the run's dtype: each process restores its devices' slices.
    blk = _partial_restore(params_dir, only(i, shapes_in_dtype[i]), only(i, shardings))["layers"][i]
    return _finite(blk, f"layers[{i}]", path)

  layers = LazyBlocks(read, shapes_in_dtype, dtype, source=path, restore=restore)
  return Model(spec, {**top, "layers": layers}, source=path)


__all__ = ["is_orbax_dir", "load_orbax", "save_orbax"]
