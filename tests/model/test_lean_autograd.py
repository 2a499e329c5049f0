"""The score network's memory-lean autograd Functions against the compositions they replace:
what they compute (forward bit for bit, gradients exact or to float tolerance, float64
gradcheck) and what they keep for backward (counted with ``saved_tensors_hooks``).

* ``compat.channel_rms_norm_torch`` with FiLM: ``x * rsqrt(mean_c x^2 + eps) * g * (1 + s) + b``,
  keeping ``x`` (composed: ``x * r`` and ``x * r * g`` as well);
* ``PeriodicConv(x, gelu_input=True)``: a pointwise convolution of ``gelu(x)``, keeping ``x`` (composed: the
  GELU output too), gradients bit for bit (it calls the kernels autograd calls);
* ``ops.domain.rfftn``: ``torch.fft.rfftn`` whose backward keeps the input's shape, not the input;
* a whole ``FieldBlock``: the stored activations per block, a budget the three above set.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sgfm_dist import compat
from sgfm_dist.model.layers import FiLM, PeriodicConv
from sgfm_dist.model.networks import FieldBlock
from sgfm_dist.ops.domain import rfftn

FIELDS = {1: (2, 6, 10), 2: (2, 6, 8, 10), 3: (2, 6, 4, 6, 8), 4: (1, 6, 3, 4, 5, 4)}  # [B, C, *S]


def saved_bytes(fn, *args, parameters=()) -> int:
    """Bytes of the distinct storages autograd keeps for backward while ``fn(*args)`` runs
    (``parameters``' storages excluded: they exist anyway)."""
    skip = {p.untyped_storage().data_ptr() for p in parameters}
    kept = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            kept[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(kept.values())


def composed_norm_film(x, w, eps, s=None, b=None):
    """The ops the norm and FiLM ran before they were one Function (layers.FiLM.forward)."""
    y = x * x.pow(2).mean(1, keepdim=True).add(eps).rsqrt() * w.reshape(1, -1, *([1] * (x.ndim - 2)))
    if s is None:
        return y
    shape = (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2)
    return y * (1 + s.reshape(shape)) + b.reshape(shape)


def _norm_inputs(ndim, dtype, film, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = FIELDS[ndim]
    x = torch.randn(shape, generator=g, dtype=dtype, requires_grad=True)
    w = (torch.rand(shape[1], generator=g, dtype=dtype) + 0.5).requires_grad_(True)
    s = b = None
    if film:
        s, b = (torch.randn(shape[:2], generator=g, dtype=dtype, requires_grad=True) for _ in range(2))
    return x, w, s, b


# ----------------------------------------------------------------------------- norm + FiLM
@pytest.mark.parametrize("film", [False, True])
@pytest.mark.parametrize("ndim", [1, 2, 3, 4])
def test_norm_film_forward_bit_for_bit_and_gradients_of_the_composition(ndim, film):
    x, w, s, b = _norm_inputs(ndim, torch.float32, film)
    y = compat.channel_rms_norm_torch(x, w, 1e-6, s, b)
    ref = composed_norm_film(x, w, 1e-6, s, b)
    assert torch.equal(y, ref)  # the same ops in the same order
    leaves = [t for t in (x, w, s, b) if t is not None]
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9))
    for got, want in zip(torch.autograd.grad(y, leaves, dy), torch.autograd.grad(ref, leaves, dy)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("film", [False, True])
@pytest.mark.parametrize("ndim", [1, 2, 4])
def test_norm_film_gradcheck(ndim, film):
    x, w, s, b = _norm_inputs(ndim, torch.float64, film, seed=1)
    leaves = tuple(t for t in (x, w, s, b) if t is not None)
    fn = (lambda *a: compat.channel_rms_norm_torch(a[0], a[1], 1e-6, *a[2:]))
    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradgradcheck(fn, leaves)  # the analytic backward is itself differentiable


@pytest.mark.parametrize("film", [False, True])
def test_norm_film_keeps_the_input_only(film):
    x, w, s, b = _norm_inputs(3, torch.float32, film)
    field = x.numel() * x.element_size()
    lean = saved_bytes(lambda: compat.channel_rms_norm_torch(x, w, 1e-6, s, b), parameters=(w,))
    composed = saved_bytes(lambda: composed_norm_film(x, w, 1e-6, s, b), parameters=(w,))
    assert field <= lean <= field + 1024  # x, and FiLM's scale [B, C]
    assert composed >= field * (3 if film else 2)  # x, x * r (and x * r * g under FiLM)


def test_norm_film_needs_scale_and_shift_together():
    x, w, s, _ = _norm_inputs(2, torch.float32, True)
    with pytest.raises(ValueError, match="scale and shift"):
        compat.channel_rms_norm_torch(x, w, 1e-6, s, None)


def test_norm_film_under_cpu_bf16_autocast_follows_the_composition():
    """bf16 activations, fp32 gain: the Function runs the composition's ops under autocast
    (same dtype out) and its gradients come back in each input's dtype."""
    x, w, s, b = _norm_inputs(2, torch.float32, True, seed=3)
    xb = x.detach().bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = compat.channel_rms_norm_torch(xb, w, 1e-6, s, b)
        ref = composed_norm_film(xb, w, 1e-6, s, b)
    assert y.dtype == ref.dtype and torch.equal(y, ref)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4), dtype=y.dtype)
    got = torch.autograd.grad(y, (xb, w, s, b), dy)
    want = torch.autograd.grad(ref, (xb, w, s, b), dy)
    assert [g.dtype for g in got] == [torch.bfloat16, torch.float32, torch.float32, torch.float32]
    for a, r in zip(got, want):
        torch.testing.assert_close(a.float(), r.float(), rtol=2e-2, atol=2e-2)


def test_film_module_and_scale_shift_agree():
    film = FiLM(5, 6)
    with torch.no_grad():
        film.proj.weight.normal_()
        film.proj.bias.normal_()
    x, w, _, _ = _norm_inputs(2, torch.float32, False)
    cond = torch.randn(2, 5)
    y = compat.channel_rms_norm_torch(x, w, 1e-6, *film.scale_shift(cond))
    assert torch.equal(y, film(compat.channel_rms_norm_torch(x, w, 1e-6), cond))


# ----------------------------------------------------------------------------- GELU then 1x1
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("ndim", [1, 2, 3, 4])
def test_gelu_input_equals_the_composition_bit_for_bit(ndim, groups, dtype):
    torch.manual_seed(ndim)
    conv = PeriodicConv(6, 4, 1, ndim, groups=groups).to(dtype)
    x = torch.randn(FIELDS[ndim], dtype=dtype, requires_grad=True)
    y, ref = conv(x, gelu_input=True), conv(F.gelu(x))
    assert torch.equal(y, ref)
    dy = torch.randn_like(y)
    leaves = (x, conv.weight, conv.bias)
    for got, want in zip(torch.autograd.grad(y, leaves, dy), torch.autograd.grad(ref, leaves, dy)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("ndim", [1, 3, 4])
def test_gelu_input_gradcheck_and_no_bias(ndim):
    torch.manual_seed(0)
    for bias in (True, False):
        conv = PeriodicConv(6, 4, 1, ndim, bias=bias).double()
        x = torch.randn(FIELDS[ndim], dtype=torch.float64, requires_grad=True)
        params = (conv.weight,) + ((conv.bias,) if bias else ())
        assert torch.autograd.gradcheck(lambda x, *p: conv(x, gelu_input=True), (x, *params))


def test_gelu_input_keeps_its_input_only_and_refuses_wider_kernels():
    conv = PeriodicConv(8, 16, 1, 2)
    x = torch.randn(2, 8, 12, 10, requires_grad=True)
    field = x.numel() * x.element_size()
    assert saved_bytes(lambda t: conv(t, gelu_input=True), x, parameters=tuple(conv.parameters())) == field
    assert saved_bytes(lambda t: conv(F.gelu(t)), x, parameters=tuple(conv.parameters())) == 2 * field
    with pytest.raises(ValueError, match="pointwise"):
        PeriodicConv(8, 8, 3, 2)(x, gelu_input=True)


@pytest.mark.parametrize("ndim", [2, 4])
def test_gelu_input_under_cpu_bf16_autocast_follows_the_composition(ndim):
    """Under autocast the convolution runs in bf16 (the 4-D one before its fp32 bias add):
    the same forward as the composition, gradients in each input's dtype to bf16 precision."""
    torch.manual_seed(1)
    conv = PeriodicConv(6, 4, 1, ndim)
    x = torch.randn(FIELDS[ndim], requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ref = conv(x, gelu_input=True), conv(F.gelu(x))
    assert y.dtype == ref.dtype and torch.equal(y, ref)
    dy = torch.randn(y.shape, dtype=y.dtype)
    leaves = (x, conv.weight, conv.bias)
    got, want = torch.autograd.grad(y, leaves, dy), torch.autograd.grad(ref, leaves, dy)
    assert [g.dtype for g in got] == [t.dtype for t in leaves]
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r, rtol=2e-2, atol=2e-2)


def test_gelu_input_runs_the_modules_hooks():
    """Through ``__call__``: ZeRO-3 gathers a module's weight in its forward pre-hook."""
    conv, calls = PeriodicConv(8, 16, 1, 2), []
    conv.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(kwargs), with_kwargs=True)
    conv(torch.randn(1, 8, 4, 4), gelu_input=True)
    assert calls == [{"gelu_input": True}]


# ----------------------------------------------------------------------------- rfftn
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,dims", [((2, 3, 8), (2,)), ((2, 3, 6, 9), (2, 3)), ((2, 3, 5, 4, 7), (2, 3, 4)),
                                        ((2, 3, 5, 4, 7), (4, 2)), ((2, 3, 6, 8), (2,))])
def test_rfftn_equals_torch_bit_for_bit(shape, dims, dtype):
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    y, ref = rfftn(x, dims), torch.fft.rfftn(x, dim=dims)
    assert torch.equal(y, ref)
    g = torch.randn_like(y)
    assert torch.equal(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0])


@pytest.mark.parametrize("shape,dims", [((2, 3, 7), (2,)), ((1, 2, 6, 5), (2, 3)), ((1, 2, 4, 3, 6), (4, 2))])
def test_rfftn_gradcheck_and_keeps_no_input(shape, dims):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: torch.view_as_real(rfftn(t, dims)), (x,))
    assert saved_bytes(rfftn, x, dims) == 0
    assert saved_bytes(lambda t: torch.fft.rfftn(t, dim=dims), x) >= x.numel() * x.element_size()  # torch's own


# ----------------------------------------------------------------------------- a whole block
@pytest.mark.parametrize("ndim,kernel,mlp_ratio", [(2, (1, 7), 2), (3, 3, 2), (1, 5, 4)])
def test_field_block_stores_about_four_plus_mlp_ratio_fields(ndim, kernel, mlp_ratio):
    """Per block autograd keeps: the block input h and the mid-block h (the norms' inputs), the
    local convolution's padded input, the GELU inputs (1 + mlp_ratio fields) and the MLP's
    input: 4 + mlp_ratio fields and the halo margin. Composed, the norms, FiLMs, GELU outputs
    and the spectral layer's FFT input added about as many again. Counted as the growth from a
    field to one twice as long, so the spectral weights (the same at every size) drop out."""
    torch.manual_seed(0)
    width, shape = 16, {1: (64,), 2: (16, 24), 3: (8, 8, 12)}[ndim]
    block = FieldBlock(width, kernel, 3, ndim, cond_dim=8, mlp_ratio=mlp_ratio)
    cond = torch.randn(1, 8)
    k = (kernel,) * ndim if isinstance(kernel, int) else kernel
    kept, fields, padded = [], [], []
    for scale in (1, 2):
        s = (shape[0] * scale,) + shape[1:]
        h = torch.randn(1, width, *s, requires_grad=True)
        kept.append(saved_bytes(block, h, cond, parameters=tuple(block.parameters())))
        fields.append(h.numel() * h.element_size())
        pad = 1.0
        for n, kk in zip(s, k):
            pad *= n + kk - 1
        padded.append(pad * width * h.element_size())
    per_field = (kept[1] - kept[0]) / (fields[1] - fields[0])
    budget = 4 + mlp_ratio + (padded[1] - padded[0]) / (fields[1] - fields[0])
    assert per_field <= budget + 1e-9, (per_field, budget)
