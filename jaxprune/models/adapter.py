"""A depth-2 view of each block's two modules, for the pruning code.

Both modules are `y = second(inner(first(norm(x))))`: the first level maps the
normalized input to U1 outputs (attention: Q, K, V; MLP: gate and up), the
inner part produces the second level's input X2 (attention: per-head value
outputs A_i V_i; MLP: act(gate) * up), and the second level maps X2 to the
model width (W_O, W_down). Units are what pruning removes: query heads (H
channels of X2 each) or MLP channels (one each). Pruning code reaches blocks
only through this view.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.models import layers as L
from jaxprune.spec import Params


@dataclasses.dataclass(frozen=True)
class ModuleKind:
  name: str  # "attn" | "mlp"
  norm_key: str
  key: str
  first_keys: Callable[[Params], tuple[str, ...]]
  second_key: str


  def post_norm(self, block: Params):
    """The parameters of the norm the module's output passes before the residual add (Gemma), or None."""
    return block.get(f"{self.name}_post_norm")


ATTN = ModuleKind("attn", "attn_norm", "attn", lambda p: ("q", "k", "v"), "o")
MLP = ModuleKind("mlp", "mlp_norm", "mlp", lambda p: ("gate", "up") if "gate" in p else ("up",), "down")
KINDS = {"attn": ATTN, "mlp": MLP}


def _flat_in(kernel):
  """[D, n, H] or [D, F] -> [D, n*H] / [D, F]."""
  return kernel.reshape(kernel.shape[0], -1)


def _placed(x):
  """Numpy weights (solved on the host) go to the default device, uncommitted; reshaping and
  casting them there first would compile once per kept width."""
  return jax.device_put(x) if isinstance(x, np.ndarray) else x


def first_level(kind: ModuleKind, p: Params):
  """W1 [D, U1] (all first-level kernels side by side) and b1 [U1] (zeros where absent)."""
  ws, bs = [], []
  for k in kind.first_keys(p):
    w = _flat_in(p[k]["kernel"])
    ws.append(w)
    bs.append(p[k]["bias"].reshape(-1) if "bias" in p[k] else jnp.zeros((w.shape[1],), w.dtype))
  return jnp.concatenate(ws, axis=1), jnp.concatenate(bs)


def with_first_level(kind: ModuleKind, p: Params, w, b=None) -> Params:
  """p with first-level kernels (and biases, if b is given) replaced from W1 [D, U1], b1 [U1]."""
  out = dict(p)
  start = 0
  for k in kind.first_keys(p):
    shape = p[k]["kernel"].shape
    width = math.prod(shape[1:])
    new = {"kernel": _placed(w[:, start:start + width].reshape(shape).astype(p[k]["kernel"].dtype))}
    if b is not None:
      new["bias"] = _placed(b[start:start + width].reshape(shape[1:]).astype(p[k]["kernel"].dtype))
    elif "bias" in p[k]:
      new["bias"] = p[k]["bias"]
    out[k] = new
    start += width
  return out


def second_level(kind: ModuleKind, p: Params):
  """W2 [U2, D] and b2 [D] (zeros where absent)."""
  q = p[kind.second_key]
  w = q["kernel"].reshape(-1, q["kernel"].shape[-1])
  b = q["bias"] if "bias" in q else jnp.zeros((w.shape[1],), w.dtype)
  return w, b


def with_second_level(kind: ModuleKind, p: Params, w, b=None) -> Params:
  q = p[kind.second_key]
  shape = q["kernel"].shape
  new = {"kernel": _placed(w.reshape(shape).astype(q["kernel"].dtype))}
  if b is not None:
    new["bias"] = _placed(b.astype(q["kernel"].dtype))
  elif "bias" in q:
    new["bias"] = q["bias"]
  return {**p, kind.second_key: new}


def unit_width(kind: ModuleKind, p: Params) -> int:
  """X2 channels per unit: head_dim for attention, 1 for the MLP."""
  return p["o"]["kernel"].shape[1] if kind is ATTN else 1


def num_units(kind: ModuleKind, p: Params) -> int:
  return p["q"]["kernel"].shape[1] if kind is ATTN else p["up"]["kernel"].shape[1]


def inner_parts(kind: ModuleKind, cfg: L.BlockConfig, p: Params, h, positions, want_probs: bool = False,
                want_pre: bool = False):
  """X2 [B,T,U2] of normalized input h [B,T,D], the attention probabilities (if
  asked, else None) and the first level's outputs {name: array} (if asked, else
  {}): the MLP's pre-activations, attention's q, k (rotated) and v."""
  if kind is ATTN:
    q, k, v = L.project_qkv(cfg, p, h, positions)
    heads, probs = L.attend(cfg, q, k, v, positions, positions)
    # Q and K after RoPE, a rotation of pairs of channels: their norms are those of the
    # first level's outputs [h 1] [W1; b1], which is what callers take from them. Not so after
    # q/k norms, which change the norms: then the projections themselves.
    pre = {}
    if want_pre:
      pre = dict(zip("qkv", L.qkv_linear(p, h))) if cfg.qk_norm else {"q": q, "k": k, "v": v}
    return heads.reshape(*heads.shape[:2], -1), (probs if want_probs else None), pre
  pre = {"up": L.dense(p["up"], h, "btd,df->btf")}
  if cfg.gated:
    pre["gate"] = L.dense(p["gate"], h, "btd,df->btf")
    x2 = L.activation(cfg.act, pre["gate"]) * pre["up"]
  else:
    x2 = L.activation(cfg.act, pre["up"])
  return x2, None, (pre if want_pre else {})


def inner(kind: ModuleKind, cfg: L.BlockConfig, p: Params, h, positions, want_probs: bool = False):
  """X2 [B,T,U2] of normalized input h [B,T,D] (and attention probabilities if asked)."""
  x2, probs, _ = inner_parts(kind, cfg, p, h, positions, want_probs)
  return x2, probs


def apply_with_first(kind: ModuleKind, cfg: L.BlockConfig, p: Params, h, positions):
  """The module's output [B,T,D] for normalized input h and its first level's outputs
  {kernel name: [B,T,...] pre-activations} [h 1] [W1; b1], computed on the way (the same
  operations as `apply`)."""
  x2, _, pre = inner_parts(kind, cfg, p, h, positions, False, True)
  if kind is ATTN:
    y = L.dense(p["o"], x2.reshape(*x2.shape[:2], *p["o"]["kernel"].shape[:2]), "btnh,nhd->btd")
  else:
    y = L.dense(p["down"], x2, "btf,fd->btd")
  return y, pre


def apply(kind: ModuleKind, cfg: L.BlockConfig, p: Params, h, positions):
  """The module's output [B,T,D] for normalized input h."""
  if kind is ATTN:
    return L.attention(cfg, p, h, positions)[0]
  return L.mlp(cfg, p, h)[0]
