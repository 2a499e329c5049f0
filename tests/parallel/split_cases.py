"""Split-vs-whole checks of every distributed operator, batched into one spawned job per world size.

``run_all(world_size)`` runs on every rank (via ``run_distributed``): for each layout of
``layouts(world_size)`` it builds the mesh and ``SplitDomain``, draws seeded float64 global
fields (identical on the ranks of one sp group), runs each family of checks and returns
``{case_id: {check: relative max error, ...}}`` (or ``{"error": traceback}``). The pytest
files parametrize over ``case_ids(world_size)`` and read these dicts, so spawning (the slow
part) happens once per world size, not once per case.

Errors are ``max|split - whole| / max(1, max|whole|)``, outputs gathered over the sp group and
input gradients of a seeded random loss gathered likewise.
"""
from __future__ import annotations

import math
import traceback
import zlib
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

TOL = 1e-10
FAMILIES = ("halo", "fft", "ops", "conv", "wavelets")


@dataclass(frozen=True)
class Layout:
    name: str
    S: tuple[int, ...]
    split_axes: tuple[int, ...]
    pencil: bool = False
    dp2: bool = False

    def grid(self, world_size: int) -> tuple[int, ...]:
        sp = world_size // 2 if self.dp2 else world_size
        if not self.pencil:
            return (sp,)
        a = {1: (1, 1), 2: (2, 1), 4: (2, 2)}[sp]
        return a


LAYOUTS = (
    Layout("d2-slab-t", (16, 12), (2,)),
    Layout("d2-slab-x", (8, 16), (3,)),          # the rfft-halved axis is split: 2 transposes
    Layout("d2-slab-t-uneven", (10, 9), (2,)),   # 10 over 4 ranks = 3,3,2,2; odd x extent
    Layout("d3-slab-t", (16, 8, 12), (2,)),
    Layout("d3-slab-x", (8, 6, 16), (4,)),
    Layout("d3-pencil-ty", (8, 8, 12), (2, 3), pencil=True),
    Layout("d3-pencil-yx", (6, 8, 8), (3, 4), pencil=True),
    Layout("d3-pencil-uneven", (7, 9, 6), (2, 3), pencil=True),
    Layout("d3-dp2-slab-y", (6, 8, 10), (3,), dp2=True),
)


def layouts(world_size: int) -> list[Layout]:
    return [lay for lay in LAYOUTS if not (lay.dp2 and world_size < 2)]


def case_ids(world_size: int, family: str) -> list[str]:
    return [f"{lay.name}-{family}" for lay in layouts(world_size)]


# ---- helpers ---------------------------------------------------------------------------------
def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _randn(shape, *key) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=_gen(*key), dtype=torch.float64)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    if a.shape != ref.shape:
        return float("inf")
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item() if ref.numel() else 0.0


class Errors(dict):
    def add(self, name: str, err: float) -> None:
        self[name] = max(self.get(name, 0.0), float(err))


def _check_op(errs: Errors, name: str, dom, fn, x_global, replicated=False, outputs=None):
    """Compare ``fn(x, domain)`` split vs whole: outputs and the input gradient of a random loss."""
    from sgfm_dist.ops.domain import LOCAL

    xg = x_global.clone().requires_grad_(True)
    ref = fn(xg, LOCAL)
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    xl = dom.shard(x_global).requires_grad_(True)
    out = fn(xl, dom)
    out = out if isinstance(out, (tuple, list)) else (out,)
    weights = [_randn(r.shape, name, "w", i) for i, r in enumerate(ref)]
    loss_ref, loss = 0.0, 0.0
    for i, (o, r, w) in enumerate(zip(out, ref, weights)):
        if replicated:
            errs.add(f"{name}.out{i}", _rel(o, r))
            loss = loss + (o * w).sum()  # replicated: the same loss on every rank, counted once
        else:
            errs.add(f"{name}.out{i}", _rel(dom.gather(o), r))
            loss = loss + (o * dom.shard(w)).sum()  # partitioned: each rank's part of one loss
        loss_ref = loss_ref + (r * w).sum()
    (g_ref,) = torch.autograd.grad(loss_ref, xg)
    (g,) = torch.autograd.grad(loss, xl)
    errs.add(f"{name}.grad", _rel(dom.gather(g), g_ref))


# ---- families --------------------------------------------------------------------------------
def check_halo(dom, lay: Layout, key) -> Errors:
    from sgfm_dist.ops.domain import LOCAL

    errs = Errors()
    d = len(lay.S)
    x = _randn((2, 3, *lay.S), key, "x")
    xl = dom.shard(x)
    thin = {a: min(dom.layout.blocks_along(a)) for a in range(2, 2 + d)}
    width_sets = [
        [(1, 1)] * d,
        [(min(2, thin[a]), 0) for a in range(2, 2 + d)],
        [(0, min(2, thin[a])) if a in dom.layout.split_axes else (0, 2 * lay.S[a - 2] + 1) for a in range(2, 2 + d)],
        [(thin[a], 1) for a in range(2, 2 + d)],
    ]
    coords_all = [dom.mesh.coords_of(r) for r in range(dom.mesh.sp)]
    for wi, widths in enumerate(width_sets):
        padded = LOCAL.pad(x, widths)

        def window(lay_c):
            sl = [slice(None), slice(None)]
            for i, (o, n) in enumerate(zip(lay_c.offsets, lay_c.local_extents)):
                lo, hi = widths[i]
                sl.append(slice(o, o + n + lo + hi))
            return tuple(sl)

        out = dom.pad(xl, widths)
        errs.add(f"pad{wi}.out", _rel(out, padded[window(dom.layout)]))
        # gradient: every rank's random cotangent on its padded block; the single-device
        # reference is sum_r (window_r o pad)^T y_r
        xg = x.clone().requires_grad_(True)
        pg = LOCAL.pad(xg, widths)
        loss_ref = 0.0
        for c in coords_all:
            lay_c = dom.layout.with_coords(c)
            y_c = _randn(pg[window(lay_c)].shape, key, "y", wi, c)
            loss_ref = loss_ref + (pg[window(lay_c)] * y_c).sum()
        (g_ref,) = torch.autograd.grad(loss_ref, xg)
        y = _randn(out.shape, key, "y", wi, dom.layout.coords)
        x_req = xl.clone().requires_grad_(True)
        hx = dom.pad(x_req, widths)
        (g,) = torch.autograd.grad((hx * y).sum(), x_req, create_graph=True)  # g = H^T y
        errs.add(f"pad{wi}.grad", _rel(dom.gather(g), g_ref))
        # dot-product adjoint test <H x, y> = <x, H^T y>, both sums over all ranks
        lhs = dom.sum((dom.pad(xl, widths) * y).sum())
        rhs = dom.sum((xl * g).sum())
        errs.add(f"pad{wi}.adjoint", abs((lhs - rhs).item()) / max(1.0, abs(lhs.item())))
        # double backward: d/dy <H^T y, z> = H z
        z = _randn(xl.shape, key, "z", wi, dom.layout.coords)
        y_req = y.clone().requires_grad_(True)
        (g2,) = torch.autograd.grad((hx * y_req).sum(), x_req, create_graph=True)
        (hz,) = torch.autograd.grad((g2 * z).sum(), y_req)
        errs.add(f"pad{wi}.double_backward", _rel(hz, dom.pad(z, widths)))
    # shard / gather / sum round trips, and their gradients (replicated values count once)
    errs.add("gather_shard", _rel(dom.gather(xl), x))
    errs.add("sum", _rel(dom.sum(xl.sum()), x.sum()))
    W = _randn(x.shape, key, "W")
    x_req = xl.clone().requires_grad_(True)
    (g,) = torch.autograd.grad((dom.gather(x_req) * W).sum(), x_req)  # replicated loss
    errs.add("gather.grad", _rel(g, dom.shard(W)))
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad((dom.shard(xg) * dom.shard(W)).sum(), xg)  # each rank's part of one loss
    errs.add("shard.grad", _rel(g, W))
    x_req = xl.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(dom.sum((x_req * dom.shard(W)).sum()), x_req)
    errs.add("sum.grad", _rel(g, dom.shard(W)))
    return errs


def check_fft(dom, lay: Layout, key) -> Errors:
    from sgfm_dist.ops.domain import LOCAL
    from sgfm_dist.parallel.comm_stats import COMM_STATS
    from sgfm_dist.parallel.fft import spectral_blocks, transpose_bytes

    errs = Errors()
    d = len(lay.S)
    x = _randn((2, 3, *lay.S), key, "x")
    xl = dom.shard(x)
    field = tuple(range(2, 2 + d))
    axes_sets = [field, field[-2:], field[:1], field[-1:]] + ([field[:2], (field[0], field[2])] if d == 3 else [])
    for axes in axes_sets:
        tag = "fft" + "".join(str(a) for a in axes)
        plan = dom.plan(xl, axes)
        blocks = spectral_blocks(plan, dom.layout.coords)
        sl = (slice(None), slice(None)) + tuple(slice(o, o + n) for o, n in blocks)
        ref = torch.fft.rfftn(x, dim=axes)
        before = COMM_STATS.bytes_sent.get("transpose", 0)
        xh = dom.rfft(xl, axes)
        sent = COMM_STATS.bytes_sent.get("transpose", 0) - before
        errs.add(f"{tag}.rfft", _rel(xh, ref[sl]))
        errs.add(f"{tag}.bytes", abs(sent - transpose_bytes(plan, 6, 8, dom.layout.coords)))
        before = COMM_STATS.bytes_sent.get("transpose", 0)
        back = dom.irfft(xh, axes, xl.shape)
        sent = COMM_STATS.bytes_sent.get("transpose", 0) - before
        errs.add(f"{tag}.inverse_bytes", abs(sent - transpose_bytes(plan, 6, 8, dom.layout.coords, "inverse")))
        errs.add(f"{tag}.roundtrip", _rel(back, xl))
        for zn in (False, True):
            for i, (k, kr) in enumerate(zip(dom.wavenumbers(xl, axes, zero_nyquist=zn),
                                            LOCAL.wavenumbers(x, axes, zero_nyquist=zn))):
                errs.add(f"{tag}.k{i}{'z' if zn else ''}", _rel(k.expand(xh.shape), kr.expand(ref.shape)[sl]))
        hw = dom.hermitian_weight(xl, axes)
        hw_ref = LOCAL.hermitian_weight(x, axes)
        errs.add(f"{tag}.hermitian_weight", _rel(hw.expand(xh.shape), hw_ref.expand(ref.shape)[sl]))
        # gradient through rfft: real loss Re<rfft x, W> on each rank's own spectral block
        W = torch.complex(_randn(ref.shape, key, tag, "wr"), _randn(ref.shape, key, tag, "wi"))
        xg = x.clone().requires_grad_(True)
        (g_ref,) = torch.autograd.grad((torch.fft.rfftn(xg, dim=axes) * W).real.sum(), xg)
        x_req = xl.clone().requires_grad_(True)
        (g,) = torch.autograd.grad((dom.rfft(x_req, axes) * W[sl]).real.sum(), x_req)
        errs.add(f"{tag}.rfft_grad", _rel(dom.gather(g), g_ref))
        # irfft of an arbitrary (non-Hermitian) spectrum, forward and gradient
        C = torch.complex(_randn(ref.shape, key, tag, "cr"), _randn(ref.shape, key, tag, "ci"))
        s = [x.shape[a] for a in axes]
        Cg = C.clone().requires_grad_(True)
        y_ref = torch.fft.irfftn(Cg, s=s, dim=axes)
        V = _randn(y_ref.shape, key, tag, "v")
        (gc_ref,) = torch.autograd.grad((y_ref * V).sum(), Cg)
        C_req = C[sl].clone().requires_grad_(True)
        y = dom.irfft(C_req, axes, xl.shape)
        errs.add(f"{tag}.irfft", _rel(dom.gather(y), y_ref.detach()))
        (gc,) = torch.autograd.grad((y * dom.shard(V)).sum(), C_req)
        errs.add(f"{tag}.irfft_grad", _rel(torch.view_as_real(gc), torch.view_as_real(gc_ref[sl])))
    return errs


def _flow(lay: Layout) -> tuple[int, ...]:
    return (2, 3) if len(lay.S) == 2 else (3, 4)


def check_ops(dom, lay: Layout, key) -> Errors:
    from sgfm_dist.ops import dynamics, finite_diff, spectral

    errs = Errors()
    d = len(lay.S)
    field = tuple(range(2, 2 + d))
    flow = _flow(lay)
    k = len(flow)
    u = _randn((2, 2, *lay.S), key, "u")
    v = _randn((2, 2 * k, *lay.S), key, "v")
    v3 = _randn((1, 3, *lay.S), key, "v3")
    lengths = tuple(2.0 + i for i in range(k))
    cases = []
    for a in field:
        for order in (1, 2):
            cases.append((f"derivative{a}.{order}", u, lambda x, D, a=a, o=order: spectral.derivative(x, a, o, domain=D)))
        cases.append((f"fd_derivative{a}.1.2", u, lambda x, D, a=a: finite_diff.fd_derivative(x, a, 1, 2, domain=D)))
        cases.append((f"fd_derivative{a}.2.4", u, lambda x, D, a=a: finite_diff.fd_derivative(x, a, 2, 4, domain=D)))
    cases += [
        ("gradient", u, lambda x, D: spectral.gradient(x, flow, lengths, domain=D)),
        ("divergence", v, lambda x, D: spectral.divergence(x, flow, domain=D)),
        ("laplacian", u, lambda x, D: spectral.laplacian(x, field, domain=D)),
        ("leray_project", v, lambda x, D: spectral.leray_project(x, flow, lengths, domain=D)),
        ("vorticity2", v, lambda x, D: spectral.vorticity(x, flow, domain=D)),
        ("fd_gradient", u, lambda x, D: finite_diff.fd_gradient(x, flow, accuracy=4, domain=D)),
        ("fd_divergence", v, lambda x, D: finite_diff.fd_divergence(x, flow, domain=D)),
        ("fd_laplacian", u, lambda x, D: finite_diff.fd_laplacian(x, field, accuracy=4, domain=D)),
        ("projected_drift", v, lambda x, D: dynamics.projected_drift(
            x, dynamics.FlowSpec(flow, nu=0.1, dealias=True), forcing=0.1 * x, domain=D)),
        ("projected_drift_fd", v, lambda x, D: dynamics.projected_drift(
            x, dynamics.FlowSpec(flow, nu=0.1, derivative="fd4"), domain=D)),
    ]
    if d == 3:
        cases.append(("vorticity3", v3, lambda x, D: spectral.vorticity(x, field, domain=D)))
    else:
        cases.append(("etdrk4_step", v, lambda x, D: dynamics.etdrk4_step(
            x, 0.05, dynamics.FlowSpec(flow, nu=0.2), domain=D)))
    for name, x, fn in cases:
        _check_op(errs, name, dom, fn, x)
    # replicated outputs: the spectrum and the physics energy (domain.sum inside)
    _check_op(errs, "energy_spectrum", dom, lambda x, D: spectral.energy_spectrum(x, flow, domain=D)[1], u,
              replicated=True)
    if d == 3:
        spec = dynamics.FlowSpec(flow, time_axis=2, time_derivative="periodic4", nu=0.05, dt=0.3)
        _check_op(errs, "physics_energy", dom, lambda x, D: dynamics.physics_energy(x, spec, domain=D), v,
                  replicated=True)
    # double backward through the transposes: d/dy <Lap^T y, z> = Lap z (Lap is self-adjoint)
    x_req = dom.shard(u).requires_grad_(True)
    y = dom.shard(_randn(u.shape, key, "y")).requires_grad_(True)
    z = dom.shard(_randn(u.shape, key, "z"))
    (g,) = torch.autograd.grad((spectral.laplacian(x_req, field, domain=dom) * y).sum(), x_req, create_graph=True)
    (lz,) = torch.autograd.grad((g * z).sum(), y)
    errs.add("laplacian.double_backward", _rel(dom.gather(lz), spectral.laplacian(dom.gather(z), field)))
    # seeded white noise is drawn globally, so it does not depend on the split
    noise = dynamics.white_noise(dom.shard(u), generator=_gen(key, "noise"), domain=dom)
    errs.add("white_noise", _rel(dom.gather(noise), dynamics.white_noise(u, generator=_gen(key, "noise"))))
    return errs


def check_conv(dom, lay: Layout, key) -> Errors:
    """PeriodicConv / SpectralConv split vs whole: outputs, input and weight gradients."""
    from sgfm_dist.model.layers import PeriodicConv, SpectralConv

    errs = Errors()
    d = len(lay.S)
    x = _randn((2, 3, *lay.S), key, "x")
    thin = min(min(dom.layout.blocks_along(a)) for a in dom.layout.split_axes)
    kernels = [3] + ([tuple(min(2 * thin + 1, 5) if a in dom.layout.split_axes else 3 for a in range(2, 2 + d))]
                     if thin >= 2 else [])
    layers = [(f"periodic_conv{ks}", lambda D, ks=ks: PeriodicConv(3, 4, ks, d, domain=D)) for ks in kernels]
    layers.append(("spectral_conv", lambda D: SpectralConv(3, 2, (3,) * (d - 1) + (2,), d, domain=D)))
    from sgfm_dist.ops.domain import LOCAL

    for name, make in layers:
        torch.manual_seed(zlib.crc32(repr((key, name)).encode()))
        ref_layer = make(LOCAL).double()
        layer = make(dom).double()
        layer.load_state_dict(ref_layer.state_dict())
        _check_op(errs, name, dom, lambda xx, D: (ref_layer if D is LOCAL else layer)(xx), x)
        # weight gradients: the sum over ranks of each rank's partial equals the whole-field gradient
        w = _randn(ref_layer(x).shape, key, name, "wloss")
        ref_layer.zero_grad()
        (ref_layer(x) * w).sum().backward()
        layer.zero_grad()
        (layer(dom.shard(x)) * dom.shard(w)).sum().backward()
        for (pn, p), (_, pr) in zip(layer.named_parameters(), ref_layer.named_parameters()):
            g = p.grad.clone()
            dist.all_reduce(g, group=dom.mesh.sp_group)
            errs.add(f"{name}.{pn}.grad", _rel(g, pr.grad))
    return errs


def check_wavelets(dom, lay: Layout, key) -> Errors:
    """Distributed DWT / inverse vs single device, on a field split like ``lay`` with extents 32
    on split axes (the DWT needs an even split with room for the halo at the coarsest level)
    and 32 (2-D) or 16 (3-D, to keep it cheap) on whole ones; as many levels as fit, >= 1."""
    from sgfm_dist.ops import wavelets
    from sgfm_dist.ops.domain import LOCAL
    from sgfm_dist.parallel.domain import SplitDomain
    from sgfm_dist.parallel.wavelets import max_split_levels, split_dwt, split_idwt

    errs = Errors()
    d = len(lay.S)
    S = tuple(32 if (d == 2 or 2 + i in lay.split_axes) else 16 for i in range(d))
    wdom = SplitDomain.create(dom.mesh, S, lay.split_axes)
    x = _randn((1, 2, *S), key, "x")
    for wavelet, levels in (("haar", 3), ("db2", 2), ("db4", 2), ("sym3", 2)):
        J = min(levels, max_split_levels(wdom.layout, wavelet))
        errs.add(f"levels.{wavelet}", 0.0 if J >= (levels if d == 2 else 1) else float("inf"))

        def fwd(xx, D, w=wavelet, J=J):
            c = wavelets.dwt(xx, w, J) if D is LOCAL else split_dwt(xx, D, w, J)
            return (c.approx, *c.details)

        _check_op(errs, f"dwt.{wavelet}.J{J}", wdom, fwd, x)

        def roundtrip(xx, D, w=wavelet, J=J):
            if D is LOCAL:
                return wavelets.idwt(wavelets.dwt(xx, w, J))
            return split_idwt(split_dwt(xx, D, w, J), D)

        # (the round trip is compared with the single-device round trip: pywt's sym3 filters are
        # orthonormal to ~1e-11 only, which is no property of the split)
        _check_op(errs, f"idwt_dwt.{wavelet}.J{J}", wdom, roundtrip, x)
    return errs


CHECKS = {"halo": check_halo, "fft": check_fft, "ops": check_ops, "conv": check_conv, "wavelets": check_wavelets}


def run_all(families=FAMILIES) -> dict:
    """Every check of every layout for this world size (runs on each rank)."""
    from sgfm_dist.parallel.domain import SplitDomain
    from sgfm_dist.parallel.mesh import ProcessMesh

    world_size = dist.get_world_size()
    torch.set_default_dtype(torch.float64)
    results, meshes = {}, {}
    for lay in layouts(world_size):
        grid = lay.grid(world_size)
        mkey = (lay.dp2, grid)
        if mkey not in meshes:  # collective: every rank creates the same meshes in the same order
            meshes[mkey] = ProcessMesh.create(dp=2 if lay.dp2 else 1, sp=math.prod(grid), sp_grid=grid)
        mesh = meshes[mkey]
        dom = SplitDomain.create(mesh, lay.S, lay.split_axes)
        for fam in families:
            try:
                results[f"{lay.name}-{fam}"] = dict(CHECKS[fam](dom, lay, (lay.name, fam, mesh.dp_rank)))
            except Exception:
                results[f"{lay.name}-{fam}"] = {"error": traceback.format_exc()}
    return results


def check_bad_input() -> dict:
    """Bad input on a live mesh: the ValueError message of each case ('' if none was raised).

    Every case raises before any communication, identically on every rank."""
    from sgfm_dist.parallel.domain import SplitDomain
    from sgfm_dist.parallel.mesh import FieldLayout, ProcessMesh

    ws = dist.get_world_size()
    out = {}

    def expect(name, fn):
        try:
            fn()
            out[name] = ""
        except ValueError as e:
            out[name] = str(e)

    mesh = ProcessMesh.create(sp=ws)
    dom = SplitDomain.create(mesh, (4 * ws, 12), (2,))  # blocks of 4 along axis 2
    x = torch.zeros(1, 1, 4, 12)
    expect("halo_too_wide", lambda: dom.pad(x, [(5, 0), (1, 1)]))
    expect("mesh_world_mismatch", lambda: ProcessMesh.create(dp=3, sp=1))
    expect("mesh_sp_not_dividing", lambda: ProcessMesh.create(sp=ws + 1))
    expect("layout_not_mesh", lambda: SplitDomain(mesh, FieldLayout((8, 8), (2,), (ws + 1,), (0,))))
    uneven = SplitDomain.create(mesh, (4 * ws + 1, 12), (2,))
    expect("uneven_derived_extent", lambda: uneven.global_extent(torch.zeros(1, 1, 2, 12), 2))
    thin = SplitDomain.create(mesh, (4 * ws, ws // 2), (2,))
    # no field axis can take the transpose's split (x has ws // 2 < ws cells): the batch takes it,
    # padded with zero samples (SplitDomain.rfft); forward and back must be the identity
    x = torch.randn(1, 1, 4, ws // 2, generator=torch.Generator().manual_seed(dist.get_rank()), dtype=torch.float64)
    back = thin.irfft(thin.rfft(x, (2, 3)), (2, 3), x.shape)
    out["fft_thin_roundtrip"] = float((back - x).abs().max())
    return out


def run_job() -> dict:
    """What one spawned job runs: all checks, plus the bad-input cases when there are several ranks."""
    res = run_all()
    if dist.get_world_size() > 1:
        res["bad-input"] = check_bad_input()
    return res


def assert_case(results: list[dict], case: str, tol: float = TOL) -> None:
    """Fail (with the worst check and rank) if any rank's errors for ``case`` exceed ``tol``."""
    worst, where = 0.0, None
    for rank, res in enumerate(results):
        errs = res[case]
        if "error" in errs:
            pytest.fail(f"{case} raised on rank {rank}:\n{errs['error']}")
        for name, e in errs.items():
            if not e <= tol:
                if where is None or e > worst:
                    worst, where = e, (name, rank)
    assert where is None, f"{case}: {where[0]} on rank {where[1]} has error {worst:.3e} > {tol:.0e}"
