"""The activation streams a run carries from module to module, and the windows they start from.

Calibration windows [S, T] are cut into batches [C, B, T] and embedded into streams
[C, B, T, D] sharded over the mesh's `data` axis. Each group of batches (all of them, or
all but the last one held out to choose the damping) carries two streams: the dense
model's (`xd`, only when some module solves against the dense outputs) and the pruned
model's (`xp`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import sharding
from jaxprune.errors import UsageError
from jaxprune.models.forward import embed
from jaxprune.spec import ModelSpec


@dataclasses.dataclass(frozen=True)
class Group:
  """One group of calibration windows: its dense (None when the run needs none) and pruned streams.
  While no module has changed anything the two are one array (`xd is xp`)."""

  xd: jax.Array | None
  xp: jax.Array


def chunks(windows: np.ndarray, batch_size: int, mesh, what: str) -> np.ndarray:
  """[S, T] -> [S/B, B, T] after checking the sizes fit."""
  windows = np.asarray(windows, np.int32)
  if windows.ndim != 2:
    raise UsageError(f"{what} windows must be a [samples, seq_len] array, got shape {windows.shape}")
  S = windows.shape[0]
  B = check_batches(S, batch_size, mesh, what)
  return windows.reshape(S // B, B, windows.shape[1])


def check_batches(S: int, batch_size: int, mesh, what: str = "calibration") -> int:
  """The batch size `S` windows are split into, after checking that they split (callers check
  before they make the windows: self-generating them takes minutes)."""
  if batch_size < 1:
    raise UsageError(f"batch size must be a positive number of windows, got {batch_size}; e.g. 16")
  B = min(batch_size, S)
  n_data = mesh.shape[sharding.DATA]
  if B % n_data:
    raise UsageError(f"batch size {B} is not a multiple of the {n_data} data-parallel devices; "
                     f"pass a batch size divisible by {n_data}")
  if S % B:
    raise UsageError(f"{S} {what} windows do not split into batches of {B}; use a sample count divisible by {B}")
  return B


def split_holdout(batches: np.ndarray, holdout: bool) -> list[np.ndarray]:
  """[C, B, T] -> [fit chunks] or [fit chunks, last chunk held out for choosing the damping]."""
  if not holdout:
    return [batches]
  if len(batches) < 2:
    raise UsageError(f"automatic damping holds out one batch of calibration windows, so it needs at least two "
                     f"batches; got {len(batches)}. Use more calibration windows or a smaller batch size")
  return [batches[:-1], batches[-1:]]


def embed_stream(spec: ModelSpec, params, tokens: np.ndarray, mesh) -> jax.Array:
  C, B, T = tokens.shape
  x = embed(spec, params, jnp.asarray(tokens.reshape(C * B, T)))
  return jax.device_put(x.reshape(C, B, T, -1), sharding.stream_sharding(mesh))


def positions(T: int):
  return jnp.arange(T, dtype=jnp.int32)[None]


def first_groups(spec: ModelSpec, params, tokens: list[np.ndarray], mesh, with_dense: bool) -> list[Group]:
  """The groups entering block 0: the embeddings, one array standing for both streams."""
  return [Group(x if with_dense else None, x) for x in (embed_stream(spec, params, t, mesh) for t in tokens)]
