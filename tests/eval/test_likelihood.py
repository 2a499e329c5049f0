"""The likelihood evaluation (``sgfm_dist.eval.likelihood``) against known answers.

* Gaussian data with the exact eps-predictor: the diffusion term's Monte-Carlo estimate equals
  its closed form ``1/2 [softplus(l_max + log s^2) - softplus(l_min + log s^2)]`` per coefficient
  (with per-level shifts that clip levels at different b), the whole bound equals the true
  negative log-density ``1/2 log(2 pi e s^2)`` up to the endpoint gaps, and the MC error
  shrinks like ``1 / sqrt(n_levels)``.
* A discrete i.i.d. source of known entropy, embedded and wavelet-transformed as the SGFM does,
  with the exact (Bayes) denoiser: the bound is the entropy (it is >= it, and tight).
* Sample entropy on hand-made strings; a repetitive sample shows.
* The SGFM and transformer paths run end to end on tiny models.
"""
from __future__ import annotations

import math

import pytest
import torch

from sgfm_dist.eval.likelihood import (compact_bytes, diffusion_draws, full_windows, gaussian_decoder_nll,
                                       generative_perplexity, prior_kl, sample_entropy, sgfm_elbo, summarize_bound,
                                       transformer_bits)
from sgfm_dist.model import diffusion as D

LMIN, LMAX = -10.0, 12.0


def softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _gaussian_case(var: float, n_levels: int, windows: int = 64, seed: int = 0, stratified: bool = True,
                   data_seed: int | None = None):
    g = torch.Generator().manual_seed(seed)
    C, N = 2, 48
    gd = g if data_seed is None else torch.Generator().manual_seed(data_seed)
    c0 = math.sqrt(var) * torch.randn(windows, C, N, generator=gd, dtype=torch.float64)
    sidx = torch.arange(N) % 3  # three levels, interleaved
    shifts = torch.tensor([2.0, 1.0, 0.0])  # they clip at different b

    def denoise(z, alpha, logsnr):
        return {"exact": D.gaussian_eps_predictor(z, alpha, var)}

    def noise():
        return torch.randn(c0.shape, generator=g, dtype=torch.float64)

    diff = diffusion_draws(c0, sidx, shifts, LMIN, LMAX, denoise, noise, n_levels, g, stratified)["exact"]  # [W, K]
    a = 1 / (1 + math.exp(-LMAX))
    z0 = math.sqrt(a) * c0 + math.sqrt(1 - a) * noise()
    # the continuous decoder N(c0; z / sqrt(a), (1 - a) / a)
    dec_var = (1 - a) / a
    decoder = 0.5 * math.log(2 * math.pi * dec_var) + 0.5 * (c0 - z0 / math.sqrt(a)).square() / dec_var
    decoder = decoder.flatten(1).sum(1)
    return c0, diff, prior_kl(c0, LMIN), decoder, C * N


@pytest.mark.parametrize("var", [0.3, 1.0, 4.0])
def test_gaussian_bound_equals_closed_form(var):
    c0, diff, prior, decoder, n = _gaussian_case(var, n_levels=16)
    s = summarize_bound(prior, diff, decoder, torch.full_like(prior, float(n)))
    per_coeff_nats = s["bits_per_byte"] * math.log(2)  # "bytes" are coefficients here
    se = s["window_stderr"] * math.log(2)
    diff_closed = 0.5 * (softplus(LMAX + math.log(var)) - softplus(LMIN + math.log(var)))
    diff_mc = float(diff.mean()) / n
    diff_se = float(diff.mean(1).std() / math.sqrt(diff.shape[0])) / n
    assert abs(diff_mc - diff_closed) < 4 * diff_se, (diff_mc, diff_closed, diff_se)
    a_lo, a_hi = 1 / (1 + math.exp(-LMIN)), 1 / (1 + math.exp(-LMAX))
    closed = (0.5 * (a_lo * var - a_lo - math.log(1 - a_lo)) + diff_closed
              + 0.5 * math.log(2 * math.pi * math.e * (1 - a_hi) / a_hi))
    true_nll = 0.5 * math.log(2 * math.pi * math.e * var)
    assert abs(closed - true_nll) < 2e-3  # the bound is tight up to the endpoints
    assert abs(per_coeff_nats - true_nll) < 4 * se + 2e-3, (per_coeff_nats, true_nll, se)


def test_mc_error_shrinks_like_one_over_sqrt_levels():
    """i.i.d. draws: the error estimate falls as 1 / sqrt(K); stratified draws: faster, and below."""
    errs = {}
    for stratified in (False, True):
        for k in (4, 64):
            c0, diff, prior, decoder, n = _gaussian_case(1.0, n_levels=k, windows=16, seed=3, stratified=stratified)
            errs[stratified, k] = summarize_bound(prior, diff, decoder, torch.full_like(prior, float(n)),
                                                  stratified)["mc_stderr"]
    ratio = errs[False, 4] / errs[False, 64]
    assert 2.5 < ratio < 6.5, (errs, ratio)  # sqrt(16) = 4
    assert errs[True, 4] / errs[True, 64] > 2.5
    assert errs[True, 64] < errs[False, 64]


@pytest.mark.parametrize("stratified", [True, False])
def test_mc_error_estimate_is_calibrated(stratified):
    """The reported MC error of one run matches the spread of the estimate over independent
    runs on the same data."""
    est, reported = [], []
    for seed in range(24):
        c0, diff, prior, decoder, n = _gaussian_case(1.0, n_levels=8, windows=4, seed=100 + seed,
                                                     stratified=stratified, data_seed=7)
        est.append(float(diff.mean(1).sum()) / diff.shape[0])  # nats per "byte" (n_bytes 1 per window)
        reported.append(float(summarize_bound(prior, diff, decoder, torch.ones_like(prior),
                                              stratified)["mc_stderr"]) * math.log(2))
    spread = float(torch.tensor(est).std())
    mean_reported = sum(reported) / len(reported)
    assert 0.6 < mean_reported / spread < 1.6, (mean_reported, spread)


def _discrete_case(n_levels: int, seed: int = 0):
    """I.i.d. symbols with p = (1/2, 1/4, 1/8, 1/8) (H = 1.75 bits), embedded (norm sqrt(C)) and
    seen through an orthonormal db2 DWT, denoised by the exact per-position posterior."""
    from sgfm_dist.ops.wavelets import coeff_layout, dwt, flatten_coeffs, idwt, unflatten_coeffs

    g = torch.Generator().manual_seed(seed)
    p = torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64)
    C, T, L, W = 4, 16, 16, 24
    e = torch.randn(4, C, generator=g, dtype=torch.float64)
    e = e * math.sqrt(C) / e.norm(dim=1, keepdim=True)
    x = torch.multinomial(p, W * T * L, replacement=True, generator=g).reshape(W, T, L)
    u0 = e[x].movedim(-1, 1)  # [W, C, T, L]
    layout = coeff_layout((T, L), 2, "db2")
    to_c = lambda u: flatten_coeffs(dwt(u, "db2", 2))  # noqa: E731
    to_u = lambda c: idwt(unflatten_coeffs(c, layout))  # noqa: E731
    c0 = to_c(u0)
    sidx = layout.scale_index(torch.device("cpu"))

    def denoise(z, alpha, logsnr):
        a = alpha[:, 0, 0].reshape(-1, 1, 1, 1)  # one noise level per window (no shift): white per position
        u = to_u(z).movedim(1, -1)  # [W, T, L, C]
        logits = p.log() + (a.sqrt() * (u @ e.T) - 0.5 * a * (e * e).sum(1)) / (1 - a)
        mean = torch.softmax(logits, -1) @ e  # E[e_x | z] [W, T, L, C]
        c0_hat = to_c(mean.movedim(-1, 1))
        return {"bayes": (z - alpha.sqrt() * c0_hat) / (1 - alpha).sqrt()}

    def noise():
        return torch.randn(c0.shape, generator=g, dtype=torch.float64)

    diff = diffusion_draws(c0, sidx, torch.zeros(3), LMIN, LMAX, denoise, noise, n_levels, g)["bayes"]  # stratified
    a = 1 / (1 + math.exp(-LMAX))
    recon = gaussian_decoder_nll(to_u(math.sqrt(a) * c0 + math.sqrt(1 - a) * noise()), x, e, a)
    nll_bits = float(-p.log2()[x].mean())  # -log2 p(x) per symbol of these very symbols (H = 1.75 on average)
    return summarize_bound(prior_kl(c0, LMIN), diff, recon, torch.full((W,), float(T * L), dtype=torch.float64)), \
        nll_bits


def test_discrete_source_bound_is_its_entropy():
    """With the exact denoiser the bound is -log p(x) of every window (the model's reverse
    process is the forward one), up to the endpoint gaps: within the MC error of the data's own
    -log2 p(x), and never significantly below it."""
    s, nll = _discrete_case(n_levels=32)
    err = s["mc_stderr"]
    assert abs(nll - 1.75) < 0.05 and err < 0.05, (s, nll)
    assert s["bits_per_byte"] > nll - 3 * err, (s, nll)
    assert abs(s["bits_per_byte"] - nll) < 4 * err, (s, nll)
    assert s["reconstruction_bits"] < 1e-3 and s["prior_bits"] < 1e-3


def test_sample_entropy_of_hand_made_strings():
    rep = sample_entropy(["aaaaaaaa"])
    assert rep["unigram_bits"] == 0 and rep["bigram_bits"] == 0 and rep["conditional_bigram_bits"] == 0
    ab = sample_entropy(["abababababab"])
    assert ab["unigram_bits"] == pytest.approx(1.0)
    assert ab["bigram_bits"] == pytest.approx(1.0, abs=0.01)  # pairs ab / ba, nearly equal counts
    assert ab["conditional_bigram_bits"] == pytest.approx(0.0, abs=0.01)
    abcd = sample_entropy([b"abcd" * 50])
    assert abcd["unigram_bits"] == pytest.approx(2.0) and abcd["conditional_bigram_bits"] == pytest.approx(0, abs=1e-2)
    # pairs are counted within a sample only
    assert sample_entropy(["ab", "ba"])["bigram_bits"] == pytest.approx(1.0)
    # ids: pads (256) dropped
    assert sample_entropy([torch.tensor([97, 256, 97, 256])])["unigram_bits"] == 0


def test_a_repetitive_sampler_shows():
    prose = ("Entropy measures how unpredictable the next byte is. A sampler that keeps repeating one "
             "likely phrase can look fluent line by line, and a language model may even score it well, "
             "but its byte statistics give it away: few distinct pairs, and each byte fixes the next.")
    repetitive = "the model of the " * 20
    good, bad = sample_entropy([prose]), sample_entropy([repetitive[:len(prose)]])
    assert bad["unigram_bits"] < good["unigram_bits"] - 1.0
    assert bad["conditional_bigram_bits"] < 0.5 * good["conditional_bigram_bits"]


def test_full_windows_and_compaction():
    t = torch.randint(0, 256, (4, 2, 4))
    t[1, -1, -1] = 256
    t[3, 0, 0] = 256
    w = full_windows([{"tokens": t, "pad_mask": t != 256}], 256)
    assert torch.equal(w, t[[0, 2]])
    ids = torch.tensor([[[65, 256, 66, 300]]])
    tokens, mask = compact_bytes(ids, 256)
    assert tokens.tolist() == [[[65, 66, 256, 256]]] and mask.tolist() == [[[True, True, False, False]]]


def _tiny_transformer():
    from sgfm_dist.model.config import DiffusionConfig, ModelConfig
    from sgfm_dist.model.sgfm import build_model

    torch.manual_seed(0)
    return build_model(ModelConfig(kind="transformer", tf_layers=1, tf_width=32, tf_heads=1, wavelet="haar",
                                   levels=1), DiffusionConfig()).eval()


def test_transformer_bits_is_the_training_loss():
    m = _tiny_transformer()
    t = torch.randint(0, 256, (3, 2, 8))
    t[2, 1, 4:] = 256
    r = transformer_bits(m, t, t != 256, batch_size=2)
    with torch.no_grad():
        loss = float(m.training_loss({"tokens": t, "pad_mask": t != 256})[0])
    assert r["bits_per_byte"] == pytest.approx(loss / math.log(2), rel=1e-6)
    assert r["bytes"] == int((t != 256).sum())
    g = generative_perplexity(m, t, 256)
    assert g["perplexity"] == pytest.approx(2 ** g["bits_per_byte"])


@pytest.mark.slow
def test_sgfm_bound_end_to_end():
    from sgfm_dist.model.config import DiffusionConfig, ModelConfig
    from sgfm_dist.model.sgfm import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(channels=4, width=8, n_blocks=1, mlp_ratio=1, forcing_width=4, forcing_blocks=1,
                      wavelet="haar", levels=2, kernel_size=3, spectral_modes=(2, 4), fourier_features=4, cond_dim=8)
    model = build_model(cfg, DiffusionConfig(level_shift=2.0, logsnr_shift=-1.0)).eval()
    windows = torch.randint(0, 256, (3, 8, 16))
    r = sgfm_elbo(model, windows, n_levels=4, batch_size=2)
    assert r["headline"] == "rounded+gaussian" and r["windows"] == 3 and r["bytes"] == 3 * 128
    assert r["n_levels"] == 4 and 0 < r["mc_stderr"] < r["bits_per_byte"]
    for v in r["variants"].values():
        assert math.isfinite(v["bits_per_byte"]) and v["bits_per_byte"] > 0
    # an untrained model is no better than a uniform byte (8 bits) distribution
    assert r["bits_per_byte"] > 8
    same = sgfm_elbo(model, windows, n_levels=4, batch_size=2)
    assert same["bits_per_byte"] == r["bits_per_byte"]  # seeded
    with pytest.raises(ValueError, match="pads"):
        sgfm_elbo(model, torch.full((1, 8, 16), 256), n_levels=2)
    cascade = build_model(cfg, DiffusionConfig(mode="cascade"))
    with pytest.raises(ValueError, match="joint"):
        sgfm_elbo(cascade, windows, n_levels=2)


@pytest.mark.slow
def test_text_likelihood_with_a_baseline_and_the_baseline_evaluation():
    from sgfm_dist.eval.evaluate import evaluate_model
    from sgfm_dist.eval.likelihood import format_likelihood, text_likelihood
    from sgfm_dist.eval.text_metrics import format_baseline_summary
    from sgfm_dist.model.config import DiffusionConfig, ModelConfig
    from sgfm_dist.model.sgfm import build_model
    from sgfm_dist.train.config import Config, DataConfig, EvalConfig, TrainConfig

    torch.manual_seed(0)
    sgfm = build_model(ModelConfig(channels=4, width=8, n_blocks=1, mlp_ratio=1, forcing_blocks=0, wavelet="haar",
                                   levels=1, kernel_size=3, spectral_modes=(2, 2), fourier_features=4, cond_dim=8),
                       DiffusionConfig()).eval()
    tf = _tiny_transformer()
    t = torch.randint(0, 256, (3, 4, 8))
    t[2, -1, -2:] = 256  # one window with pads: not in the bound
    samples = torch.randint(0, 257, (2, 4, 8))
    r = text_likelihood(sgfm, [{"tokens": t, "pad_mask": t != 256}], samples, pad_id=256, n_levels=2, baseline=tf,
                        unigram_ids=torch.randint(0, 256, (2, 4, 8)), reference_ids=[t[t != 256]], log=lambda *a: None)
    assert r["sgfm_elbo"]["windows"] == 2 and r["transformer_bits_per_byte"]["windows"] == 2
    assert set(r["entropy"]) == {"sgfm", "heldout", "unigram"}
    assert set(r["generative_perplexity"]) == {"sgfm", "unigram"}
    assert "SGFM variational bound" in format_likelihood(r)
    # no full window: the bound is skipped with its reason, the rest stands
    r = text_likelihood(sgfm, [{"tokens": t[2:], "pad_mask": t[2:] != 256}], samples, pad_id=256, n_levels=2,
                        log=lambda *a: None)
    assert "padding" in r["sgfm_elbo"]["skipped"] and "skipped" in format_likelihood(r)
    # the baseline's own evaluation (what launch/evaluate.py runs on a transformer run)
    cfg = Config(model=tf.cfg, data=DataConfig(rows=2, row_len=16),
                 train=TrainConfig(micro_batch=2, device="cpu"),
                 eval=EvalConfig(val_batches=1, metric_samples=2, prior_bytes=5000))
    s = evaluate_model(tf, cfg, "cpu", log=lambda *a: None)
    assert s["kind"] == "transformer" and s["modality"] == "text" and 0 < s["heldout_bits_per_byte"]["bits_per_byte"]
    assert "exact bits per byte" in format_baseline_summary(s)
