"""The `nemotron-nas` config class that `jaxprune export --format decilm` ships (named in `auto_map`).

transformers has no `nemotron-nas` model type, so vLLM and TensorRT-LLM build the
config from the checkpoint's own file (`--trust-remote-code`). Their DeciLM code reads
`block_configs` by attribute (`block.attention.n_heads_in_group`) and takes the FFN
width from `ffn.ffn_mult` only when that attribute exists, else from
`ffn.intermediate_size`; so every block becomes a namespace holding exactly the keys
written, and a block without `ffn_mult` keeps its exact width.

This file is copied into exports and runs there without jaxprune installed.
"""

from types import SimpleNamespace

from transformers import PretrainedConfig


def _namespace(block: dict) -> SimpleNamespace:
  return SimpleNamespace(**{k: SimpleNamespace(**v) if isinstance(v, dict) else v for k, v in block.items()})


def _plain(block) -> dict:
  if isinstance(block, dict):
    return block
  return {k: dict(vars(v)) if isinstance(v, SimpleNamespace) else v for k, v in vars(block).items()}


class DeciLMConfig(PretrainedConfig):
  model_type = "nemotron-nas"

  def __init__(self, block_configs=None, **kwargs):
    self.block_configs = [_namespace(_plain(b)) for b in block_configs or []]
    super().__init__(**kwargs)

  def to_dict(self):
    out = super().to_dict()
    out["block_configs"] = [_plain(b) for b in self.block_configs]
    return out
