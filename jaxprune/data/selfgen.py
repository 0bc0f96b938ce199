"""Data-free calibration: text the model writes itself, and random token windows.

Sampling runs entirely under one `jax.jit`: a `lax.fori_loop` over positions
with the per-layer KV cache of `models.decode` (layers may differ in shape),
seeded with a `jax.random` key, so the same seed gives the same windows.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.data.windows import prefixed
from jaxprune.errors import UsageError
from jaxprune.models import decode
from jaxprune.spec import ModelSpec, Params


BATCH = 32  # texts sampled at once by default


@functools.partial(jax.jit, static_argnames=("spec", "length", "top_k"))
def _sample(spec: ModelSpec, params: Params, keys, first, length: int, temperature, top_k: int):
  """Texts [B, length], row b from token `first[b]` drawn with its own key `keys[b]` (so a text
  does not depend on which other texts share its batch)."""
  batch = keys.shape[0]
  caches = decode.init_cache(spec, batch, length, params["embed"]["embedding"].dtype)
  out = jnp.zeros((batch, length), jnp.int32).at[:, 0].set(first)

  def body(pos, state):
    out, caches = state
    logits, caches = decode.decode_step(spec, params, caches, out[:, pos], pos)
    logits = logits / temperature
    if top_k:
      kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
      logits = jnp.where(logits < kth, -jnp.inf, logits)
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, pos))(keys)
    nxt = jax.vmap(jax.random.categorical)(step_keys, logits).astype(jnp.int32)
    return out.at[:, pos + 1].set(nxt), caches

  out, _ = jax.lax.fori_loop(0, length - 1, body, (out, caches))
  return out


def self_generated(spec: ModelSpec, params: Params, n: int, seq_len: int, seed: int = 0, *, temperature: float = 1.0,
                   top_k: int = 50, batch_size: int = BATCH, first_token: int | Sequence[int] | None = None,
                   windows_per_text: int = 1, prefix: tuple[int, ...] = (),
                   progress: Callable[[int], None] | None = None) -> np.ndarray:
  """`n` windows [n, len(prefix) + seq_len] of text sampled by the model itself from BOS.

  Args:
    first_token: the token every text starts with (default: the model's BOS id), or several:
      text i starts with `first_token[i % len(first_token)]`.
    prefix: the tokenizer's prefix (`data.bos_prefix`): (BOS,) for a model whose tokenizer adds
      BOS. Then a text is sampled after its one token, BOS, and every window is that token
      followed by seq_len sampled tokens, [n, 1 + seq_len], as text windows are (a later window
      of a text: BOS and the text's next seq_len tokens). Empty: windows of seq_len tokens,
      the first window of a text starting with its first token.
    windows_per_text: consecutive windows cut from each sampled text. 1 (the paper's
      Self-Gen): every window is a text of its own, starting with the same token. More:
      texts of windows_per_text * seq_len tokens, so that most windows start mid-text,
      as the windows of a tokenized corpus do.
    progress: called with the number of windows each batch added (of `n`), as it is done.

  Text i is drawn with the key `fold_in(key(seed), i)`, whatever the batch it is sampled in,
  so the first windows of a larger `n` are those of a smaller one. Batches are of equal
  size (at most `batch_size`): one compile.
  """
  if len(prefix) > 1 or (prefix and first_token is not None):
    raise UsageError(f"self-generated texts after a prefix start from it, one token (BOS); got prefix {prefix!r} "
                     f"and first_token {first_token!r}; pass one of them")
  firsts = list(prefix) or ([spec.bos_token_id] if first_token is None else np.atleast_1d(first_token).tolist())
  if firsts == [None]:
    raise UsageError("the model declares no BOS token id to start self-generated text from; pass first_token")
  bad = [t for t in firsts if not (isinstance(t, int) and 0 <= t < spec.vocab_size)]
  if bad or not firsts:
    raise UsageError(f"self-generated texts start from token ids in [0, {spec.vocab_size}), got {first_token!r}")
  if windows_per_text < 1:
    raise UsageError(f"windows_per_text must be a positive number of windows, got {windows_per_text}")
  length = len(prefix) + windows_per_text * seq_len
  if length > spec.max_positions:
    raise UsageError(f"self-generated texts of {len(prefix)} + {windows_per_text} x {seq_len} tokens exceed the "
                     f"model's {spec.max_positions} positions; use fewer windows per text or a shorter seq_len")
  if not temperature > 0:
    raise UsageError(f"temperature must be positive, got {temperature}")
  texts = -(-n // windows_per_text)
  batch = batches(texts, batch_size)[1]
  base = jax.random.key(seed)
  rows = []
  for start in range(0, texts, batch):
    ids = np.arange(start, start + batch)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(ids))
    first = jnp.asarray(np.asarray(firsts, np.int32)[ids % len(firsts)])
    rows.append(np.asarray(_sample(spec, params, keys, first, length, jnp.float32(temperature), int(top_k or 0))))
    if progress is not None:
      progress(min((start + batch) * windows_per_text, n) - min(start * windows_per_text, n))
  body = np.concatenate(rows)[:texts, len(prefix):]
  return prefixed(body.reshape(-1, seq_len)[:n], tuple(prefix))


def batches(texts: int, batch_size: int = BATCH) -> tuple[int, int]:
  """(batches, texts per batch) that `self_generated` samples `texts` texts in: batches of equal
  size, at most `batch_size`, so that one compile serves them all."""
  n = -(-texts // batch_size)
  return n, -(-texts // n)


def random_tokens(vocab_size: int, n: int, seq_len: int, seed: int = 0, prefix: tuple[int, ...] = ()) -> np.ndarray:
  """Uniformly random token windows [n, seq_len] (data-free statistics, docs/method.md 2(b)), each after
  `prefix` ([n, len(prefix) + seq_len]: the random tokens stand for text, which such a model sees after BOS)."""
  return prefixed(np.random.default_rng(seed).integers(0, vocab_size, size=(n, seq_len), dtype=np.int32), prefix)


def own_text_count(n_text: int, config, n_data: int = 1) -> int:
  """How many windows of the model's own text join `n_text` windows of a calibration text:
  `config.selfgen_share` of them, fewer where that many would not split into the run's batches
  (`config.batch_size` windows, a multiple of the `n_data` data-parallel devices); 0 for none."""
  share = config.selfgen_share
  if not 0 < share < float("inf") or config.batch_size < 1:  # none, or values that are refused later
    return 0
  for m in range(int(share * n_text), 0, -1):
    batch = min(config.batch_size, n_text + m)
    if batch % n_data == 0 and (n_text + m) % batch == 0:
      return m
  return 0


def per_text_that_fits(spec: ModelSpec, seq_len: int, per_text: int, prefix: tuple[int, ...] = ()) -> int:
  """`per_text` windows a self-generated text, or as many as the model's positions hold (at least
  one): the share that joins a calibration text is drawn however long its windows are."""
  return max(1, min(per_text, (spec.max_positions - len(prefix)) // seq_len))


def own_per_text(spec: ModelSpec, seq_len: int, config, prefix: tuple[int, ...] = (), fit: bool = False) -> int:
  """Windows a text of `own_windows`: the config's, or with `fit` as many as the model's positions hold."""
  per_text = config.selfgen_windows_per_text
  return per_text_that_fits(spec, seq_len, per_text, prefix) if fit else per_text


def own_windows(spec: ModelSpec, params: Params, n: int, seq_len: int, config, *, prefix: tuple[int, ...] = (),
                fit: bool = False, progress: Callable[[int], None] | None = None) -> np.ndarray:
  """`n` self-generated windows sampled as `config`'s selfgen_* fields say, from `config.seed`;
  with `fit`, in texts cut to what the model's positions hold (`per_text_that_fits`)."""
  per_text = own_per_text(spec, seq_len, config, prefix, fit)
  return self_generated(spec, params, n, seq_len, seed=config.seed, windows_per_text=per_text,
                        top_k=config.selfgen_top_k, temperature=config.selfgen_temperature, prefix=prefix,
                        progress=progress)


def with_own_text(spec: ModelSpec, params: Params, windows, config, *, prefix: tuple[int, ...] = (), n_data: int = 1,
                  progress: Callable[[int], None] | None = None) -> np.ndarray:
  """`windows` of a calibration text [n, len(prefix) + seq_len], then `own_text_count` windows of
  the model's own text, sampled as `config`'s selfgen_* fields say from `config.seed` (in texts
  the model's positions hold): the set `jaxprune prune --calib FILE` calibrates on (`prune`
  itself calibrates on the windows it is given)."""
  windows = np.asarray(windows)
  m = own_text_count(len(windows), config, n_data)
  if not m:
    return windows
  own = own_windows(spec, params, m, windows.shape[1] - len(prefix), config, prefix=prefix, fit=True,
                    progress=progress)
  return np.concatenate([windows, own.astype(windows.dtype)])
