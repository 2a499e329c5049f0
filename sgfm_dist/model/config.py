"""Typed configuration of the SGFM model: the field and networks (``ModelConfig``) and the
wavelet-space diffusion and composite loss (``DiffusionConfig``).

One dataclass per concern, every field typed, defaulted and documented, choices as
``Literal``, invariants checked in ``__post_init__`` (torchtitan style). YAML gives lists
where tuples are meant; ``__post_init__`` normalises them, so a config loaded from YAML
equals one built in Python. The checks are ``sgfm_dist.validation``'s, shared with the run
config (``sgfm_dist.train.config``); ``train/config_loader.py`` reads them from YAML.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import pywt

from ..ops.dynamics import DerivativeKind, TimeDerivativeKind
from ..validation import (check, check_fields, length, non_negative, non_negative_int, odd, positive,
                          positive_int, positive_ints)


@dataclass(frozen=True)
class FieldLayout:
    """The field a modality's samples become (DESIGN.md section 1): its axes and the defaults that
    follow from them. The only per-modality facts the config holds; the encoder / readout, data
    source and metrics of a modality live in ``model/modalities.py``, ``train/batches.py`` and
    ``eval/``."""

    axes: tuple[str, ...]
    """Names of the field axes, t first."""
    flow: Literal["all", "spatial"]
    """Default flow axes of the Navier-Stokes operators (``ModelConfig.flow="auto"``)."""
    kernel_size: int | tuple[int, ...]
    """Default ``ModelConfig.kernel_size``."""
    spectral_modes: int | tuple[int, ...]
    """Default ``ModelConfig.spectral_modes``."""
    physics: bool = True
    """Default ``ModelConfig.physics``: whether the physics residual and the learned forcing are on."""
    positions: int = 0
    """Default ``ModelConfig.positions``: harmonics of the position features given to the score network."""


LAYOUTS: dict[str, FieldLayout] = {
    # text: wide along x, the byte order, where most context is; rows mix through the spectral
    # layer (measured better and cheaper than 3x3 or 3x5)
    "text": FieldLayout(("t", "x"), "all", (1, 7), (4, 8)),
    "video": FieldLayout(("t", "y", "x"), "spatial", 3, 4),
    "physics": FieldLayout(("t", "y", "x"), "spatial", 3, 4),
    # time series: one axis t, the features as channels; t is its own (only) flow axis so the
    # operators stay defined, but a series' t is no flow: physics off unless asked for
    # and a window's ends are not like its middle (every series starts at its own t = 0), which
    # a translation-equivariant network cannot see without position features
    "timeseries": FieldLayout(("t",), "all", 5, 8, physics=False, positions=4),
}
"""The field layout of each ``ModelConfig.modality``."""


@dataclass
class ModelConfig:
    """The field representation and the score / forcing networks."""

    kind: Literal["sgfm", "transformer"] = "sgfm"
    """Which network the run trains. sgfm: the Spectral Generative Flow Model. transformer: the
    decoder-only byte transformer baseline (``model/transformer.py``; text only, sp = 1): next-byte
    cross-entropy over each window's T x L bytes read row-major, trained by the same pipeline. Its
    shape is ``tf_layers`` / ``tf_width`` / ``tf_heads``; the SGFM fields of this same config then
    only set the parameter budget it is matched to (``transformer.match_sgfm``)."""

    tf_layers: int = 0
    """Transformer only: residual blocks. 0: chosen with ``tf_width`` so that the parameter count
    matches the SGFM this config builds with ``kind: sgfm`` (within 5%)."""

    tf_width: int = 0
    """Transformer only: model width d (a multiple of ``tf_heads``). 0: matched like ``tf_layers``."""

    tf_heads: int = 0
    """Transformer only: attention heads. 0: the most heads with a head size of at least 32 that
    divide the width."""

    tf_mlp_ratio: int = 4
    """Transformer only: hidden expansion of each block's MLP (GPT-2's 4)."""

    modality: Literal["text", "video", "physics", "timeseries"] = "text"
    """What a sample is. text: byte/token ids ``[B, T, L]`` embedded into a field
    ``[B, channels, T, L]`` (axes t, x); video: frames ``[B, data_channels, T, H, W]`` lifted
    to ``channels`` by a 1x1 map; physics: a velocity field ``[B, channels, T, H, W]`` used raw;
    timeseries: windows ``[T, F]`` of F = ``channels`` features as a 1-D field ``[B, F, N]``
    (axis t, made periodic by ``series_padding``)."""

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

    physics: bool | None = None
    """Whether the physics terms are used: the residual ``diffusion.lambda_R ||P R(u_hat)||^2`` in
    the loss and the learned forcing f_theta. None: the modality's default, on for text, video and
    physics, off for time series (a series' t axis carries no flow, so the Navier-Stokes residual
    has no meaning for arbitrary features). False drops both whatever lambda_R and forcing_blocks say."""

    positions: int | None = None
    """Harmonics K of the position features appended to the score network's input: cos and sin of
    k * 2 pi (i + 1/2) / n, k = 1..K, for cell i of each field axis of n cells (2 K d channels).
    The convolutions and spectral layers commute with shifts, so without them the network cannot
    tell where in the field a cell is: right for text rows and physics, which are statistically
    shift-invariant, wrong for a time-series window, whose first step is unlike its middle (Sines
    all start near 0.5). The half-cell offset keeps the cosines mirror-symmetric in a reflected
    window. None: the modality's default (4 for time series, 0 = none otherwise)."""

    series_padding: Literal["reflect", "periodic"] = "reflect"
    """Time series only: how a window's t axis is made periodic for the periodized wavelets, the
    periodic convolutions and the FFT layers. reflect: the window [x_0 .. x_{T-1}] is followed by
    its mirror image [x_{T-1} .. x_0], a field of N = 2T cells whose wrap-around is continuous
    (no jump from x_{T-1} back to x_0 that the finest wavelet levels would have to generate); the
    readout averages the two halves. periodic: the window itself, N = T, its ends joined as they
    are. N must be divisible by 2**levels."""

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

    spatial_dims: int = 2
    """Physics only: spatial axes after t. 2: a field (t, y, x) of 2-D Navier-Stokes; 3: (t, z, y, x),
    a 3-D corpus (``tools/simulate_ns.py --dims 3``) with ``channels`` = 3 components (u_z, u_y, u_x)."""

    derivative: DerivativeKind = "spectral"
    """How the residual takes spatial derivatives: "spectral", "fd2" or "fd4" (passed to
    ``ops.dynamics.FlowSpec``)."""

    time_derivative: TimeDerivativeKind = "one_sided2"
    """How the residual takes d_t: "periodic2", "periodic4", "one_sided2", "one_sided4" or "flow"
    (passed to ``ops.dynamics.FlowSpec``; text, whose t is a flow axis, always uses "flow")."""

    fourier_features: int = 16
    """Fourier features per scalar conditioning input (tau per level, lambda)."""

    cond_dim: int = 128
    """Width of the conditioning vector that drives every FiLM layer."""

    def __post_init__(self):
        check_fields(self, "model")
        for name in ("vocab_size", "channels", "data_channels", "width", "n_blocks", "mlp_ratio",
                     "forcing_width", "levels", "fourier_features", "cond_dim"):
            positive_int(f"model.{name}", getattr(self, name))
        for name in ("forcing_blocks", "forcing_noise_channels", "tf_layers", "tf_width", "tf_heads"):
            non_negative_int(f"model.{name}", getattr(self, name))
        positive_int("model.tf_mlp_ratio", self.tf_mlp_ratio)
        if self.kind == "transformer":
            # the baseline reads bytes; other modalities have no next-token factorisation here
            check(self.modality == "text", "model.kind",
                  f"the transformer baseline models text; model.modality is {self.modality!r}")
            check((self.tf_layers == 0) == (self.tf_width == 0), "model.tf_layers",
                  f"set both tf_layers and tf_width, or neither (0: matched to the SGFM's parameter count); "
                  f"got tf_layers={self.tf_layers}, tf_width={self.tf_width}")
            if self.tf_heads and self.tf_width:
                check(self.tf_width % self.tf_heads == 0, "model.tf_width",
                      f"{self.tf_width} is not a multiple of tf_heads={self.tf_heads}")
        check(self.fourier_features % 2 == 0, "model.fourier_features",
              f"must be even (sin/cos pairs), got {self.fourier_features}")
        if self.modality == "text":
            check(0 <= self.pad_id < self.vocab_size, "model.pad_id",
                  f"must be an id in [0, vocab_size={self.vocab_size}), got {self.pad_id}")
        if self.physics is None:
            self.physics = self.layout.physics
        if self.positions is None:
            self.positions = self.layout.positions
        non_negative_int("model.positions", self.positions)
        if self.kernel_size is None:
            self.kernel_size = self.layout.kernel_size
        if self.spectral_modes is None:
            self.spectral_modes = self.layout.spectral_modes
        positive_ints("model.kernel_size", self.kernel_size)
        odd("model.kernel_size", self.kernel_size, "centred periodic stencil")
        positive_ints("model.spectral_modes", self.spectral_modes)
        check(self.wavelet in pywt.wavelist(kind="discrete") and pywt.Wavelet(self.wavelet).orthogonal,
              "model.wavelet", f"must be an orthogonal pywt wavelet (e.g. 'haar', 'db2', 'db4', 'sym4', "
                               f"'coif2'), got {self.wavelet!r}")
        check(self.spatial_dims in (2, 3), "model.spatial_dims", f"must be 2 or 3, got {self.spatial_dims!r}")
        check(self.spatial_dims == 2 or self.modality == "physics", "model.spatial_dims",
              f"3 spatial axes are a physics field (t, z, y, x); a {self.modality} field has 2")
        non_negative("model.nu", self.nu)
        non_negative("model.forcing_strength", self.forcing_strength)
        positive("model.dt", self.dt)
        if self.lengths is not None:
            check(all(v > 0 for v in self.lengths), "model.lengths",
                  f"box lengths must be positive, got {self.lengths}")
        d = self.field_ndim
        for name in ("kernel_size", "spectral_modes", "lengths"):
            v = getattr(self, name)
            if isinstance(v, tuple):
                length(f"model.{name}", v, d, f"a {self.modality} field has {d} field axes")
        k = len(self.flow_axes())
        check(self.channels % k == 0, "model.channels",
              f"C={self.channels} must be a multiple of the number of flow axes k={k} ({self.modality}, "
              f"flow={self.flow!r}): vector fields group channels as C = G*k")

    @property
    def layout(self) -> FieldLayout:
        """The field layout of the modality (``LAYOUTS``), with z in front of (y, x) for a 3-D physics field."""
        layout = LAYOUTS[self.modality]
        if self.spatial_dims == 3 and self.modality == "physics":
            layout = dataclasses.replace(layout, axes=("t", "z", "y", "x"))
        return layout

    @property
    def field_ndim(self) -> int:
        """Number of field axes d: 2 for text (t, x), 3 for video and physics (t, y, x), 4 for 3-D physics."""
        return len(self.layout.axes)

    def flow_axes(self) -> tuple[int, ...]:
        """Flow axes as tensor dims of ``[B, C, *S]`` (the vector components' directions)."""
        flow = self.flow if self.flow != "auto" else self.layout.flow
        d = self.field_ndim
        return tuple(range(2, 2 + d)) if flow == "all" else tuple(range(3, 2 + d))

    @property
    def physical_conditions(self) -> tuple[str, ...]:
        """The physical parameters lambda the score network is conditioned on (Eq. 20), each
        sample's own where the data has them: nu and the forcing strength; a physics field also
        its frame spacing dt, which differs between corpora and sets how much a trajectory moves
        per t-slice (``SGFM.dt_condition``; the forcing, a function of the state, does not see dt)."""
        return ("nu", "forcing_strength", "dt") if self.modality == "physics" else ("nu", "forcing_strength")


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
    """The prompt length k: the t-slices at t = 0 that L_BC compares with the data (the initial
    condition u0 of Eq. 44): the first k rows of text, frames of video, snapshots of a flow.
    Evaluation and sampling give this many frames by default, so the L_BC that is trained is the
    one that guides them (``losses.first_rows_mask``). Every training sample uses it unless
    ``prompt_lengths`` draws one per sample."""

    prompt_lengths: tuple[int, int] | None = None
    """``[k_min, k_max]``: draw each training sample's prompt length k uniformly from this range
    (None: ``bc_rows`` for every sample). The drawn k is the sample's noise-free prompt
    (``prompt_training``), the slice its increments are taken over (``prompt_residual``) and the
    rows its L_BC penalizes, so one model forecasts from any of these k. With noise-free prompts
    the network sees where its prompt ends (the noise-free cells; explicitly with
    ``prompt_condition``); unprompted samples only get their L_BC rows drawn. Lengths are capped at
    the field's t extent - 1 (a prompt leaves a slice to generate)."""

    prompt_training: float = 0.0
    """Share of training samples whose first ``bc_rows`` t-slices are given noise-free (their noise
    is masked out, so the eps target there is 0): besides the unconditional field the model learns
    to continue a prompt, p(rest | first k slices), the initial-value problem of Eq. 44, instead of
    only meeting prompts at sampling by inpainting. Sampling with a prompt then holds the prompt
    cells noise-free at every step (``generation.PromptConstraint``), as in training, instead of
    noising them to the current level. 0 = unconditional training (prompts by inpainting). Joint
    mode only."""

    prompt_residual: bool = False
    """For the samples given their prompt (``prompt_training``), diffuse the t-slices after it as
    increments over the last given slice, ``u_t - u_{k-1}`` (``losses.prompt_increments``), as
    forecast models of slowly changing states predict the change rather than the state (GenCast,
    Price et al. 2024): the increment is small at short horizons, so a rough estimate of it stays
    close to persistence instead of far from it. Training terms other than L_diff (physics, L_BC,
    readout) see the state, increments undone; sampling with a prompt of any P slices (1 <= P < T)
    diffuses the increments over its last slice and undoes them at the end (train the lengths it
    will be given: ``bc_rows`` or ``prompt_lengths``). Needs ``prompt_training > 0`` and the t axis
    whole on every rank."""

    prompt_condition: bool = False
    """Also give the network the prompt as a clean condition: ``C + 1`` more input channels, the
    given slices' field (unscaled, zero after the prompt) and the 0/1 mask of the given cells (zero
    for an unprompted sample). Inside the diffused field a noise-free prompt is scaled by
    ``sqrt(alpha_bar)``, so at high noise (alpha_bar ~ 1e-4) the network would see it at a
    hundredth of the noise's size; as an input of its own it sees it whole at every noise level,
    with the prompt length. Needs ``prompt_training > 0``."""

    def __post_init__(self):
        check_fields(self, "diffusion")
        check(self.logsnr_min < self.logsnr_max, "diffusion.logsnr_min",
              f"need logsnr_min < logsnr_max, got {self.logsnr_min} and {self.logsnr_max}")
        for name in ("lambda_R", "lambda_B", "lambda_ce"):
            non_negative(f"diffusion.{name}", getattr(self, name))
        positive_int("diffusion.bc_rows", self.bc_rows)
        if self.prompt_lengths is not None:
            check(isinstance(self.prompt_lengths, (tuple, list)) and len(self.prompt_lengths) == 2
                  and all(isinstance(k, int) and not isinstance(k, bool) for k in self.prompt_lengths)
                  and 1 <= self.prompt_lengths[0] <= self.prompt_lengths[1], "diffusion.prompt_lengths",
                  f"must be [k_min, k_max] with 1 <= k_min <= k_max, got {self.prompt_lengths!r}")
            self.prompt_lengths = tuple(self.prompt_lengths)
        check(0.0 <= self.prompt_training <= 1.0, "diffusion.prompt_training",
              f"must lie in [0, 1], got {self.prompt_training}")
        check(not self.prompt_residual or self.prompt_training > 0, "diffusion.prompt_residual",
              "increments over the prompt need prompted training samples (diffusion.prompt_training > 0)")
        check(not self.prompt_condition or self.prompt_training > 0, "diffusion.prompt_condition",
              "a prompt condition needs prompted training samples (diffusion.prompt_training > 0)")
        check(self.prompt_training == 0 or self.mode == "joint", "diffusion.prompt_training",
              "noise-free prompts need mode: joint (a cascade stage noises one scale of every frame)")
