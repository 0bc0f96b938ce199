"""The pruning engine: configuration and presets (`config`, `presets`), the module step
(`step`) and the layer loop (`engine`); docs/engine.md walks through them.

    from jaxprune.prune import PruneConfig, prune
    result = prune(model, calib_windows, PruneConfig.preset("recommended", sparsity=0.2))
"""

from jaxprune.prune import presets
from jaxprune.prune.config import PruneConfig, PruneResult
from jaxprune.prune.engine import prune
from jaxprune.prune.streams import check_batches

__all__ = ["PruneConfig", "PruneResult", "check_batches", "presets", "prune"]
