"""LocalDomain against independent references: numpy's wrap padding, torch.fft, Parseval."""
import numpy as np
import pytest
import torch

from sgfm_dist.ops.domain import LOCAL, normalize_axes


@pytest.mark.parametrize("widths", [[(1, 2), (0, 3)], [(0, 0), (5, 5)], [(9, 1), (2, 13)], [(8, 8), (6, 6)]])
def test_pad_equals_numpy_wrap(widths):
    x = torch.randn(2, 3, 8, 6, dtype=torch.float64)
    want = np.pad(x.numpy(), [(0, 0), (0, 0), *widths], mode="wrap")
    np.testing.assert_array_equal(LOCAL.pad(x, widths).numpy(), want)


@pytest.mark.parametrize("widths", [[(1, 2), (0, 3)], [(9, 1), (2, 13)]])
def test_pad_gradient_is_adjoint(widths):
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: LOCAL.pad(t, widths), (x,))


@pytest.mark.parametrize("shape", [(2, 3, 8, 6), (1, 2, 7, 5, 4)])
def test_rfft_roundtrip_parseval_and_wavenumbers(shape):
    x = torch.randn(*shape, dtype=torch.float64)
    axes = tuple(range(2, x.ndim))
    xh = LOCAL.rfft(x, axes)
    torch.testing.assert_close(xh, torch.fft.rfftn(x, dim=axes))
    torch.testing.assert_close(LOCAL.irfft(xh, axes, x.shape), x)
    w = LOCAL.hermitian_weight(x, axes)
    n = LOCAL.numel(x)
    torch.testing.assert_close((xh.abs() ** 2 * w).sum() / n, (x ** 2).sum())
    ks = LOCAL.wavenumbers(x, axes, zero_nyquist=True)
    for a, k in zip(axes, ks):
        assert k.shape[a] == xh.shape[a]
        if x.shape[a] % 2 == 0:
            assert not (k.abs() == x.shape[a] // 2).any()


def test_bad_axes():
    with pytest.raises(ValueError, match="axes"):
        normalize_axes((1,), 4)
    with pytest.raises(ValueError, match="repeats"):
        normalize_axes((2, -2), 4)
