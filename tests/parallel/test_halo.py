"""Halo exchange: split vs whole (gathered windows of the padded field), gradients against the
single-device adjoint, the dot-product adjoint test and double backward; plus the local
(one-rank) exchange and its config checks in-process."""
from __future__ import annotations

import pytest
import torch

from sgfm_dist.ops.domain import LOCAL
from sgfm_dist.parallel.halo import HaloConfig, halo_adjoint, halo_exchange, halo_pad

from .split_cases import LAYOUTS, assert_case

WORLD_SIZES = [1, 2, 4]


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [lay.name for lay in LAYOUTS])
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_halo_split_equals_whole(split_results, world_size, layout):
    if layout.startswith("d3-dp2") and world_size < 2:
        pytest.skip("a dp=2 mesh needs at least 2 ranks")
    assert_case(split_results(world_size), f"{layout}-halo")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("widths", [[(1, 1), (2, 0)], [(0, 3), (5, 1)], [(7, 9), (0, 0)]])
def test_one_rank_exchange_is_local_wrap(widths, dtype):
    x = torch.randn(2, 3, 5, 4, dtype=dtype)
    configs = [HaloConfig(2 + i, lo, hi, (x.shape[2 + i],)) for i, (lo, hi) in enumerate(widths)]
    torch.testing.assert_close(halo_pad(x, configs), LOCAL.pad(x, widths), rtol=0, atol=0)


@pytest.mark.parametrize("lo,hi", [(1, 1), (2, 0), (0, 3), (6, 4)])
@pytest.mark.parametrize("n", [3, 5])
def test_one_rank_exchange_adjoint_and_gradcheck(n, lo, hi):
    cfg = HaloConfig(2, lo, hi, (n,))
    x = torch.randn(2, 1, n, 3, dtype=torch.float64)
    y = torch.randn(2, 1, n + lo + hi, 3, dtype=torch.float64)
    lhs = (halo_exchange(x, cfg) * y).sum()
    rhs = (x * halo_adjoint(y, cfg)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-13, atol=1e-13)
    xr = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: halo_exchange(t, cfg), (xr,))
    assert torch.autograd.gradgradcheck(lambda t: halo_exchange(t, cfg), (xr,))


@pytest.mark.parametrize("extents,lo,hi", [((4, 4), 5, 0), ((3, 2, 2), 1, 3), ((2, 2, 2, 2), 3, 3)])
def test_halo_wider_than_neighbour_slab_is_rejected(extents, lo, hi):
    with pytest.raises(ValueError, match=r"axis 3 is wider than a neighbour's slab: global extent "
                                         rf"{sum(extents)} split over {len(extents)} ranks"):
        HaloConfig(3, lo, hi, extents)


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=2, lo=-1, hi=0, extents=(4,)), "lo: expected a non-negative int"),
    (dict(dim=2, lo=1, hi=1, extents=()), "extents: expected positive block extents"),
    (dict(dim=2, lo=1, hi=1, extents=(4, 4), coord=2), "coord: 2 outside the 2 ranks"),
])
def test_halo_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HaloConfig(**kwargs)
