"""Pure forward passes of LLaMA-family and GPT-2 models."""

from jaxprune.models.forward import CAPTURES, attn_step, block_step, embed, forward, head, head_params, \
    hidden_states, logits, mlp_step
from jaxprune.models.layers import BlockConfig, block_config

__all__ = ["CAPTURES", "BlockConfig", "attn_step", "block_config", "block_step", "embed", "forward", "head",
           "head_params", "hidden_states", "logits", "mlp_step"]
