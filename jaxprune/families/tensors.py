"""The pieces of a family's tensor-name table: how one Hugging Face tensor becomes jaxprune leaves.

A `Rule` maps one Hugging Face tensor (a PyTorch-layout array) to one or more
jaxprune leaves and back; a `TensorTable` is a family's rules for the model top
and for one block. `jaxprune.io.mapping` applies them both ways, so import and
export cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
  """One HF tensor <-> leaves at `paths` (relative to a block, or to the model).

  `load(hf_array, layer) -> tuple of leaves`, `save(*leaves, layer) -> hf_array`.
  `when(spec, layer)` says whether the tensor exists for this model.
  """

  hf: str
  paths: tuple[Path, ...]
  load: Callable
  save: Callable
  when: Callable[[Any, Any], bool] = lambda spec, layer: True


@dataclasses.dataclass(frozen=True)
class TensorTable:
  top: tuple[Rule, ...]
  block: tuple[Rule, ...]
  block_prefix: str  # HF prefix of block i, with {i}
  base_prefix: str  # prefix that base-model checkpoints (no LM head) omit
  ignored: tuple[str, ...]  # regexes of buffers that checkpoints may carry


def ident():
  return dict(load=lambda w, l: (w,), save=lambda w, l: w)


def linear():
  """PyTorch `nn.Linear.weight` [out, in] <-> kernel [in, out]."""
  return dict(load=lambda w, l: (w.T,), save=lambda k, l: k.T)


def heads_in(n: str):
  """q/k/v weight [n*H, D] <-> kernel [D, n, H]; n is 'N' or 'K'."""

  def load(w, l):
    n_ = l.num_heads if n == "N" else l.num_kv_heads
    return (w.reshape(n_, l.head_dim, w.shape[1]).transpose(2, 0, 1),)

  def save(k, l):
    return k.transpose(1, 2, 0).reshape(-1, k.shape[0])

  return dict(load=load, save=save)


def heads_bias(n: str):
  """q/k/v bias [n*H] <-> [n, H]."""

  def load(b, l):
    n_ = l.num_heads if n == "N" else l.num_kv_heads
    return (b.reshape(n_, l.head_dim),)

  return dict(load=load, save=lambda b, l: b.reshape(-1))


def heads_out(conv1d: bool):
  """o weight [D, N*H] (Linear) or [N*H, D] (GPT-2 Conv1D) <-> kernel [N, H, D]."""

  def load(w, l):
    w = w if conv1d else w.T
    return (w.reshape(l.num_heads, l.head_dim, w.shape[1]),)

  def save(k, l):
    w = k.reshape(-1, k.shape[-1])
    return w if conv1d else w.T

  return dict(load=load, save=save)


def fused_qkv_weight():
  """Fused c_attn [D, 3*N*H] (GPT-2's Conv1D layout) <-> q, k, v kernels [D, N, H]."""

  def load(w, l):
    D = w.shape[0]
    q, k, v = np.split(w, 3, axis=1)
    return tuple(x.reshape(D, l.num_heads, l.head_dim) for x in (q, k, v))

  def save(q, k, v, l):
    return np.concatenate([x.reshape(x.shape[0], -1) for x in (q, k, v)], axis=1)

  return dict(load=load, save=save)


def fused_qkv_bias():

  def load(b, l):
    return tuple(x.reshape(l.num_heads, l.head_dim) for x in np.split(b, 3))

  def save(q, k, v, l):
    return np.concatenate([x.reshape(-1) for x in (q, k, v)])

  return dict(load=load, save=save)


# `Rule.when` predicates: tensors that exist only for some models of a family.


def qkv_bias(spec, layer):
  return spec.qkv_bias


def o_bias(spec, layer):
  return spec.o_bias


def mlp_bias(spec, layer):
  return spec.mlp_bias


def untied(spec, layer):
  return not spec.tie_embeddings
