"""Static, hashable model descriptions.

A `ModelSpec` describes an architecture with per-layer sizes, so a pruned model
whose layers all differ is described as naturally as a dense one. It is frozen
and hashable: jitted functions take it (or a `BlockConfig` derived from it) as
a static argument.

Shapes are the source of truth: `spec_from_params` re-derives every per-layer
size from the parameter arrays, and `check_params` refuses parameters whose
shapes disagree with a spec, naming every mismatching leaf.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import numpy as np
from flax import traverse_util

from jaxprune import families
from jaxprune.errors import ConfigError, ShapeError
from jaxprune.families.base import Family

Params = dict[str, Any]


# Every family jaxprune knows, by name (a read-only view of the registry in jaxprune.families).
FAMILIES = families.REGISTRY

ACTIVATIONS = ("silu", "gelu_tanh", "gelu")


@dataclasses.dataclass(frozen=True)
class RopeSpec:
  """Rotary embedding settings (Hugging Face's `rope_parameters`)."""

  theta: float
  kind: str = "default"  # "default" | "linear" | "llama3"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_positions: int = 8192

  def inv_freq(self, head_dim: int) -> np.ndarray:
    """Inverse frequencies, f64 then f32, as transformers computes them."""
    inv = 1.0 / (self.theta**(np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    inv = inv.astype(np.float32)
    if self.kind == "linear":
      inv = inv / np.float32(self.factor)
    elif self.kind == "llama3":
      low_wavelen = self.original_max_positions / self.low_freq_factor
      high_wavelen = self.original_max_positions / self.high_freq_factor
      wavelen = 2 * math.pi / inv
      scaled = np.where(wavelen > low_wavelen, inv / self.factor, inv)
      smooth = (self.original_max_positions / wavelen - self.low_freq_factor) / (
          self.high_freq_factor - self.low_freq_factor)
      smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
      medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
      inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """Sizes of one transformer block.

  Attributes:
    num_heads: query heads N.
    num_kv_heads: key/value heads K.
    head_dim: H.
    ffn_dim: inner width F of the MLP.
    kv_map: for each query head, the KV head it reads. `None` means the
      standard contiguous grouping (N/K query heads per KV head, in order).
  """

  num_heads: int
  num_kv_heads: int
  head_dim: int
  ffn_dim: int
  kv_map: tuple[int, ...] | None = None

  def __post_init__(self):
    for name in ("num_heads", "num_kv_heads", "head_dim", "ffn_dim"):
      v = getattr(self, name)
      if not isinstance(v, (int, np.integer)) or v < 1:
        raise ConfigError(f"LayerSpec.{name} must be a positive integer, got {v!r}")
    if self.kv_map is None:
      if self.num_heads % self.num_kv_heads:
        raise ConfigError(
            f"{self.num_heads} query heads cannot be split evenly over {self.num_kv_heads} KV heads; "
            "pass an explicit kv_map for uneven groups")
    else:
      if len(self.kv_map) != self.num_heads:
        raise ConfigError(f"kv_map has {len(self.kv_map)} entries but the layer has {self.num_heads} query heads")
      if sorted(set(self.kv_map)) != list(range(self.num_kv_heads)):
        raise ConfigError(
            f"kv_map {self.kv_map} must use every KV head 0..{self.num_kv_heads - 1} at least once")

  @property
  def kv_index(self) -> tuple[int, ...]:
    """KV head read by each query head."""
    if self.kv_map is not None:
      return self.kv_map
    g = self.num_heads // self.num_kv_heads
    return tuple(i // g for i in range(self.num_heads))

  @property
  def uniform_groups(self) -> bool:
    """True when query heads form equal contiguous groups (a plain HF config)."""
    g, r = divmod(self.num_heads, self.num_kv_heads)
    return r == 0 and self.kv_index == tuple(i // g for i in range(self.num_heads))

  def canonical(self) -> "LayerSpec":
    """The same layer with `kv_map` dropped when it is the contiguous default."""
    if self.kv_map is not None and self.uniform_groups:
      return dataclasses.replace(self, kv_map=None)
    return self


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A whole model: family, global sizes and per-layer sizes.

  Bias flags say which projections carry a bias; reconstruction with an
  intercept may turn them on.
  """

  family: str
  vocab_size: int
  hidden_size: int
  layers: tuple[LayerSpec, ...]
  norm_eps: float
  max_positions: int
  tie_embeddings: bool
  rope: RopeSpec | None = None
  sliding_window: int | None = None
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  act: str | None = None  # None: the family's default
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  # Gemma's per-model settings (None: the plain computation).
  query_pre_attn_scalar: float | None = None  # attention scores scaled by its -1/2 power instead of head_dim's
  attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) before the softmax
  final_softcap: float | None = None  # the same on the logits
  sliding_layers: tuple[int, ...] | None = None  # layers the window applies to (None: all, when there is one)
  rope_local: RopeSpec | None = None  # the rotary settings of the sliding layers (None: `rope`)

  def __post_init__(self):
    fam = families.get(self.family)
    if self.act is None:
      object.__setattr__(self, "act", fam.act)
    if self.act not in ACTIVATIONS:
      raise ConfigError(f"activation {self.act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    if not isinstance(self.layers, tuple):
      object.__setattr__(self, "layers", tuple(self.layers))
    if self.sliding_layers is not None and not isinstance(self.sliding_layers, tuple):
      object.__setattr__(self, "sliding_layers", tuple(self.sliding_layers))
    if not self.layers:
      raise ConfigError("a model needs at least one layer")
    if (fam.positions == "rope") != (self.rope is not None):
      raise ConfigError(f"family {self.family!r} uses {fam.positions} positions; rope={self.rope!r} does not fit")

  @property
  def fam(self) -> Family:
    return families.get(self.family)

  @property
  def num_layers(self) -> int:
    return len(self.layers)

  @property
  def uniform(self) -> bool:
    """All layers have the same sizes (and standard GQA groups)."""
    first = self.layers[0].canonical()
    return all(l.canonical() == first for l in self.layers) and first.kv_map is None

  def with_layers(self, layers) -> "ModelSpec":
    return dataclasses.replace(self, layers=tuple(l.canonical() for l in layers))

  # Serialisation (jaxprune.json next to the weights).
  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d["layers"] = [dataclasses.asdict(l) for l in self.layers]
    return d

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "ModelSpec":
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ConfigError(f"unknown ModelSpec fields {unknown}; known: {sorted(known)}")
    layers = []
    for l in d.pop("layers"):
      l = dict(l)
      if l.get("kv_map") is not None:
        l["kv_map"] = tuple(l["kv_map"])
      layers.append(LayerSpec(**l))
    rope = RopeSpec(**d.pop("rope")) if d.get("rope") is not None else d.pop("rope", None)
    if d.get("rope_local") is not None:
      d["rope_local"] = RopeSpec(**d["rope_local"])
    return cls(layers=tuple(layers), rope=rope, **d)

  def sliding(self, layer: int) -> bool:
    """Whether the attention window applies to this layer."""
    return self.sliding_window is not None and (self.sliding_layers is None or layer in self.sliding_layers)


# --------------------------------------------------------------------------
# Parameter shapes.


def layer_shapes(spec: ModelSpec, layer: LayerSpec) -> Params:
  """Shape tree of one block (tuples of ints at the leaves)."""
  D, N, K, H, F = spec.hidden_size, layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.ffn_dim
  fam = spec.fam

  def norm():
    return {"scale": (D,), "bias": (D,)} if fam.norm == "layer" else {"scale": (D,)}

  post = {"attn_post_norm": norm(), "mlp_post_norm": norm()} if fam.post_norms else {}
  qk_norms = {"q_norm": {"scale": (H,)}, "k_norm": {"scale": (H,)}} if fam.qk_norm else {}

  def proj(kernel, bias, with_bias):
    return {"kernel": kernel, "bias": bias} if with_bias else {"kernel": kernel}

  mlp = {
      "up": proj((D, F), (F,), spec.mlp_bias),
      "down": proj((F, D), (D,), spec.mlp_bias),
  }
  if fam.gated_mlp:
    mlp["gate"] = proj((D, F), (F,), spec.mlp_bias)
  return {
      "attn_norm": norm(),
      "attn": {
          "q": proj((D, N, H), (N, H), spec.qkv_bias),
          "k": proj((D, K, H), (K, H), spec.qkv_bias),
          "v": proj((D, K, H), (K, H), spec.qkv_bias),
          "o": proj((N, H, D), (D,), spec.o_bias),
          **qk_norms,
      },
      "mlp_norm": norm(),
      "mlp": mlp,
      **post,
  }


def param_shapes(spec: ModelSpec) -> Params:
  """Shape tree of the whole model; leaves are tuples of ints."""
  D, V = spec.hidden_size, spec.vocab_size
  tree: Params = {"embed": {"embedding": (V, D)}}
  if spec.fam.positions == "learned":
    tree["pos_embed"] = {"embedding": (spec.max_positions, D)}
  tree["layers"] = tuple(layer_shapes(spec, l) for l in spec.layers)
  tree["final_norm"] = {"scale": (D,), "bias": (D,)} if spec.fam.norm == "layer" else {"scale": (D,)}
  if not spec.tie_embeddings:
    tree["lm_head"] = {"kernel": (D, V)}
  return tree


def _flatten(tree) -> dict[str, Any]:
  """Leaves of a parameter (or shape) tree by path name, e.g. `layers[0].mlp.up.kernel`.

  Flax's `flatten_dict` walks the nested dicts; the tuple of blocks is the one
  sequence in the tree, so its entries are flattened one by one and named
  `layers[i]`, as in error messages and the rest of jaxprune.
  """
  tree = dict(tree)
  blocks = tree.pop("layers", ())
  # Blocks still in their checkpoint (jaxprune.io.lazy.LazyBlocks) are described by their shapes,
  # so counting or checking a lazy model reads nothing.
  blocks = getattr(blocks, "shapes", blocks)
  flat = traverse_util.flatten_dict(tree, sep=".")
  for i, block in enumerate(blocks):
    flat.update({f"layers[{i}].{k}": v for k, v in traverse_util.flatten_dict(block, sep=".").items()})
  return flat


def check_params(spec: ModelSpec, params: Params) -> None:
  """Raises ShapeError listing every leaf whose shape disagrees with `spec`."""
  want = _flatten(param_shapes(spec))
  have = {k: tuple(np.shape(v)) for k, v in _flatten(params).items()}
  problems = []
  for k in sorted(set(want) | set(have)):
    if k not in have:
      problems.append(f"{k}: missing (expected shape {want[k]})")
    elif k not in want:
      problems.append(f"{k}: unexpected leaf of shape {have[k]}")
    elif want[k] != have[k]:
      problems.append(f"{k}: shape {have[k]}, but the config implies {want[k]}")
  if problems:
    shown = "\n  ".join(problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise ShapeError(
        f"parameters do not match the model description ({len(problems)} problems):\n  {shown}{more}\n"
        "Check that config.json belongs to these weights.")


def spec_from_params(spec: ModelSpec, params: Params) -> ModelSpec:
  """`spec` with every per-layer size re-derived from the arrays in `params`."""
  layers = []
  for old, blk in zip(spec.layers, params["layers"], strict=True):
    a = blk["attn"]
    N, H = np.shape(a["q"]["kernel"])[1:]
    K = np.shape(a["k"]["kernel"])[1]
    F = np.shape(blk["mlp"]["up"]["kernel"])[1]
    kv_map = old.kv_map if old.kv_map is not None and len(old.kv_map) == N else None
    layers.append(LayerSpec(int(N), int(K), int(H), int(F), kv_map))
  return dataclasses.replace(spec, layers=tuple(l.canonical() for l in layers), **bias_flags(params["layers"][0]))


def bias_flags(block: Params) -> dict[str, bool]:
  """The spec's bias flags (qkv_bias, o_bias, mlp_bias) as one block's leaves say them."""
  return dict(qkv_bias="bias" in block["attn"]["q"], o_bias="bias" in block["attn"]["o"],
              mlp_bias="bias" in block["mlp"]["up"])


def count_params(params: Params) -> int:
  return int(sum(int(np.prod(np.shape(v))) for v in _flatten(params).values()))


def block_param_count(block: Params) -> int:
  """Attention + MLP parameters of one block (norms excluded)."""
  return count_params({"attn": block["attn"], "mlp": block["mlp"]})


def layer_param_count(spec: ModelSpec, layer: LayerSpec) -> int:
  """`block_param_count` of a block of `spec` with sizes `layer`, from the sizes alone."""
  shapes = layer_shapes(spec, layer)
  leaves = jax.tree.leaves({"attn": shapes["attn"], "mlp": shapes["mlp"]}, is_leaf=lambda x: isinstance(x, tuple))
  return int(sum(math.prod(s) for s in leaves))
