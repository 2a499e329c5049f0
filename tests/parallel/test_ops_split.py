"""Every single-device operator run on a SplitDomain equals itself run whole: spectral and
finite-difference derivatives, projection, spectrum, dynamics, white noise, the periodic and
spectral convolution layers and the DWT / inverse; outputs and input gradients (float64).
Plus bad input on a live mesh: the errors name the axis, the extents and the rank count."""
from __future__ import annotations

import pytest

from .split_cases import LAYOUTS, assert_case

WORLD_SIZES = [1, 2, 4]
FAMILIES = ["ops", "conv", "wavelets"]


@pytest.mark.distributed
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", [lay.name for lay in LAYOUTS])
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_operator_split_equals_whole(split_results, world_size, layout, family):
    if layout.startswith("d3-dp2") and world_size < 2:
        pytest.skip("a dp=2 mesh needs at least 2 ranks")
    assert_case(split_results(world_size), f"{layout}-{family}")


BAD_INPUT = {
    "halo_too_wide": [r"axis 2 is wider than a neighbour's slab", r"global extent {4ws} split over {ws} ranks",
                      r"local extents \({blocks}\)"],
    "mesh_world_mismatch": [r"dp x sp = 3 x 1 = 3 ranks, but the world size is {ws}"],
    "mesh_sp_not_dividing": [r"sp={ws1} does not divide the world size {ws}"],
    "layout_not_mesh": [r"ranks \({ws1},\) per split axis do not match the mesh's sp_grid \({ws},\)"],
    "uneven_derived_extent": [r"axis 2 has local extent 2 on rank \d of {ws}", r"splits {4ws1} cells unevenly"],
}


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 4])
def test_fft_of_a_field_no_axis_can_split_goes_through_the_padded_batch(split_results, world_size):
    """A field whose every whole axis is narrower than the ranks used to be refused; its one sample
    now takes the transpose's split, padded with zero samples, and rfft + irfft is the identity."""
    for rank, res in enumerate(split_results(world_size)):
        err = res["bad-input"]["fft_thin_roundtrip"]
        assert err <= 1e-12, f"rank {rank}: rfft + irfft of the thin field differs by {err:.3g}"


@pytest.mark.distributed
@pytest.mark.parametrize("case", sorted(BAD_INPUT))
@pytest.mark.parametrize("world_size", [2, 4])
def test_bad_input_on_a_live_mesh(split_results, world_size, case):
    import re

    ws = world_size
    fill = {"ws": ws, "ws1": ws + 1, "4ws": 4 * ws, "4ws1": 4 * ws + 1, "blocks": ", ".join(["4"] * ws)}
    for rank, res in enumerate(split_results(world_size)):
        msg = res["bad-input"][case]
        assert msg, f"{case}: no ValueError on rank {rank}"
        for pattern in BAD_INPUT[case]:
            pat = pattern
            for k, v in sorted(fill.items(), key=lambda kv: -len(kv[0])):
                pat = pat.replace("{" + k + "}", str(v))
            assert re.search(pat, msg), f"{case} on rank {rank}: {msg!r} does not match {pat!r}"


@pytest.mark.parametrize("S,axes,ranks,wavelet,levels,match", [
    ((34, 32), (2,), (4,), "haar", 1, r"axis 2 has local extents \(9, 9, 8, 8\) \(global 34 over 4 ranks\), not all "
                                       r"divisible by 2\*\*levels = 2"),
    ((32, 24), (3,), (4,), "db2", 2, r"axis 3 has local extents \(6, 6, 6, 6\) \(global 24 over 4 ranks\), not all "
                                      r"divisible by 2\*\*levels = 4"),
    ((32, 32, 32), (3, 4), (8, 8), "db4", 2, r"level 2 of 'db4' needs a halo of 3 cells on axis 3 .* only 2 cells "
                                              r".* local extents \(4, 4, 4, 4, 4, 4, 4, 4\) \(global 32 over 8 ranks\)"),
    ((64, 16), (2,), (2,), "db4", 2, r"levels: 2 is too many for axis 3 of global extent 16"),
])
def test_dwt_split_rejections(S, axes, ranks, wavelet, levels, match):
    from sgfm_dist.parallel.mesh import FieldLayout
    from sgfm_dist.parallel.wavelets import check_dwt_split, max_split_levels

    layout = FieldLayout(S, axes, ranks, (0,) * len(axes))
    with pytest.raises(ValueError, match=match):
        check_dwt_split(layout, wavelet, levels)
    assert max_split_levels(layout, wavelet) < levels


@pytest.mark.parametrize("wavelet,levels", [("haar", 4), ("db2", 3), ("db4", 2)])
@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_dwt_split_accepts_even_splits_with_room(ranks, wavelet, levels):
    from sgfm_dist.parallel.mesh import FieldLayout
    from sgfm_dist.parallel.wavelets import check_dwt_split

    check_dwt_split(FieldLayout((64, 32), (2,), (ranks,), (0,)), wavelet, levels)
