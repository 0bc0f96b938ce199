"""jaxprune: structured pruning of LLMs without retraining, in JAX."""

from jaxprune.errors import CheckpointError, ConfigError, JaxpruneError, ShapeError, UsageError
from jaxprune.io import load, load_tokenizer
from jaxprune.model import Model
from jaxprune.models import forward, logits
from jaxprune.spec import FAMILIES, LayerSpec, ModelSpec, RopeSpec, count_params

from jaxprune.version import __version__

__all__ = ["CheckpointError", "ConfigError", "FAMILIES", "JaxpruneError", "LayerSpec", "Model", "ModelSpec",
           "RopeSpec", "ShapeError", "UsageError", "count_params", "forward", "load", "load_tokenizer", "logits"]
