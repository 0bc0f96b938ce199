"""Checkpoint import and export."""

from jaxprune.io.hf import load_hf
from jaxprune.io.gguf import load_gguf
from jaxprune.io.hf_config import spec_from_hf_config
from jaxprune.io.mapping import params_to_tensors, tensors_to_params
from jaxprune.io.resolve import BUILTIN, load, load_tokenizer, resolve

__all__ = ["BUILTIN", "load", "load_gguf", "load_hf", "load_tokenizer", "params_to_tensors", "resolve",
           "spec_from_hf_config", "tensors_to_params"]
