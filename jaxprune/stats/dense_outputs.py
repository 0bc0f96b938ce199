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
`durable`: a checkpointed run that is killed finds whole files when it resumes),
and the sha256 of each output is kept (`digests`, recorded in the checkpoint), so
a resumed run uses only outputs that are what was written, and finite. A module
whose output is missing, damaged, or was never stored (`DenseOutputs(None)`: the
outputs did not fit on the disk) is recomputed by the loop with the plan's own
kernels (`jaxprune.prune.context.StepContext.stored_dense`), to the same bits: the store is only
ever a saving, and no result depends on the free disk space.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
import shutil

import jax
import numpy as np

from jaxprune.io.atomic import write_file

log = logging.getLogger(__name__)

# Use at most this fraction of the free space of the directory.
MAX_DISK_FRACTION = 0.5


def _sha256(y: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(y).view(np.uint8).reshape(-1).data).hexdigest()


class DenseOutputs:
  """Module output streams of the dense model, one .npy file per module (none when
  `directory` is None: the loop then computes each one again)."""

  def __init__(self, directory: str | None, durable: bool = False, digests: dict[str, str] | None = None):
    self.directory = directory
    self.durable = durable
    # File name -> sha256 of the array written (what a resumed run's checkpoint recorded).
    self.digests: dict[str, str] = dict(digests or {})
    if directory is not None:
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
    if self.directory is None:
      return
    self.flush()
    self._pending = self._writer.submit(self._write, self._path(layer, kind), y)

  def _write(self, path: str, y: jax.Array) -> None:
    host = np.asarray(y)
    self.digests[os.path.basename(path)] = _sha256(host)
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
    """Module `kind` of block `layer`'s dense output [C, B, T, D], or None if it was not stored,
    or is not what was stored (then said in a warning: the loop computes it again)."""
    if self.directory is None:
      return None
    self.flush()
    path = self._path(layer, kind)
    if not os.path.exists(path):
      return None
    try:
      y = np.load(path)
    except Exception as e:  # noqa: BLE001 -- numpy raises many types for a cut-off file
      return self._damaged(path, f"cannot be read ({type(e).__name__})")
    recorded = self.digests.get(os.path.basename(path))
    if recorded is not None and _sha256(y) != recorded:
      return self._damaged(path, "is not what was written (its sha256 differs)")
    if not np.isfinite(y).all():
      return self._damaged(path, "holds NaN or Inf values")
    return y

  @staticmethod
  def _damaged(path: str, what: str) -> None:
    log.warning("the stored dense output %s %s: computing it again", path, what)
    return None
