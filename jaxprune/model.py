"""`Model`: a parameter pytree plus its static description."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxprune.spec import ModelSpec, Params, check_params, count_params


@struct.dataclass
class Model:
  """Parameters (a Flax-style dict pytree) and the `ModelSpec` they realise.

  `Model` is a frozen `flax.struct` dataclass, itself a pytree whose only
  leaves are the parameters; the spec and the source path are static metadata,
  so `jax.jit` and `jax.tree.map` see through it.
  """

  spec: ModelSpec = struct.field(pytree_node=False)
  params: Params
  source: str | None = struct.field(pytree_node=False, default=None)  # where the weights and tokenizer came from

  @classmethod
  def checked(cls, spec: ModelSpec, params: Params, source: str | None = None) -> "Model":
    """A Model, after checking that every array has the shape `spec` implies."""
    check_params(spec, params)
    return cls(spec, params, source)

  @property
  def num_params(self) -> int:
    return count_params(self.params)

  def astype(self, dtype) -> "Model":
    dtype = jnp.dtype(dtype)
    return dataclasses.replace(self, params=jax.tree.map(lambda x: jnp.asarray(x, dtype), self.params))

  def to_numpy(self) -> Params:
    return jax.tree.map(np.asarray, self.params)

