"""Where the engine used to live; it is the package `jaxprune.prune` now (docs/engine.md).
Kept so that scripts importing `jaxprune.pipeline` keep working."""

from jaxprune.prune import PruneConfig, PruneResult, check_batches, prune

__all__ = ["PruneConfig", "PruneResult", "check_batches", "prune"]
