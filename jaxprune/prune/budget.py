"""How many units each module keeps: the parameter costs of a block and the budget's shape."""

from __future__ import annotations

import dataclasses

from jaxprune import allocate
from jaxprune.models import adapter as A
from jaxprune.spec import layer_param_count


def costs(spec, layer, bias_after: dict) -> allocate.Costs:
  return allocate.Costs.of(spec, layer, **bias_after)


def dense_block_params(spec, i: int) -> int:
  return layer_param_count(spec, spec.layers[i])


def start(c) -> allocate.Budget:
  """The budget at the first block (no carry yet)."""
  return allocate.Budget(c.sparsity, c.attn_sparsity, c.free_groups, carry_rounding=c.rounding == "carry",
                         round_to=c.round_to)


def keep_shape(budget: allocate.Budget, carry: float, spec, kind, i, layer, bias_after: dict, block,
               plan) -> tuple[tuple[int, int | None], float]:
  """((units to keep, KV heads to keep or None), the carry after it) of block i's module;
  `spec` is the dense model's, `block` block i as it stands (its attention already cut when
  `kind` is the MLP). `budget` is not changed: a copy with `carry` takes the step."""
  b = dataclasses.replace(budget, carry=carry)
  dense_layer = spec.layers[i]
  cost = costs(spec, layer, bias_after)
  if kind is A.ATTN:
    return b.heads(layer, dense_layer, cost, plan), b.carry
  attn = block["attn"]
  kept = (attn["q"]["kernel"].shape[1], attn["k"]["kernel"].shape[1])
  return (b.channels(layer, dense_layer, cost, dense_block_params(spec, i), kept, plan), None), b.carry
