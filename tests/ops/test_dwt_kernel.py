"""The fused CPU DWT kernel (sgfm_dist/ops/_dwt_kernel.py) against the windowed-GEMM path
(``SGFM_DWT_KERNEL=0``) and against pywt.wavedecn/waverecn(mode="periodization"): forward,
inverse and gradients, d = 1, 2, 3, float32/float64, filter lengths 2 to 18 (the templated
lengths and the run-time-length fallback), and the switches that keep the GEMM path."""
from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest
import pywt
import torch

from sgfm_dist.ops import _dwt_kernel
from sgfm_dist.ops import wavelets as wv
from sgfm_dist.ops.domain import LOCAL, LocalDomain

pytestmark = pytest.mark.skipif(not _dwt_kernel.available(),
                                reason="the fused CPU DWT kernel cannot be built here (no C++ toolchain / "
                                       "torch extension build failed) or SGFM_DWT_KERNEL=0; the GEMM path "
                                       "is covered by test_wavelets.py")

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
# haar F=2, db2 F=4, sym3 F=6, db4 F=8, sym5 F=10, coif2 F=12, db8 F=16 (templated); coif3 F=18 (generic)
WAVELETS = ["haar", "db2", "sym3", "db4", "sym5", "coif2", "db8", "coif3"]
SHAPES = {1: [(64,), (136,)], 2: [(40, 48), (72, 36)], 3: [(40, 36, 48), (36, 44, 40)]}


def _case(d: int, wavelet: str, which: int):
    shape = SHAPES[d][which]
    levels = min(2, min(wv.max_levels(n, wavelet) for n in shape))
    return shape, levels


def _gemm(monkeypatch, fn):
    with monkeypatch.context() as m:
        m.setenv("SGFM_DWT_KERNEL", "0")
        return fn()


def _pywt(u: torch.Tensor, wavelet: str, levels: int):
    d = u.ndim - 2
    return pywt.wavedecn(u.double().numpy(), wavelet, mode="periodization", level=levels,
                         axes=tuple(range(2, 2 + d)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("wavelet", WAVELETS)
@pytest.mark.parametrize("d", [1, 2, 3])
def test_kernel_matches_gemm_and_pywt(monkeypatch, d, wavelet, which, dtype):
    shape, levels = _case(d, wavelet, which)
    if levels < 1:
        pytest.skip(f"{shape} admits no {wavelet} level")
    g = torch.Generator().manual_seed(d * 100 + which)
    batch, chan = (1, 1) if d == 3 else (2, 3)
    u = torch.randn(batch, chan, *shape, generator=g, dtype=torch.float64).to(dtype)
    assert wv._fused_kernel(u, LOCAL) is not None
    c = wv.dwt(u, wavelet, levels)
    c_gemm = _gemm(monkeypatch, lambda: wv.dwt(u, wavelet, levels))
    tol = TOL[dtype]
    torch.testing.assert_close(wv.flatten_coeffs(c), wv.flatten_coeffs(c_gemm), atol=tol, rtol=0)
    ref = _pywt(u, wavelet, levels)
    np.testing.assert_allclose(c.approx.double().numpy(), ref[0], atol=tol, rtol=0)
    keys = ["".join(k) for k in itertools.product("ad", repeat=d)][1:]
    for j, det in enumerate(c.details, start=1):
        for b, key in enumerate(keys):
            np.testing.assert_allclose(det[:, :, b].double().numpy(), ref[-j][key], atol=tol, rtol=0)
    # inverse: of the pywt coefficients (through our layout), against waverecn and the GEMM path
    rec = wv.idwt(c)
    rec_gemm = _gemm(monkeypatch, lambda: wv.idwt(c))
    torch.testing.assert_close(rec, rec_gemm, atol=tol, rtol=0)
    torch.testing.assert_close(rec, u, atol=tol, rtol=0)
    ref_rec = pywt.waverecn(ref, wavelet, mode="periodization", axes=tuple(range(2, 2 + d)))
    np.testing.assert_allclose(rec.double().numpy(), ref_rec, atol=tol, rtol=0)


@pytest.mark.parametrize("d, wavelet", [(1, "haar"), (1, "db4"), (1, "coif3"), (2, "haar"), (2, "db4"),
                                        (2, "coif3"), (3, "haar"), (3, "db4")])
def test_kernel_gradcheck(d, wavelet):
    shape = {1: (36,), 2: (36, 40), 3: (16, 14, 18)}[d]
    levels = 1
    u = torch.randn(1, 2 if d < 3 else 1, *shape, dtype=torch.float64, requires_grad=True)
    assert wv._fused_kernel(u.detach(), LOCAL) is not None
    torch.autograd.gradcheck(lambda x: wv.flatten_coeffs(wv.dwt(x, wavelet, levels)), (u,))
    c = wv.dwt(u.detach(), wavelet, levels)
    flat = wv.flatten_coeffs(c).requires_grad_(True)
    layout = wv.coeff_layout(shape, levels, wavelet)
    torch.autograd.gradcheck(lambda f: wv.idwt(wv.unflatten_coeffs(f, layout)), (flat,))


def test_explicit_filters_use_kernel_and_match_gemm(monkeypatch):
    u = torch.randn(2, 2, 24, 32, dtype=torch.float64)
    filters = wv.orthogonal_filters("db3")
    a, det = wv.dwt_level(u, filters)
    a0, det0 = _gemm(monkeypatch, lambda: wv.dwt_level(u, filters))
    torch.testing.assert_close(a, a0, atol=1e-12, rtol=0)
    torch.testing.assert_close(det, det0, atol=1e-12, rtol=0)
    torch.testing.assert_close(wv.idwt_level(a, det, filters), u, atol=1e-12, rtol=0)


def test_switches_keep_gemm_path(monkeypatch, caplog):
    u = torch.randn(1, 1, 16, 16)
    monkeypatch.setenv("SGFM_DWT_KERNEL", "0")
    assert wv._fused_kernel(u, LOCAL) is None
    monkeypatch.delenv("SGFM_DWT_KERNEL")
    assert wv._fused_kernel(u, LOCAL) is not None
    # not a plain local domain, half precision: the GEMM path
    class Recording(LocalDomain):
        pass
    assert wv._fused_kernel(u, Recording()) is None
    assert wv._fused_kernel(u.bfloat16(), LOCAL) is None
    # a failed build: one warning, then None (the GEMM path) for the rest of the process
    monkeypatch.setattr(_dwt_kernel, "_state", {})
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")
    monkeypatch.setattr("torch.utils.cpp_extension.load_inline", broken)
    with caplog.at_level(logging.WARNING, logger=_dwt_kernel.__name__):
        assert _dwt_kernel.load() is None
        assert _dwt_kernel.load() is None
    assert sum("could not be built" in r.getMessage() for r in caplog.records) == 1
    assert wv._fused_kernel(u, LOCAL) is None
    c = wv.dwt(u, "db2", 1)
    torch.testing.assert_close(wv.idwt(c), u, atol=1e-5, rtol=0)
