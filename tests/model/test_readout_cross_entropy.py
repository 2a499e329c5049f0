"""The text readout's chunked cross-entropy (``TextField.cross_entropy``): the same numbers as the
plain ``F.cross_entropy(TextField.logits(...))`` (forward bit for bit, gradients to float
rounding), for any field size against the chunk, with pad-masked tokens in the loss, and with
autograd keeping no V-wide tensor of the full field (the reason it is chunked)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sgfm_dist.model import fields
from sgfm_dist.model.config import DiffusionConfig, ModelConfig
from sgfm_dist.model.fields import TextField
from sgfm_dist.model.sgfm import build_model


def _field(vocab: int = 257, channels: int = 16, dtype=torch.float32) -> TextField:
    torch.manual_seed(0)
    f = TextField(vocab, channels, pad_id=vocab - 1).to(dtype)
    with torch.no_grad():  # a non-trivial scale MLP and bias (both start constant)
        f.log_scale[2].weight.normal_(0, 0.5)
        f.bias.normal_()
    return f


def _inputs(f: TextField, b: int, t: int, n: int, dtype=torch.float32, contiguous: bool = True):
    g = torch.Generator().manual_seed(1)
    if contiguous:
        u = torch.randn(b, f.channels, t, n, generator=g, dtype=dtype)  # [B, C, T, L]
    else:  # the network's output may be a permuted view
        u = torch.randn(b, t, n, f.channels, generator=g, dtype=dtype).movedim(-1, 1)  # [B, C, T, L]
    logsnr = torch.randn(b, generator=g, dtype=dtype) * 5  # [B]
    tokens = torch.randint(0, f.vocab_size, (b, t, n), generator=g)  # [B, T, L]
    return u.requires_grad_(), logsnr, tokens


def _reference(f: TextField, u, logsnr, tokens):
    """The unchunked form the readout loss used before: every logit kept for backward."""
    logits = f.logits(u, logsnr)  # [B, T, L, V]
    return F.cross_entropy(logits.flatten(0, -2), tokens.reshape(-1), reduction="none").view_as(tokens)


def _grads(f: TextField, u, ce, weight):
    return torch.autograd.grad((ce * weight).sum(), [u, *f.parameters()])


# (B, T, L): T a multiple of the chunk's rows (4 chunks of 4096 cells), not a multiple (50 + 51
# rows; 300 rows as 5 x 60), one chunk, and a row (B x L) longer than a chunk (runs of L)
EXACT = [(1, 256, 64), (2, 101, 24), (4, 300, 16), (1, 3, 5), (3, 7, 3000)]


@pytest.mark.parametrize("b,t,n", EXACT)
@pytest.mark.parametrize("contiguous", [True, False])
def test_chunked_equals_unchunked(b, t, n, contiguous):
    f = _field()
    u, logsnr, tokens = _inputs(f, b, t, n, contiguous=contiguous)
    ref = _reference(f, u, logsnr, tokens)
    ce = f.cross_entropy(u, logsnr, tokens)
    assert ce.shape == tokens.shape and torch.equal(ce, ref)  # forward: bit for bit
    _assert_same_grads(f, u, ce, ref)
    with torch.no_grad():
        assert torch.equal(f.cross_entropy(u, logsnr, tokens), ref)


def test_chunked_equals_unchunked_under_bf16_autocast():
    """The checkpointed chunks recompute under the forward's autocast (bf16 GEMM, fp32 softmax)."""
    f = _field()
    u, logsnr, tokens = _inputs(f, 2, 101, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _reference(f, u, logsnr, tokens)
        ce = f.cross_entropy(u, logsnr, tokens)
    assert ce.dtype == ref.dtype == torch.float32 and torch.equal(ce, ref)
    weight = torch.rand(ce.shape, generator=torch.Generator().manual_seed(2))  # [B, T, L]
    for got, want in zip(_grads(f, u, ce, weight), _grads(f, u, ref, weight)):
        assert (got - want).abs().max() <= 1e-2 * want.abs().max()  # bf16 products, summed by chunk


# (B, T, L, chunk cells, least positions): tiny chunks, so every way of cutting shows on a small
# field: T not a multiple of the rows, T shorter than a chunk, runs of L, one position per chunk
TINY = [(2, 37, 5, 30, 1), (3, 7, 11, 8, 1), (3, 7, 11, 2048, 1), (2, 5, 3, 1, 1), (1, 1, 1, 4096, 1)]


@pytest.mark.parametrize("b,t,n,cells,least", TINY)
def test_tiny_chunks_equal_unchunked(monkeypatch, b, t, n, cells, least):
    """Values to float rounding only: MKL may round a GEMM of a few rows differently from the same
    rows inside a larger one (why ``READOUT_MIN_POSITIONS`` keeps real chunks long)."""
    monkeypatch.setattr(fields, "READOUT_CHUNK_CELLS", cells)
    monkeypatch.setattr(fields, "READOUT_MIN_POSITIONS", least)
    f = _field()
    u, logsnr, tokens = _inputs(f, b, t, n)
    ref = _reference(f, u, logsnr, tokens)
    ce = f.cross_entropy(u, logsnr, tokens)
    torch.testing.assert_close(ce, ref, rtol=1e-6, atol=1e-6)
    _assert_same_grads(f, u, ce, ref)


def _assert_same_grads(f: TextField, u, ce, ref):
    weight = torch.rand(ce.shape, generator=torch.Generator().manual_seed(2))  # [B, T, L]
    for got, want in zip(_grads(f, u, ce, weight), _grads(f, u, ref, weight)):
        # u's gradient is per position; the shared vectors / scale / bias are sums over the
        # positions, in chunks: float rounding of the sum, relative to the gradient's size
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("cells", [2, 4, 1000])
def test_gradcheck_float64(monkeypatch, cells):
    """cells 2: one position per sample, so rows of L are cut into runs; 4: one row of T per
    chunk; 1000: one chunk."""
    monkeypatch.setattr(fields, "READOUT_CHUNK_CELLS", cells)
    monkeypatch.setattr(fields, "READOUT_MIN_POSITIONS", 1)
    f = _field(vocab=7, channels=3, dtype=torch.float64)
    u, logsnr, tokens = _inputs(f, 2, 3, 2, dtype=torch.float64)
    # gradcheck perturbs its inputs in place, the parameters among them: the function reads them from f
    assert torch.autograd.gradcheck(lambda u, *params: f.cross_entropy(u, logsnr, tokens), (u, *f.parameters()))


def test_pad_masked_readout_loss_equals_the_unchunked_one():
    """The text readout term through the model (two chunks of 40 rows): pads (and a given
    pad_mask) count nothing, and their positions get no gradient."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(modality="text", channels=4, width=8, n_blocks=1, forcing_width=4,
                                    forcing_blocks=1, cond_dim=16, fourier_features=4, wavelet="haar", levels=1),
                        DiffusionConfig(lambda_R=0.0, lambda_B=0.0))
    pad = model.cfg.pad_id
    g = torch.Generator().manual_seed(3)
    b, t, n = 2, 80, 32
    tokens = torch.randint(0, pad, (b, t, n), generator=g)  # [B, T, L]
    tokens[0, 70, 5:] = pad
    tokens[1, 20:, :] = pad
    u_hat = torch.randn(b, 4, t, n, generator=g).requires_grad_()  # [B, C, T, L]
    logsnr = torch.randn(b, generator=g) * 5  # [B]
    mask = (tokens != pad).float()  # [B, T, L]
    # the readout term as it was computed unchunked: per-sample sums, then their ratio
    want = (_reference(model.text, u_hat, logsnr, tokens) * mask).sum(dim=(1, 2)).sum() / mask.sum(dim=(1, 2)).sum()
    (du_want,) = torch.autograd.grad(want, u_hat)
    for batch in ({"tokens": tokens}, {"tokens": tokens, "pad_mask": tokens != pad}):
        got = model.modality.readout_loss(model, u_hat, batch, logsnr)
        assert torch.equal(got, want)
        (du,) = torch.autograd.grad(got, u_hat)
        pads = du.movedim(1, -1)[mask == 0]  # [pads, C]
        assert du.abs().sum() > 0 and pads.numel() and torch.equal(pads, torch.zeros_like(pads))
        assert torch.equal(du, du_want)  # per position: the same numbers


def _saved_for_backward(fn, *inputs) -> dict[int, int]:
    """Bytes of the storages autograd keeps for backward while ``fn()`` runs (by storage, so a
    view counts once), other than the ``inputs``' own; a checkpointed region's own hook takes the
    tensors its operators save, so what is counted is what outlives the forward."""
    own = {x.untyped_storage().data_ptr() for x in inputs}
    kept = {}

    def pack(x):
        if x.untyped_storage().data_ptr() not in own:
            kept[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()
    return kept


def test_autograd_keeps_no_full_v_wide_tensor():
    f = _field()
    b, t, n = 1, 256, 64  # 16384 cells: 4 chunks of 4096
    u, logsnr, tokens = _inputs(f, b, t, n)
    v_wide = b * t * n * f.vocab_size * 4  # bytes of one [B, T, L, V] float32 tensor
    plain = _saved_for_backward(lambda: _reference(f, u, logsnr, tokens), u, tokens)
    chunked = _saved_for_backward(lambda: f.cross_entropy(u, logsnr, tokens), u, tokens)
    # the plain form keeps the logits and their log-softmax
    assert sum(x >= v_wide for x in plain.values()) == 2
    # chunked: views of u and tokens, the [V, C] vectors, the [V] bias, the scale and its MLP's
    assert max(chunked.values()) <= f.vocab_size * f.channels * 4, chunked
    assert sum(chunked.values()) * 100 < sum(plain.values()), (sum(chunked.values()), sum(plain.values()))
