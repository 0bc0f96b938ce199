"""The model families jaxprune computes, imports and exports: one file each, collected here.

`get(name)` is the one place a family name is looked up; `for_model_type`
finds the family of a Hugging Face config. Adding a family is adding a file
beside these and one line below (docs/families.md says which fields and tests).
"""

from __future__ import annotations

from types import MappingProxyType

from jaxprune.errors import ConfigError
from jaxprune.families.base import Family
from jaxprune.families.gemma3 import GEMMA3
from jaxprune.families.gpt2 import GPT2
from jaxprune.families.llama import LLAMA
from jaxprune.families.mistral import MISTRAL
from jaxprune.families.qwen2 import QWEN2
from jaxprune.families.qwen3 import QWEN3

_REGISTRY: dict[str, Family] = {f.name: f for f in (LLAMA, MISTRAL, QWEN2, GPT2, QWEN3, GEMMA3)}
# A read-only view for callers that list or test membership (jaxprune.FAMILIES).
REGISTRY = MappingProxyType(_REGISTRY)


def names() -> tuple[str, ...]:
  """Registered family names, in registration order."""
  return tuple(_REGISTRY)


def get(name: str) -> Family:
  try:
    return _REGISTRY[name]
  except KeyError:
    raise ConfigError(f"model family {name!r} is not supported; supported families: "
                      f"{', '.join(sorted(_REGISTRY))}") from None


def for_model_type(model_type) -> Family:
  """The family whose Hugging Face `model_type` this is; a one-line ConfigError naming the supported ones."""
  for fam in _REGISTRY.values():
    if fam.model_type == model_type:
      return fam
  raise ConfigError(f"model_type {model_type!r} is not supported; supported: "
                    f"{', '.join(f.model_type for f in _REGISTRY.values())}")


def exportable() -> tuple[str, ...]:
  """Families with a Hugging Face export (a tensor table and a transformers class), sorted."""
  return tuple(sorted(n for n, f in _REGISTRY.items() if f.table is not None and f.architectures))


__all__ = ["Family", "REGISTRY", "exportable", "for_model_type", "get", "names"]
