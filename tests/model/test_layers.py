"""Layers of the score / forcing networks against independent references: PeriodicConv vs
torch's circular convolution, SpectralConv vs a dense-DFT-matrix implementation, plus
float64 gradchecks of every small layer."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sgfm_dist.model.layers import ChannelRMSNorm, FiLM, FourierFeatures, PeriodicConv, SpectralConv
from sgfm_dist.ops.domain import LocalDomain

TORCH_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
SHAPES = {1: [(12,), (9,)], 2: [(8, 12), (7, 10)], 3: [(4, 6, 8), (5, 4, 6)], 4: [(4, 3, 4, 6), (3, 4, 5, 4)]}


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("kernel", [1, 3, 5])
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_periodic_conv_equals_circular_conv(ndim, kernel, groups):
    torch.manual_seed(0)
    conv = PeriodicConv(4, 6, kernel, ndim, groups=groups).double()
    ref = TORCH_CONV[ndim](4, 6, kernel, padding=kernel // 2, padding_mode="circular", groups=groups).double()
    ref.weight.data.copy_(conv.weight.data)
    ref.bias.data.copy_(conv.bias.data)
    for shape in SHAPES[ndim]:
        x = torch.randn(2, 4, *shape, dtype=torch.float64)
        torch.testing.assert_close(conv(x), ref(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel", [(3, 5), (1, 3)])
def test_periodic_conv_anisotropic_kernel(kernel):
    torch.manual_seed(1)
    conv = PeriodicConv(3, 2, kernel, 2).double()
    ref = nn.Conv2d(3, 2, kernel, padding=(kernel[0] // 2, kernel[1] // 2), padding_mode="circular").double()
    ref.weight.data.copy_(conv.weight.data)
    ref.bias.data.copy_(conv.bias.data)
    x = torch.randn(2, 3, 6, 10, dtype=torch.float64)
    torch.testing.assert_close(conv(x), ref(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("kernel", [1, 3, (3, 1, 3, 5)])
def test_periodic_conv_4d_equals_direct_sum(kernel, groups):
    """Four field axes (a 3-D flow with its time axis; torch has no conv4d): against the direct
    sum over kernel offsets of circularly shifted inputs."""
    torch.manual_seed(4)
    conv = PeriodicConv(4, 6, kernel, 4, groups=groups).double()
    ks = conv.kernel_size
    for shape in SHAPES[4]:
        x = torch.randn(2, 4, *shape, dtype=torch.float64)
        ref = conv.bias.reshape(1, -1, 1, 1, 1, 1).expand(2, 6, *shape).clone()
        gi, go = 4 // groups, 6 // groups
        for off in torch.cartesian_prod(*[torch.arange(k) for k in ks]).reshape(-1, 4).tolist():
            shifted = torch.roll(x, shifts=[k // 2 - o for k, o in zip(ks, off)], dims=(2, 3, 4, 5))
            w = conv.weight[(slice(None), slice(None), *off)]                # [O, I/g]
            for g in range(groups):
                ref[:, g * go:(g + 1) * go] += torch.einsum(
                    "oi,bi...->bo...", w[g * go:(g + 1) * go], shifted[:, g * gi:(g + 1) * gi])
        torch.testing.assert_close(conv(x), ref, rtol=1e-12, atol=1e-12)


def _dft(n: int) -> torch.Tensor:
    """Dense DFT matrix F[k, x] = exp(-2 pi i k x / n) (rows in fftfreq order)."""
    x = torch.arange(n, dtype=torch.float64)
    return torch.exp(-2j * math.pi * torch.outer(x, x) / n)


def _spectral_conv_dense(layer: SpectralConv, x: torch.Tensor) -> torch.Tensor:
    """Reference: full complex DFT by dense matrices, multiply by the full-spectrum weight
    (kept low modes, Hermitian extension to negative last-axis frequencies), inverse DFT."""
    d = layer.ndim
    shape = x.shape[2:]
    w = layer.hermitian_weight().detach()  # [I, O, *box]
    xc = x.to(torch.complex128)
    letters = "xyzw"[:d]
    for i, n in enumerate(shape):  # forward DFT along every axis
        xc = torch.movedim(torch.tensordot(xc, _dft(n), dims=([2 + i], [1])), -1, 2 + i)
    full = torch.zeros(layer.in_ch, layer.out_ch, *shape, dtype=torch.complex128)
    freqs = [torch.fft.fftfreq(n, 1.0 / n).round().long() for n in shape]
    grids = torch.meshgrid(*freqs, indexing="ij")
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in shape]).reshape(-1, d):
        nvec = [int(g[tuple(idx)]) for g in grids]
        if any(abs(k) >= m or 2 * abs(k) >= n for k, m, n in zip(nvec, layer.modes, shape)):
            continue
        if nvec[-1] >= 0:
            box = [k + m - 1 for k, m in zip(nvec[:-1], layer.modes[:-1])] + [nvec[-1]]
            val = w[(slice(None), slice(None), *box)]
        else:  # negative last-axis frequency: conjugate of the weight at -n
            box = [-k + m - 1 for k, m in zip(nvec[:-1], layer.modes[:-1])] + [-nvec[-1]]
            val = w[(slice(None), slice(None), *box)].conj()
        full[(slice(None), slice(None), *idx.tolist())] = val
    yc = torch.einsum(f"bi{letters},io{letters}->bo{letters}", xc, full)
    for i, n in enumerate(shape):  # inverse DFT
        yc = torch.movedim(torch.tensordot(yc, _dft(n).conj() / n, dims=([2 + i], [1])), -1, 2 + i)
    assert yc.imag.abs().max() < 1e-10, "the reference operator must map real fields to real fields"
    return yc.real


@pytest.mark.parametrize("modes", ["small", "large"])
@pytest.mark.parametrize("ndim", [1, 2, 3, 4])
def test_spectral_conv_matches_dense_dft(ndim, modes):
    torch.manual_seed(2)
    m = {"small": {1: (3,), 2: (2, 3), 3: (2, 2, 2), 4: (2, 2, 2, 2)},
         "large": {1: (9,), 2: (6, 9), 3: (4, 5, 6), 4: (2, 3, 3, 4)}}[modes][ndim]
    layer = SpectralConv(3, 2, m, ndim).double()
    with torch.no_grad():
        layer.weight.normal_()
    for shape in SHAPES[ndim]:  # even and odd extents, same weights (resolution-agnostic)
        x = torch.randn(2, 3, *shape, dtype=torch.float64)
        torch.testing.assert_close(layer(x), _spectral_conv_dense(layer, x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_spectral_conv_is_real_linear_and_translation_equivariant(ndim):
    torch.manual_seed(3)
    layer = SpectralConv(2, 2, 3, ndim).double()
    shape = SHAPES[ndim][0]
    x, y = torch.randn(2, 1, 2, *shape, dtype=torch.float64)
    torch.testing.assert_close(layer(2 * x - y), 2 * layer(x) - layer(y), rtol=1e-10, atol=1e-10)
    shifted = torch.roll(x, shifts=[1] * ndim, dims=list(range(2, 2 + ndim)))
    torch.testing.assert_close(layer(shifted), torch.roll(layer(x), shifts=[1] * ndim, dims=list(range(2, 2 + ndim))),
                               rtol=1e-10, atol=1e-10)


class CountingDomain(LocalDomain):
    """A LocalDomain that records which seam methods the layers call."""

    def __init__(self):
        self.calls: dict[str, int] = {}

    def __getattribute__(self, name):
        if name in ("pad", "rfft", "irfft", "wavenumbers", "global_extent"):
            calls = object.__getattribute__(self, "calls")
            calls[name] = calls.get(name, 0) + 1
        return object.__getattribute__(self, name)


def test_layers_go_through_their_domain():
    dom = CountingDomain()
    x = torch.randn(1, 2, 8, 8)
    PeriodicConv(2, 2, 3, 2, domain=dom)(x)
    SpectralConv(2, 2, 3, 2, domain=dom)(x)
    assert dom.calls.get("pad", 0) >= 1 and dom.calls.get("rfft", 0) >= 1 and dom.calls.get("irfft", 0) >= 1
    assert dom.calls.get("wavenumbers", 0) >= 1


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_gradcheck_small_layers(ndim):
    torch.manual_seed(4)
    shape = {1: (6,), 2: (4, 6), 3: (4, 4, 4)}[ndim]
    x = torch.randn(1, 2, *shape, dtype=torch.float64, requires_grad=True)
    conv = PeriodicConv(2, 2, 3, ndim).double()
    spec = SpectralConv(2, 2, 2, ndim).double()
    norm = ChannelRMSNorm(2).double()
    assert torch.autograd.gradcheck(conv, (x,), fast_mode=True)
    assert torch.autograd.gradcheck(spec, (x,), fast_mode=True)
    assert torch.autograd.gradcheck(norm, (x,), fast_mode=True)
    # the weights too: functional forms with the parameter as input
    w = conv.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w_: torch.func.functional_call(conv, {"weight": w_}, (x.detach(),)), (w,),
                                    fast_mode=True)
    sw = spec.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w_: torch.func.functional_call(spec, {"weight": w_}, (x.detach(),)), (sw,),
                                    fast_mode=True)


def test_gradcheck_film_and_fourier_features():
    torch.manual_seed(5)
    film = FiLM(3, 2).double()
    with torch.no_grad():
        film.proj.weight.normal_()
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(film, (x, c), fast_mode=True)
    ff = FourierFeatures(2, 4).double()
    v = torch.rand(3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ff, (v,), fast_mode=True)


@pytest.mark.parametrize("bad", [
    dict(kernel_size=2), dict(kernel_size=(3, 4)), dict(kernel_size=(3,)), dict(ndim=5),
])
def test_periodic_conv_bad_arguments(bad):
    kw = dict(in_ch=2, out_ch=2, kernel_size=3, ndim=2) | bad
    with pytest.raises(ValueError, match="kernel_size|ndim"):
        PeriodicConv(**kw)


def test_bad_input_shapes():
    with pytest.raises(ValueError, match=r"x: expected a field \[B, 2"):
        PeriodicConv(2, 2, 3, 2)(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"x: expected a field \[B, 2"):
        SpectralConv(2, 2, 2, 2)(torch.randn(1, 2, 4))
    with pytest.raises(ValueError, match="modes"):
        SpectralConv(2, 2, 0, 2)
