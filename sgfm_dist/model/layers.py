"""Building blocks of the score and forcing networks: periodic local convolution, truncated
spectral mixing, per-cell channel norm, FiLM conditioning and Fourier features.

Every layer is O(N) (local convolution, pointwise maps) or O(N log N) (spectral mixing);
there is no attention. Anything that depends on the field's spatial layout goes through
``self.domain`` (a :class:`~sgfm_dist.ops.domain.LocalDomain` by default), so a split
field works by swapping the domain (``set_domain``), never by branching:

* :class:`PeriodicConv` pads with ``domain.pad`` (local wrap, or halo exchange when split)
  and then runs an ordinary unpadded convolution;
* :class:`SpectralConv` goes through ``domain.rfft / irfft`` and selects its modes by the
  integer frequencies that ``domain.wavenumbers`` reports, so it works on any field size and
  on any spectral layout (the distributed FFT's transposed one included);
* :class:`ChannelRMSNorm` normalises over channels of each cell only, never over space, so
  it needs no global reduction.

Notes
-----
SpectralConv keeps the modes with ``|n_i| < modes[i]`` on every transformed axis (``n_i``
the integer frequency, ``0 <= n < modes`` on the rfft-halved last axis) and, in addition,
``|n_i| < N_i / 2``: Nyquist modes are never kept. Together with weights made Hermitian on
the ``n_last = 0`` plane (``W(-n', 0) = conj W(n', 0)``, enforced by symmetrising the small
weight tensor) this makes the layer an exactly real linear operator whose output spectrum
is Hermitian, so every correct inverse real FFT (local or distributed, whatever order it
transforms the axes in) gives the same field.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..compat import channel_rms_norm
from ..ops.domain import LOCAL, Domain

def _conv4d(x: Tensor, weight: Tensor, bias: Tensor | None = None, groups: int = 1) -> Tensor:
    """Unpadded 4-D convolution (a 3-D flow with its time axis; torch has no conv4d): the sum over
    the first kernel axis of 3-D convolutions of shifted t-slices folded into the batch.
    ``[B, I, T+k-1, *S3] -> [B, O, T, *S3']``."""
    kt, (b, c, tp) = weight.shape[2], x.shape[:3]
    t = tp - kt + 1
    out = None
    for i in range(kt):
        xi = x[:, :, i:i + t].transpose(1, 2).reshape(b * t, c, *x.shape[3:])  # [B*T, I, *S3]
        yi = F.conv3d(xi, weight[:, :, i], None, groups=groups)             # [B*T, O, *S3']
        out = yi if out is None else out + yi
    out = out.reshape(b, t, *out.shape[1:]).transpose(1, 2)                 # [B, O, T, *S3']
    return out if bias is None else out + bias.reshape(1, -1, 1, 1, 1, 1)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d, 4: _conv4d}


def _per_axis(value: int | Sequence[int], ndim: int, name: str) -> tuple[int, ...]:
    """An int or a per-axis tuple of ints, as a tuple of length ``ndim``."""
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected an int or a tuple of {ndim} ints, got {value!r}")
    if isinstance(value, int):
        return (value,) * ndim
    value = tuple(value)
    if len(value) != ndim or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise ValueError(f"{name}: expected an int or a tuple of {ndim} ints (one per field axis), got {value!r}")
    return value


def _check_ndim(ndim: int) -> None:
    if ndim not in (1, 2, 3, 4):
        raise ValueError(f"ndim: fields have 1 to 4 field axes, got {ndim}")


def _check_field(x: Tensor, channels: int, ndim: int, name: str) -> None:
    if x.ndim != ndim + 2 or x.shape[1] != channels:
        raise ValueError(f"{name}: expected a field [B, {channels}, *S] with {ndim} field axes, "
                         f"got shape {tuple(x.shape)}")


class PeriodicConv(nn.Module):
    """Convolution on a periodic grid: ``domain.pad`` ghost cells, then an unpadded conv.

    Equal to ``nn.ConvNd(in_ch, out_ch, kernel_size, padding=kernel_size // 2,
    padding_mode="circular")`` on a whole field. Kernel sizes must be odd (a centred
    stencil, so the output stays on the input grid).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int | Sequence[int], ndim: int,
                 domain: Domain = LOCAL, groups: int = 1, bias: bool = True):
        super().__init__()
        _check_ndim(ndim)
        ks = _per_axis(kernel_size, ndim, "kernel_size")
        if any(k < 1 or k % 2 == 0 for k in ks):
            raise ValueError(f"kernel_size: must be odd and positive on every axis (centred stencil), got {ks}")
        if in_ch < 1 or out_ch < 1 or groups < 1 or in_ch % groups or out_ch % groups:
            raise ValueError(f"in_ch/out_ch/groups: need positive channels divisible by groups, "
                             f"got in_ch={in_ch}, out_ch={out_ch}, groups={groups}")
        self.in_ch, self.out_ch, self.ndim, self.kernel_size, self.groups = in_ch, out_ch, ndim, ks, groups
        self.domain = domain
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch // groups, *ks))  # [O, I/g, *K]
        self.bias = nn.Parameter(torch.zeros(out_ch)) if bias else None
        # the same fan-in scaled init nn.ConvNd uses
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt((in_ch // groups) * math.prod(ks))
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor, gelu_input: bool = False) -> Tensor:
        """The convolution of ``x``; with ``gelu_input`` of ``F.gelu(x)``, for a pointwise (1x1)
        convolution only, keeping just ``x`` for backward: the GELU output, which the
        convolution would store, is recomputed there (:class:`_PointwiseOfGELU`; values and
        gradients those of the composition). A flag of ``forward``, not a method of its own, so
        the module's hooks (ZeRO-3 gathering its weight, FSDP, profilers) run as for any call."""
        _check_field(x, self.in_ch, self.ndim, "x")
        if gelu_input:
            if any(k != 1 for k in self.kernel_size):
                raise ValueError(f"gelu_input: pointwise convolutions only (kernel_size 1), got {self.kernel_size}")
            return _PointwiseOfGELU.apply(x, self.weight, self.bias, self.groups)  # [B, O, *S]
        widths = [(k // 2, k // 2) for k in self.kernel_size]
        if any(w != (0, 0) for w in widths):
            x = self.domain.pad(x, widths)  # [B, I, *(S + K - 1)]
        return _CONV[self.ndim](x, self.weight, self.bias, groups=self.groups)  # [B, O, *S]

    def extra_repr(self) -> str:
        return f"{self.in_ch}, {self.out_ch}, kernel_size={self.kernel_size}, ndim={self.ndim}, groups={self.groups}"


def _fold_time(x: Tensor) -> Tensor:
    """``[B, C, T, *S3] -> [B*T, C, *S3]``, the batch fold of :func:`_conv4d` with a 1-long time kernel."""
    return x.transpose(1, 2).reshape(x.shape[0] * x.shape[2], x.shape[1], *x.shape[3:])


class _PointwiseOfGELU(torch.autograd.Function):
    """``conv1x1(gelu(x), weight, bias)`` saving ``x`` and the weights only.

    Composed by autograd, GELU keeps its input and the convolution keeps GELU's output: two
    tensors per MLP, the output ``mlp_ratio`` times the block's width. Backward recomputes
    ``a = gelu(x)`` and calls the kernels autograd calls (``convolution_backward`` with ``a``,
    then ``gelu_backward``), so values and gradients are the composition's bit for bit. Under
    autocast the convolution ran in the dtype of its output: backward casts to it likewise."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, groups: int) -> Tensor:
        ndim = x.ndim - 2
        if ndim <= 3:
            y = _CONV[ndim](F.gelu(x), weight, bias, groups=groups)  # [B, O, *S]
            conv_dtype = y.dtype
        else:  # _conv4d's own steps, so the dtype the convolution ran in is seen before the bias add
            y = _conv4d(F.gelu(x), weight, None, groups=groups)  # [B, O, T, *S3]
            conv_dtype = y.dtype
            if bias is not None:
                y = y + bias.reshape(1, -1, 1, 1, 1, 1)
        ctx.save_for_backward(x, weight)
        ctx.groups, ctx.conv_dtype, ctx.has_bias = groups, conv_dtype, bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight = ctx.saved_tensors
        dtype, groups, ndim = ctx.conv_dtype, ctx.groups, x.ndim - 2
        a = F.gelu(x).to(dtype)  # [B, I, *S], recomputed
        w, dy_conv = weight.to(dtype), dy.to(dtype)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        if ndim <= 3:
            d_a, d_w, d_b = torch.ops.aten.convolution_backward(
                dy_conv, a, w, [w.shape[0]] if ctx.has_bias else None, [1] * ndim, [0] * ndim, [1] * ndim, False,
                [0] * ndim, groups, mask)
        else:  # _conv4d: one conv3d over the time-folded batch, the bias added after (in dy's dtype)
            d_a, d_w, _ = torch.ops.aten.convolution_backward(
                _fold_time(dy_conv), _fold_time(a), w[:, :, 0], None, [1] * 3, [0] * 3, [1] * 3, False, [0] * 3,
                groups, [mask[0], mask[1], False])
            if d_a is not None:
                d_a = d_a.reshape(x.shape[0], x.shape[2], *d_a.shape[1:]).transpose(1, 2)  # [B, I, T, *S3]
            d_w = None if d_w is None else d_w.unsqueeze(2)
            d_b = dy.sum((0, *range(2, dy.ndim))) if mask[2] else None
        d_x = None
        if d_a is not None:
            d_x = torch.ops.aten.gelu_backward(d_a.to(x.dtype), x)  # [B, I, *S]
        d_w = None if d_w is None else d_w.to(weight.dtype)
        d_b = None if d_b is None else d_b.to(ctx.bias_dtype)
        return d_x, d_w, d_b, None


class SpectralConv(nn.Module):
    """Fourier-layer mixing (FNO): ``irfft(W(n) . rfft(x))`` with complex weights on the
    low modes ``|n_i| < modes[i]`` and zero elsewhere.

    Weights are indexed by integer frequency, not by position in the FFT output, so the
    same weights act on any field size (modes beyond a small field's Nyquist are simply
    not used) and on any spectral layout the domain's FFT returns. The mode box and the
    Hermitian rules are in the module Notes.
    """

    def __init__(self, in_ch: int, out_ch: int, modes: int | Sequence[int], ndim: int, domain: Domain = LOCAL):
        super().__init__()
        _check_ndim(ndim)
        modes = _per_axis(modes, ndim, "modes")
        if any(m < 1 for m in modes):
            raise ValueError(f"modes: need at least one mode per axis, got {modes}")
        if in_ch < 1 or out_ch < 1:
            raise ValueError(f"in_ch/out_ch: must be positive, got {in_ch}, {out_ch}")
        self.in_ch, self.out_ch, self.ndim, self.modes = in_ch, out_ch, ndim, modes
        self.domain = domain
        # frequency n on a non-halved axis i lives at index n + modes[i] - 1; on the halved
        # (last) axis at index n
        box = [2 * m - 1 for m in modes[:-1]] + [modes[-1]]
        scale = 1.0 / math.sqrt(in_ch * out_ch)
        self.weight = nn.Parameter(scale * torch.randn(in_ch, out_ch, *box, 2))  # [I, O, *box, re/im]

    def hermitian_weight(self) -> Tensor:
        """Complex weights ``[I, O, *box]`` with ``W(-n', 0) = conj W(n', 0)`` on the plane
        ``n_last = 0`` (so real fields map to real fields, see the module Notes)."""
        real = self.weight if self.weight.dtype in (torch.float32, torch.float64) else self.weight.float()
        w = torch.view_as_complex(real)  # [I, O, *box]
        if self.ndim == 1:
            # the only n_last = 0 mode is n = 0 itself: its weight must be real
            return torch.cat([w[..., :1].real.to(w.dtype), w[..., 1:]], dim=-1)
        plane = w[..., 0]  # [I, O, *box'] at n_last = 0
        flipped = plane.flip(dims=tuple(range(2, plane.ndim))).conj()  # W(-n', 0)^*
        sym = 0.5 * (plane + flipped)
        return torch.cat([sym.unsqueeze(-1), w[..., 1:]], dim=-1)

    def _selection(self, x: Tensor, dims: Sequence[int]) -> tuple[list[tuple[int, Tensor]], list[Tensor]]:
        """Per transformed axis: (spectral tensor dim, positions of the kept modes) and the
        matching weight-box indices, from the domain's integer wavenumbers."""
        # per axis, shaped [1, .., m, .., 1] with the m locally held frequencies at the axis' own
        # dim (local and split domains alike); lengths 2*pi make them integers
        ks = self.domain.wavenumbers(x, dims)
        picks, w_index = [], []
        for i, (a, k) in enumerate(zip(dims, ks)):
            sdim = a
            n = k.reshape(-1).round().long()  # integer frequencies held locally along this dim
            extent = self.domain.global_extent(x, a)
            m = self.modes[i]
            keep = (n.abs() < m) & (2 * n.abs() < extent)  # low modes, never the Nyquist
            pos = keep.nonzero().flatten()
            picks.append((sdim, pos))
            w_index.append(n[pos] + (m - 1 if i < len(dims) - 1 else 0))
        return picks, w_index

    def forward(self, x: Tensor) -> Tensor:
        _check_field(x, self.in_ch, self.ndim, "x")
        in_dtype = x.dtype
        if in_dtype in (torch.float16, torch.bfloat16):
            x = x.float()  # no half-precision FFT for general sizes: transform in float32
        dims = tuple(range(2, x.ndim))
        x_hat = self.domain.rfft(x, dims)  # [B, I, *spec]
        picks, w_index = self._selection(x, dims)
        low = x_hat
        for sdim, pos in picks:
            low = low.index_select(sdim, pos)  # [B, I, *box_local]
        w = self.hermitian_weight().to(x_hat.dtype)
        for j, idx in enumerate(w_index):
            w = w.index_select(2 + j, idx)  # [I, O, *box_local]
        if self.ndim == 1:
            y_low = torch.einsum("bix,iox->box", low, w)
        elif self.ndim == 2:
            y_low = torch.einsum("bixy,ioxy->boxy", low, w)
        elif self.ndim == 3:
            y_low = torch.einsum("bixyz,ioxyz->boxyz", low, w)  # [B, O, *box_local]
        else:
            y_low = torch.einsum("bitxyz,iotxyz->botxyz", low, w)  # [B, O, *box_local]
        out_shape = (x.shape[0], self.out_ch, *x_hat.shape[2:])
        y_hat = y_low
        # scatter the kept modes back into a zero spectrum, one axis at a time
        for sdim, pos in reversed(picks):
            full = list(y_hat.shape)
            full[sdim] = out_shape[sdim]
            y_hat = torch.zeros(full, dtype=y_hat.dtype, device=y_hat.device).index_copy(sdim, pos, y_hat)
        y = self.domain.irfft(y_hat, dims, (x.shape[0], self.out_ch, *x.shape[2:]))  # [B, O, *S]
        return y.to(in_dtype)

    def extra_repr(self) -> str:
        return f"{self.in_ch}, {self.out_ch}, modes={self.modes}, ndim={self.ndim}"


class ChannelRMSNorm(nn.Module):
    """RMS norm over the channels of each cell (no reduction over space: split-safe).

    Computed by :func:`sgfm_dist.compat.channel_rms_norm` (apex's fused RMSNorm on CUDA when
    apex is installed, plain torch otherwise)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.gain = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor, scale: Tensor | None = None, shift: Tensor | None = None) -> Tensor:
        """The norm; with a FiLM's ``scale, shift`` (:meth:`FiLM.scale_shift`) also the FiLM
        after it, ``* (1 + scale) + shift``, in one function that keeps only ``x`` for backward."""
        return channel_rms_norm(x, self.gain, self.eps, scale, shift)  # [B, C, *S]; apex on CUDA if installed


class FourierFeatures(nn.Module):
    """Random Fourier features ``[sin, cos](2 pi f x)`` of scalar inputs (tau, log-SNR, nu ...).

    Fixed (a buffer), as in score-SDE's Gaussian Fourier projection.
    """

    def __init__(self, n_inputs: int, n_features: int, scale: float = 4.0, seed: int = 0):
        super().__init__()
        if n_features < 1 or n_features % 2:
            raise ValueError(f"n_features: must be a positive even number (sin and cos pairs), got {n_features}")
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", scale * torch.randn(n_inputs, n_features // 2, generator=g))
        self.out_dim = n_inputs * n_features

    def forward(self, v: Tensor) -> Tensor:
        """``[B, n_inputs] -> [B, n_inputs * n_features]``."""
        arg = 2 * math.pi * v.unsqueeze(-1) * self.freqs  # [B, n_inputs, F/2]
        return torch.cat([arg.sin(), arg.cos()], dim=-1).flatten(1)  # [B, n_inputs*F]


class FiLM(nn.Module):
    """Per-channel scale and shift from a conditioning vector (zero-initialised: identity at init)."""

    def __init__(self, cond_dim: int, channels: int):
        super().__init__()
        self.proj = nn.Linear(cond_dim, 2 * channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def scale_shift(self, cond: Tensor) -> tuple[Tensor, Tensor]:
        """``cond [B, cond_dim]`` -> ``scale, shift`` ``[B, C]`` each."""
        scale, shift = self.proj(cond).chunk(2, dim=-1)  # [B, C] each
        return scale, shift

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        scale, shift = self.scale_shift(cond)  # [B, C] each
        shape = (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2)
        return x * (1 + scale.reshape(shape)) + shift.reshape(shape)  # [B, C, *S]
