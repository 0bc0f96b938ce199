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
