"""The perturbations behind the derived tolerances (tests/numerics.py, point 2)."""

import math

import numpy as np
import pytest

from tests import numerics

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("scale", [1.0, math.sqrt(576), 2.0])
def test_jitter_is_x_times_one_plus_scaled_unit_roundoff_times_random_signs(dtype, scale):
  # The definition, written out: signs from the generator's randint stream, formed in float64.
  x = torch.randn(37, 53, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
  want_gen, got_gen = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
  for _ in range(2):  # and the generator is left where the definition leaves it
    signs = torch.randint(0, 2, x.shape, generator=want_gen, dtype=torch.float64) * 2 - 1
    want = x * (1 + scale * numerics.U32 * signs.to(dtype))
    got = numerics._jitter(x, got_gen, scale)
    assert got.dtype == dtype and torch.equal(got, want)
  if dtype == torch.float64:  # both signs drawn, each a relative change of exactly scale * u (to float64 rounding)
    ratio = (got / x).numpy()
    assert set(np.unique(ratio.round(12))) == {round(1 + s * scale * numerics.U32, 12) for s in (-1, 1)}


def test_jitter_passes_non_float_values_through():
  ids = torch.arange(5)
  assert numerics._jitter(ids, torch.Generator(), 1.0) is ids
  assert numerics._jitter(None, torch.Generator(), 1.0) is None
