"""Evaluation metrics: the context-free Bayes denoiser and its bisection against brute force,
corpus statistics, sample-quality fractions."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sgfm_dist.eval.text_metrics import (alpha_for_bayes_ce, bayes_denoiser_ce, bisect_logsnr, corpus_statistics,
                                         in_vocabulary_fraction, printable_fraction, sigmoid, unigram_samples)


def brute_force_ce(targets, emb, prior, alpha, noise) -> float:
    """Independent reference: full Gaussian densities N(z; sqrt(a) e_b, (1-a) I) for every
    (position, byte) pair in numpy, normalised explicitly over the bytes."""
    t, e, p, eps = targets.numpy(), emb.numpy(), prior.numpy(), noise.numpy()
    C = e.shape[1]
    z = math.sqrt(alpha) * e[t] + math.sqrt(1 - alpha) * eps  # [N, C]
    sq = ((z[:, None, :] - math.sqrt(alpha) * e[None, :, :]) ** 2).sum(-1)  # [N, V]
    logdens = np.log(p)[None] - sq / (2 * (1 - alpha)) - 0.5 * C * math.log(2 * math.pi * (1 - alpha))
    m = logdens.max(1, keepdims=True)
    log_norm = (m + np.log(np.exp(logdens - m).sum(1, keepdims=True)))[:, 0]
    return float(-(logdens[np.arange(len(t)), t] - log_norm).mean())


@pytest.fixture(scope="module")
def toy():
    g = torch.Generator().manual_seed(0)
    V, C, N = 5, 3, 400
    emb = torch.randn(V, C, generator=g, dtype=torch.float64) * 1.5
    prior = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05], dtype=torch.float64)
    targets = torch.multinomial(prior, N, replacement=True, generator=g)
    noise = torch.randn(N, C, generator=g, dtype=torch.float64)
    return targets, emb, prior, noise


@pytest.mark.parametrize("alpha", [0.01, 0.2, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("chunk", [7, 16384])
def test_bayes_ce_matches_brute_force(toy, alpha, chunk):
    targets, emb, prior, noise = toy
    got = bayes_denoiser_ce(targets, emb, prior.log(), alpha, noise, chunk=chunk)
    assert got == pytest.approx(brute_force_ce(targets, emb, prior, alpha, noise), rel=1e-10, abs=1e-12)


@pytest.fixture(scope="module")
def dense_scan(toy):
    """Brute force CE on a dense log-SNR grid (step 0.02), computed once."""
    targets, emb, prior, noise = toy
    grid = np.linspace(-8, 8, 801)
    return grid, np.array([brute_force_ce(targets, emb, prior, sigmoid(x), noise) for x in grid])


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
def test_bisection_matches_dense_scan(toy, dense_scan, fraction):
    targets, emb, prior, noise = toy
    grid, ces = dense_scan
    H = float(-(prior * prior.log()).sum())  # nats
    target = fraction * H
    alpha = alpha_for_bayes_ce(targets, emb, prior, target, noise)
    # brute force: scan a dense log-SNR grid with the reference CE, find the crossing
    k = int(np.argmax(ces < target))
    assert k > 0 and ces[k - 1] >= target > ces[k]
    lo, hi = sigmoid(grid[k - 1]), sigmoid(grid[k])
    assert lo <= alpha <= hi
    # and at the found alpha the CE is the target
    assert bayes_denoiser_ce(targets, emb, prior.log(), alpha, noise) == pytest.approx(target, abs=1e-6)


def test_bisection_rejects_unbracketed_target():
    with pytest.raises(ValueError, match="not bracketed"):
        bisect_logsnr(lambda x: 1.0 / (1.0 + math.exp(x)), target=2.0)


def test_bayes_ce_bad_input(toy):
    targets, emb, prior, noise = toy
    with pytest.raises(ValueError, match="alpha_bar"):
        bayes_denoiser_ce(targets, emb, prior.log(), 1.0, noise)
    with pytest.raises(ValueError, match="noise: expected shape"):
        bayes_denoiser_ce(targets, emb, prior.log(), 0.5, noise[:3])


def _batch(texts, T=2, L=8, pad=256):
    tok = torch.full((len(texts), T, L), pad, dtype=torch.long)
    for i, s in enumerate(texts):
        ids = torch.tensor(list(s.encode()), dtype=torch.long)[: T * L]
        tok[i].view(-1)[: ids.numel()] = ids
    return {"tokens": tok, "pad_mask": tok != pad}


def test_corpus_statistics_counts_vocab_and_prior():
    batches = [_batch(["the cat sat", "a dog"]), _batch(["the end"])]
    st = corpus_statistics(iter(batches), max_bytes=10_000, pad_id=256)
    text = "the cat sat" + "a dog" + "the end"
    assert st.n_bytes == len(text)
    assert st.counts[ord("t")] == text.count("t") and st.counts.sum() == len(text)
    assert st.vocabulary == {"the", "cat", "sat", "a", "dog", "end"}
    assert st.prior.sum().item() == pytest.approx(1.0) and bool((st.prior > 0).all())
    assert 0 < st.entropy_bits < 8
    with pytest.raises(ValueError, match="no real"):
        corpus_statistics(iter([_batch([""])]), 100, pad_id=256)


def test_sample_fractions():
    ids = torch.tensor([[72, 105, 32, 0, 7, 256]])  # "Hi " + two control bytes + pad
    assert printable_fraction(ids, pad_id=256) == pytest.approx(3 / 5)
    assert in_vocabulary_fraction(["the cat", "zzq the"], frozenset({"the", "cat"})) == pytest.approx(3 / 4)
    assert in_vocabulary_fraction(["   "], frozenset({"a"})) == 0.0


def test_unigram_samples_follow_prior():
    prior = torch.zeros(256, dtype=torch.float64)
    prior[[97, 98]] = torch.tensor([0.75, 0.25], dtype=torch.float64)
    s = unigram_samples(prior, 4, (16, 64), torch.Generator().manual_seed(0))
    assert s.shape == (4, 16, 64)
    assert set(s.unique().tolist()) == {97, 98}
    assert (s == 97).float().mean().item() == pytest.approx(0.75, abs=0.03)
