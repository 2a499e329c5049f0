"""Periodized orthonormal DWT (sgfm_dist/ops/wavelets.py) against independent references:
pywt.wavedecn/waverecn(mode="periodization") coefficient by coefficient, ptwt (its circular
stationary transform decimated, and its convolution transforms of a wrapped field, gradients
included), orthonormality (energy, W^T W = I, adjoint identity), autograd gradcheck, and every
bad-input rule."""
from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import ptwt
import pytest
import pywt
import torch

from sgfm_dist.ops import wavelets as wv
from sgfm_dist.ops.domain import LocalDomain
from sgfm_dist.ops.wavelets import (
    CoeffLayout,
    WaveletCoeffs,
    coarse_reconstruction,
    coeff_layout,
    dwt,
    dwt_level,
    filter_reach,
    flatten_coeffs,
    idwt,
    idwt_level,
    inverse_filter_reach,
    max_levels,
    orthogonal_filters,
    select_scales,
    unflatten_coeffs,
)

WAVELETS = ["haar", "db2", "db4", "sym4", "coif2", "db8"]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def field_shape(d: int, wavelet: str, levels: int) -> tuple[int, ...]:
    """Smallest extents pywt admits for ``levels`` (n >= (F - 1) 2^J, divisible by 2^J),
    different per axis so that an axis mix-up cannot pass."""
    f = pywt.Wavelet(wavelet).dec_len
    base = 2 ** levels * max(1, f - 1)
    return tuple(base + 2 ** levels * i for i in range(d))


def pywt_bands(d: int) -> list[str]:
    """pywt.wavedecn detail keys in our band order (bit i of b = high-pass on axis i, axis 0 MSB)."""
    return ["".join(k) for k in itertools.product("ad", repeat=d)][1:]


def random_field(shape, dtype, seed=0, batch=2, chan=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, chan, *shape, generator=g, dtype=torch.float64).to(dtype)


def pywt_coeffs(u: torch.Tensor, wavelet: str, levels: int):
    d = u.ndim - 2
    return pywt.wavedecn(u.double().numpy(), wavelet, mode="periodization", level=levels,
                         axes=tuple(range(2, 2 + d)))


@functools.lru_cache(maxsize=None)
def reference_case(d: int, wavelet: str, levels: int):
    """A float64 field and its pywt coefficients, shared by the float64 and float32 cases
    (the float32 field is the rounded float64 one; the 1e-5 tolerance covers the rounding)."""
    shape = field_shape(d, wavelet, levels)
    u = random_field(shape, torch.float64, batch=1 if d == 3 else 2, chan=1 if d == 3 else 2)
    return u, pywt_coeffs(u, wavelet, levels)


# ------------------------------------------------------------------------------------------
# forward / inverse against pywt
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("levels", [1, 2, 3])
@pytest.mark.parametrize("wavelet", WAVELETS)
@pytest.mark.parametrize("d", [1, 2, 3])
def test_dwt_matches_pywt_and_reconstructs(d, wavelet, levels, dtype):
    shape = field_shape(d, wavelet, levels)
    u64, ref = reference_case(d, wavelet, levels)
    u = u64.to(dtype)
    tol = TOL[dtype]
    c = dwt(u, wavelet, levels)
    assert c.levels == levels and c.ndim == d and c.wavelet == wavelet and c.field_shape == shape
    np.testing.assert_allclose(c.approx.double().numpy(), ref[0], atol=tol, rtol=0)
    for j in range(1, levels + 1):
        det = c.details[j - 1]
        assert det.shape == (*u.shape[:2], 2 ** d - 1, *[n >> j for n in shape])
        for b, key in enumerate(pywt_bands(d)):
            np.testing.assert_allclose(det[:, :, b].double().numpy(), ref[-j][key], atol=tol, rtol=0,
                                       err_msg=f"level {j} band {b} ({key})")
    # perfect reconstruction (pywt's own inverse agrees with the input to 1e-12)
    rec = idwt(c)
    assert rec.dtype == dtype and rec.shape == u.shape
    torch.testing.assert_close(rec, u, atol=tol, rtol=0)
    # orthonormality: energy per (sample, channel) preserved
    flat = flatten_coeffs(c)
    torch.testing.assert_close(flat.double().pow(2).sum(-1), u.double().flatten(2).pow(2).sum(-1),
                               atol=0, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("wavelet", ["haar", "db3", "sym4"])
@pytest.mark.parametrize("d", [1, 2, 3])
def test_single_level_matches_pywt_dwtn(d, wavelet, dtype):
    shape = field_shape(d, wavelet, 1)
    u = random_field(shape, dtype, seed=1)
    filters = orthogonal_filters(wavelet, dtype=dtype)
    approx, details = dwt_level(u, filters)
    ref = pywt.dwtn(u.double().numpy(), wavelet, mode="periodization", axes=tuple(range(2, 2 + d)))
    np.testing.assert_allclose(approx.double().numpy(), ref["a" * d], atol=TOL[dtype], rtol=0)
    for b, key in enumerate(pywt_bands(d)):
        np.testing.assert_allclose(details[:, :, b].double().numpy(), ref[key], atol=TOL[dtype], rtol=0)
    torch.testing.assert_close(idwt_level(approx, details, filters), u, atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("wavelet", ["db2", "db4", "coif2"])
@pytest.mark.parametrize("d", [1, 2, 3])
def test_adjoint_identity(d, wavelet):
    """<W u, c> = <u, W^T c> with W^T = idwt: the inverse is the adjoint (orthonormal W)."""
    levels = 2
    shape = field_shape(d, wavelet, levels)
    u = random_field(shape, torch.float64, seed=2, batch=1)
    layout = coeff_layout(shape, levels, wavelet)
    cflat = random_field((layout.numel,), torch.float64, seed=3, batch=1).reshape(1, 2, -1)
    lhs = (flatten_coeffs(dwt(u, wavelet, levels)) * cflat).sum()
    rhs = (u * idwt(unflatten_coeffs(cflat, layout))).sum()
    torch.testing.assert_close(lhs, rhs, atol=1e-10, rtol=1e-12)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_dense_matrix_is_orthogonal(d):
    """Build W column by column on a tiny field: W^T W = I and W W^T = I (dense reference)."""
    shape = {1: (12,), 2: (6, 8), 3: (6, 6, 8)}[d]
    n = math.prod(shape)
    eye = torch.eye(n, dtype=torch.float64).reshape(n, 1, *shape)
    w = flatten_coeffs(dwt(eye, "db2", 1)).reshape(n, n)  # row k = W e_k = column k of W
    torch.testing.assert_close(w @ w.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(w.T @ w, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------
# flat layout, scales, coarse reconstruction
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("levels", [1, 2, 3])
@pytest.mark.parametrize("d", [1, 2, 3])
def test_flatten_round_trip_and_scale_index(d, levels):
    shape = tuple(2 ** levels * (2 + i) for i in range(d))
    u = random_field(shape, torch.float64, seed=4)
    c = dwt(u, "haar", levels)
    layout = coeff_layout(shape, levels, "haar")
    flat = flatten_coeffs(c)
    assert flat.shape == (*u.shape[:2], math.prod(shape)) == (*u.shape[:2], layout.numel)
    back = unflatten_coeffs(flat, layout)
    torch.testing.assert_close(back.approx, c.approx, atol=0, rtol=0)
    for a, b in zip(back.details, c.details):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(flatten_coeffs(back), flat, atol=0, rtol=0)
    # order: approximation, then j = J .. 1, each band-major C-order
    expected = [c.approx.reshape(*u.shape[:2], -1)] + [c.details[j - 1].reshape(*u.shape[:2], -1)
                                                        for j in range(levels, 0, -1)]
    torch.testing.assert_close(flat, torch.cat(expected, -1), atol=0, rtol=0)
    idx = layout.scale_index()
    assert idx.dtype == torch.long and idx.shape == (layout.numel,)
    assert torch.all(idx[1:] >= idx[:-1])
    counts = torch.bincount(idx, minlength=levels + 1).tolist()
    assert counts[0] == math.prod(n >> levels for n in shape)
    for s in range(1, levels + 1):
        j = levels - s + 1
        assert counts[s] == (2 ** d - 1) * math.prod(n >> j for n in shape)


@pytest.mark.parametrize("finest_scale", [0, 1, 2, 3])
@pytest.mark.parametrize("d", [1, 2, 3])
def test_select_scales_and_coarse_reconstruction_match_pywt(d, finest_scale):
    levels, wavelet = 3, "db2"
    shape = field_shape(d, wavelet, levels)
    u = random_field(shape, torch.float64, seed=5, batch=1)
    c = dwt(u, wavelet, levels)
    ref = pywt_coeffs(u, wavelet, levels)
    # pywt list: [approx, level J, .., level 1]; entry k >= 1 is scale k
    for k in range(finest_scale + 1, levels + 1):
        ref[k] = {key: np.zeros_like(v) for key, v in ref[k].items()}
    expected = pywt.waverecn(ref, wavelet, mode="periodization", axes=tuple(range(2, 2 + d)))
    got = coarse_reconstruction(c, finest_scale)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-10, rtol=0)
    # select_scales zeroes exactly the dropped scales, shares the kept ones
    sel = select_scales(c, range(finest_scale + 1))
    idx = coeff_layout(shape, levels, wavelet).scale_index()
    flat_sel, flat = flatten_coeffs(sel), flatten_coeffs(c)
    keep = idx <= finest_scale
    assert torch.equal(flat_sel[..., keep], flat[..., keep])
    assert torch.count_nonzero(flat_sel[..., ~keep]) == 0
    if finest_scale >= 1:
        assert sel.details[levels - 1] is c.details[levels - 1]


# ------------------------------------------------------------------------------------------
# autograd
# ------------------------------------------------------------------------------------------
GRADCHECK_SHAPES = {  # tiny fields that still satisfy max_levels (n >= (F - 1) 2^J)
    ("haar", 2): {1: (8,), 2: (4, 8), 3: (4, 4, 8)},
    ("db2", 1): {1: (6,), 2: (6, 8), 3: (6, 6, 8)},
    ("db3", 1): {1: (10,), 2: (10, 12), 3: (10, 10, 12)},
}


@pytest.mark.parametrize("wavelet,levels", list(GRADCHECK_SHAPES))
@pytest.mark.parametrize("d", [1, 2, 3])
def test_gradcheck_dwt_and_idwt(d, wavelet, levels):
    shape = GRADCHECK_SHAPES[wavelet, levels][d]
    fast = d > 1  # fast_mode: random directional derivatives instead of full Jacobians
    u = random_field(shape, torch.float64, seed=6, batch=1, chan=1).requires_grad_(True)
    torch.autograd.gradcheck(lambda x: flatten_coeffs(dwt(x, wavelet, levels)), (u,), fast_mode=fast)
    layout = coeff_layout(shape, levels, wavelet)
    flat = random_field((layout.numel,), torch.float64, seed=7, batch=1, chan=1).reshape(1, 1, -1)
    flat.requires_grad_(True)
    torch.autograd.gradcheck(lambda c: idwt(unflatten_coeffs(c, layout)), (flat,), fast_mode=fast)


@pytest.mark.parametrize("wavelet", ["haar", "db2", "db4"])
@pytest.mark.parametrize("d", [1, 2, 3])
def test_level_gradcheck_and_double_backward(d, wavelet):
    """dwt_level / idwt_level are autograd Functions whose backward is the adjoint level (the
    inverse: nothing is stored for backward): gradcheck against finite differences in float64,
    and gradgradcheck (the backward is itself differentiable)."""
    filters = orthogonal_filters(wavelet, dtype=torch.float64)
    shape = field_shape(d, wavelet, 1)
    u = random_field(shape, torch.float64, seed=21, batch=1, chan=2).requires_grad_(True)
    fwd = lambda x: (lambda a, det: flatten_coeffs(WaveletCoeffs(a, [det], wavelet)))(*dwt_level(x, filters))  # noqa: E731
    torch.autograd.gradcheck(fwd, (u,), fast_mode=d > 1)
    torch.autograd.gradgradcheck(fwd, (u,), fast_mode=True)
    approx, details = (t.detach() for t in dwt_level(u, filters))
    approx.requires_grad_(True)
    details.requires_grad_(True)
    torch.autograd.gradcheck(lambda a, b: idwt_level(a, b, filters), (approx, details), fast_mode=d > 1)


def test_backward_is_inverse_transform():
    """For orthonormal W the gradient of <W u, g> w.r.t. u is W^T g = idwt(g)."""
    shape, levels = (56, 64), 3
    u = random_field(shape, torch.float64, seed=8).requires_grad_(True)
    c = flatten_coeffs(dwt(u, "db4", levels))
    g = torch.randn_like(c)
    (grad,) = torch.autograd.grad((c * g).sum(), u)
    torch.testing.assert_close(grad, idwt(unflatten_coeffs(g, coeff_layout(shape, levels, "db4"))),
                               atol=1e-10, rtol=0)


def test_cached_matrices_survive_inference_mode():
    """A first call under inference_mode must not poison the matrix cache for training."""
    wv._cached_matrix.cache_clear()
    u = random_field((28, 28), torch.float32, seed=9)
    with torch.inference_mode():
        idwt(dwt(u, "db4", 2))
    x = u.clone().requires_grad_(True)
    idwt(dwt(x, "db4", 2)).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, 2 * u, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------
# the domain seam and halo widths
# ------------------------------------------------------------------------------------------
class RecordingDomain(LocalDomain):
    def __init__(self):
        self.widths = []

    def pad(self, x, widths):
        self.widths.append(tuple(tuple(w) for w in widths))
        return super().pad(x, widths)


@pytest.mark.parametrize("wavelet,reach,inv_reach", [("haar", 0, 0), ("db2", 1, 1), ("db3", 2, 1), ("db4", 3, 2),
                                                      ("coif2", 5, 3), ("db8", 7, 4)])
def test_padding_goes_through_domain_with_filter_reach(wavelet, reach, inv_reach):
    assert filter_reach(wavelet) == reach == pywt.Wavelet(wavelet).dec_len // 2 - 1
    assert inverse_filter_reach(wavelet) == inv_reach
    dom = RecordingDomain()
    levels = 2 if wavelet == "haar" else 1
    shape = field_shape(3, wavelet, levels)
    u = random_field(shape, torch.float64, seed=10, batch=1)
    c = dwt(u, wavelet, levels, domain=dom)
    # one pad per axis and level, last axis first, only that axis padded (halo = filter_reach)
    per_level = [tuple((reach, reach) if i == a else (0, 0) for i in range(3)) for a in (2, 1, 0)]
    assert dom.widths == per_level * levels
    dom.widths.clear()
    torch.testing.assert_close(idwt(c, domain=dom), u, atol=1e-10, rtol=0)
    # the inverse runs the axes first to last (the band of the axis at hand is outermost)
    per_level = [tuple((inv_reach, inv_reach) if i == a else (0, 0) for i in range(3)) for a in (0, 1, 2)]
    assert dom.widths == per_level * levels


@pytest.mark.parametrize("wavelet", WAVELETS + ["dmey"])
@pytest.mark.parametrize("extent", [1, 2, 6, 16, 24, 64, 96, 128, 1000, 1024])
def test_max_levels_consistent_with_pywt(extent, wavelet):
    f = pywt.Wavelet(wavelet).dec_len
    twos = 0
    while extent % 2 ** (twos + 1) == 0:
        twos += 1
    assert max_levels(extent, wavelet) == min(pywt.dwt_max_level(extent, f), twos)


def test_orthogonal_filters_are_pywt_filters():
    for wavelet in WAVELETS:
        w = pywt.Wavelet(wavelet)
        filters = orthogonal_filters(wavelet, dtype=torch.float32)
        for f, ref in zip(filters, (w.dec_lo, w.dec_hi, w.rec_lo, w.rec_hi)):
            assert f.dtype == torch.float32
            np.testing.assert_allclose(f.numpy(), ref, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("d", [1, 2, 3])
def test_cuda_matches_cpu(d, dtype):
    shape = field_shape(d, "db4", 2)
    u = random_field(shape, dtype, seed=11)
    c_cpu = flatten_coeffs(dwt(u, "db4", 2))
    c_gpu = dwt(u.cuda(), "db4", 2)
    torch.testing.assert_close(flatten_coeffs(c_gpu).cpu(), c_cpu, atol=TOL[dtype], rtol=0)
    torch.testing.assert_close(idwt(c_gpu).cpu(), u, atol=TOL[dtype], rtol=0)


# ------------------------------------------------------------------------------------------
# ptwt: a second, torch-native reference
# ------------------------------------------------------------------------------------------
# ptwt has no "periodization" mode: its padding modes (zero, constant, reflect, periodic,
# symmetric) follow pywt's *extension* modes (n/2 + F/2 - 1 coefficients per level, not n/2)
# and its matrix transform orthogonalises boundary filters instead of wrapping. Two things it
# computes are nevertheless exactly our transform, by an independent route:
# * its stationary (undecimated, a-trous) transform ``ptwt.swt`` wraps circularly; level j of
#   our DWT is level j of the SWT sampled every 2^j cells from cell 0 (the SWT's
#   ``F/2 - 1`` left / ``F/2`` right circular pad puts the phase of every level at 0);
# * ``ptwt.wavedec{,2,3}`` (level 1) of a field wrapped by ``filter_reach = F/2 - 1`` cells on
#   each side: the wrapped cells make every retained coefficient see the periodic field, so
#   whatever ptwt pads further out (mode "zero" here) is never read. Its coefficients
#   ``R .. R + n/2 - 1`` (R = F/2 - 1) are ours. Likewise ``ptwt.waverec{,2,3}`` (a "valid"
#   reconstruction) of coefficients wrapped by ``inverse_filter_reach = F // 4`` coarse cells
#   gives our inverse level from fine cell ``2 (F // 4) - F/2 + 1`` (0 or 1) on.
# Levels > 1 repeat the single level on the cropped approximation.
PTWT_DEC = {1: lambda x, w: ptwt.wavedec(x, w, mode="zero", level=1),
            2: lambda x, w: ptwt.wavedec2(x, w, mode="zero", level=1),
            3: lambda x, w: ptwt.wavedec3(x, w, mode="zero", level=1)}
PTWT_REC = {1: ptwt.waverec, 2: ptwt.waverec2, 3: ptwt.waverec3}
# ptwt's 2-D details are pywt's (horizontal, vertical, diagonal) = ('da', 'ad', 'dd'); ours are
# ('ad', 'da', 'dd'). Its 3-D details are a dict keyed like pywt's.
PTWT_2D_ORDER = (1, 0, 2)
# d = 3 costs (F - 1)^3 8^J cells per field at the smallest admissible size: long filters in 3-D
# are left to the pywt tests above.
PTWT_WAVELETS = {1: WAVELETS + ["dmey"], 2: WAVELETS, 3: ["haar", "db2", "db3", "db4"]}


def ptwt_cases(max_levels_: int = 3):
    return [(d, w, j) for d in (1, 2, 3) for w in PTWT_WAVELETS[d] for j in range(1, max_levels_ + 1)
            if not (w == "dmey" and j > 1)]  # dmey (F = 62): one level keeps the field small


def wrap(x: torch.Tensor, width: int) -> torch.Tensor:
    """Periodic extension of every field axis by ``width`` cells on each side (no pad in ptwt)."""
    for axis in range(2, x.ndim):
        n = x.shape[axis]
        x = x.index_select(axis, torch.arange(-width, n + width, device=x.device) % n)
    return x


def crop(x: torch.Tensor, start: int, lengths) -> torch.Tensor:
    for axis, n in zip(range(2, x.ndim), lengths):
        x = x.narrow(axis, start, n)
    return x


def ptwt_periodized_dwt(u: torch.Tensor, wavelet: str, levels: int):
    """(approx, [details level 1 .. J] as [B, C, 2^d - 1, *S/2^j]) from ptwt.wavedec{,2,3}."""
    d, f = u.ndim - 2, pywt.Wavelet(wavelet).dec_len
    reach, details, a = f // 2 - 1, [], u
    for _ in range(levels):
        half = [n // 2 for n in a.shape[2:]]
        out = PTWT_DEC[d](wrap(a, reach), wavelet)
        det = {1: lambda: [out[1]], 2: lambda: [out[1][i] for i in PTWT_2D_ORDER],
               3: lambda: [out[1][k] for k in pywt_bands(3)]}[d]()
        details.append(torch.stack([crop(t, reach, half) for t in det], 2))
        a = crop(out[0], reach, half)
    return a, details


def ptwt_periodized_idwt(approx: torch.Tensor, details, wavelet: str) -> torch.Tensor:
    """Inverse of :func:`ptwt_periodized_dwt` through ptwt.waverec{,2,3}."""
    d, f = approx.ndim - 2, pywt.Wavelet(wavelet).dec_len
    pad = f // 4
    start = 2 * pad - f // 2 + 1
    a = approx
    for det in reversed(details):
        bands = [wrap(det[:, :, b], pad) for b in range(2 ** d - 1)]
        coeffs = {1: lambda: [wrap(a, pad), bands[0]],
                  2: lambda: [wrap(a, pad), tuple(bands[i] for i in PTWT_2D_ORDER)],
                  3: lambda: [wrap(a, pad), dict(zip(pywt_bands(3), bands))]}[d]()
        a = crop(PTWT_REC[d](coeffs, wavelet), start, [2 * n for n in a.shape[2:]])
    return a


def ptwt_swt_dwt(u: torch.Tensor, wavelet: str, levels: int):
    """Our DWT from ptwt's circular stationary transform: per axis, level j of ``ptwt.swt``
    gives the j-fold low-pass ('a') and the (j-1)-fold low-pass + high-pass ('d') undecimated;
    the separable products of these, sampled every 2^j cells, are the level-j bands."""
    d = u.ndim - 2
    details, sample = [], None
    for j in range(1, levels + 1):
        parts = {"": u}
        for axis in range(2, 2 + d):
            nxt = {}
            for key, t in parts.items():
                out = ptwt.swt(t, wavelet, level=j, axis=axis)  # [A_j, D_j, D_{j-1}, .., D_1]
                nxt[key + "a"], nxt[key + "d"] = out[0], out[1]
            parts = nxt
        sample = (slice(None), slice(None)) + (slice(None, None, 2 ** j),) * d
        details.append(torch.stack([parts[k][sample] for k in pywt_bands(d)], 2))
    return parts["a" * d][sample], details


@pytest.mark.parametrize("d,wavelet,levels", ptwt_cases())
def test_dwt_matches_ptwt_stationary_transform_decimated(d, wavelet, levels):
    u = random_field(field_shape(d, wavelet, levels), torch.float64, seed=12, batch=1, chan=1 if d == 3 else 2)
    c = dwt(u, wavelet, levels)
    approx, details = ptwt_swt_dwt(u, wavelet, levels)
    torch.testing.assert_close(c.approx, approx, atol=1e-12, rtol=0)
    for j in range(levels):
        torch.testing.assert_close(c.details[j], details[j], atol=1e-12, rtol=0, msg=lambda m: f"level {j + 1}: {m}")


@pytest.mark.parametrize("d,wavelet,levels,dtype", [(*case, torch.float64) for case in ptwt_cases()]
                         + [(*case, torch.float32) for case in ptwt_cases() if case[2] == 2])
def test_dwt_and_idwt_match_ptwt_on_wrapped_field(d, wavelet, levels, dtype):
    u = random_field(field_shape(d, wavelet, levels), dtype, seed=13, batch=1, chan=1 if d == 3 else 2)
    c = dwt(u, wavelet, levels)
    approx, details = ptwt_periodized_dwt(u, wavelet, levels)
    tol = TOL[dtype]
    torch.testing.assert_close(c.approx, approx, atol=tol, rtol=0)
    for j in range(levels):
        torch.testing.assert_close(c.details[j], details[j], atol=tol, rtol=0, msg=lambda m: f"level {j + 1}: {m}")
    # the inverse, on coefficients that are not those of a field of ours (random ones)
    g = torch.Generator().manual_seed(14)
    rnd = WaveletCoeffs(torch.randn(c.approx.shape, generator=g, dtype=torch.float64).to(dtype),
                        tuple(torch.randn(t.shape, generator=g, dtype=torch.float64).to(dtype) for t in c.details),
                        wavelet)
    torch.testing.assert_close(idwt(rnd), ptwt_periodized_idwt(rnd.approx, rnd.details, wavelet), atol=tol, rtol=0)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_dwt_gradient_matches_ptwt_autograd(d):
    """Our backward against autograd through ptwt's convolutions (an independent adjoint)."""
    wavelet, levels = "db4", 2
    u = random_field(field_shape(d, wavelet, levels), torch.float64, seed=15, batch=1).requires_grad_(True)
    g = torch.randn(flatten_coeffs(dwt(u.detach(), wavelet, levels)).shape, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(16))
    (ours,) = torch.autograd.grad((flatten_coeffs(dwt(u, wavelet, levels)) * g).sum(), u)
    approx, details = ptwt_periodized_dwt(u, wavelet, levels)
    ref_flat = flatten_coeffs(WaveletCoeffs(approx, tuple(details), wavelet))
    (ref,) = torch.autograd.grad((ref_flat * g).sum(), u)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [1, 2, 3])
def test_cuda_matches_ptwt_on_cuda(d):
    """ptwt runs on the GPU as well (pywt does not): both transforms on CUDA, float64."""
    wavelet, levels = "db4", 2
    u = random_field(field_shape(d, wavelet, levels), torch.float64, seed=18, batch=1).cuda()
    c = dwt(u, wavelet, levels)
    approx, details = ptwt_periodized_dwt(u, wavelet, levels)
    torch.testing.assert_close(flatten_coeffs(c), flatten_coeffs(WaveletCoeffs(approx, tuple(details), wavelet)),
                               atol=1e-12, rtol=0)
    torch.testing.assert_close(idwt(c), ptwt_periodized_idwt(c.approx, c.details, wavelet), atol=1e-12, rtol=0)


def _ptwt_direct(u: torch.Tensor, wavelet: str, mode: str) -> torch.Tensor:
    """ptwt's own level-1 approximation of a ``[1, 1, *S]`` field with one of its boundary modes."""
    d = u.ndim - 2
    if mode == "boundary":  # sparse-matrix transform, boundary filters orthogonalised; takes [batch, *S]
        return (ptwt.MatrixWavedec(wavelet, 1) if d == 1 else ptwt.MatrixWavedec2(wavelet, 1))(u[0])[0]
    return (ptwt.wavedec if d == 1 else ptwt.wavedec2)(u, wavelet, mode=mode, level=1)[0]


NO_PERIODIZATION = ("ptwt has no periodization mode: its padding modes extend the field (n/2 + F/2 - 1 "
                    "coefficients), its matrix 'boundary' mode orthogonalises edge filters instead of wrapping")


@pytest.mark.filterwarnings("ignore:Sparse:UserWarning")  # ptwt's matrix transform builds beta sparse tensors
@pytest.mark.parametrize("mode", ["periodic", "zero", "boundary"])
@pytest.mark.parametrize("wavelet", ["haar", pytest.param("db4", marks=pytest.mark.xfail(strict=True,
                                                                                          reason=NO_PERIODIZATION))])
@pytest.mark.parametrize("d", [1, 2])
def test_ptwt_boundary_modes_equal_periodization_only_for_haar(d, wavelet, mode):
    """Haar (F = 2) never reads past its own pair of cells, so every ptwt mode is our transform."""
    u = random_field((16, 24)[:d], torch.float64, seed=17, batch=1, chan=1)
    ours = dwt(u, wavelet, 1).approx.flatten()
    ref = _ptwt_direct(u, wavelet, mode).flatten()
    assert ref.numel() == ours.numel(), f"ptwt mode {mode!r}: {ref.numel()} approximation coefficients, ours {ours.numel()}"
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------
GOOD = torch.zeros(1, 1, 32, 32)


@pytest.mark.parametrize("call,match", [
    (lambda: dwt(torch.zeros(1, 1, 32, 24), "haar", 4), r"u: field axis 1 .*extent 24.*2\*\*levels = 16"),
    (lambda: dwt(GOOD, "haar", 0), r"levels: .*>= 1"),
    (lambda: dwt(GOOD, "haar", -1), r"levels: "),
    (lambda: dwt(GOOD, "haar", 1.5), r"levels: "),
    (lambda: dwt(GOOD, "haar", True), r"levels: "),
    (lambda: dwt(GOOD, "db4", 3), r"levels: 3 is too many .*extent 32.*'db4'.*max_levels = 2"),
    (lambda: dwt(GOOD, "no_such_wavelet", 1), r"wavelet: 'no_such_wavelet'"),
    (lambda: dwt(GOOD, "bior2.2", 1), r"wavelet: 'bior2.2' is not orthogonal"),
    (lambda: dwt(GOOD, "rbio1.3", 1), r"wavelet: 'rbio1.3' is not orthogonal"),
    (lambda: dwt(GOOD, "mexh", 1), r"wavelet: 'mexh'"),
    (lambda: dwt(GOOD, 4, 1), r"wavelet: "),
    (lambda: dwt(GOOD.to(torch.complex64), "haar", 1), r"u: .*real floating"),
    (lambda: dwt(GOOD.to(torch.int64), "haar", 1), r"u: .*real floating"),
    (lambda: dwt(torch.zeros(1, 32), "haar", 1), r"u: "),
    (lambda: dwt(torch.zeros(1, 1, 4, 4, 4, 4, 4), "haar", 1), r"u: .*1 to 4 field axes"),
    (lambda: dwt([[1.0]], "haar", 1), r"u: "),
    (lambda: orthogonal_filters("bior2.2"), r"wavelet: 'bior2.2'"),
    (lambda: orthogonal_filters("mexh"), r"wavelet: 'mexh'"),
    (lambda: filter_reach("bior1.3"), r"wavelet: "),
    (lambda: max_levels(0, "haar"), r"extent: "),
    (lambda: max_levels(16, "gaus1"), r"wavelet: "),
    (lambda: dwt_level(torch.zeros(1, 1, 10, 7), orthogonal_filters("haar")), r"u: field axis 1 .*extent 7"),
    (lambda: dwt_level(GOOD, orthogonal_filters("haar")[:2]), r"filters: "),
    (lambda: idwt_level(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 2, 4, 4), orthogonal_filters("haar")),
     r"details: expected shape \(1, 1, 3, 4, 4\)"),
    (lambda: idwt("not coeffs"), r"coeffs: "),
    (lambda: coeff_layout((32, 24), 4, "haar"), r"field_shape: axis 1 has extent 24"),
    (lambda: coeff_layout((32, 32), 0, "haar"), r"levels: "),
    (lambda: coeff_layout((32, 32, 32, 32, 32), 1, "haar"), r"field_shape: "),
    (lambda: coeff_layout((32,), 1, "bior2.2"), r"wavelet: "),
    (lambda: unflatten_coeffs(torch.zeros(1, 1, 100), coeff_layout((32,), 2, "haar")), r"flat: .*\[B, C, 32\]"),
    (lambda: unflatten_coeffs(torch.zeros(1, 32), coeff_layout((32,), 2, "haar")), r"flat: "),
    (lambda: select_scales(dwt(GOOD, "haar", 2), [0, 3]), r"keep: scale 3 is not in 0..2"),
    (lambda: coarse_reconstruction(dwt(GOOD, "haar", 2), -1), r"finest_scale: "),
    (lambda: coarse_reconstruction(dwt(GOOD, "haar", 2), 5), r"finest_scale: "),
    (lambda: WaveletCoeffs(GOOD, [torch.zeros(1, 1, 2, 16, 16)], "haar"), r"details\[0\]: "),
])
def test_bad_input_raises_value_error_naming_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_layout_dataclass_is_frozen_and_typed():
    layout = coeff_layout([16, 32], 2, "db2")
    assert isinstance(layout, CoeffLayout) and layout.field_shape == (16, 32)
    with pytest.raises(Exception):
        layout.levels = 3  # frozen
    assert layout.segments() == [(0, 4 * 8), (1, 3 * 4 * 8), (2, 3 * 8 * 16)]
