"""sgfm_dist.compat: apex's fused RMSNorm against the plain-torch channel RMS norm (where apex
and CUDA exist), the torch path against a hand-written RMS norm, the channels-last plumbing of
the apex path with a stand-in kernel, and ChannelRMSNorm going through compat."""
from __future__ import annotations

import pytest
import torch

from sgfm_dist import compat
from sgfm_dist.model import layers
from sgfm_dist.model.layers import ChannelRMSNorm

SHAPES = {1: (2, 6, 10), 2: (2, 6, 8, 10), 3: (1, 6, 4, 6, 8)}  # [B, C, *S]


def hand_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y[b, c, s] = x[b, c, s] / sqrt(sum_c' x[b, c', s]^2 / C + eps) * w[c]."""
    c = x.shape[1]
    ms = (x * x).sum(1, keepdim=True) / c
    return x / torch.sqrt(ms + eps) * weight.reshape(1, c, *([1] * (x.ndim - 2)))


def last_dim_rms_norm(x, weight, normalized_shape, eps):
    """A torch stand-in with the signature and semantics of apex's ``fused_rms_norm_affine``
    (normalises the trailing ``normalized_shape`` dims; requires a contiguous input like apex)."""
    assert tuple(normalized_shape) == (x.shape[-1],) and weight.shape == (x.shape[-1],)
    x = x.contiguous()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_torch_path_equals_hand_written_rms_norm(ndim):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPES[ndim], generator=g, dtype=torch.float64)
    w = torch.rand(SHAPES[ndim][1], generator=g, dtype=torch.float64) + 0.5
    torch.testing.assert_close(compat.channel_rms_norm_torch(x, w, 1e-6), hand_rms_norm(x, w, 1e-6),
                               rtol=1e-13, atol=1e-13)
    # on CPU (and without apex) the dispatcher is the torch path, bit for bit
    assert torch.equal(compat.channel_rms_norm(x, w, 1e-6), compat.channel_rms_norm_torch(x, w, 1e-6))


def test_channel_rms_norm_uses_compat_and_keeps_todays_ops():
    """ChannelRMSNorm calls compat's function, and (CPU) computes exactly what it computed
    before it did: x * rsqrt(mean_c x^2 + eps) * gain, in that order (the loss traces rely on it)."""
    assert layers.channel_rms_norm is compat.channel_rms_norm
    norm = ChannelRMSNorm(6)
    with torch.no_grad():
        norm.gain.uniform_(0.5, 1.5)
    x = torch.randn(SHAPES[2])
    before = x * x.pow(2).mean(1, keepdim=True).add(norm.eps).rsqrt() * norm.gain.reshape(1, -1, 1, 1)
    assert torch.equal(norm(x), before)


def test_channel_rms_norm_module_calls_compat(monkeypatch):
    calls = []

    def spy(x, weight, eps, scale=None, shift=None):
        calls.append((x.shape, weight is norm.gain, eps, scale is not None))
        return compat.channel_rms_norm_torch(x, weight, eps, scale, shift)

    norm = ChannelRMSNorm(6, eps=1e-5)
    monkeypatch.setattr(layers, "channel_rms_norm", spy)
    norm(torch.randn(SHAPES[1]))
    norm(torch.randn(SHAPES[1]), torch.zeros(2, 6), torch.zeros(2, 6))  # with a FiLM
    assert calls == [(torch.Size(SHAPES[1]), True, 1e-5, False), (torch.Size(SHAPES[1]), True, 1e-5, True)]


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_apex_path_layout_with_stand_in_kernel(monkeypatch, ndim):
    """The apex branch (channels moved last, kernel, moved back) with a torch stand-in for the
    kernel: same values and gradients as the torch path, so only the kernel is left to the GPU test."""
    monkeypatch.setattr(compat, "_apex_rms_norm_affine", last_dim_rms_norm)
    monkeypatch.setattr(compat, "_use_apex", lambda x, w: True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SHAPES[ndim], generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(SHAPES[ndim][1], generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    y = compat.channel_rms_norm(x, w, 1e-6)
    assert y.shape == x.shape
    ref = compat.channel_rms_norm_torch(x, w, 1e-6)
    torch.testing.assert_close(y, ref, rtol=1e-13, atol=1e-13)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    gx, gw = torch.autograd.grad(y, (x, w), dy)
    rx, rw = torch.autograd.grad(ref, (x, w), dy)
    torch.testing.assert_close(gx, rx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, rw, rtol=1e-12, atol=1e-12)
    # with a FiLM after the norm (the blocks' use): the apex branch applies it with torch ops
    s, b = (torch.randn(SHAPES[ndim][:2], generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    y = compat.channel_rms_norm(x, w, 1e-6, s, b)
    ref = compat.channel_rms_norm_torch(x, w, 1e-6, s, b)
    torch.testing.assert_close(y, ref, rtol=1e-13, atol=1e-13)
    for a, r in zip(torch.autograd.grad(y, (x, w, s, b), dy), torch.autograd.grad(ref, (x, w, s, b), dy)):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_apex_is_never_used_off_cuda(monkeypatch):
    """Even with apex importable, a CPU field takes the torch path."""
    def boom(*args, **kwargs):
        raise AssertionError("apex kernel called for a CPU tensor")

    monkeypatch.setattr(compat, "HAVE_APEX", True)
    monkeypatch.setattr(compat, "_apex_rms_norm_affine", boom)
    x, w = torch.randn(SHAPES[2]), torch.ones(6)
    assert torch.equal(compat.channel_rms_norm(x, w, 1e-6), compat.channel_rms_norm_torch(x, w, 1e-6))


@pytest.mark.gpu
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_apex_matches_torch_fallback_forward_and_backward(ndim):
    if not compat.HAVE_APEX:
        pytest.skip("apex (with its fused_layer_norm_cuda extension) is not installed")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(SHAPES[ndim], generator=g).cuda().requires_grad_(True)  # float32
    w = (torch.rand(SHAPES[ndim][1], generator=g) + 0.5).cuda().requires_grad_(True)
    assert compat._use_apex(x, w)
    y = compat.channel_rms_norm(x, w, 1e-6)
    ref = compat.channel_rms_norm_torch(x, w, 1e-6)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn(y.shape, generator=g).cuda()
    gx, gw = torch.autograd.grad(y, (x, w), dy)
    rx, rw = torch.autograd.grad(ref, (x, w), dy)
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-4)  # a sum over B * prod(S) cells
    # and through the module the networks use
    norm = ChannelRMSNorm(SHAPES[ndim][1]).cuda()
    torch.testing.assert_close(norm(x), compat.channel_rms_norm_torch(x, norm.gain, norm.eps), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_apex_under_bf16_autocast_matches_torch_fallback():
    """bf16 autocast (the GPU training precision: fp32 gain, bf16 activations): apex runs in
    bf16 (fp32 accumulation), the torch path promotes to fp32; they agree to bf16 precision."""
    if not compat.HAVE_APEX:
        pytest.skip("apex (with its fused_layer_norm_cuda extension) is not installed")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(SHAPES[2], generator=g).cuda().bfloat16().requires_grad_(True)
    w = (torch.rand(SHAPES[2][1], generator=g) + 0.5).cuda().requires_grad_(True)  # float32
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert compat._use_apex(x, w)
        y = compat.channel_rms_norm(x, w, 1e-6)
        ref = compat.channel_rms_norm_torch(x, w, 1e-6)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
    dy = torch.randn(y.shape, generator=g).cuda()
    gx, gw = torch.autograd.grad(y.float(), (x, w), dy)
    rx, rw = torch.autograd.grad(ref.float(), (x, w), dy)
    assert gw.dtype == torch.float32  # the cast to bf16 is differentiated back to the fp32 gain
    torch.testing.assert_close(gx.float(), rx.float(), rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(gw, rw, rtol=3e-2, atol=3e-1)
