"""Navier-Stokes dynamics of a vector field: drift, residual, physics energy, SPDE integrators.

The paper's field dynamics (Eq. 8-11) in projected form,

    du = P[-(u . grad) u + nu Lap u + f(u)] dt + sigma P dW,                       (Eq. 8/10/11)

its residual on a space-time field (Eq. 41) and the physics energy (Eq. 23 / 42)

    R(u) = d_t u + (u . grad) u - nu Lap u - f,       E(u) = mean |P R(u)|^2,

with ``P = I - k k^T / |k|^2`` the Leray-Helmholtz projection over the flow axes (Eq. 43).

Notes
-----
*Vector structure* (DESIGN.md section 1). A field ``u`` is ``[B, C, *S]``. The velocity
components point along the *flow axes* ``spec.flow_axes`` (tensor dims, k of them), and the
channels are grouped ``C = G * k``: component i of group g is channel ``g*k + i`` and points
along ``flow_axes[i]``. Each group is an independent velocity field advected by itself. Physics
data ``[B, 2, T, Y, X]`` has flow axes ``(3, 4)`` and time axis 2; the text field (paper Eq. 25-28)
uses all field axes as flow axes and has no separate time axis.

*Where the math meets parallelism.* Spatial derivatives go through ``ops.spectral`` or
``ops.finite_diff`` (choice ``spec.derivative``), the projection through
``spectral.leray_project``, FFTs, wavenumbers and global reductions through the ``domain``.
Nothing here knows whether the field is split, so every function runs unchanged on a split
domain. The time derivative is a finite-difference stencil along ``spec.time_axis``; a
one-sided (non-periodic) time axis must not be split (a ``finite_diff`` rule).

*Projection and derivative choice.* ``P`` is always spectral (Eq. 43), whatever
``spec.derivative`` says: it is the exact projection onto discretely divergence-free fields in the
spectral sense. With finite-difference derivatives, advection and viscosity carry the stencil's
truncation error; ``P`` still removes exactly the gradient part.

*Per-sample physics.* ``FlowSpec.nu`` and ``FlowSpec.dt`` are Python floats (one value for the
batch) or 1-D tensors ``[B]`` (each sample's own viscosity and frame spacing, as a corpus of
trajectories at several viscosities carries them): every term broadcasts them as ``[B, 1, ..]``
against the field. Per-sample values are never split: the ranks that share a sample along the
field hold the same ``[B]`` tensor. ``dataclasses.replace(spec, nu=..., dt=...)`` makes the
per-batch spec from a fixed one.

*Integrators* step a velocity state without a time axis (``spec.time_axis is None``):
classical RK4 on the projected drift, ETDRK4 (Cox & Matthews 2002, with the phi-function form of
Kassam & Trefethen 2005) that treats the viscous term exactly, and Euler-Maruyama for the
stochastic equation (Eq. 8 with the cylindrical Wiener process of Eq. 10 discretised as white
noise per cell). All are plain differentiable tensor code; wrap calls in ``torch.no_grad()``
when no gradient is wanted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Union

import torch
from torch import Tensor
from torch.profiler import record_function

from sgfm_dist.ops import finite_diff, spectral
from sgfm_dist.ops.draws import SampleDraws
from sgfm_dist.ops.domain import LOCAL, Domain, check_real_field, field_axes, normalize_axes

DerivativeKind = Literal["spectral", "fd2", "fd4"]
TimeDerivativeKind = Literal["periodic2", "periodic4", "one_sided2", "one_sided4", "flow"]
IntegratorKind = Literal["rk4", "etdrk4", "euler_maruyama"]
Forcing = Union[Tensor, Callable[[Tensor], Tensor], None]
PerSample = Union[float, Tensor]

_DERIVATIVES = ("spectral", "fd2", "fd4")
_TIME_DERIVATIVES = ("periodic2", "periodic4", "one_sided2", "one_sided4", "flow")
_INTEGRATORS = ("rk4", "etdrk4", "euler_maruyama")
_FD_ACCURACY = {"fd2": 2, "fd4": 4}
_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class FlowSpec:
    """Which axes carry the flow and how the Navier-Stokes operators are discretised."""

    flow_axes: tuple[int, ...]
    """Tensor dims (>= 2, strictly increasing, 1 to 3 of them) that the velocity components point
    along: component i of each channel group points along ``flow_axes[i]``. E.g. ``(3, 4)`` for a
    physics field ``[B, C, T, Y, X]``, ``(2, 3)`` for the text field ``[B, C, T, L]`` (Eq. 25-28)."""

    time_axis: int | None = None
    """Tensor dim of physical time t inside the field, or None for a velocity state without time
    (what the integrators step). ``residual`` and ``physics_energy`` need it (the d_t u term of
    Eq. 41). It may also be a flow axis: the paper's text field u = (u_x, u_t) has grad =
    (d_x, d_t) over both of its axes (Eq. 25-29), so d_t then appears both alone and inside the
    advection; a physics trajectory keeps t out of the flow axes."""

    lengths: tuple[float, ...] | None = None
    """Periodic box length per flow axis, same order as ``flow_axes``; None means 2*pi each
    (integer wavenumbers)."""

    dt: PerSample = 1.0
    """Spacing of the time axis (physical time between consecutive t-slices), > 0: one float, or a
    ``[B]`` tensor of each sample's spacing. Used by the time derivative only; the integrators take
    their own step ``dt``."""

    nu: PerSample = 1e-2
    """Kinematic viscosity nu >= 0 of the nu Lap u term: one float, or a ``[B]`` tensor of each
    sample's viscosity."""

    derivative: DerivativeKind = "spectral"
    """Spatial derivatives: "spectral" (FFT, exact for band-limited fields) or central finite
    differences of order 2 ("fd2") or 4 ("fd4"), cheaper local stencils on a split field."""

    time_derivative: TimeDerivativeKind = "one_sided2"
    """d_t stencil along ``time_axis``: "periodic2"/"periodic4" (central, time-periodic data) or
    "one_sided2"/"one_sided4" (central inside, one-sided of the same order at both ends: a
    trajectory is not periodic in time), with spacing ``dt``. "flow" (only when the time axis is
    also a flow axis, as for text): d_t is the very operator the gradient uses along that axis
    (``derivative``, the axis' box length), so the lone d_t u and the d_t inside (u.grad)u are one
    discretisation."""

    dealias: bool = False
    """Apply Orszag's 2/3 rule to the advection product: velocity and product are truncated to
    |n_i| < N_i/3 on every flow axis, so the quadratic term has no aliasing error."""

    def __post_init__(self):
        axes = self.flow_axes
        if isinstance(axes, int) or not isinstance(axes, (tuple, list)):
            raise ValueError(f"flow_axes: expected a tuple of tensor dims, got {axes!r}")
        axes = tuple(axes)
        if not 1 <= len(axes) <= 3:
            raise ValueError(f"flow_axes: need 1 to 3 flow axes, got {axes}")
        if any(not _is_int(a) or a < 2 for a in axes):
            raise ValueError(f"flow_axes: each flow axis is a non-negative tensor dim >= 2 "
                             f"(field axes of [B, C, *S]), got {axes}")
        if any(b <= a for a, b in zip(axes, axes[1:])):
            raise ValueError(f"flow_axes: must be strictly increasing (component i points along "
                             f"flow_axes[i]), got {axes}")
        object.__setattr__(self, "flow_axes", axes)
        if self.time_axis is not None:
            if not _is_int(self.time_axis) or self.time_axis < 2:
                raise ValueError(f"time_axis: expected None or a tensor dim >= 2, got {self.time_axis!r}")
        if self.time_derivative == "flow" and self.time_axis not in axes:
            raise ValueError(f"time_derivative: 'flow' differentiates along a flow axis, but time_axis="
                             f"{self.time_axis} is not one of flow_axes {axes}")
        if self.lengths is not None:
            lengths = tuple(float(v) for v in self.lengths)
            if len(lengths) != len(axes):
                raise ValueError(f"lengths: got {len(lengths)} box lengths for flow axes {axes}")
            if any(not (math.isfinite(v) and v > 0) for v in lengths):
                raise ValueError(f"lengths: box lengths must be finite and > 0, got {lengths}")
            object.__setattr__(self, "lengths", lengths)
        _check_parameter("dt", self.dt, "time spacing", strictly_positive=True)
        _check_parameter("nu", self.nu, "viscosity", strictly_positive=False)
        if self.derivative not in _DERIVATIVES:
            raise ValueError(f"derivative: expected one of {_DERIVATIVES}, got {self.derivative!r}")
        if self.time_derivative not in _TIME_DERIVATIVES:
            raise ValueError(f"time_derivative: expected one of {_TIME_DERIVATIVES}, "
                             f"got {self.time_derivative!r}")
        if not isinstance(self.dealias, bool):
            raise ValueError(f"dealias: expected a bool, got {self.dealias!r}")

    @property
    def k(self) -> int:
        """Number of velocity components per channel group."""
        return len(self.flow_axes)


# ---- checks --------------------------------------------------------------------------------

def _is_int(a) -> bool:
    return isinstance(a, int) and not isinstance(a, bool)


def _check_parameter(name: str, value, what: str, strictly_positive: bool) -> None:
    """A FlowSpec scalar: a finite float (> 0 or >= 0), or a 1-D float tensor of per-sample values.

    Tensor values are inspected only on the CPU: on an accelerator the check would stall the
    stream once per step, and the data layer (``data.fields``) already refuses a corpus whose
    metadata is missing or invalid."""
    bound = "> 0" if strictly_positive else ">= 0"
    if isinstance(value, Tensor):
        if value.ndim != 1 or value.numel() == 0 or not value.is_floating_point():
            raise ValueError(f"{name}: a per-sample {what} is a 1-D float tensor [B], got "
                             f"{value.dtype} {tuple(value.shape)}")
        if value.device.type == "cpu":
            v = value.detach()
            ok = torch.isfinite(v) & ((v > 0) if strictly_positive else (v >= 0))
            if not bool(ok.all()):
                raise ValueError(f"{name}: {what} must be finite and {bound} for every sample, got "
                                 f"{v.tolist()}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: expected a float or a [B] tensor, got {type(value).__name__}")
    if not (math.isfinite(value) and (value > 0 if strictly_positive else value >= 0)):
        raise ValueError(f"{name}: {what} must be finite and {bound}, got {value}")


def _per_sample(value: PerSample, u: Tensor, name: str, dtype: torch.dtype | None = None) -> PerSample:
    """A FlowSpec scalar ready to multiply a tensor of u's batch: a float as it is (bit-identical to
    a one-value spec), a ``[B]`` tensor as ``[B, 1, .., 1]`` on u's device in ``dtype`` (default
    u's real dtype)."""
    if not isinstance(value, Tensor):
        return value
    if value.shape[0] not in (1, u.shape[0]):
        raise ValueError(f"spec.{name}: {value.shape[0]} per-sample values for a batch of {u.shape[0]} "
                         f"(field shape {tuple(u.shape)})")
    if dtype is None:
        dtype = u.real.dtype if u.is_complex() else u.dtype
    return value.to(device=u.device, dtype=dtype).reshape(-1, *([1] * (u.ndim - 1)))  # [B, 1, .., 1]


def _viscous(spec: FlowSpec) -> bool:
    """Whether the nu Lap u term is present: a per-sample nu always counts (no host sync to ask)."""
    return isinstance(spec.nu, Tensor) or spec.nu != 0


def _check_field(u: Tensor, spec: FlowSpec, name: str = "u") -> None:
    """u is a real float32/float64 [B, G*k, *S] whose dims include the spec's axes."""
    if not isinstance(spec, FlowSpec):
        raise ValueError(f"spec: expected a FlowSpec, got {type(spec).__name__}")
    check_real_field(u, name)
    if u.dtype not in _DTYPES:
        raise ValueError(f"{name}: expected dtype float32 or float64, got {u.dtype}")
    for a in spec.flow_axes:
        if a >= u.ndim:
            raise ValueError(f"spec.flow_axes: {spec.flow_axes} names dim {a}, but {name} has shape "
                             f"{tuple(u.shape)} (field axes are dims 2..{u.ndim - 1})")
    if spec.time_axis is not None and spec.time_axis >= u.ndim:
        raise ValueError(f"spec.time_axis: {spec.time_axis} is not a field axis of {name} with shape "
                         f"{tuple(u.shape)}")
    c = u.shape[1]
    if c % spec.k:
        raise ValueError(f"{name}: channel count C={c} is not divisible by k={spec.k}, the number of "
                         f"flow axes {spec.flow_axes} (vector channels are grouped C = G*k)")


def _check_state(u: Tensor, dt: float, spec: FlowSpec, name: str = "u") -> None:
    """An integrator state: a velocity field without a time axis, and a usable step."""
    _check_field(u, spec, name)
    if spec.time_axis is not None:
        raise ValueError(f"spec.time_axis: the integrators step a velocity state without a time axis; "
                         f"got time_axis={spec.time_axis} (use a FlowSpec with time_axis=None)")
    if not isinstance(dt, (int, float)) or isinstance(dt, bool) or not (math.isfinite(dt) and dt > 0):
        raise ValueError(f"dt: step size must be a finite number > 0, got {dt!r}")


def _forcing_value(forcing: Forcing, u: Tensor) -> Tensor | None:
    """The forcing tensor at state u: a fixed tensor, or a callable f(u) (the learned network)."""
    if forcing is None:
        return None
    f = forcing if isinstance(forcing, Tensor) else forcing(u) if callable(forcing) else forcing
    if not isinstance(f, Tensor):
        raise ValueError(f"forcing: expected None, a Tensor or a callable returning a Tensor, "
                         f"got {type(f).__name__}")
    if f.is_complex() or not f.is_floating_point():
        raise ValueError(f"forcing: expected a real floating tensor, got dtype {f.dtype}")
    try:
        shape = torch.broadcast_shapes(f.shape, u.shape)
    except RuntimeError:
        shape = None
    if shape != u.shape:
        raise ValueError(f"forcing: shape {tuple(f.shape)} does not broadcast to the field shape "
                         f"{tuple(u.shape)}")
    return f


# ---- spatial and time derivatives ------------------------------------------------------------

def _laplacian(u: Tensor, spec: FlowSpec, domain: Domain) -> Tensor:
    """Laplacian over the flow axes, same shape."""
    if spec.derivative == "spectral":
        return spectral.laplacian(u, spec.flow_axes, spec.lengths, domain=domain)
    return finite_diff.fd_laplacian(u, spec.flow_axes, spec.lengths,
                                    accuracy=_FD_ACCURACY[spec.derivative], domain=domain)


def time_derivative(u: Tensor, spec: FlowSpec, domain: Domain = LOCAL) -> Tensor:
    """d_t u along ``spec.time_axis`` by the ``spec.time_derivative`` stencil with spacing ``spec.dt``
    (per sample when ``spec.dt`` is a ``[B]`` tensor)."""
    _check_field(u, spec)
    if spec.time_axis is None:
        raise ValueError("spec.time_axis: d_t u needs a time axis in the field; got time_axis=None")
    if spec.time_derivative == "flow":
        length = 2 * math.pi if spec.lengths is None else spec.lengths[spec.flow_axes.index(spec.time_axis)]
        if spec.derivative == "spectral":
            return spectral.derivative(u, spec.time_axis, 1, length, domain=domain)
        return finite_diff.fd_derivative(u, spec.time_axis, 1, _FD_ACCURACY[spec.derivative],
                                         length / domain.global_extent(u, spec.time_axis), domain)
    kind, accuracy = spec.time_derivative[:-1], int(spec.time_derivative[-1])
    boundary = "periodic" if kind == "periodic" else "one_sided"
    if not isinstance(spec.dt, Tensor):
        return finite_diff.fd_derivative(u, spec.time_axis, order=1, accuracy=accuracy, spacing=spec.dt,
                                         domain=domain, boundary=boundary)
    # 1/dt in float64, then rounded once: the same factor a float spacing gives for the same value
    inv_dt = _per_sample(1.0 / spec.dt.detach().double(), u, "dt")       # [B, 1, .., 1]
    return finite_diff.fd_derivative(u, spec.time_axis, order=1, accuracy=accuracy, spacing=1.0,
                                     domain=domain, boundary=boundary) * inv_dt


# ---- dealiasing ---------------------------------------------------------------------------

def dealias_mask(u: Tensor, axes, domain: Domain = LOCAL) -> Tensor:
    """2/3-rule mask (1 keep, 0 drop) broadcasting against ``domain.rfft(u, axes)``.

    Keeps integer frequencies with ``3*|n_i| < N_i`` on every axis (N_i the global extent):
    a product of two fields so truncated has frequencies below 2N/3, whose aliases land at
    |n| > N/3, exactly the band the mask removes again (Orszag 1971). The strict inequality
    matters when 3 divides N.
    """
    axes = normalize_axes(axes, u.ndim)
    ks = domain.wavenumbers(u, axes)  # lengths 2*pi: integer frequencies n
    mask = None
    for a, n in zip(axes, ks):
        extent = domain.global_extent(u, a)
        keep = (3.0 * n.abs().round()) < extent
        mask = keep if mask is None else mask & keep
    return mask.to(u.dtype)


def _filter(x: Tensor, mask: Tensor, axes, domain: Domain) -> Tensor:
    """Multiply the spectrum of x over ``axes`` by a real mask (same shape out)."""
    return domain.irfft(domain.rfft(x, axes) * mask, axes, x.shape)


# ---- Navier-Stokes terms -------------------------------------------------------------------

def _advection_unfiltered(u: Tensor, spec: FlowSpec, domain: Domain, mask: Tensor | None = None,
                          u_hat: Tensor | None = None, ks_odd: list[Tensor] | None = None) -> Tensor:
    """sum_j u_j d_j u_i in physical space. With a dealias ``mask`` the velocity is truncated
    first; the product is returned untruncated. ``u_hat``/``ks_odd`` (spectral derivatives only)
    reuse a forward FFT of u and its Nyquist-zeroed wavenumbers the caller already has."""
    b, c, *s = u.shape
    k, axes = spec.k, spec.flow_axes
    if spec.derivative == "spectral":
        if u_hat is None:
            u_hat = domain.rfft(u, axes)                                  # [B, C, *spectral]
        if ks_odd is None:
            ks_odd = domain.wavenumbers(u, axes, spec.lengths, zero_nyquist=True)
        if mask is not None:
            u_hat = u_hat * mask
            u = domain.irfft(u_hat, axes, u.shape)                        # [B, G*k, *S]
        grad = domain.irfft(spectral.gradient_hat(u_hat, ks_odd), axes, (b, c * k, *s))  # [B, C*k, *S]
    else:
        if mask is not None:
            u = _filter(u, mask, axes, domain)                            # [B, G*k, *S]
        grad = finite_diff.fd_gradient(u, axes, spec.lengths, accuracy=_FD_ACCURACY[spec.derivative],
                                       domain=domain)                     # [B, C*k, *S]
    grad = grad.reshape(b, c // k, k, k, *s)                              # [B, G, i, j, *S] = d_j u_i
    vel = u.reshape(b, c // k, 1, k, *s)                                  # [B, G, 1, j, *S]
    return (vel * grad).sum(dim=3).reshape(b, c, *s)                      # [B, G*k, *S]


def advection(u: Tensor, spec: FlowSpec, domain: Domain = LOCAL) -> Tensor:
    """(u . grad) u per channel group: component i = sum_j u_j d_j u_i.  [B, G*k, *S] -> same.

    With ``spec.dealias`` the velocity is truncated to the 2/3 band before the product and the
    product is truncated after it.
    """
    _check_field(u, spec)
    mask = dealias_mask(u, spec.flow_axes, domain) if spec.dealias else None
    adv = _advection_unfiltered(u, spec, domain, mask)                    # [B, G*k, *S]
    return adv if mask is None else _filter(adv, mask, spec.flow_axes, domain)


def viscous_term(u: Tensor, spec: FlowSpec, domain: Domain = LOCAL) -> Tensor:
    """nu Lap u over the flow axes (nu per sample when ``spec.nu`` is a ``[B]`` tensor).  [B, C, *S] -> same."""
    _check_field(u, spec)
    return _per_sample(spec.nu, u, "nu") * _laplacian(u, spec, domain)


def project(v: Tensor, spec: FlowSpec, domain: Domain = LOCAL) -> Tensor:
    """Leray projection P over the flow axes (Eq. 43), per channel group."""
    return spectral.leray_project(v, spec.flow_axes, spec.lengths, domain=domain)


def _rhs_hat(u: Tensor, spec: FlowSpec, forcing: Forcing, domain: Domain, viscous: bool = True
             ) -> tuple[Tensor, list[Tensor], Tensor | None]:
    """Spectrum over the flow axes of -(u.grad)u [+ nu Lap u] + f(u), unprojected, the
    Nyquist-zeroed wavenumbers that project it, and u's own spectrum (None with FD derivatives).

    Why fused: with spectral derivatives one forward FFT of u serves both the velocity gradient
    and the Laplacian, and the caller projects in Fourier space: a drift costs two forward and two
    inverse transforms (one of them k-fold) instead of three and three term by term (with
    dealiasing two and three instead of five and five).
    """
    axes = spec.flow_axes
    ks_odd = domain.wavenumbers(u, axes, spec.lengths, zero_nyquist=True)
    mask = dealias_mask(u, axes, domain) if spec.dealias else None
    f = _forcing_value(forcing, u)
    if spec.derivative != "spectral":
        rhs = -advection(u, spec, domain)                                 # [B, G*k, *S]
        if viscous and _viscous(spec):
            rhs = rhs + viscous_term(u, spec, domain)
        if f is not None:
            rhs = rhs + f
        return domain.rfft(rhs, axes), ks_odd, None
    u_hat = domain.rfft(u, axes)                                          # [B, C, *spectral]
    adv = _advection_unfiltered(u, spec, domain, mask, u_hat, ks_odd)    # [B, G*k, *S]
    if mask is None:
        rhs_hat = domain.rfft(-adv if f is None else f - adv, axes)
    else:  # only the product is truncated, not the forcing
        rhs_hat = domain.rfft(adv, axes) * -mask
        if f is not None:
            rhs_hat = rhs_hat + domain.rfft(f.expand(u.shape), axes)
    if viscous and _viscous(spec):
        ks = domain.wavenumbers(u, axes, spec.lengths)                    # Nyquist kept: -k^2 is real
        rhs_hat = rhs_hat + _per_sample(spec.nu, u, "nu") * spectral.laplacian_hat(u_hat, ks)
    return rhs_hat, ks_odd, u_hat


def projected_drift(u: Tensor, spec: FlowSpec, forcing: Forcing = None, domain: Domain = LOCAL) -> Tensor:
    """P[-(u.grad)u + nu Lap u + f(u)] (Eq. 11), the deterministic drift.  [B, G*k, *S] -> same.

    ``forcing`` is a tensor broadcasting to u's shape, or a callable ``f(u) -> Tensor`` (the
    learned forcing network), evaluated at u.
    """
    _check_field(u, spec)
    with record_function("sgfm.physics"):  # profiler range (tools/benchmarks/profile.py); changes no value
        rhs_hat, ks_odd, _ = _rhs_hat(u, spec, forcing, domain)
        return domain.irfft(spectral.leray_project_hat(rhs_hat, ks_odd), spec.flow_axes, u.shape)


def residual(u: Tensor, spec: FlowSpec, forcing: Forcing = None, domain: Domain = LOCAL) -> Tensor:
    """R(u) = d_t u + (u.grad)u - nu Lap u - f (Eq. 41) on a space-time field.  [B, G*k, *S] -> same.

    Not projected: for an exact Navier-Stokes solution R equals -grad p, which ``P`` removes
    (see ``projected_residual``). Needs ``spec.time_axis``.
    """
    _check_field(u, spec)
    if spec.time_axis is None:
        raise ValueError("spec.time_axis: the residual R(u) = d_t u + ... (Eq. 41) needs a time axis "
                         "in the field; got time_axis=None")
    r = time_derivative(u, spec, domain) + advection(u, spec, domain)
    if _viscous(spec):
        r = r - viscous_term(u, spec, domain)
    f = _forcing_value(forcing, u)
    if f is not None:
        r = r - f
    return r


def projected_residual(u: Tensor, spec: FlowSpec, forcing: Forcing = None, domain: Domain = LOCAL) -> Tensor:
    """P R(u) (Eq. 42 before the norm), computed as P[d_t u - (-(u.grad)u + nu Lap u + f)] with
    the fused spectral right-hand side.  [B, G*k, *S] -> same."""
    _check_field(u, spec)
    if spec.time_axis is None:
        raise ValueError("spec.time_axis: the residual R(u) = d_t u + ... (Eq. 41) needs a time axis "
                         "in the field; got time_axis=None")
    rhs_hat, ks_odd, u_hat = _rhs_hat(u, spec, forcing, domain)
    if u_hat is not None and spec.time_derivative == "flow":
        # d_t is the gradient's own component along t: read it off u's spectrum (no FFT pair)
        dt_hat = spectral.derivative_hat(u_hat, ks_odd[spec.flow_axes.index(spec.time_axis)])
    else:
        dt_hat = domain.rfft(time_derivative(u, spec, domain), spec.flow_axes)
    r_hat = dt_hat - rhs_hat
    return domain.irfft(spectral.leray_project_hat(r_hat, ks_odd), spec.flow_axes, u.shape)


def physics_energy(u: Tensor, spec: FlowSpec, forcing: Forcing = None, domain: Domain = LOCAL) -> Tensor:
    """E(u) = ||P R(u)||^2 (Eq. 23 / 42) per sample, as a mean over cells and channels.  -> [B]

    A mean rather than a sum: it approximates (1/|Omega|) * integral of |P R|^2 / C, which does not
    change when the same continuum field is sampled on a finer grid, so the loss weight lambda_R
    and the guidance step eta (Eq. 24) need no retuning with resolution. Over a split field the
    sum and the cell count are global (``domain.sum``, ``domain.numel``).
    """
    with record_function("sgfm.physics"):  # profiler range (tools/benchmarks/profile.py); changes no value
        pr = projected_residual(u, spec, forcing, domain)                # [B, C, *S]
        local = pr.square().sum(dim=tuple(range(1, pr.ndim)))            # [B]
        return domain.sum(local) / (pr.shape[1] * domain.numel(pr))


# ---- integrators (state [B, G*k, *S_spatial], no time axis) ----------------------------------

def rk4_step(u: Tensor, dt: float, spec: FlowSpec, forcing: Forcing = None, domain: Domain = LOCAL) -> Tensor:
    """One classical RK4 step of du/dt = P[-(u.grad)u + nu Lap u + f(u)] (pseudo-spectral, with
    2/3 dealiasing of the advection when ``spec.dealias``).  [B, G*k, *S] -> same."""
    _check_state(u, dt, spec)

    def drift(v: Tensor) -> Tensor:
        return projected_drift(v, spec, forcing, domain)

    k1 = drift(u)
    k2 = drift(u + 0.5 * dt * k1)
    k3 = drift(u + 0.5 * dt * k2)
    k4 = drift(u + dt * k3)
    return u + (dt / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


@dataclass(frozen=True)
class ETDRK4Coefficients:
    """Spectral multipliers of one ETDRK4 step, broadcasting against ``domain.rfft(u, flow_axes)``.

    With z = dt * L, L the symbol of nu * Lap (exactly the discrete Laplacian in use):
    ``e = exp(z)``, ``e_half = exp(z/2)``, ``q = dt/2 * phi1(z/2)``,
    ``f1 = dt*(phi1 - 3 phi2 + 4 phi3)(z)``, ``f2 = dt*(phi2 - 2 phi3)(z)``,
    ``f3 = dt*(-phi2 + 4 phi3)(z)`` (Kassam & Trefethen 2005, Eq. 2.5 written with phi functions).
    """

    dt: float
    """The step these multipliers were built for."""
    shape: tuple[int, ...]
    """Local shape of the field they were built for (checked on use)."""
    e: Tensor
    """exp(z): the exact viscous decay over one step."""
    e_half: Tensor
    """exp(z/2): the decay over half a step (the stage predictions)."""
    q: Tensor
    """dt/2 phi1(z/2): weight of the nonlinear term in the half-step stages."""
    f1: Tensor
    """Weight of N(v_n) in the final combination."""
    f2: Tensor
    """Weight of N(a) + N(b), the two half-step stages, in the final combination (times 2)."""
    f3: Tensor
    """Weight of N(c), the full-step stage, in the final combination."""


def _laplacian_symbol(u: Tensor, spec: FlowSpec, domain: Domain) -> Tensor:
    """Fourier symbol of the configured Laplacian over the flow axes (float64, <= 0), broadcasting
    against ``domain.rfft(u, flow_axes)``: -|k|^2 for spectral derivatives (Nyquist kept, as
    ``spectral.laplacian`` does) and sum_c a_c cos(c k h) / h^2 for the finite-difference stencil,
    so the exponential integrator solves the same semi-discrete system as RK4."""
    probe = u.detach()[:1, :1].to(torch.float64)
    lengths = spec.lengths if spec.lengths is not None else (2.0 * math.pi,) * spec.k
    ks = domain.wavenumbers(probe, spec.flow_axes, lengths)
    if spec.derivative != "spectral":
        offsets, coeffs = finite_diff.central_stencil(2, _FD_ACCURACY[spec.derivative])
    symbol = None
    for a, length, k in zip(spec.flow_axes, lengths, ks):
        if spec.derivative == "spectral":
            term = -k.square()
        else:
            h = length / domain.global_extent(probe, a)
            term = sum(cf * torch.cos(off * k * h) for off, cf in zip(offsets, coeffs)) / h ** 2
        symbol = term if symbol is None else symbol + term
    return symbol


def _phi_functions(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """phi1, phi2, phi3 of a real z <= 0 (float64), phi_k(z) = sum_n z^n / (n+k)!.

    Taylor series for |z| < 1 (the closed forms cancel catastrophically there), the recurrence
    phi_{k+1} = (phi_k - 1/k!) / z from expm1 elsewhere (relative error ~1e-15 for |z| >= 1).
    Used instead of the Kassam-Trefethen contour mean to avoid an M-fold memory blow-up.
    """
    small = z.abs() < 1.0
    zs = torch.where(small, z, torch.zeros_like(z))
    zl = torch.where(small, torch.ones_like(z), z)
    series = []
    for k in (1, 2, 3):
        # Horner: sum_{n=0}^{N} z^n/(n+k)!, 20 terms: 1/23! < 1e-22
        acc = torch.full_like(zs, 1.0 / math.factorial(20 + k))
        for n in range(19, -1, -1):
            acc = acc * zs + 1.0 / math.factorial(n + k)
        series.append(acc)
    p1 = torch.expm1(zl) / zl
    p2 = (p1 - 1.0) / zl
    p3 = (p2 - 0.5) / zl
    return tuple(torch.where(small, s, p) for s, p in zip(series, (p1, p2, p3)))


def etdrk4_coefficients(u: Tensor, dt: float, spec: FlowSpec, domain: Domain = LOCAL) -> ETDRK4Coefficients:
    """Build the ETDRK4 multipliers for state shape ``u.shape`` and step ``dt`` (reuse them across
    steps: ``integrate`` does). Computed in float64, stored in u's dtype."""
    _check_state(u, dt, spec)
    nu = _per_sample(spec.nu.detach(), u, "nu", torch.float64) if isinstance(spec.nu, Tensor) else spec.nu
    z = dt * nu * _laplacian_symbol(u, spec, domain)                      # [1 or B, 1, *spectral]
    p1, p2, p3 = _phi_functions(z)
    h1, _, _ = _phi_functions(0.5 * z)

    def cast(x: Tensor) -> Tensor:
        return x.to(u.dtype)

    return ETDRK4Coefficients(
        dt=float(dt), shape=tuple(u.shape),
        e=cast(torch.exp(z)), e_half=cast(torch.exp(0.5 * z)), q=cast(0.5 * dt * h1),
        f1=cast(dt * (p1 - 3.0 * p2 + 4.0 * p3)), f2=cast(dt * (p2 - 2.0 * p3)),
        f3=cast(dt * (4.0 * p3 - p2)))


def etdrk4_step(u: Tensor, dt: float, spec: FlowSpec, forcing: Forcing = None, domain: Domain = LOCAL,
                coefficients: ETDRK4Coefficients | None = None) -> Tensor:
    """One ETDRK4 step (Cox & Matthews 2002, J. Comput. Phys. 176:430, scheme (26)-(29); coefficients
    as in Kassam & Trefethen 2005, SIAM J. Sci. Comput. 26:1214) of the same projected drift as
    ``rk4_step``: the viscous part nu Lap u is integrated exactly, P[-(u.grad)u + f] explicitly.

    The gradient part (I - P) u of the state has zero drift in the projected dynamics, so it is
    carried unchanged and only the solenoidal part P u is stepped: this is exactly the equation RK4
    integrates, also for a state that is not divergence-free.  [B, G*k, *S] -> same.
    """
    _check_state(u, dt, spec)
    c = etdrk4_coefficients(u, dt, spec, domain) if coefficients is None else coefficients
    if c.dt != float(dt) or c.shape != tuple(u.shape):
        raise ValueError(f"coefficients: built for dt={c.dt}, shape {c.shape}; got dt={dt}, "
                         f"shape {tuple(u.shape)}")
    axes, shape = spec.flow_axes, u.shape
    u_hat = domain.rfft(u, axes)                                          # [B, G*k, *spectral]
    v_hat = spectral.leray_project_hat(u_hat, domain.wavenumbers(u, axes, spec.lengths, zero_nyquist=True))
    grad_part = domain.irfft(u_hat - v_hat, axes, shape)                  # [B, G*k, *S], constant

    def nonlinear_hat(v_hat: Tensor) -> Tensor:
        """Spectrum of P[-(v.grad)v + f(v)], the drift without its viscous part."""
        v = domain.irfft(v_hat, axes, shape) + grad_part                 # [B, G*k, *S]
        rhs_hat, ks_odd, _ = _rhs_hat(v, spec, forcing, domain, viscous=False)
        return spectral.leray_project_hat(rhs_hat, ks_odd)               # spectral layout

    n_v = nonlinear_hat(v_hat)
    a_hat = c.e_half * v_hat + c.q * n_v
    n_a = nonlinear_hat(a_hat)
    b_hat = c.e_half * v_hat + c.q * n_a
    n_b = nonlinear_hat(b_hat)
    c_hat = c.e_half * a_hat + c.q * (2.0 * n_b - n_v)
    n_c = nonlinear_hat(c_hat)
    v_hat = c.e * v_hat + c.f1 * n_v + 2.0 * c.f2 * (n_a + n_b) + c.f3 * n_c
    return domain.irfft(v_hat, axes, shape) + grad_part


def white_noise(u: Tensor, generator: torch.Generator | SampleDraws | None = None, domain: Domain = LOCAL,
                purpose: str = "noise") -> Tensor:
    """Standard normal noise shaped like u: drawn as the *global* field and ``domain.shard``-ed, so a
    seeded sample does not depend on how the field is split. From ``generator`` (on its own device),
    the global RNG when None, or per sample from a :class:`~sgfm_dist.ops.draws.SampleDraws` (its
    ``purpose`` stream: each sample's noise then depends on its global index only)."""
    shape = tuple(u.shape[:2]) + tuple(domain.global_extent(u, a) for a in field_axes(u))
    if isinstance(generator, SampleDraws):
        generator.check_batch(shape[0])
        xi = generator.normal(shape[1:], u.dtype, purpose)  # [B, C, *S_global], a generator per sample
        return domain.shard(xi.to(u.device))
    device = generator.device if generator is not None else u.device
    xi = torch.randn(shape, generator=generator, dtype=u.dtype, device=device)   # [B, C, *S_global]
    return domain.shard(xi.to(u.device))


def euler_maruyama_step(u: Tensor, dt: float, spec: FlowSpec, forcing: Forcing = None,
                        noise_std: float = 0.0, noise: Tensor | None = None,
                        generator: torch.Generator | None = None, domain: Domain = LOCAL) -> Tensor:
    """One Euler-Maruyama step of Eq. 8/10: u + dt * P[-(u.grad)u + nu Lap u + f] + sqrt(dt) *
    noise_std * P(xi), xi white noise per cell (``noise`` if given, else drawn from ``generator``).
    The increment is divergence-free because the noise is projected too.  [B, G*k, *S] -> same."""
    _check_state(u, dt, spec)
    if not (math.isfinite(noise_std) and noise_std >= 0):
        raise ValueError(f"noise_std: expected a finite value >= 0, got {noise_std}")
    out = u + dt * projected_drift(u, spec, forcing, domain)
    if noise_std > 0:
        if noise is None:
            noise = white_noise(u, generator, domain)
        elif not isinstance(noise, Tensor) or noise.shape != u.shape:
            raise ValueError(f"noise: expected a tensor of the field shape {tuple(u.shape)}, got "
                             f"{tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__}")
        out = out + (math.sqrt(dt) * noise_std) * project(noise.to(u.dtype), spec, domain)
    return out


def integrate(u0: Tensor, n_steps: int, dt: float, spec: FlowSpec, method: IntegratorKind = "rk4",
              forcing: Forcing = None, noise_std: float = 0.0, generator: torch.Generator | None = None,
              domain: Domain = LOCAL, callback: Callable[[dict], None] | None = None) -> Tensor:
    """Advance u0 by ``n_steps`` steps of size ``dt`` with ``method`` and return the final state.

    "rk4" and "etdrk4" are deterministic (``noise_std`` must be 0); "euler_maruyama" adds projected
    noise of strength ``noise_std`` drawn from ``generator``. ``callback`` (k-diffusion style) is
    called after every step with ``{"i": step index from 0, "t": time reached, "u": state}``.
    """
    _check_state(u0, dt, spec, "u0")
    if not _is_int(n_steps) or n_steps < 0:
        raise ValueError(f"n_steps: expected an int >= 0, got {n_steps!r}")
    if method not in _INTEGRATORS:
        raise ValueError(f"method: expected one of {_INTEGRATORS}, got {method!r}")
    if method != "euler_maruyama" and noise_std != 0:
        raise ValueError(f"noise_std: {noise_std} given but method={method!r} is deterministic "
                         f"(use method='euler_maruyama' for the stochastic equation)")
    coefficients = etdrk4_coefficients(u0, dt, spec, domain) if method == "etdrk4" else None
    u = u0
    for i in range(n_steps):
        if method == "rk4":
            u = rk4_step(u, dt, spec, forcing, domain)
        elif method == "etdrk4":
            u = etdrk4_step(u, dt, spec, forcing, domain, coefficients=coefficients)
        else:
            u = euler_maruyama_step(u, dt, spec, forcing, noise_std=noise_std, generator=generator,
                                    domain=domain)
        if callback is not None:
            callback({"i": i, "t": (i + 1) * dt, "u": u})
    return u
