"""The generation wrappers one by one: the cascade estimate every call site shares, the stage
blocks, the denoiser (with and without rounding to the vocabulary), the prompt constraint and
the guidance energy, the L_BC guidance of the denoiser; and that training, evaluation and sampling
all go through the one cascade estimate."""
from __future__ import annotations

import pytest
import torch

from sgfm_dist.model import diffusion as D
from sgfm_dist.model import generation as G
from sgfm_dist.model.config import DiffusionConfig, ModelConfig
from sgfm_dist.model.sgfm import SGFM, build_model, wavelet_energy_per_level

TINY = dict(width=8, n_blocks=1, spectral_modes=2, forcing_width=4, forcing_blocks=1, wavelet="haar", levels=2,
            cond_dim=16, fourier_features=4)
SHAPE = (8, 16)


def _model(mode: str = "joint", modality: str = "text") -> SGFM:
    torch.manual_seed(0)
    channels = 4 if modality == "text" else 2
    model = build_model(ModelConfig(**{**TINY, "modality": modality, "channels": channels}),
                        DiffusionConfig(mode=mode, level_shift=1.0, lambda_R=1e-2, lambda_B=0.1)).double().eval()
    with torch.no_grad():  # non-zero outputs, so every path carries information
        model.score_net.out.weight.normal_(0, 0.1)
    return model


def _noisy(model: SGFM, B: int = 2, tau: float = 0.6):
    g = torch.Generator().manual_seed(1)
    c0 = model.to_coeffs(torch.randn(B, model.cfg.channels, *SHAPE, generator=g, dtype=torch.float64))
    c_tau_eps = model.to_coeffs(torch.randn(B, model.cfg.channels, *SHAPE, generator=g, dtype=torch.float64))
    logsnr = model.level_logsnr(torch.full((B,), tau))  # [B, J+1]
    alpha = D.per_coefficient(D.alpha_from_logsnr(logsnr), model._scale_index(SHAPE, "cpu")).double()  # [B, 1, N]
    return c0, D.q_sample(c0, alpha, c_tau_eps), alpha, logsnr, model._lambda(None, B, "cpu")


def test_cascade_estimate_teacher_forced_equals_stage_by_stage():
    """Per-sample stages (training) and one stage for all (evaluation, sampling) are the same
    estimate: stage s with the data as coarser scales, whichever way it is asked for."""
    model = _model("cascade")
    c0, c_tau, alpha, logsnr, lam = _noisy(model, B=3)
    stages = torch.tensor([2, 0, 1])
    eps_mixed, c0_mixed, target = G.cascade_estimate(model, c0, c_tau, alpha, logsnr, lam, stages, SHAPE)
    sidx = model._scale_index(SHAPE, "cpu")
    for b, s in enumerate(stages.tolist()):
        one = torch.full((3,), s)
        eps_s, c0_s, _ = G.cascade_estimate(model, c0, c_tau, alpha, logsnr, lam, one, SHAPE)
        torch.testing.assert_close(eps_mixed[b], eps_s[b], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(c0_mixed[b], c0_s[b], rtol=1e-12, atol=1e-12)
        assert torch.equal(target[b, 0], (sidx == s).double())
        # coarser scales are the given clean ones, finer ones absent
        assert torch.equal(c0_mixed[b][:, sidx < s], c0[b][:, sidx < s])
        assert torch.equal(c0_mixed[b][:, sidx > s], torch.zeros_like(c0[b][:, sidx > s]))


def test_clean_coefficients_runs_the_stages_on_their_own_estimates():
    model = _model("cascade")
    _, c_tau, alpha, logsnr, lam = _noisy(model)
    est = torch.zeros_like(c_tau)
    for s in range(model.cfg.levels + 1):
        _, est, _ = G.cascade_estimate(model, est, c_tau, alpha, logsnr, lam, torch.full((2,), s), SHAPE)
    assert torch.equal(G.clean_coefficients(model, c_tau, alpha, logsnr, lam, SHAPE), est)
    joint = _model("joint")
    want = joint.eps_network(c_tau, alpha, joint._conditions(logsnr, lam, None), SHAPE)[1]
    assert torch.equal(G.clean_coefficients(joint, c_tau, alpha, logsnr, lam, SHAPE), want)


def test_one_cascade_estimate_for_training_evaluation_and_sampling(monkeypatch):
    """Rule 13 of DESIGN.md: the coarse-to-fine estimate is one function every path calls."""
    model = _model("cascade").float()
    calls = []
    real = G.cascade_estimate

    def counting(*args, **kw):
        calls.append(kw.get("coarse", args[8] if len(args) > 8 else None) is not None)
        return real(*args, **kw)

    monkeypatch.setattr(G, "cascade_estimate", counting)
    tokens = torch.randint(0, 256, (2, *SHAPE), generator=torch.Generator().manual_seed(0))
    model.train().training_loss({"tokens": tokens}, torch.Generator().manual_seed(0))
    assert len(calls) == 1
    model.eval().denoising_cross_entropy(tokens, None, 0.5, torch.Generator().manual_seed(0))  # clean_estimate
    assert len(calls) == 1 + 3
    wavelet_energy_per_level(model, {"tokens": tokens}, [0.5])
    assert len(calls) == 4 + 3
    model.generate(1, SHAPE, 2, sampler="euler_maruyama", generator=torch.Generator().manual_seed(0))
    assert len(calls) == 7 + 3 * 2  # one call per stage and step; the sampler keeps the coarse field
    assert calls[7:] == [True] * 6


def test_stage_blocks_partition_the_coefficients():
    model = _model("cascade")
    N = model._scale_index(SHAPE, "cpu").numel()
    c = torch.randn(2, 4, N, dtype=torch.float64)
    blocks = [G.Stage.build(model, SHAPE, s, c) for s in range(model.cfg.levels + 1)]
    assert [b.select.start for b in blocks] == [0] + [b.select.stop for b in blocks[:-1]]
    assert blocks[-1].select.stop == N
    assert [b.last for b in blocks] == [False, False, True]
    for b in blocks:
        assert torch.equal(b.full(b.part(c)), c)  # the block put back where it came from
        torch.testing.assert_close(b.coarse, model.to_field(c, SHAPE))
        assert b.alpha(0.0).shape == (1, 1, 1) and float(b.alpha(0.0)) == 1.0
    joint = G.Stage.build(model, SHAPE, None, c)
    assert joint.full(c) is c and joint.part(c) is c and joint.last
    assert joint.alpha(0.5).shape == (1, 1, N)


@pytest.mark.parametrize("mode", ["joint", "cascade"])
def test_denoiser_is_the_eps_network_on_the_block(mode):
    model = _model(mode)
    _, c_tau, _, _, lam = _noisy(model)
    sidx = model._scale_index(SHAPE, "cpu")
    c = torch.randn_like(c_tau) * (sidx < 1)  # a sampler's state before stage 1: scale 0 done, the rest zero
    stage = G.Stage.build(model, SHAPE, None if mode == "joint" else 1, c)
    x, tau = stage.part(c_tau), 0.4
    eps = G.Denoiser(model, stage, SHAPE, lam)(x, tau)
    assert eps.shape == x.shape
    logsnr = model._logsnr_at(tau, 2, "cpu")
    if mode == "joint":
        want = model.eps_network(x, stage.alpha(tau), model._conditions(logsnr, lam, None), SHAPE)[0]
    else:
        want = G.cascade_estimate(model, c, stage.full(x), stage.alpha(tau), logsnr, lam, torch.full((2,), 1),
                                  SHAPE)[0][:, :, stage.select]
    torch.testing.assert_close(eps, want, rtol=1e-12, atol=1e-12)
    # rounding applies only where the whole field exists (joint, or the last cascade stage)
    rounded = G.Denoiser(model, stage, SHAPE, lam, temperature=0.7)(x, tau)
    assert torch.equal(rounded, eps) == (mode == "cascade")


@torch.no_grad()
def test_denoiser_rounding_reads_out_the_vocabulary():
    """With rounding, the denoiser's clean estimate is the readout's expected embedding."""
    model = _model("joint")
    _, c_tau, _, _, lam = _noisy(model)
    stage = G.Stage.build(model, SHAPE, None, c_tau)
    tau = 0.3
    eps = G.Denoiser(model, stage, SHAPE, lam, temperature=0.5)(c_tau, tau)
    a = stage.alpha(tau)
    c0 = (c_tau - (1 - a).sqrt() * eps) / a.sqrt()  # the clean estimate the sampler sees
    u = model.to_field(c0, SHAPE)  # [B, C, T, L]
    e = model.embedding_matrix().double()  # [V, C]
    # an expected embedding is a convex combination of the vectors: its norm is at most sqrt(C)
    assert float(u.norm(dim=1).max()) <= float(e.norm(dim=1).max()) + 1e-9
    logits = model.text.logits(model.to_field(model.eps_network(c_tau, a, model._conditions(
        model._logsnr_at(tau, 2, "cpu"), lam, None), SHAPE)[1], SHAPE), model._logsnr_at(tau, 2, "cpu")[:, -1])
    want = torch.einsum("n...v,vc->nc...", torch.softmax(logits / 0.5, -1), e)
    torch.testing.assert_close(u, want, rtol=1e-9, atol=1e-9)


def _prompt(model: SGFM, n: int = 2) -> G.Prompt:
    like = torch.zeros(n, model.cfg.channels, *SHAPE, dtype=torch.float64)
    ids = torch.randint(0, 256, (1, 21), generator=torch.Generator().manual_seed(2))
    return G.make_prompt(model, ids, None, n, like)


def test_make_prompt_marks_the_first_positions():
    model = _model("joint")
    p = _prompt(model)
    assert p.mask.shape == (1, 1, *SHAPE) and int(p.mask.sum()) == 21
    assert torch.equal(p.mask.flatten()[:21], torch.ones(21, dtype=torch.float64))
    u = torch.randn(2, 4, *SHAPE, dtype=torch.float64)
    pasted = p.paste(u)
    assert torch.equal(pasted.flatten(2)[:, :, 21:], u.flatten(2)[:, :, 21:])
    torch.testing.assert_close(pasted.flatten(2)[:, :, :21], p.field.flatten(2)[:, :, :21])
    assert G.make_prompt(model, None, None, 2, u) is None


@pytest.mark.parametrize("mode", ["joint", "cascade"])
def test_prompt_constraint_at_tau_zero_restores_the_prompt(mode):
    model = _model(mode)
    prompt = _prompt(model)
    like = torch.zeros(2, 4, *SHAPE, dtype=torch.float64)
    noise = G.CoefficientNoise(model, like, torch.Generator().manual_seed(3))
    c = model.to_coeffs(torch.randn_like(like))
    last = None if mode == "joint" else model.cfg.levels
    stage = G.Stage.build(model, SHAPE, last, torch.zeros_like(c) if mode == "joint" else c)
    x = stage.part(torch.randn_like(c))
    out = G.PromptConstraint(model, stage, SHAPE, prompt, noise)(x, 0.0)
    assert out.shape == x.shape
    u = model.to_field(stage.full(out), SHAPE)
    if mode == "joint":  # every scale is replaced: the prompt cells are the prompt
        torch.testing.assert_close(u.flatten(2)[:, :, :21], prompt.field.flatten(2)[:, :, :21])
    else:  # the finest scale takes the finest part of the pasted field, coarser scales stay
        want = stage.part(model.to_coeffs(prompt.paste(model.to_field(stage.full(x), SHAPE))))
        assert torch.equal(out, want)
    # at tau > 0 the constraint draws noise; at tau = 0 the cascade one draws none
    g_state = noise.generator.get_state()
    G.PromptConstraint(model, stage, SHAPE, prompt, noise)(x, 0.0)
    assert torch.equal(noise.generator.get_state(), g_state) == (mode == "cascade")


def test_guidance_energy_is_the_weighted_physics_energy():
    model = _model("cascade")
    c = model.to_coeffs(torch.randn(2, 4, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(4)))
    stage = G.Stage.build(model, SHAPE, 1, c)
    lam = model._lambda(None, 2, "cpu")
    x = stage.part(c) * 0.5
    u = model.to_field(stage.full(x), SHAPE)
    energy = G.GuidanceEnergy.build(model, stage, SHAPE, None, lam, 0.3)
    torch.testing.assert_close(energy(x), 0.3 * model.physics_energy(u, None, lam), rtol=1e-12, atol=1e-12)
    # nothing to guide: no energy at all (the sampler then takes no guidance step)
    assert G.GuidanceEnergy.build(model, stage, SHAPE, None, lam, 0.0) is None


@pytest.mark.parametrize("mode", ["joint", "cascade"])
def test_denoiser_l_bc_guidance_is_reconstruction_guidance(mode):
    """bc_eta adds bc_eta a / (2 sqrt(1 - a)) grad_x S to eps_hat, S the prompt cells' squared misfit
    of the clean estimate (Ho et al. 2022, Eq. 7); a small step along it lowers that misfit."""
    model = _model(mode)
    prompt = _prompt(model)
    _, c_tau, _, _, lam = _noisy(model)
    stage = G.Stage.build(model, SHAPE, None if mode == "joint" else model.cfg.levels, c_tau)
    x, tau = stage.part(c_tau), 0.5
    plain = G.Denoiser(model, stage, SHAPE, lam)(x, tau)
    assert torch.equal(G.Denoiser(model, stage, SHAPE, lam, prompt=prompt, bc_eta=0.0)(x, tau), plain)
    guided = G.Denoiser(model, stage, SHAPE, lam, prompt=prompt, bc_eta=2.0)(x, tau)
    a = stage.alpha(tau)

    def misfit(xx):
        logsnr = model._logsnr_at(tau, 2, "cpu")
        if mode == "joint":
            c0 = model.eps_network(xx, a, model._conditions(logsnr, lam, None), SHAPE)[1]
        else:
            c0 = G.cascade_estimate(model, stage.base, stage.full(xx), a, logsnr, lam,
                                    torch.full((2,), model.cfg.levels), SHAPE, stage.coarse)[1]
        u = model.to_field(c0, SHAPE)
        return (((u - prompt.field) ** 2) * prompt.mask).flatten(1).sum(1)  # [n]: S

    xg = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(misfit(xg).sum(), xg)
    torch.testing.assert_close(guided, plain + 2.0 * a / (2 * (1 - a).sqrt()) * grad, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        assert bool((misfit(x - 1e-3 * grad) < misfit(x)).all())


def test_sample_stage_fills_only_its_block():
    model = _model("cascade")
    lam = model._lambda(None, 2, "cpu")
    like = torch.zeros(2, 4, *SHAPE, dtype=torch.float64)
    noise = G.CoefficientNoise(model, like, torch.Generator().manual_seed(5))
    c = model.to_coeffs(torch.randn_like(like))
    stage = G.Stage.build(model, SHAPE, 1, c)
    out = G.sample_stage(G.SAMPLERS["heun"], 2, stage, G.Denoiser(model, stage, SHAPE, lam), noise)
    keep = torch.ones(c.shape[-1], dtype=torch.bool)
    keep[stage.select] = False
    assert torch.equal(out[:, :, keep], c[:, :, keep])
    assert not torch.equal(out[:, :, stage.select], c[:, :, stage.select])
