"""Statistics: second moments, Jensen-Shannon divergences, equality across device counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from jaxprune import sharding
from jaxprune.stats import passes
from jaxprune.stats.needs import StreamNeeds
from jaxprune.models import adapter as A
from jaxprune.models import layers as L
from jaxprune.prune.streams import chunks as _chunks, embed_stream as _embed_stream, positions as _positions
from jaxprune.stats import heads as js_stats
from jaxprune.stats import moments
from tests.numerics import assert_within_sum_bound, gamma


def _softmax_rows(rng, shape):
  """Causal attention-like distributions [B,N,T,S]."""
  B, N, T = shape
  logits = rng.normal(size=(B, N, T, T)) * 2
  mask = np.tril(np.ones((T, T), bool))
  logits = np.where(mask, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


def _js_numpy(p, q):
  m = (p + q) / 2
  def kl(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
      t = np.where(a > 0, a * np.log(a / b), 0.0)
    return t.sum(-1)
  return kl(p, m) / 2 + kl(q, m) / 2


def test_js_matches_direct_numpy():
  rng = np.random.default_rng(0)
  probs = _softmax_rows(rng, (3, 4, 7))
  got = np.asarray(js_stats.js_sums(jnp.asarray(probs, jnp.float32)) / js_stats.js_rows(probs))
  want = np.zeros((4, 4))
  for i in range(4):
    for j in range(4):
      want[i, j] = _js_numpy(probs[:, i], probs[:, j]).mean()
  # Each JS term p log(p/m) is a few float32 roundings of a value <= p; a row of S
  # keys sums to at most ln 2, so a row carries <= gamma(S + 8) * 2 ln 2 of error, and the
  # mean over rows no more (tests/numerics.py, point 1).
  bound = gamma(7 + 8 + 21) * 2 * np.log(2)
  np.testing.assert_allclose(got, want, atol=bound, rtol=0)
  assert np.all(got >= 0) and np.all(got <= np.log(2) + bound)
  np.testing.assert_array_equal(got, got.T)
  np.testing.assert_array_equal(np.diag(got), 0)


def test_moments_match_numpy():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 5, 6)).astype(np.float32)
  y = rng.normal(size=(2, 5, 3)).astype(np.float32)
  m = moments.update(moments.init(6, 3), x[:1], y[:1])
  m = moments.update(m, x[1:], y[1:])  # two batches add up to one
  xf, yf = x.reshape(-1, 6).astype(np.float64), y.reshape(-1, 3).astype(np.float64)
  ax, ay = np.abs(xf), np.abs(yf)
  # Worst-case float32 bounds of 10-term sums, whatever the summation order (tests/numerics.py, point 1).
  assert_within_sum_bound(m.gram, xf.T @ xf, ax.T @ ax, 10, "gram")
  assert_within_sum_bound(m.mean, xf.mean(0), ax.mean(0), 11, "mean")  # the sum, then one division
  assert_within_sum_bound(m.xy[:6], xf.T @ yf, ax.T @ ay, 10, "xy")
  assert_within_sum_bound(m.xy[6], yf.sum(0), ay.sum(0), 10, "y sum")
  assert float(m.count) == 10
  # E[x^2] - E[x]^2: each part carries the bounds above (plus a product and a difference).
  assert_within_sum_bound(m.variance, xf.var(0), (ax ** 2).mean(0) + ax.mean(0) ** 2, 14, "variance")
  sub = moments.subset(m, [1, 4])
  np.testing.assert_array_equal(sub.gram, np.asarray(m.gram)[np.ix_([1, 4], [1, 4])])


@pytest.mark.parametrize("kind", ["llama_gqa", "gpt2"])
@pytest.mark.parametrize("data,model", [(8, 1), (2, 4)])
def test_statistics_equal_on_1_and_8_devices(tiny_dir, kind, data, model):
  """On a `model` axis the block is split over it and so are the Gram sums' rows
  (`sharding.gram_rows`), joined on the host for the solves (`passes.gather_hidden`)."""
  if len(jax.devices()) < 8:
    pytest.skip(f"needs 8 devices (tests/conftest.py forces 8 on CPU); {jax.default_backend()} has {len(jax.devices())}")
  model_ = jaxprune.load(tiny_dir(kind))
  tokens = np.random.default_rng(0).integers(0, 128, size=(16, 12)).astype(np.int32)
  cfg = L.block_config(model_.spec, 0)
  pos = _positions(12)
  out = {}
  for n, m in ((1, 1), (data, model)):
    mesh = sharding.make_mesh(n, m)
    blk = sharding.place(model_.params["layers"][0], mesh)
    x = _embed_stream(model_.spec, model_.params, _chunks(tokens, 8, mesh, "test"), mesh)
    if n * m == 8:
      assert len(x.sharding.device_set) == 8
    res = {}
    for kind_ in (A.ATTN, A.MLP):
      d = passes.dense_pass(kind_, cfg, blk[kind_.norm_key], blk[kind_.key], x, x * 0.5, pos, True, True)
      h = passes.hidden_pass(kind_, cfg, blk[kind_.norm_key], blk[kind_.key], x, d.yd, pos,
                             StreamNeeds(hidden="gram", cross=True, js=kind_ is A.ATTN), mesh=mesh)
      if m > 1:  # every device added only its rows of X^T X and X^T Y
        assert isinstance(h.hidden, moments.RowSplit)
        assert tuple(h.hidden.gram.sharding.spec)[:1] == ("model",)
        assert {s.data.shape for s in h.hidden.gram.addressable_shards} == {(h.x2.shape[-1] // m, h.x2.shape[-1])}
      h = passes.gather_hidden(h, mesh)
      res[kind_.name] = [d.m_in.xx, d.m_in.xy, d.yy1, d.err, d.yy, h.hidden.xx, h.hidden.xy] + (
          [h.js] if h.js is not None else [])
      # sqrt(sum_t hd_ti^2) of the dense input, for the cross moment's Cauchy-Schwarz bound
      hd = np.asarray(L.norm(cfg, blk[kind_.norm_key], x), np.float64).reshape(-1, x.shape[-1])
      res[kind_.name + "_dd"] = np.sqrt(np.sum(hd ** 2, axis=0))
    out[n] = res
  # The two runs add the same per-token terms in a different order (per device, then
  # psum). Each entry is a sum over the 16 x 12 tokens of terms computed with <= ~2D
  # roundings each (norm, projection), so both lie within gamma(N + 2D) * sum|terms| of
  # the exact value; by Cauchy-Schwarz sum_t |x_ti y_tj| <= sqrt(G_ii G_jj), which the
  # runs' own Gram diagonals give (tests/numerics.py, point 1).
  n = 16 * 12 + 2 * model_.spec.hidden_size
  for k in ("attn", "mlp"):
    a = [np.asarray(v, np.float64) for v in out[1][k]]
    b = [np.asarray(v, np.float64) for v in out[data][k]]
    din, d2 = (np.sqrt(np.abs(np.diag(a[i]))) for i in (0, 5))
    dd = out[1][k + "_dd"]
    yy = np.sqrt(abs(a[4]))
    scales = [np.outer(din, din), np.outer(din, dd), abs(a[2]),
              abs(a[3]), abs(a[4]), np.outer(d2, d2), np.outer(d2, np.full(a[6].shape[1], yy))]
    scales += [np.full_like(a[7], np.log(2) * 16 * 12)] if len(a) > 7 else []
    for i, (x, y, sc) in enumerate(zip(a, b, scales)):
      assert x.shape == y.shape
      assert np.all(np.abs(x - y) <= 2 * gamma(n) * np.broadcast_to(sc, x.shape) + 1e-30), (k, i)


def test_wide_gram_from_its_upper_blocks_is_symmetric_and_exact_to_the_sum_bound():
  """From SYMMETRIC_MIN features the Gram matrix multiplies only its upper blocks; the
  result is exactly symmetric and within the float32 summation bound of the float64 sum."""
  rng = np.random.default_rng(3)
  t, d = 64, moments.SYMMETRIC_MIN + 13
  x = rng.normal(size=(t, d)) * rng.uniform(0.1, 3.0, size=d)
  xa = np.concatenate([x, np.ones((t, 1))], axis=1)
  g = np.asarray(moments.gram(jnp.asarray(xa, jnp.float32)))
  np.testing.assert_array_equal(g, g.T)
  xf = xa.astype(np.float32).astype(np.float64)
  assert_within_sum_bound(g, xf.T @ xf, np.abs(xf).T @ np.abs(xf), t, "upper-block gram")


def test_chunk_sums_are_compensated_to_one_rounding_of_the_exact_sum():
  """Statistics over thousands of chunks: a float32 running sum is off by up to one rounding
  per chunk, which buries a Gram matrix's small directions; the passes add chunk sums by
  Kahan's compensated summation, whose error is one rounding of the total plus each chunk's
  own (tests/numerics.py, point 1, with n = the tokens of one chunk + 2)."""
  rng = np.random.default_rng(4)
  C, T, d = 8192, 2, 3
  x = (100.0 + rng.normal(size=(C, T, d))).astype(np.float32)  # large mean: every entry adds up
  xf = x.reshape(-1, d).astype(np.float64)
  exact = xf.T @ xf
  terms = np.abs(xf).T @ np.abs(xf)

  def accumulate(compensated: bool):
    def body(carry, xc):
      total, comp = carry
      term = moments.sums(xc)
      if compensated:
        return moments.compensated_add(total, comp, term), None
      return (total + term, comp), None
    m0 = moments.init(d)
    return jax.jit(lambda x: jax.lax.scan(body, (m0, m0), x)[0][0])(jnp.asarray(x))

  got = np.asarray(accumulate(True).gram)
  # One rounding of the total (2u, Kahan) on top of each chunk's own gamma(T + 2).
  bound = gamma(T + 2) * terms + 2 * 2.0**-24 * np.abs(exact)
  assert np.all(np.abs(got - exact) <= bound), np.max(np.abs(got - exact) / bound)
  naive = np.asarray(accumulate(False).gram)
  assert np.max(np.abs(naive - exact) / bound) > 2  # the test tells the two apart (4.7 here)


def test_split_gram_sums_leave_no_device_a_whole_gram_matrix():
  """XLA's own buffer assignment of the statistics pass of a 2048-channel MLP: with the
  sums' rows split over a `model` axis of 8, a device's buffers (temporaries and outputs)
  come to less than one Gram matrix; replicated, they hold more than one."""
  from jaxprune.io.hf_config import spec_from_hf_config
  from jaxprune.io.lazy import block_shapes

  F = 2048
  spec = spec_from_hf_config(dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128,
                                  hidden_size=64, intermediate_size=F, num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=64))
  blk, cfg = block_shapes(spec)[0], L.block_config(spec, 0)
  needs = StreamNeeds(hidden="gram", cross=True)
  gram_bytes = 4 * F * F
  per_device = {}
  for split in (False, True):
    mesh = sharding.make_mesh(1, 8)
    shard = sharding.param_shardings(blk, mesh, quiet=True)
    p = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), blk, shard)
    x = jax.ShapeDtypeStruct((2, 8, 16, 64), jnp.float32, sharding=sharding.stream_sharding(mesh))
    mem = passes.hidden_pass.lower(A.MLP, cfg, p[A.MLP.norm_key],
                                   p[A.MLP.key], x, x, _positions(16), needs,
                                   mesh=mesh if split else None).compile().memory_analysis()
    per_device[split] = mem.temp_size_in_bytes + mem.output_size_in_bytes
  assert per_device[True] < gram_bytes < per_device[False], per_device


def test_shrink_on_host_statistics_matches_the_device():
  """Gram statistics joined on the host (`passes.gather_hidden`) are shrunk with numpy; the
  result is the device's up to float32 rounding: elementwise steps of a few roundings, and a
  (d+1)-term product for the cross moment (tests/numerics.py, point 1)."""
  rng = np.random.default_rng(5)
  x = rng.normal(size=(40, 9)).astype(np.float32) * rng.uniform(0.5, 2, 9).astype(np.float32)
  y = rng.normal(size=(40, 4)).astype(np.float32)
  w = rng.normal(size=(10, 4)).astype(np.float32)
  dev = moments.sums(jnp.asarray(x), jnp.asarray(y))
  host = moments.Moments(np.asarray(dev.xx), np.asarray(dev.xy))
  for alpha in (0.25, 1.0):
    a, b = moments.shrink(dev, alpha, jnp.asarray(w)), moments.shrink(host, alpha, w)
    assert isinstance(b.xx, np.ndarray) and isinstance(b.xy, np.ndarray)
    xx = np.abs(np.asarray(dev.xx, np.float64))
    s = xx[-1, :9]
    scale = xx + np.pad(np.outer(s, s) / xx[-1, -1], ((0, 1), (0, 1)))
    assert_within_sum_bound(b.xx, np.asarray(a.xx, np.float64), scale, 8, "shrunk gram")
    assert_within_sum_bound(b.xy, np.asarray(a.xy, np.float64),
                            np.abs(np.asarray(dev.xy, np.float64)) + (scale + xx) @ np.abs(w), 10 + 8, "shrunk xy")


@pytest.mark.parametrize("kind", [A.MLP, A.ATTN], ids=["mlp", "attn"])
def test_statistics_are_reduced_over_data_once_per_module(kind):
  """Compiled for a data=2, model=4 mesh, the statistics passes keep each data shard's sums
  on its own devices while they scan the chunks: no reduction inside the loop spans the
  `data` axis (the old kernels all-reduced every chunk's Gram term over it), and the sums
  are reduced over `data` after the loop. Reductions over `model` inside the loop are the
  module's own forward (its split matmuls)."""
  from jaxprune.io.hf_config import spec_from_hf_config
  from jaxprune.io.lazy import block_shapes
  from tests import hlo

  spec = spec_from_hf_config(dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128,
                                  hidden_size=64, intermediate_size=256, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
  blk, cfg = block_shapes(spec)[0], L.block_config(spec, 0)
  mesh = sharding.make_mesh(2, 4)
  M = mesh.shape["model"]
  shard = sharding.param_shardings(blk, mesh, quiet=True)
  p = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), blk, shard)
  x = jax.ShapeDtypeStruct((3, 8, 16, 64), jnp.float32, sharding=sharding.stream_sharding(mesh))
  needs = StreamNeeds(hidden="gram", cross=True, first_sq=kind is A.MLP, inputs=True, js=kind is A.ATTN)
  args = (kind, cfg, p[kind.norm_key], p[kind.key], x, x, _positions(16))
  U2 = 256 if kind is A.MLP else 64
  x2 = jax.ShapeDtypeStruct((3, 8, 16, U2), jnp.float32, sharding=sharding.stream_sharding(mesh))
  kernels = {
      "hidden_pass": passes.hidden_pass.lower(*args, needs, mesh=mesh),
      "dense_pass": passes.dense_pass.lower(*args, True, True, mesh=mesh),
      "second_apply": passes.second_apply.lower(x2, jnp.zeros((U2, 64)), jnp.zeros(64), x, x, mesh=mesh),
  }
  data_row = lambda partition: partition // M  # partitions follow the mesh's devices in order
  for name, lowered in kernels.items():
    found = [c for c in hlo.collectives(lowered.compile().as_text(), mesh.size) if c.op in hlo.REDUCTIONS]
    in_loop = [c for c in found if c.in_loop and hlo.spans_axis(c.groups, data_row)]
    assert not in_loop, (name, [c.line[:200] for c in in_loop])
    assert any(not c.in_loop and hlo.spans_axis(c.groups, data_row) for c in found), name


@pytest.mark.parametrize("kind", ["llama_gqa", "gpt2"])
def test_skipped_positions_are_left_out_of_every_moment(tiny_dir, kind):
  """With `skip`, every moment (and the target energies the solves read) sums only each
  window's positions from `skip` on, while the attention still sees the whole window."""
  model_ = jaxprune.load(tiny_dir(kind))
  skip, T = 3, 12
  tokens = np.random.default_rng(0).integers(0, 128, size=(16, T)).astype(np.int32)
  cfg, pos, mesh = L.block_config(model_.spec, 0), _positions(T), sharding.make_mesh(1, 1)
  blk = model_.params["layers"][0]
  x = _embed_stream(model_.spec, model_.params, _chunks(tokens, 8, mesh, "test"), mesh)
  n = 16 * (T - skip)  # terms of every sum
  for kind_ in (A.ATTN, A.MLP):
    norm_p, p = blk[kind_.norm_key], blk[kind_.key]
    d = passes.dense_pass(kind_, cfg, norm_p, p, x, x * 0.5, pos, True, False, skip=skip)
    full = passes.dense_pass(kind_, cfg, norm_p, p, x, x * 0.5, pos, True, False)
    np.testing.assert_array_equal(d.yd, full.yd)  # the outputs are the whole windows'
    needs = StreamNeeds(hidden="gram", cross=True, first_sq=kind_ is A.MLP, inputs=True, skip=skip)
    h = passes.hidden_pass(kind_, cfg, norm_p, p, x, d.yd, pos, needs)
    assert h.x2.shape[2] == T

    def tail(a):
      a = np.asarray(a, np.float64)
      return a[:, :, skip:].reshape(-1, a.shape[-1])

    def aug(a):
      return np.concatenate([a, np.ones((a.shape[0], 1))], axis=1)

    yd, x2 = tail(d.yd), aug(tail(h.x2))
    hp, hd = aug(tail(L.norm(cfg, norm_p, x * 0.5))), tail(L.norm(cfg, norm_p, x))
    # Each entry a float32 sum of n products, within gamma(n + a few) of the exact sum of
    # those positions' terms, whatever the order (tests/numerics.py, point 1); the stream's
    # own float32 values are the inputs.
    assert_within_sum_bound(h.hidden.xx, x2.T @ x2, np.abs(x2).T @ np.abs(x2), n + 4, f"{kind_.name} gram")
    assert_within_sum_bound(h.hidden.xy, x2.T @ yd, np.abs(x2).T @ np.abs(yd), n + 4, f"{kind_.name} cross")
    assert_within_sum_bound(d.yy, np.sum(yd ** 2), np.sum(yd ** 2), n + 4, f"{kind_.name} energy")
    assert_within_sum_bound(d.m_in.xx, hp.T @ hp, np.abs(hp).T @ np.abs(hp), n + 4, f"{kind_.name} input gram")
    assert_within_sum_bound(d.m_in.xy, hp.T @ hd, np.abs(hp).T @ np.abs(hd), n + 4, f"{kind_.name} input cross")
    hn = aug(tail(L.norm(cfg, norm_p, x)))
    assert_within_sum_bound(h.inputs.xx, hn.T @ hn, np.abs(hn).T @ np.abs(hn), n + 4, f"{kind_.name} inputs")
    assert float(h.hidden.count) == float(d.m_in.count) == n
