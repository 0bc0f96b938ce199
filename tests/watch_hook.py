"""Watches a run for whole Gram matrices (issue 31): at every statistics pass, cut, shrink, sweep
and solve, every live array's shards on this process's devices, the statistics handed between
the run's parts, and every device array brought to the host. In a test (`install` with
monkeypatch's setattr) or in a child process (`install_from_env`, the findings written at exit)."""

from __future__ import annotations

import atexit
import json
import os

# Set in a child's environment to "FILE_PREFIX:W1,W2,...": the Gram widths to watch for; each
# process writes its findings to FILE_PREFIX.<process index> at exit.
ENV = "JAXPRUNE_TEST_WATCH"

WATCHED = [("jaxprune.stats.passes", "hidden_pass"), ("jaxprune.stats.passes", "gather_hidden"),
           ("jaxprune.stats.split", "cut"), ("jaxprune.stats.split", "shrink"), ("jaxprune.stats.split", "with_cross"),
           ("jaxprune.criteria.obs_split", "_sweep"), ("jaxprune.reconstruct", "ridge_solve"),
           ("jaxprune.sharded_solve", "_solve")]


class Watch:
  """What was seen: `seen` (where, what, shape) for each whole Gram or cross moment found, `converted`
  the shapes of Gram-wide arrays brought to the host, `calls` the watched functions' call counts."""

  def __init__(self, grams: set[int]):
    self.grams, self.seen, self.converted, self.calls = set(grams), [], [], {}

  def _gram_wide(self, shape) -> bool:
    return len(shape) == 2 and shape[0] == shape[1] and shape[0] in self.grams

  def scan(self, where: str) -> None:
    """No shard on this process's devices is a square as wide as a watched Gram."""
    import jax

    for a in jax.live_arrays():
      for s in a.addressable_shards:
        if self._gram_wide(s.data.shape):
          self.seen.append((where, str(a.shape), str(s.data.shape)))

  def structures(self, where: str, *trees) -> None:
    """Statistics handed on are Gram and cross moment split by rows over `model`, never joined."""
    import jax

    from jaxprune.stats import moments

    stats = (moments.RowSplit, moments.Moments)
    for t in jax.tree.leaves(trees, is_leaf=lambda v: isinstance(v, stats)):
      if isinstance(t, moments.Moments) and t.xx.shape[0] - 1 in self.grams:
        self.seen.append((where, "joined Moments", str(t.xx.shape)))
      if isinstance(t, moments.RowSplit):
        for a in (t.gram, t.xy):
          if a is None:
            continue
          m = a.sharding.mesh.shape.get("model", 1) if hasattr(a.sharding, "mesh") else 1
          if m == 1 or any(s.data.shape[0] * m != a.shape[0] for s in a.addressable_shards):
            self.seen.append((where, "not split by rows", str(a.shape)))

  def report(self) -> dict:
    return {"seen": self.seen, "converted": self.converted, "calls": self.calls}


def install(setattr, grams) -> Watch:
  """Wraps the watched functions and the device-to-host conversion with `setattr(obj, name, value)`."""
  import importlib

  from jax._src import array as jax_array

  watch = Watch(grams)
  for module_name, name in WATCHED:
    module = importlib.import_module(module_name)
    setattr(module, name, _watched(watch, getattr(module, name), name))
  to_numpy = jax_array.ArrayImpl.__array__

  def converted(self, *a, **k):
    out = to_numpy(self, *a, **k)
    if watch._gram_wide(out.shape):
      watch.converted.append(str(out.shape))
    return out

  setattr(jax_array.ArrayImpl, "__array__", converted)
  return watch


def _watched(watch: Watch, fn, name: str):
  def run(*a, **k):
    watch.structures(name, a, k)
    out = fn(*a, **k)
    watch.calls[name] = watch.calls.get(name, 0) + 1
    watch.structures(name, out)
    watch.scan(name)
    return out

  return run


def install_from_env() -> None:
  """In a child process: the watch per ENV, its findings written at exit."""
  spec = os.environ.get(ENV)
  if not spec:
    return
  prefix, widths = spec.rsplit(":", 1)
  watch = install(setattr, {int(w) for w in widths.split(",")})

  def write():
    import jax

    with open(f"{prefix}.{jax.process_index()}", "w") as f:
      json.dump(watch.report(), f)

  atexit.register(write)
