"""The module step (`jaxprune.prune.step.step`) called directly on a tiny model."""

import jax
import numpy as np
import pytest

import jaxprune
from jaxprune import criteria, sharding
from jaxprune.models import adapter as A
from jaxprune.models import layers as L
from jaxprune.prune import PruneConfig, streams
from jaxprune.prune.context import StepContext
from jaxprune.prune.step import ModuleInput, ModuleOut, StepMetrics, StepResult, step
from jaxprune.stats import passes

PHASES = {"statistics", "solves", "scoring", "surgery", "advance"}


@pytest.fixture(scope="module")
def setup(tiny_dir):
  """(model, the paper's context, block 0 on the mesh, the calibration groups entering it)."""
  model = jaxprune.load(tiny_dir("llama_gqa"))
  c = PruneConfig.preset("paper", sparsity=0.3, batch_size=8).check(model.spec)
  mesh = sharding.make_mesh()
  ctx = StepContext.build(model, c, mesh, criteria.get(c.method))
  calib = np.random.default_rng(0).integers(0, 128, size=(16, 16)).astype(np.int32)
  tokens = streams.chunks(calib, c.batch_size, mesh, "calibration")
  groups = streams.first_groups(model.spec, model.params, [tokens], mesh, ctx.with_dense)
  return model, ctx, sharding.place(model.params["layers"][0], mesh), groups


def _input(setup, kind, shape, block=None, groups=None, layer=None):
  model, ctx, blk, grp = setup
  spec = model.spec
  layer = layer or spec.layers[0]
  return ModuleInput(kind, 0, blk if block is None else block, layer,
                     L.block_config(spec.with_layers((layer,) + spec.layers[1:]), 0),
                     grp if groups is None else groups, None, shape, None)


def _host(tree):
  return jax.tree.map(np.asarray, tree)


def _equal(a, b) -> bool:
  la, lb = jax.tree.leaves(_host(a)), jax.tree.leaves(_host(b))
  same_shapes = jax.tree.structure(a) == jax.tree.structure(b)
  return same_shapes and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(la, lb))


def test_a_module_that_keeps_all_units_returns_the_block_and_advances_by_its_output(setup):
  model, ctx, blk, groups = setup
  layer = model.spec.layers[0]
  assert ctx.with_dense and groups[0].xd is groups[0].xp  # the paper reconstructs: both streams, still one
  attn = step(ctx, _input(setup, A.ATTN, (layer.num_heads, None)))
  mlp = step(ctx, _input(setup, A.MLP, (layer.ffn_dim, None), block=attn.out.block, groups=attn.out.groups))
  for res in (attn, mlp):
    assert _equal(res.out.block, ctx.fill_biases(blk)) and res.out.layer == layer
    g = res.out.groups[0]
    assert g.xd is g.xp  # nothing changed: one stream stands for both
    row = res.metrics.row.to_json()
    assert row["kept"] == list(range(row["units_before"])) and row["unchanged"] and not row["scored"]
    assert res.metrics.passes == {"forward": 1}  # no statistics, no solves
  # Attention then MLP advanced the stream by the block's output: what the dense block pass
  # gives, up to the order of float32 sums (the two paths apply the same weights in other
  # fused kernels). Each output value is a sum of about D + F products of unit-sized terms,
  # so a reordering moves it by at most that many float32 roundings of its magnitude.
  x = groups[0].xp
  want = np.asarray(passes.block_pass(L.block_config(model.spec, 0), blk, x, streams.positions(x.shape[2]),
                                      mesh=ctx.mesh))
  got = np.asarray(mlp.out.groups[0].xp)
  n_terms = model.spec.hidden_size + layer.ffn_dim
  bound = n_terms * np.finfo(np.float32).eps * np.abs(want).max()
  assert np.abs(got - want).max() <= bound
  assert np.abs(got - np.asarray(x)).max() > 1000 * bound  # and the module did move it


@pytest.mark.parametrize("kind,shape", [(A.ATTN, (2, 1)), (A.MLP, (40, None))])
def test_a_pruned_module_keeps_the_requested_shape(setup, kind, shape):
  model, ctx, blk, groups = setup
  res = step(ctx, _input(setup, kind, shape))
  row = res.metrics.row.to_json()
  kept = np.asarray(row["kept"])
  assert len(kept) == shape[0] == row["units_after"] and row["scored"]
  assert np.all(np.diff(kept) > 0) and kept.min() >= 0 and kept.max() < row["units_before"]
  layer = res.out.layer
  if kind is A.ATTN:
    assert (layer.num_heads, layer.num_kv_heads) == shape
    assert res.out.block["attn"]["q"]["kernel"].shape[1] == shape[0]
  else:
    assert layer.ffn_dim == shape[0] and res.out.block["mlp"]["up"]["kernel"].shape[-1] == shape[0]
  # Both streams advanced and now differ: the pruned one carries the cut's error.
  g = res.out.groups[0]
  assert g.xd is not g.xp and g.xp.shape == groups[0].xp.shape
  assert 0 < row["error_after"] < 1
  assert set(res.metrics.seconds) <= PHASES and res.metrics.passes["hidden_pass"] == len(groups)


def test_the_step_changes_none_of_its_inputs_and_is_deterministic(setup):
  model, ctx, blk, groups = setup
  m = _input(setup, A.MLP, (40, None))
  before = _host((m.block, [(g.xd, g.xp) for g in m.groups]))
  ids = (id(m.block), id(m.block["mlp"]), [id(g) for g in m.groups], id(m.groups))
  one, two = step(ctx, m), step(ctx, m)
  assert _equal((m.block, [(g.xd, g.xp) for g in m.groups]), before)
  assert ids == (id(m.block), id(m.block["mlp"]), [id(g) for g in m.groups], id(m.groups))
  assert m.layer == model.spec.layers[0] and len(m.groups) == len(groups)
  assert _equal(one.out.block, two.out.block) and _equal(one.out.groups[0].xp, two.out.groups[0].xp)
  drop = lambda r: {k: v for k, v in r.metrics.row.to_json().items() if not k.endswith("seconds")}
  assert drop(one) == drop(two)


def test_the_results_are_named(setup):
  res = step(setup[1], _input(setup, A.MLP, (40, None)))
  assert isinstance(res, StepResult) and res._fields == ("out", "metrics")
  assert isinstance(res.out, ModuleOut) and res.out._fields == ("block", "layer", "groups", "xs")
  assert isinstance(res.metrics, StepMetrics) and res.metrics._fields == ("row", "passes", "seconds")
  row = res.metrics.row
  assert (row.layer, row.module) == (0, "mlp") and "second_level" in row.solves  # the paper reconstructs
  assert res.out.xs is None  # no scoring stream went in
