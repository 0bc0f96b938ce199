"""Statistics: second moments, Jensen-Shannon divergences, equality across device counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from jaxprune import kernels, sharding
from jaxprune.models import adapter as A
from jaxprune.models import layers as L
from jaxprune.pipeline import _chunks, _embed_stream, _positions
from jaxprune.stats import heads as js_stats
from jaxprune.stats import moments


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
  np.testing.assert_allclose(got, want, atol=2e-6)
  assert np.all(got >= 0) and np.all(got <= np.log(2) + 1e-6)
  np.testing.assert_array_equal(got, got.T)
  np.testing.assert_array_equal(np.diag(got), 0)


def test_moments_match_numpy():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 5, 6)).astype(np.float32)
  y = rng.normal(size=(2, 5, 3)).astype(np.float32)
  m = moments.update(moments.init(6, 3), x[:1], y[:1])
  m = moments.update(m, x[1:], y[1:])  # two batches add up to one
  xf, yf = x.reshape(-1, 6).astype(np.float64), y.reshape(-1, 3)
  np.testing.assert_allclose(m.gram, xf.T @ xf, rtol=1e-5)
  np.testing.assert_allclose(m.mean, xf.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m.xy[:6], xf.T @ yf, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(m.xy[6], yf.sum(0), rtol=1e-5)
  assert float(m.count) == 10
  np.testing.assert_allclose(m.variance, xf.var(0), rtol=1e-4)
  sub = moments.subset(m, [1, 4])
  np.testing.assert_allclose(sub.gram, (xf.T @ xf)[np.ix_([1, 4], [1, 4])], rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama_gqa", "gpt2"])
def test_statistics_equal_on_1_and_8_devices(tiny_dir, kind):
  assert len(jax.devices()) == 8
  model = jaxprune.load(tiny_dir(kind))
  tokens = np.random.default_rng(0).integers(0, 128, size=(16, 12)).astype(np.int32)
  blk = model.params["layers"][0]
  cfg = L.block_config(model.spec, 0)
  pos = _positions(12)
  out = {}
  for n in (1, 8):
    mesh = sharding.make_mesh(data=n)
    x = _embed_stream(model.spec, model.params, _chunks(tokens, 8, mesh, "test"), mesh)
    if n == 8:
      assert len(x.sharding.device_set) == 8
    res = {}
    for kind_ in (A.ATTN, A.MLP):
      m_in, m_d, err, yy, yd = kernels.first_pass(kind_, cfg, blk[kind_.norm_key], blk[kind_.key], x, x * 0.5, pos)
      m2, js, _ = kernels.second_pass(kind_, cfg, blk[kind_.norm_key], blk[kind_.key], x, yd, pos,
                                      kind_ is A.ATTN)
      res[kind_.name] = [m_in.xx, m_in.xy, m_d.xx, err, yy, m2.xx, m2.xy] + ([js] if js is not None else [])
    out[n] = res
  for k in out[1]:
    for a, b in zip(out[1][k], out[8][k]):
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())
