"""Typed configuration of the SGFM model: the field and networks (``ModelConfig``) and the
wavelet-space diffusion and composite loss (``DiffusionConfig``).

One dataclass per concern, every field typed, defaulted and documented, choices as
``Literal``, invariants checked in ``__post_init__`` (torchtitan style). YAML gives lists
where tuples are meant; ``__post_init__`` normalises them, so a config loaded from YAML
equals one built in Python.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import pywt

_MODALITIES = ("text", "video", "physics")


def _int_or_tuple(value, name: str) -> int | tuple[int, ...]:
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected an int or a list of ints, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"{name}: must be >= 1, got {value}")
        return value
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = tuple(value)
        if not value or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
            raise ValueError(f"{name}: expected positive ints, got {value!r}")
        return value
    raise ValueError(f"{name}: expected an int or a list of ints, got {value!r}")


def _positive(value, name: str, strict: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (value <= 0 if strict else value < 0):
        raise ValueError(f"{name}: must be {'> 0' if strict else '>= 0'}, got {value!r}")


def _choice(value, choices, name: str) -> None:
    if value not in choices:
        raise ValueError(f"{name}: must be one of {list(choices)}, got {value!r}")


@dataclass
class ModelConfig:
    """The field representation and the score / forcing networks."""

    modality: Literal["text", "video", "physics"] = "text"
    """What a sample is. text: byte/token ids ``[B, T, L]`` embedded into a field
    ``[B, channels, T, L]`` (axes t, x); video: frames ``[B, data_channels, T, H, W]`` lifted
    to ``channels`` by a 1x1 map; physics: a velocity field ``[B, channels, T, H, W]`` used raw."""

    vocab_size: int = 257
    """Text only: number of ids (256 bytes + the pad id by default)."""

    pad_id: int = 256
    """Text only: id that fills a document shorter than the field; masked out of the cross-entropy."""

    channels: int = 16
    """Field channels C. Text/video: embedding channels; physics: the data's channels. Must be
    a multiple of the number of flow axes k (vector fields group channels as C = G*k)."""

    data_channels: int = 3
    """Video only: channels of the raw frames (3 = RGB), lifted to ``channels`` by a 1x1 map."""

    width: int = 64
    """Hidden channels of the score network."""

    n_blocks: int = 5
    """Residual blocks (local conv + spectral mixing + pointwise MLP) of the score network."""

    kernel_size: int | tuple[int, ...] | None = None
    """Odd periodic-convolution kernel, one int for all field axes or one per axis. None: (1, 7)
    for text (wide along x, the byte order, where most context is; rows mix through the
    spectral layer: measured better and cheaper than 3x3 or 3x5), 3 for video/physics."""

    spectral_modes: int | tuple[int, ...] | None = None
    """Kept Fourier modes per field axis in the spectral mixing (|n| < modes; one int or one per
    axis). Modes a small field does not have are simply not used (resolution-agnostic).
    None: (4, 8) for text, 4 per axis for video/physics."""

    mlp_ratio: int = 2
    """Hidden expansion of the pointwise MLP in each block."""

    forcing_width: int = 16
    """Hidden channels of the forcing network f_theta(u, xi)."""

    forcing_blocks: int = 1
    """Residual blocks of the forcing network; 0 disables the learned forcing (f = 0)."""

    forcing_noise_channels: int = 2
    """Channels of the stochastic input xi of f_theta(u, xi) (Eq. 28); 0 = deterministic forcing."""

    wavelet: str = "db4"
    """Orthogonal pywt wavelet of the multiscale basis W (Eq. 12-15)."""

    levels: int = 2
    """Wavelet levels J: every field extent must be divisible by 2**levels."""

    flow: Literal["auto", "all", "spatial"] = "auto"
    """Flow axes of the Navier-Stokes operators. all: every field axis (text: u = (u_t, u_x),
    grad = (d_t, d_x), Eq. 25-28); spatial: every field axis but the first (time) one (video,
    physics); auto: all for text, spatial otherwise."""

    nu: float = 1e-2
    """Viscosity of the physics residual (Eq. 41); also a conditioning input lambda (Eq. 20)."""

    forcing_strength: float = 1.0
    """Scale of the learned forcing in the residual; also a conditioning input lambda (Eq. 20)."""

    dt: float = 1.0
    """Time step between consecutive t-slices, for d_t in the residual."""

    lengths: tuple[float, ...] | None = None
    """Periodic box length per field axis (None: 2*pi each, integer wavenumbers)."""

    derivative: Literal["spectral", "fd2", "fd4"] = "spectral"
    """How the residual takes spatial derivatives (passed to ``ops.dynamics.FlowSpec``)."""

    time_derivative: str = "one_sided2"
    """How the residual takes d_t (passed to ``ops.dynamics.FlowSpec``)."""

    fourier_features: int = 16
    """Fourier features per scalar conditioning input (tau per level, lambda)."""

    cond_dim: int = 128
    """Width of the conditioning vector that drives every FiLM layer."""

    def __post_init__(self):
        _choice(self.modality, _MODALITIES, "model.modality")
        _choice(self.flow, ("auto", "all", "spatial"), "model.flow")
        _choice(self.derivative, ("spectral", "fd2", "fd4"), "model.derivative")
        for name in ("vocab_size", "channels", "data_channels", "width", "n_blocks", "mlp_ratio",
                     "forcing_width", "levels", "fourier_features", "cond_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"model.{name}: must be a positive int, got {v!r}")
        for name in ("forcing_blocks", "forcing_noise_channels"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"model.{name}: must be an int >= 0, got {v!r}")
        if self.fourier_features % 2:
            raise ValueError(f"model.fourier_features: must be even (sin/cos pairs), got {self.fourier_features}")
        if self.modality == "text" and not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"model.pad_id: must be an id in [0, vocab_size={self.vocab_size}), got {self.pad_id}")
        if self.kernel_size is None:
            self.kernel_size = (1, 7) if self.modality == "text" else 3
        if self.spectral_modes is None:
            self.spectral_modes = (4, 8) if self.modality == "text" else 4
        self.kernel_size = _int_or_tuple(self.kernel_size, "model.kernel_size")
        ks = (self.kernel_size,) if isinstance(self.kernel_size, int) else self.kernel_size
        if any(k % 2 == 0 for k in ks):
            raise ValueError(f"model.kernel_size: must be odd (centred periodic stencil), got {self.kernel_size}")
        self.spectral_modes = _int_or_tuple(self.spectral_modes, "model.spectral_modes")
        if self.wavelet not in pywt.wavelist(kind="discrete") or not pywt.Wavelet(self.wavelet).orthogonal:
            raise ValueError(f"model.wavelet: must be an orthogonal pywt wavelet (e.g. 'haar', 'db2', 'db4', "
                             f"'sym4', 'coif2'), got {self.wavelet!r}")
        _positive(self.nu, "model.nu", strict=False)
        _positive(self.forcing_strength, "model.forcing_strength", strict=False)
        _positive(self.dt, "model.dt")
        if self.lengths is not None:
            self.lengths = tuple(float(v) for v in self.lengths)
            if any(v <= 0 for v in self.lengths):
                raise ValueError(f"model.lengths: box lengths must be positive, got {self.lengths}")
        d = self.field_ndim
        for name in ("kernel_size", "spectral_modes", "lengths"):
            v = getattr(self, name)
            if isinstance(v, tuple) and len(v) != d:
                raise ValueError(f"model.{name}: has {len(v)} entries but a {self.modality} field has {d} field axes")
        k = len(self.flow_axes())
        if self.channels % k:
            raise ValueError(f"model.channels: C={self.channels} must be a multiple of the number of flow axes "
                             f"k={k} ({self.modality}, flow={self.flow!r}): vector fields group channels as C = G*k")

    @property
    def field_ndim(self) -> int:
        """Number of field axes d: 2 for text (t, x), 3 for video and physics (t, y, x)."""
        return 2 if self.modality == "text" else 3

    def flow_axes(self) -> tuple[int, ...]:
        """Flow axes as tensor dims of ``[B, C, *S]`` (the vector components' directions)."""
        flow = self.flow if self.flow != "auto" else ("all" if self.modality == "text" else "spatial")
        d = self.field_ndim
        return tuple(range(2, 2 + d)) if flow == "all" else tuple(range(3, 2 + d))


@dataclass
class DiffusionConfig:
    """Wavelet-space VP diffusion (Eq. 17-22, 40) and the composite loss (Eq. 38)."""

    schedule: Literal["cosine", "linear"] = "cosine"
    """alpha_bar(tau) for tau in [0, 1]: cosine (log-SNR = -2 log tan(pi tau / 2)) or the
    linear-beta VP schedule of Song et al. 2021 (beta from 0.1 to 20)."""

    logsnr_shift: float = 0.0
    """Log-SNR added to the base schedule on every level (negative = noisier), shifting training
    and sampling towards the noise levels where the data is decided (Hoogeboom et al. 2023's
    shifted schedules). For byte text with 16-channel embeddings about -1 helps."""

    level_shift: float = 0.0
    """Log-SNR added to the approximation coefficients, falling linearly to 0 at the finest
    detail level, so coarse scales are noised less (section 5.3). 0 = one schedule for all."""

    mode: Literal["joint", "cascade"] = "joint"
    """joint: all scales denoised together; cascade: one scale at a time, coarser scales
    clean (teacher-forced in training, generated first when sampling) and given to the
    network as the coarse reconstruction (Eq. 20)."""

    parameterization: Literal["eps", "v"] = "v"
    """What the network's raw output is before it is turned into eps_hat: eps directly, or
    v = sqrt(a) eps - sqrt(1-a) c0 (bounded clean estimates at every noise level). The loss
    is the eps-DSM of Eq. 40 either way."""

    logsnr_min: float = -10.0
    """Lowest log-SNR used (tau = 1): alpha_bar >= sigmoid(logsnr_min)."""

    logsnr_max: float = 12.0
    """Highest log-SNR drawn in training (tau near 0); sampling ends at alpha_bar = 1 exactly."""

    lambda_R: float = 1e-3
    """Weight of the physics residual ||P R(u_hat)||^2 (Eq. 38, 42), mean over cells."""

    lambda_B: float = 0.1
    """Weight of the boundary / initial-condition loss L_BC (Eq. 44) on the first ``bc_rows`` t-slices."""

    lambda_ce: float = 1.0
    """Weight of the readout cross-entropy (text, pads masked) or readout MSE (video)."""

    bc_rows: int = 1
    """t-slices at t = 0 that L_BC compares with the data (the initial condition u0)."""

    def __post_init__(self):
        _choice(self.schedule, ("cosine", "linear"), "diffusion.schedule")
        _choice(self.mode, ("joint", "cascade"), "diffusion.mode")
        _choice(self.parameterization, ("eps", "v"), "diffusion.parameterization")
        for name in ("logsnr_shift", "level_shift", "logsnr_min", "logsnr_max"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"diffusion.{name}: must be a number, got {v!r}")
        if not self.logsnr_min < self.logsnr_max:
            raise ValueError(f"diffusion.logsnr_min/logsnr_max: need logsnr_min < logsnr_max, "
                             f"got {self.logsnr_min} and {self.logsnr_max}")
        for name in ("lambda_R", "lambda_B", "lambda_ce"):
            _positive(getattr(self, name), f"diffusion.{name}", strict=False)
        if isinstance(self.bc_rows, bool) or not isinstance(self.bc_rows, int) or self.bc_rows < 1:
            raise ValueError(f"diffusion.bc_rows: must be a positive int, got {self.bc_rows!r}")
