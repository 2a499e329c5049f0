"""Distributed FFT: spectral blocks equal slices of ``torch.fft.rfftn`` of the whole field, round
trips, wavenumbers / Hermitian weights, gradients through rfft and irfft, and the bytes sent
equal to the all-to-all volume (split jobs); plan structure and volume formula in-process."""
from __future__ import annotations

import math

import pytest

from sgfm_dist.parallel.fft import FFTStage, RFFTStage, make_plan, transpose_bytes
from sgfm_dist.parallel.mesh import block_sizes

from .split_cases import LAYOUTS, assert_case

WORLD_SIZES = [1, 2, 4]


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [lay.name for lay in LAYOUTS])
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_fft_split_equals_whole(split_results, world_size, layout):
    if layout.startswith("d3-dp2") and world_size < 2:
        pytest.skip("a dp=2 mesh needs at least 2 ranks")
    assert_case(split_results(world_size), f"{layout}-fft")


@pytest.mark.parametrize("extents,axes,split,ranks,n_transposes", [
    ((16, 12), (0, 1), (0,), (4,), 1),          # slab, split axis not halved
    ((8, 16), (0, 1), (1,), (4,), 2),           # the halved axis is split: real transpose first
    ((16, 8, 12), (1, 2), (0,), (4,), 0),       # split axis not transformed: local
    ((16, 8, 12), (0, 1, 2), (0,), (4,), 1),
    ((16, 8, 12), (0, 1, 2), (2,), (4,), 2),
    ((8, 8, 12), (0, 1, 2), (0, 1), (2, 2), 2),  # pencil: one transpose per mesh dim
    ((8, 8, 12), (1, 2), (0, 1), (2, 2), 1),     # pencil, spatial FFT only: t stays split
    ((6, 8, 8), (0, 1, 2), (1, 2), (2, 2), 3),   # pencil holding the halved axis split
    ((16, 8, 12), (0, 1, 2), (0,), (1,), 0),     # one rank
])
def test_plan_structure(extents, axes, split, ranks, n_transposes):
    plan = make_plan(extents, axes, split, ranks)
    assert plan.n_transposes == n_transposes
    assert sum(isinstance(s, RFFTStage) for s in plan.stages) == 1
    transformed = set()
    for st in plan.stages:
        if isinstance(st, RFFTStage):
            assert st.axis == max(axes)  # torch.fft.rfftn convention: the last axis is halved
            transformed |= {st.axis, *st.others}
        elif isinstance(st, FFTStage):
            transformed.add(st.axis)
    assert transformed == set(axes)
    assert plan.spectral_extents[max(axes)] == extents[max(axes)] // 2 + 1


@pytest.mark.parametrize("p", [2, 4, 8])
@pytest.mark.parametrize("B,C,T,X", [(2, 3, 32, 16), (1, 4, 64, 30)])
def test_slab_transpose_volume_is_all_to_all_minimum(B, C, T, X, p):
    """Slab on t, rfft over (t, x): each rank holds T/p * (X/2+1) complex cells and keeps 1/p of them."""
    plan = make_plan((T, X), (0, 1), (0,), (p,))
    m = X // 2 + 1
    for q in range(p):
        local = (T // p) * m * B * C * 16  # complex128 bytes held before the transpose
        keep = (T // p) * block_sizes(m, p)[q] * B * C * 16
        assert transpose_bytes(plan, B * C, 8, (q,)) == local - keep
    total = sum(transpose_bytes(plan, B * C, 8, (q,)) for q in range(p))
    assert total == math.prod((T, m, B, C, 16)) * (p - 1) // p


@pytest.mark.parametrize("extents,axes,split,ranks", [
    ((10, 9), (0, 1), (0,), (4,)),
    ((7, 9, 6), (0, 1, 2), (0, 1), (2, 2)),
    ((6, 8, 8), (0, 1, 2), (1, 2), (2, 3)),
])
def test_inverse_transposes_send_back_what_the_forward_received(extents, axes, split, ranks):
    """Uneven blocks: per rank the inverse volume differs from the forward one, in total they agree."""
    plan = make_plan(extents, axes, split, ranks)
    coords = [(i, j) for i in range(ranks[0]) for j in range(ranks[1])] if len(ranks) == 2 else [(i,) for i in range(ranks[0])]
    fwd = [transpose_bytes(plan, 2, 8, c) for c in coords]
    inv = [transpose_bytes(plan, 2, 8, c, "inverse") for c in coords]
    assert sum(fwd) == sum(inv) > 0
    assert [transpose_bytes(plan, 2, 8, c, "both") for c in coords] == [f + i for f, i in zip(fwd, inv)]


@pytest.mark.parametrize("extents,split,ranks,match", [
    ((8, 1), (0,), (2,), "no whole field axis has at least 2 cells"),
    ((8, 3, 2), (0, 1), (4, 2), "no whole field axis has at least 4 cells"),
])
def test_plan_without_a_transpose_target_is_rejected(extents, split, ranks, match):
    with pytest.raises(ValueError, match=match):
        make_plan(extents, tuple(range(len(extents))), split, ranks)
