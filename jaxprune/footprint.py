"""Memory a pruning run will need, per device and per host, from the spec alone.

`estimate` reads no weights: parameter shapes come from the spec
(`spec.layer_shapes`), and the shapes of what each module's statistics pass
keeps (X2, the Gram matrix and cross moment) from `jax.eval_shape` of the
engine's own kernel (`passes.hidden_pass`) on abstract inputs. Terms follow
what the streamed engine (`jaxprune prune`) holds while it prunes one module:

  per device   the embedding and head tables in the checkpoint's dtype (vocabulary over `model`);
               the block in use, float32, sharded over `model` (the dense block
               and its pruned copy); the activation streams [S, T, D] float32,
               sharded over `data` (pruned; dense and the module's dense output
               when the configuration solves against it; with `absorb`, the target
               that adds the stream's error, while the statistics are taken; the
               next streams while they advance); X2 of every calibration window (its features
               split over `model`); the statistics
               (total, compensation and one chunk's term; a Gram matrix's rows
               split over `model`, the rest replicated); with the statistics kept
               split (`--solves split`, the default on accelerators), each device's share
               of the split solve or `goa-obs` sweep, while it solves; else, on a GPU, the
               joined Gram matrix, replicated, and the float64 solves; one chunk's
               intermediates (MLP first level, attention maps);
  per host     the process itself (measured: this process's resident memory
               after importing jaxprune, starting JAX and, when the model has one,
               loading its tokenizer), one block as read from the checkpoint and upcast, the
               float64 copies the solves and the `goa-obs` sweep make on CPU and TPU
               hosts with joined statistics (and the joined float32 Gram matrix they read), the dense
               outputs of the plan's store (written, then read back), and the output shard
               being written at the end; on a CPU backend every local device's
               memory is also host memory.

A run that calibrates on the model's own text (`--calib selfgen`, or the share that
joins a text) first samples it with the whole model at once on one device
(`data.selfgen`): every parameter in float32 (beside the streamed model's own embeddings and
head, in the checkpoint's dtype), the KV cache of a batch of texts and its logits; planning
for this process's own backend, the sampler is compiled on abstract shapes and XLA's
`memory_analysis` gives its arguments and buffers instead. That is a phase of its own, before
the first block.

The peak is taken over the phases of a module's step (statistics, solves,
advance), each the sum of what is alive in it, and the largest term at the
peak is named. Compiled executables and allocator slack are not modelled.
"""

from __future__ import annotations

import dataclasses
import math
import resource
import sys

import jax
import jax.numpy as jnp
from jaxprune import criteria
from jaxprune.models import adapter as A
from jaxprune.models import layers as L
from jaxprune.io.lazy import block_shapes
from jaxprune.spec import ModelSpec, layer_param_count, param_shapes
from jaxprune.stats import needs as needs_lib
from jaxprune.stats import passes

F32 = 4
F64 = 8


@dataclasses.dataclass(frozen=True)
class Peak:
  """One side's (device or host) peak: total bytes, the phase and module where it falls, its terms."""

  bytes: int
  phase: str
  terms: dict[str, int]

  @property
  def dominant(self) -> str:
    return max(self.terms, key=self.terms.get)


@dataclasses.dataclass(frozen=True)
class Estimate:
  device: Peak
  host: Peak
  mesh: tuple[int, int]
  backend: str
  local_devices: int
  notes: tuple[str, ...]
  # (device, host) while the model samples its own calibration text, before the first block;
  # None for a run that generates none. `device` and `host` are the pruning's peaks.
  generation: tuple[Peak, Peak] | None = None

  def to_json(self) -> dict:
    side = lambda p: {"bytes": p.bytes, "phase": p.phase, "dominant": p.dominant, "terms": p.terms}
    gen = None if self.generation is None else {"device": side(self.generation[0]), "host": side(self.generation[1])}
    return {"device": side(self.device), "host": side(self.host), "mesh": {"data": self.mesh[0], "model": self.mesh[1]},
            "backend": self.backend, "local_devices": self.local_devices, "notes": list(self.notes),
            "generation": gen}


def process_floor() -> int:
  """Resident memory of this process now (it has imported jaxprune and started JAX), bytes."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * resource.getpagesize()
  except OSError:  # not Linux: the peak so far (kilobytes on Linux, bytes on macOS)
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _nbytes(tree) -> int:
  return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def _shard(nbytes: float, ways: int) -> int:
  return int(math.ceil(nbytes / max(ways, 1)))


def estimate(spec: ModelSpec, config, *, samples: int, seq_len: int, data: int = 1, model: int = 1,
             checkpoint_bytes: int = 4, backend: str | None = None, local_devices: int | None = None,
             floor: int | None = None, max_shard_bytes: int = 200 * 10 ** 6, mapped_bytes: int = 0,
             generated: int = 0, prefix: int = 0, fit: bool = True, solves: str = "auto") -> Estimate:
  """The peak per-device and per-host memory of pruning `spec` with `config` (a PruneConfig).

  Args:
    samples, seq_len: calibration windows and tokens per window.
    data, model: the mesh's axes.
    checkpoint_bytes: bytes per weight as stored (2 for bfloat16; 4 for GGUF, read as float32).
    backend: "cpu", "gpu" or "tpu" (default: this process's); on a CPU the devices are host memory.
    local_devices: devices per host (default: min(data * model, this process's local devices) on
      a CPU, else 4 for TPU hosts and 8 for GPU nodes).
    floor: the process's own resident memory (default: `process_floor()`, so load the
      run's tokenizer first to count it).
    mapped_bytes: checkpoint file pages the reader keeps mapped (a GGUF file, read whole
      over the run).
    generated: how many of the `samples` windows the model generates itself (0: none); `prefix`,
      the tokens each window is fed after (BOS), so `seq_len - prefix` are sampled per window;
      `fit`, texts cut to what the model's positions hold (the share that joins a text).
    solves: `placement.Solves` ("auto": split on a gpu or tpu mesh with a model axis): split
      statistics are solved and swept on the devices, a share each (`split_solve_bytes`);
      joined ones on the host (CPU, TPU) or replicated on every GPU.
  """
  backend = backend or jax.default_backend()
  if local_devices is None:
    local_devices = min(data * model, jax.local_device_count()) if backend == "cpu" else (4 if backend == "tpu"
                                                                                          else 8)
  floor = process_floor() if floor is None else floor
  crit = criteria.get(config.method)
  B = config.batch_size
  C = max(samples // B, 1)
  n_tok = samples * seq_len
  Dm = spec.hidden_size
  stream = _shard(n_tok * Dm * F32, data)
  per_dev_batch = max(B // data, 1)
  notes = []
  if B % data:
    notes.append(f"batch size {B} is not a multiple of the data axis {data}; the run would refuse it")

  generation = None
  if generated:
    # Planning for this process's own backend, XLA's account of the compiled sampler; else the terms
    # it is known to hold.
    terms = compiled_generation_terms if backend == jax.default_backend() else generation_terms
    gen = terms(spec, config, generated, seq_len - prefix, prefix, fit)
    if checkpoint_bytes != F32:  # the streamed model's own tables stay beside their float32 copies
      gen["embedding and head (as stored)"] = _top_bytes(spec, checkpoint_bytes)
    host = {"process (measured)": floor, **({"checkpoint file (memory-mapped)": mapped_bytes} if mapped_bytes else {})}
    if backend == "cpu":
      host.update(gen)
    else:  # read a block at a time, each upcast and put on the device that generates
      host["block as read + float32 copy"] = max(layer_param_count(spec, l) for l in spec.layers) * (
          checkpoint_bytes + F32)
    where = f"self-generation of {generated} windows, on one device"
    generation = (Peak(sum(gen.values()), where, gen), Peak(sum(host.values()), where, host))
  split_solves = model > 1 and (solves == "split" or (solves == "auto" and backend != "cpu"))
  solve_bytes = F32 if backend == "tpu" else F64  # a TPU has no float64: float32 with refinement
  best_dev = best_host = None
  start, stop = config.block_range(spec)
  shapes = block_shapes(spec)
  seen = set()
  for i in range(start, stop):
    layer = spec.layers[i]
    shape_key = (layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.ffn_dim)
    if shape_key in seen:  # the same sizes give the same terms
      continue
    seen.add(shape_key)
    p_abs = shapes[i]
    cfg = L.block_config(spec, i)
    block_bytes = layer_param_count(spec, layer) * F32
    for kind in (A.ATTN, A.MLP):
      js = kind is A.ATTN and config.heads == "similarity"
      nd = needs_lib.module_needs(config, crit.needs, kind, True, js)
      st = nd.calib
      x_abs = jax.ShapeDtypeStruct((C, per_dev_batch, seq_len, Dm), jnp.float32)
      y_abs = x_abs if st.hidden == "gram" and st.cross else None
      out = jax.eval_shape(lambda p, n, x, y: passes.hidden_pass(kind, cfg, n, p, x, y, jnp.arange(seq_len, dtype=jnp.int32)[None], st),
                           p_abs[kind.key], p_abs[kind.norm_key], x_abs, y_abs)
      U2 = out.x2.shape[-1]
      # One device's share of the windows; its features split over `model` where it divides
      # them (`sharding.laid_out_stream`).
      x2 = _nbytes(out.x2) // (model if U2 % model == 0 else 1)
      # Total, compensation and a chunk's term; a Gram matrix's rows split over `model` where it
      # divides them (`sharding.gram_rows`), then joined once where the solves run.
      gram = _nbytes(out.hidden) if st.hidden == "gram" else 0
      split = model > 1 and gram and U2 % model == 0
      if split:  # X^T X and X^T Y split by rows; the column, token and target sums replicated
        e = 0 if out.hidden.xy is None else out.hidden.xy.shape[1]
        hidden = _shard(U2 * (U2 + e) * F32, model) + (U2 + 1 + e) * F32
      else:
        hidden = gram
      stats = 3 * (_nbytes((out.first, out.inputs, out.js)) + hidden)
      joined = gram if split and not split_solves else 0
      chunk = per_dev_batch * seq_len * F32
      if kind is A.MLP:
        transient = chunk * 3 * layer.ffn_dim  # gate, up and their product for one chunk
      else:
        transient = chunk * ((layer.num_heads + 2 * layer.num_kv_heads) * layer.head_dim) + (
            2 * per_dev_batch * layer.num_heads * seq_len * seq_len * F32)  # q, k, v; scores and probabilities
      if nd.first_moments:
        stats += 3 * 2 * (Dm + 1) * (Dm + 1) * F32
      n_streams = 3 if nd.dense else 1  # pruned; dense and the module's dense output
      dev_common = {"block (dense + pruned, float32)": 2 * _shard(block_bytes, model),
                    "activation streams": n_streams * stream,
                    # Vocabulary split over `model` where it divides it (`sharding.DEFAULT_RULES`).
                    "embedding and head": _shard(_top_bytes(spec, checkpoint_bytes),
                                                 model if spec.vocab_size % model == 0 else 1)}
      phases_dev = {
          "statistics": {**dev_common, "X2": x2, "statistics": stats, "chunk intermediates": transient,
                         **({"absorbing target": stream} if config.absorb and nd.dense else {})},
          "solves": {**dev_common, "X2": x2, "statistics": stats,
                     **({"Gram joined (replicated)": joined} if backend == "gpu" and joined else {})},
          "advance": {**dev_common, "activation streams": 2 * n_streams * stream - (1 if nd.dense else 0) * stream,
                      "X2": x2},
      }
      # Host: float64 solves (LAPACK copies the Gram once) and the goa-obs sweep's inverse and weights.
      solve_host = 0
      if config.reconstruct or config.refit or nd.first_moments:
        solve_host = ((U2 + 1) ** 2 + 2 * (U2 + 1) * Dm) * F64
      if "hidden_cross" in (crit.needs or ()):
        from jaxprune.criteria.output_approx import OBS_BLOCK

        b = min(U2, OBS_BLOCK) + 1
        solve_host = max(solve_host, (U2 + 1) ** 2 * F64 + 3 * b * b * F64 + 2 * b * Dm * F64)
      host_common = {"process (measured)": floor,
                     "block as read + float32 copy": layer_param_count(spec, layer) * (checkpoint_bytes + F32)}
      if model == 1 and i + 1 < len(spec.layers):  # `LazyBlocks.prefetch`: the next block, as stored
        host_common["next block (read ahead)"] = layer_param_count(spec, spec.layers[i + 1]) * checkpoint_bytes
      if mapped_bytes:
        host_common["checkpoint file (memory-mapped)"] = mapped_bytes
      if config.allocation == "adaptive" and nd.dense:  # written by the plan, read back by the loop
        host_common["dense output (plan's store)"] = n_tok * Dm * F32
      phases_host = {name: dict(host_common) for name in phases_dev}
      if split and split_solves:  # on the devices, a share each (`jaxprune.stats.split`)
        refit = split_solve_bytes(U2, Dm, model, solve_bytes) if solve_host else 0
        sweep = 0
        if "hidden_cross" in (crit.needs or ()):
          from jaxprune.criteria.output_approx import OBS_BLOCK

          sweep = split_sweep_bytes(min(U2, OBS_BLOCK), Dm, model, solve_bytes)
        phases_dev["solves"]["split solve or goa-obs sweep (row blocks)"] = max(refit, sweep)
      elif backend == "gpu":  # GPUs factor on the device, each for its own columns of W
        phases_dev["solves"]["float64 solves"] = solve_host
      else:
        phases_host["solves"]["float64 solves"] = solve_host
        if joined:  # gathered to the host, where LAPACK solves
          phases_host["solves"]["Gram joined (float32)"] = joined
      cpu = backend == "cpu"
      for name, terms in phases_dev.items():
        total = sum(terms.values())
        where = f"{name}, {kind.name} of block {i}"
        if best_dev is None or total > best_dev.bytes:
          best_dev = Peak(total, where, terms)
        h = dict(phases_host[name])
        if cpu:
          h["devices (CPU memory)"] = local_devices * total
        ht = sum(h.values())
        if best_host is None or ht > best_host.bytes:
          best_host = Peak(ht, where, h)
  # At the end the output is written one shard at a time.
  end = {"process (measured)": floor, "output shard being written": max_shard_bytes}
  if backend == "cpu":
    end["embedding and head"] = _top_bytes(spec, checkpoint_bytes)
  if sum(end.values()) > best_host.bytes:
    best_host = Peak(sum(end.values()), "writing the output", end)
  if backend != "cpu":
    notes.append("device figures are accelerator memory; host figures exclude it")
  notes.append("not modelled: compiled executables, allocator slack, the tokenized text")
  return Estimate(best_dev, best_host, (data, model), backend, local_devices, tuple(notes), generation)


def generation_terms(spec: ModelSpec, config, windows: int, seq_len: int, prefix: int = 0,
                     fit: bool = True) -> dict[str, int]:
  """What sampling `windows` windows of `seq_len` tokens (after `prefix` tokens) holds on its one
  device, as `data.selfgen.own_windows` samples them: the whole model in float32
  (`generation_model_bytes`), one batch of texts' KV cache and logits (the logits and their
  scaled, masked copy)."""
  batch, length = _sampler_call(spec, config, windows, seq_len, prefix, fit)
  kv = sum(2 * batch * l.num_kv_heads * length * l.head_dim for l in spec.layers)
  return {"whole model (float32, generating)": generation_model_bytes(spec),
          "KV cache (generating)": kv * F32, "logits (generating)": 2 * batch * spec.vocab_size * F32}


def compiled_generation_terms(spec: ModelSpec, config, windows: int, seq_len: int, prefix: int = 0,
                              fit: bool = True) -> dict[str, int]:
  """`generation_terms` as XLA accounts for it on this process's backend: the sampler
  (`data.selfgen._sample`) compiled for the batch and length it would run at, on abstract float32
  parameters, its arguments (the model) and its temporaries and outputs (the KV cache, logits and
  whatever else the loop keeps) from `compile().memory_analysis()`."""
  from jaxprune.data import selfgen

  batch, length = _sampler_call(spec, config, windows, seq_len, prefix, fit)
  params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), param_shapes(spec), is_leaf=_is_shape)
  keys = jax.eval_shape(lambda: jax.vmap(jax.random.key)(jnp.arange(batch)))
  first = jax.ShapeDtypeStruct((batch,), jnp.int32)
  mem = selfgen._sample.lower(spec, params, keys, first, length, jnp.float32(config.selfgen_temperature),
                              int(config.selfgen_top_k or 0)).compile().memory_analysis()
  return {"whole model (float32, generating)": int(mem.argument_size_in_bytes),
          "sampler's buffers (compiled: KV cache, logits, ...)": int(mem.temp_size_in_bytes + mem.output_size_in_bytes)}


def _sampler_call(spec: ModelSpec, config, windows: int, seq_len: int, prefix: int, fit: bool) -> tuple[int, int]:
  """(texts per batch, tokens per text) of the sampler's call for `windows` windows."""
  from jaxprune.data.selfgen import batches, own_per_text

  per_text = own_per_text(spec, seq_len, config, (0,) * prefix, fit)
  return batches(-(-windows // per_text))[1], prefix + per_text * seq_len


def generation_model_bytes(spec: ModelSpec) -> int:
  """The model as a streamed run samples from it (`io.lazy.materialize`): every parameter in float32."""
  return F32 * sum(math.prod(s) for s in jax.tree.leaves(param_shapes(spec), is_leaf=_is_shape))


def _is_shape(x) -> bool:
  """A leaf of `spec.param_shapes`' tree: a tuple of ints (the blocks are a tuple of dicts)."""
  return isinstance(x, tuple) and all(isinstance(n, int) for n in x)


def split_solve_bytes(d: int, e: int, model: int, nbytes: int) -> int:
  """One device's arrays in a split refit (`stats.split.cut`, then `sharded_solve`) of a d-wide
  system with e outputs over `model` m (b = d/m rows each): the cut's rows of G and X^T Y
  (float32), its copy in the solve's precision and the factor's rows, one panel (d x b), four
  b x e blocks (right-hand side, solution, residual, correction) and six b x b blocks."""
  b = -(-d // model)
  return b * (d + e) * F32 + (2 * b * d + d * b + 4 * b * e + 6 * b * b) * nbytes


def split_sweep_bytes(d: int, e: int, model: int, nbytes: int) -> int:
  """One device's arrays in a split `goa-obs` sweep (`criteria.obs_split`) of a d-wide system: the
  solve for [X^T Y | I] (e + d right-hand sides), then its rows of W and G^-1, of the low-rank
  factor U (at most 1.5 d columns) and its units' diagonal blocks."""
  b = -(-d // model)
  return split_solve_bytes(d, e + d, model, nbytes) + b * (e + d + 3 * d // 2 + d) * nbytes


def _top_bytes(spec: ModelSpec, checkpoint_bytes: int) -> int:
  """The embedding table (and an untied head and learned positions) in the checkpoint's dtype."""
  tables = {k: v for k, v in param_shapes(spec).items() if k not in ("layers", "final_norm")}
  return sum(math.prod(s) for s in jax.tree.leaves(tables, is_leaf=lambda x: isinstance(x, tuple))) * checkpoint_bytes


def human(n: float) -> str:
  for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if n >= size:
      return f"{n / size:.2f} {unit}"
  return f"{int(n)} B"


def table(e: Estimate) -> str:
  """The estimate as the lines `jaxprune plan` prints."""
  lines = [f"mesh data={e.mesh[0]},model={e.mesh[1]} on {e.backend} ({e.local_devices} devices per host)"]
  sides = [("per device", e.device), ("per host", e.host)]
  if e.generation is not None:
    sides = [("generating, on its device", e.generation[0]), ("generating, per host", e.generation[1]), *sides]
  for title, p in sides:
    lines.append(f"{title}: peak {human(p.bytes)} during {p.phase}; dominated by {p.dominant} "
                 f"({100 * p.terms[p.dominant] / max(p.bytes, 1):.0f}%)")
    for k, v in sorted(p.terms.items(), key=lambda kv: -kv[1]):
      lines.append(f"  {human(v):>10}  {k}")
  lines += [f"note: {n}" for n in e.notes]
  return "\n".join(lines)


__all__ = ["Estimate", "Peak", "compiled_generation_terms", "estimate", "generation_model_bytes", "generation_terms",
           "human", "process_floor", "table"]
