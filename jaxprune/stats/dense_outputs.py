"""The dense model's module outputs, kept on disk from the adaptive plan to the layer loop.

Adaptive allocation first runs the dense model over the calibration windows to
score every module (the plan). A run that solves against the dense model's
outputs (the refit, reconstruction, `goa-obs`) needs those same outputs again
in the layer loop, as the targets of its solves. Rather than running the dense
model a second time, the plan writes each module's output stream ([C, B, T, D]
in the stream's dtype: C*B*T*D*4 bytes per module in float32, 38 MB for
SmolLM2 at 128 x 128 tokens) and the loop reads it back, adding it to the dense
residual stream instead of recomputing it.

Files are written to a temporary name and renamed (and flushed to disk when
`durable`: a checkpointed run that is killed finds whole files when it resumes).
A module whose file is missing is recomputed by the loop, so the store is only
ever a saving.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import shutil

import jax
import numpy as np

from jaxprune.io.atomic import write_file

log = logging.getLogger(__name__)

# Use at most this fraction of the free space of the directory.
MAX_DISK_FRACTION = 0.5


class DenseOutputs:
  """Module output streams of the dense model, one .npy file per module."""

  def __init__(self, directory: str, durable: bool = False):
    self.directory = directory
    self.durable = durable
    os.makedirs(directory, exist_ok=True)
    # Files are written by a background thread while the plan computes the next module;
    # one write at a time, so at most two outputs wait in memory.
    self._writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="jaxprune-dense")
    self._pending: concurrent.futures.Future | None = None

  @staticmethod
  def fits(directory: str, nbytes: int) -> bool:
    """Whether `nbytes` of module outputs fit in the free space the store may use there."""
    os.makedirs(directory, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if nbytes > MAX_DISK_FRACTION * free:
      log.info("dense module outputs (%.1f GB) do not fit in %s (%.1f GB free): the layer loop runs the dense "
               "model again", nbytes / 1e9, directory, free / 1e9)
      return False
    return True

  def _path(self, layer: int, kind: str) -> str:
    return os.path.join(self.directory, f"dense_{layer:04d}_{kind}.npy")

  def put(self, layer: int, kind: str, y: jax.Array) -> None:
    """Writes module `kind` of block `layer`'s output stream (in the background)."""
    self.flush()
    self._pending = self._writer.submit(self._write, self._path(layer, kind), y)

  def _write(self, path: str, y: jax.Array) -> None:
    host = np.asarray(y)
    if self.durable:
      write_file(path, lambda f: np.save(f, host), force=True, binary=True)
      return
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
      np.save(f, host)
    os.replace(tmp, path)

  def flush(self) -> None:
    """Waits for the write in flight (raising its error, if any)."""
    if self._pending is not None:
      pending, self._pending = self._pending, None
      pending.result()

  def close(self) -> None:
    """Finishes the write in flight and stops the writer thread."""
    try:
      self.flush()
    finally:
      self._writer.shutdown()

  def get(self, layer: int, kind: str) -> np.ndarray | None:
    """Module `kind` of block `layer`'s dense output [C, B, T, D], or None if it was not stored."""
    self.flush()
    path = self._path(layer, kind)
    if not os.path.exists(path):
      return None
    return np.load(path)
