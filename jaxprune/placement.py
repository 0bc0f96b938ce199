"""Where the small dense linear algebra runs, and in which precision.

The rule, in one place:

- Solves and inverses (ridge least squares, the `goa-obs` sweep) are float64, always: a
  float32 Cholesky of an ill-conditioned Gram matrix loses the small directions the fit needs.
- Where the backend is a CPU (the CPU backend, and the host of a TPU) they go to SciPy's
  LAPACK on numpy arrays (`lapack_solves`): its blocked, threaded Cholesky took a quarter of
  the time of XLA's CPU one on a 1537 x 1537 system (`benchmarks/README.md`), and numpy
  compiles nothing per system size.
- A GPU factors on the device in float64 under `float64_solves`. A TPU has no float64, so
  its JAX float64 work (the sweep's updates) runs on the host CPU device instead
  (`solve_on_host`).
- Statistics come out of the data-parallel kernels replicated on every device; a solve takes
  one local copy (`local_copy`) rather than repeating the same work once per device, and its
  result goes back where the statistics live (`replicate_like`).
- Arrays the host holds (numpy, or JAX arrays on CPU devices of this process, `on_host`) are
  cut and gathered with numpy, which compiles nothing per shape.
- Small host BLAS work (fewer than `SERIAL_BLAS_BELOW` rows: the adaptive plan's 513-channel
  sweep blocks) runs on one BLAS thread (`serial_blas`). Alone, a 513-row inverse is faster on
  OpenBLAS's pool, but the pool's threads keep spinning after each call and take the cores
  from XLA's threads, which run the sweep's steps in between: the plan's sweep of a
  4096-channel MLP ran 1.9x faster on one BLAS thread on a quiet machine and 3.9x beside two
  spinning processes (`benchmarks/results/blas_threads.json`).
- Split (`Solves.SPLIT`, the default `Solves.AUTO` on an accelerator's mesh with a `model` axis):
  the statistics stay split by rows over `model` from accumulation to the solve
  (`jaxprune.stats.split`), the ridge solves run on the devices (`jaxprune.sharded_solve`:
  float64 where the backend has it, else float32 with iterative refinement) and so does the
  `goa-obs` sweep (`jaxprune.criteria.obs_split`): no device or host holds a whole Gram matrix.
  On the CPU backend AUTO keeps them joined on the host, where LAPACK is the faster path.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxprune.errors import UsageError


SERIAL_BLAS_BELOW = 1024  # rows; the loop's wider systems keep the threaded BLAS

class Solves(str, enum.Enum):
  """Where a run's statistics go to be solved: `auto` (split on an accelerator's mesh with a
  `model` axis, else joined), `joined` (gathered where the solves run: the host's LAPACK on CPU
  and TPU, each device on GPU) or `split` (kept split over `model`, solved on the devices)."""

  AUTO = "auto"
  JOINED = "joined"
  SPLIT = "split"

  def __str__(self) -> str:
    return self.value


def solve_mesh(mode: Solves | str, mesh: Mesh | None) -> Mesh | None:
  """The mesh whose `model` axis the solves split over under `mode`, or None (joined). AUTO keeps
  a mesh that `split_solves` already names."""
  mode = Solves(mode)
  if mode is Solves.SPLIT and (mesh is None or mesh.shape.get("model", 1) == 1):
    raise UsageError("--solves split keeps the statistics split over the mesh's model axis, and this run has none; "
                     "pass a mesh with one (--mesh data=D,model=M, M > 1) or --solves auto")
  if mesh is None or mesh.shape.get("model", 1) == 1 or mode is Solves.JOINED:
    return None
  if mode is Solves.SPLIT or jax.default_backend() != "cpu":
    return mesh
  return split_solve_mesh()


_SPLIT_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("split_solves", default=None)


@contextlib.contextmanager
def split_solves(mesh: Mesh | None):
  """Within: ridge solves split over `mesh`'s `model` axis on its devices (None: as by default)."""
  token = _SPLIT_MESH.set(mesh if mesh is not None and mesh.shape.get("model", 1) > 1 else None)
  try:
    yield
  finally:
    _SPLIT_MESH.reset(token)


def split_solve_mesh() -> Mesh | None:
  """The mesh `split_solves` asked for (one with a `model` axis over 1), or None."""
  return _SPLIT_MESH.get()


def lapack_solves() -> bool:
  """Solves run with SciPy's LAPACK on the host: the CPU backend, and the host of a TPU."""
  return jax.default_backend() in ("cpu", "tpu")


@functools.cache
def _blas_pools():
  import scipy.linalg  # noqa: F401  (SciPy's own OpenBLAS must be loaded to be seen)
  from threadpoolctl import ThreadpoolController

  return ThreadpoolController()


@contextlib.contextmanager
def serial_blas(rows: int):
  """Within: NumPy's and SciPy's BLAS on one thread when the work is on matrices of fewer
  than `SERIAL_BLAS_BELOW` rows (as it was otherwise). The limit is process-wide, so it is
  for host-side work that runs one system at a time."""
  if rows >= SERIAL_BLAS_BELOW:
    yield
    return
  with _blas_pools().limit(limits=1, user_api="blas"):
    yield


BUCKET = 128  # the kept widths of device solves are padded to a multiple of this (x the `model` axis)


def bucket_width(kept: int, full: int, mesh: Mesh | None = None) -> int:
  """The width a system of `kept` of a module's `full` features is padded to on the devices:
  the next multiple of BUCKET x the mesh's `model` axis, at most `full`. Adaptive allocation
  gives nearly every layer its own kept width, and each width would compile its own cut,
  solve and residuals: with buckets the compiles are bounded by the module's width, not by
  the model's depth."""
  q = BUCKET * (mesh.shape.get("model", 1) if mesh is not None else 1)
  return min(full, -(-kept // q) * q)


def solve_on_host() -> bool:
  """Platforms without float64 arithmetic (TPU) run their float64 JAX work on the host CPU."""
  return jax.default_backend() == "tpu"


@contextlib.contextmanager
def float64_solves():
  """float64 enabled and, where the accelerator has none, the host CPU as the default device."""
  with jax.enable_x64(True):
    if solve_on_host():
      with jax.default_device(jax.devices("cpu")[0]):
        yield
    else:
      yield


def to_host(x) -> np.ndarray:
  """`x` as a numpy array on every process (a collective for arrays split across processes)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
    from jax.experimental import multihost_utils  # only multi-process runs pay for its import
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def local_copy(x):
  """A copy of array `x` on this process's first device (non-arrays as they are).

  Arrays sharded across processes are gathered, a collective: every process
  must call this in the same order, as the pipeline's processes do.
  """
  if not isinstance(x, jax.Array) or len(x.sharding.device_set) == 1:
    return x
  if x.is_fully_replicated:
    return x.addressable_data(0)
  if x.is_fully_addressable:
    return jax.device_put(x, jax.local_devices()[0])
  # Sharded across processes: every process gathers the whole (small) array.
  return jax.device_put(to_host(x), jax.local_devices()[0])


def replicate_like(y, like):
  """`y` replicated over the devices `like` lives on (as it was, when `like` is on one device)."""
  if not isinstance(like, jax.Array) or len(like.sharding.device_set) == 1:
    return y
  sharding = like.sharding
  mesh = sharding.mesh if isinstance(sharding, NamedSharding) else Mesh(np.array(list(sharding.device_set)), ("all",))
  host = to_host(y)
  return jax.make_array_from_callback(host.shape, NamedSharding(mesh, P()), lambda idx: host[idx])


def host64(x) -> np.ndarray:
  """`x` as a float64 numpy array on this host (gathered from a mesh if need be)."""
  return np.asarray(local_copy(x), np.float64)


def to_solve(x, keep_dtype: bool = False) -> jax.Array:
  """`x` as a float64 array where the solves run (inside `float64_solves`); with
  `keep_dtype`, in its own dtype (for a kernel that widens it where it reads it)."""
  x = local_copy(x)
  if solve_on_host():
    x = np.asarray(x)
  return jnp.asarray(x, None if keep_dtype else jnp.float64)


def on_host(v) -> bool:
  """Whether the host CPU holds `v` (numpy, or a JAX array on this process's CPU devices)."""
  return isinstance(v, np.ndarray) or (isinstance(v, jax.Array) and v.is_fully_addressable and
                                       all(d.platform == "cpu" for d in v.sharding.device_set))
