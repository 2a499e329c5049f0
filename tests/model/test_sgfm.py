"""The SGFM end to end on tiny fields: shapes and dtypes through the whole chain (text d = 2,
physics and video d = 3, joint and cascade), prompts reproduced exactly, resolution-agnostic
weights, the domain seam, the physics residual against an analytic flow, and bad input."""
from __future__ import annotations

import math

import pytest
import torch

from sgfm_dist.model.config import DiffusionConfig, ModelConfig
from sgfm_dist.model.sgfm import SGFM, build_model, wavelet_energy_per_level
from sgfm_dist.ops.domain import LocalDomain

TINY = dict(width=8, n_blocks=1, spectral_modes=2, forcing_width=4, forcing_blocks=1, wavelet="haar", levels=2,
            cond_dim=16, fourier_features=4)


def _model(modality: str, mode: str = "joint", **kw) -> SGFM:
    torch.manual_seed(0)
    channels = {"text": 4, "video": 4, "physics": 2}[modality]
    cfg = ModelConfig(**{**TINY, "modality": modality, "channels": channels, **kw})
    return build_model(cfg, DiffusionConfig(mode=mode, level_shift=1.0, lambda_R=1e-2, lambda_B=0.1))


def _batch(modality: str, B: int = 2, shape=None):
    g = torch.Generator().manual_seed(1)
    if modality == "text":
        shape = shape or (8, 16)
        tokens = torch.randint(0, 256, (B, *shape), generator=g)
        mask = torch.ones(B, *shape, dtype=torch.bool)
        tokens[0, -1, 8:] = 256  # a padded tail
        mask[0, -1, 8:] = False
        return {"tokens": tokens, "pad_mask": mask}
    shape = shape or (8, 8, 8)
    return {"field": torch.randn(B, 2 if modality == "physics" else 3, *shape, generator=g)}


@pytest.mark.parametrize("mode", ["joint", "cascade"])
@pytest.mark.parametrize("modality", ["text", "physics", "video"])
def test_training_loss_shapes_terms_and_gradients(modality, mode):
    model = _model(modality, mode)
    # cascade: the physics term (which trains f_theta) is taken on the last stage's samples only,
    # so the batch must hold one (6 samples over 3 stages, seeded: it does)
    B = 6 if mode == "cascade" else 2
    total, terms = model.training_loss(_batch(modality, B=B), torch.Generator().manual_seed(0))
    assert total.ndim == 0 and total.dtype == torch.float32 and torch.isfinite(total)
    readout = {"text": {"ce"}, "video": {"recon"}, "physics": set()}[modality]
    expected = {"diff", "physics", "bc"} | readout
    assert set(terms) == expected
    assert all(t.ndim == 0 and not t.requires_grad and torch.isfinite(t) for t in terms.values())
    total.backward()
    assert model.score_net.out.weight.grad is not None and model.score_net.out.weight.grad.abs().sum() > 0
    assert model.forcing_net.out.weight.grad.abs().sum() > 0  # the physics term trains f_theta
    if modality == "text":
        assert model.text.weight.grad.abs().sum() > 0


def test_training_loss_is_reproducible_with_a_generator():
    model = _model("text")
    b = _batch("text")
    l1, _ = model.training_loss(b, torch.Generator().manual_seed(5))
    l2, _ = model.training_loss(b, torch.Generator().manual_seed(5))
    l3, _ = model.training_loss(b, torch.Generator().manual_seed(6))
    assert torch.equal(l1, l2) and not torch.equal(l1, l3)


@pytest.mark.parametrize("sampler", ["euler_maruyama", "heun", "pc"])
@pytest.mark.parametrize("mode", ["joint", "cascade"])
def test_generate_text_shapes_and_prompt_rows_exact(mode, sampler):
    model = _model("text", mode).eval()
    prompt = torch.randint(0, 256, (1, 21), generator=torch.Generator().manual_seed(2))  # 1 row + 5 ids
    guided = dict(physics_eta=1e-3, bc_eta=0.1) if sampler == "pc" else {}  # Eq. 24 and L_BC guidance
    out = model.generate(3, (8, 16), 2, sampler=sampler, prompt_tokens=prompt,
                         generator=torch.Generator().manual_seed(0), **guided)
    assert out["tokens"].shape == (3, 8, 16) and out["tokens"].dtype == torch.int64
    assert out["field"].shape == (3, 4, 8, 16) and out["field"].dtype == torch.float32
    assert torch.equal(out["tokens"].reshape(3, -1)[:, :21], prompt.expand(3, -1))
    e = model.embedding_matrix()[prompt[0]]  # [21, C]
    torch.testing.assert_close(out["field"].flatten(2)[:, :, :21], e.T.expand(3, -1, -1))


@pytest.mark.parametrize("modality", ["physics", "video"])
def test_generate_3d_with_first_frames_prompt(modality):
    model = _model(modality).eval()
    data_ch = 2 if modality == "physics" else 3
    prompt = torch.randn(2, data_ch, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    out = model.generate(2, (8, 8, 8), 2, sampler="heun", prompt_field=prompt,
                         generator=torch.Generator().manual_seed(0))
    assert out["field"].shape == (2, 4 if modality == "video" else 2, 8, 8, 8)
    got = out["field"] if modality == "physics" else out["frames"]
    assert got.shape == (2, data_ch, 8, 8, 8)
    torch.testing.assert_close(got[:, :, :2], prompt, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rounding", [dict(round_to_vocab=False), dict(vocab_temperature=0.7)])
def test_generate_is_seeded(rounding):
    model = _model("text").eval()
    a = model.generate(2, (8, 16), 2, generator=torch.Generator().manual_seed(4), **rounding)
    b = model.generate(2, (8, 16), 2, generator=torch.Generator().manual_seed(4), **rounding)
    assert torch.equal(a["field"], b["field"])


@pytest.mark.parametrize("modality", ["text", "physics"])
def test_resolution_agnostic_same_weights(modality):
    """The same weights train and sample on two field sizes (and the spectral weights are
    indexed by frequency, so a constant field is treated the same at both sizes)."""
    model = _model(modality)
    small = (8, 16) if modality == "text" else (8, 8, 8)
    large = (16, 32) if modality == "text" else (16, 8, 16)
    for shape in (small, large):
        total, _ = model.training_loss(_batch(modality, shape=shape), torch.Generator().manual_seed(0))
        assert torch.isfinite(total)
        out = model.eval().generate(1, shape, 2, sampler="euler_maruyama", generator=torch.Generator().manual_seed(0))
        assert tuple(out["field"].shape[2:]) == shape
        model.train()
    cond = torch.zeros(1, model.cfg.cond_dim)
    with torch.no_grad():
        model.score_net.out.weight.normal_()
        const_small = model.score_net(torch.ones(1, model.score_net.in_ch, *small), cond)
        const_large = model.score_net(torch.ones(1, model.score_net.in_ch, *large), cond)
    torch.testing.assert_close(const_small.mean(), const_large.mean(), rtol=1e-4, atol=1e-5)


def test_denoising_cross_entropy_and_embedding_matrix():
    model = _model("text").eval()
    b = _batch("text")
    ce = model.denoising_cross_entropy(b["tokens"], b["pad_mask"], 0.3, generator=torch.Generator().manual_seed(0))
    assert ce.ndim == 0 and torch.isfinite(ce) and ce > 0
    e = model.embedding_matrix()
    assert e.shape == (257, 4)
    torch.testing.assert_close(e.norm(dim=1), torch.full((257,), 2.0))  # norm sqrt(C)
    # the field at a position is exactly its token's vector: what the Bayes baseline assumes
    u0 = model.encode(b)
    torch.testing.assert_close(u0[1, :, 3, 5], e[b["tokens"][1, 3, 5]])
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="alpha_bar"):
            model.denoising_cross_entropy(b["tokens"], b["pad_mask"], bad)


@pytest.mark.parametrize("mode", ["joint", "cascade"])
def test_wavelet_energy_per_level(mode):
    model = _model("text", mode)
    out = wavelet_energy_per_level(model, _batch("text"), [0.2, 0.8])
    assert set(out) == {"data", "tau=0.2", "tau=0.8"}
    assert set(out["data"]) == {"scale0", "scale1", "scale2"}
    assert set(out["tau=0.8"]) == {"noisy", "denoised"}
    # orthonormal W: the coefficient energy over all scales is the field energy (1 per channel)
    layout_counts = [8 * 16 // 16, 3 * 8 * 16 // 16, 3 * 8 * 16 // 4]
    total = sum(out["data"][f"scale{s}"] * n for s, n in enumerate(layout_counts)) / (8 * 16)
    assert abs(total - 1.0) < 1e-5


class CountingDomain(LocalDomain):
    """LocalDomain that counts calls; the model must route every spatial operation through it."""

    def __init__(self):
        self.calls = {}

    def __getattribute__(self, name):
        if name in ("pad", "rfft", "irfft", "wavenumbers", "sum", "shard", "global_extent", "numel"):
            calls = object.__getattribute__(self, "calls")
            calls[name] = calls.get(name, 0) + 1
        return object.__getattribute__(self, name)


def test_set_domain_reaches_every_layer_and_changes_nothing_locally():
    model = _model("text")
    b = _batch("text")
    ref, _ = model.training_loss(b, torch.Generator().manual_seed(0))
    dom = CountingDomain()
    model.set_domain(dom)
    assert all(m.domain is dom for m in model.modules() if hasattr(m, "domain"))
    got, _ = model.training_loss(b, torch.Generator().manual_seed(0))
    torch.testing.assert_close(got, ref)
    for name in ("pad", "rfft", "irfft", "wavenumbers", "sum", "shard"):
        assert dom.calls.get(name, 0) > 0, f"domain.{name} never called"
    with pytest.raises(ValueError, match="domain"):
        model.set_domain(object())


def test_text_physics_energy_of_an_analytic_shear_flow():
    """u = (u_t, u_x) = (0, sin t): divergence-free, no advection; R = (0, cos t + nu sin t)
    is solenoidal, so E = mean over channels and cells of |R|^2 = (1 + nu^2) / 4 (no forcing)."""
    nu = 0.3
    model = build_model(ModelConfig(**{**TINY, "modality": "text", "channels": 2, "forcing_blocks": 0, "nu": nu}),
                        DiffusionConfig()).double()
    T, L = 16, 8
    t = torch.arange(T, dtype=torch.float64) * (2 * math.pi / T)
    u = torch.zeros(1, 2, T, L, dtype=torch.float64)
    u[0, 1] = torch.sin(t)[:, None]
    torch.testing.assert_close(model.physics_energy(u), torch.tensor([(1 + nu ** 2) / 4], dtype=torch.float64))


def test_physics_energy_matches_dynamics_for_physics_fields():
    from sgfm_dist.ops import dynamics

    model = build_model(ModelConfig(**{**TINY, "modality": "physics", "channels": 2, "forcing_blocks": 0}),
                        DiffusionConfig()).double()
    u = torch.randn(2, 2, 8, 8, 8, dtype=torch.float64)
    spec = dynamics.FlowSpec(flow_axes=(3, 4), time_axis=2, nu=model.cfg.nu)
    torch.testing.assert_close(model.physics_energy(u), dynamics.physics_energy(u, spec))


@pytest.mark.parametrize("bad, match", [
    ({"tokens": torch.zeros(2, 8, 16)}, "integer tensor"),
    ({"tokens": torch.full((2, 8, 16), 300)}, r"\[0, vocab_size=257\)"),
    ({"tokens": torch.zeros(2, 6, 16, dtype=torch.long)}, "not divisible by 2\\*\\*levels"),
    ({"tokens": torch.zeros(2, 128, dtype=torch.long)}, r"\[B, T, L\]"),
    ({"field": torch.zeros(2, 4, 8, 16)}, "'tokens'"),
])
def test_bad_text_batches(bad, match):
    with pytest.raises(ValueError, match=match):
        _model("text").training_loss(bad)


def test_bad_generate_arguments():
    model = _model("text").eval()
    with pytest.raises(ValueError, match="do not fit"):
        model.generate(1, (8, 16), 2, prompt_tokens=torch.zeros(1, 200, dtype=torch.long))
    with pytest.raises(ValueError, match="sampler"):
        model.generate(1, (8, 16), 2, sampler="ddim")
    with pytest.raises(ValueError, match="vocab_temperature"):
        model.generate(1, (8, 16), 2, vocab_temperature=0.0)
    with pytest.raises(ValueError, match="field_shape"):
        model.generate(1, (6, 16), 2)
    with pytest.raises(ValueError, match="prompt_tokens"):
        model.generate(2, (8, 16), 2, prompt_tokens=torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="batch\\['field'\\]"):
        _model("physics").training_loss({"field": torch.zeros(2, 3, 8, 8, 8)})


@pytest.mark.parametrize("bad, match", [
    (dict(modality="audio"), "model.modality"),
    (dict(kernel_size=4), "model.kernel_size"),
    (dict(channels=3), "model.channels"),
    (dict(wavelet="bior2.2"), "model.wavelet"),
    (dict(spectral_modes=(4, 4, 4)), "model.spectral_modes"),
    (dict(width=0), "model.width"),
    (dict(pad_id=300), "model.pad_id"),
])
def test_model_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**bad)


@pytest.mark.parametrize("bad, match", [
    (dict(schedule="sqrt"), "diffusion.schedule"),
    (dict(mode="both"), "diffusion.mode"),
    (dict(lambda_R=-1.0), "diffusion.lambda_R"),
    (dict(logsnr_min=5.0, logsnr_max=1.0), "logsnr_min"),
    (dict(bc_rows=0), "diffusion.bc_rows"),
])
def test_diffusion_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        DiffusionConfig(**bad)


def test_config_from_yaml_lists_equals_tuples():
    a = ModelConfig(kernel_size=[3, 5], spectral_modes=[4, 8], lengths=[1.0, 2.0])
    b = ModelConfig(kernel_size=(3, 5), spectral_modes=(4, 8), lengths=(1.0, 2.0))
    assert a == b


@pytest.mark.parametrize("modality", ["physics", "video"])
def test_cascade_stage_terms_compare_like_with_like(modality, monkeypatch):
    """Cascade training: a stage's estimate holds the scales up to its own, so L_BC compares it
    with the data's approximation on those scales (an oracle stage scores 0, where the full u0
    would charge it for the finer detail it cannot have), and the physics residual is averaged
    over the last stage's samples only (the one estimate that is a whole field)."""
    import sgfm_dist.model.generation as G

    model = _model(modality, "cascade")
    B = 6
    batch = _batch(modality, B=B)
    seen = {}

    def oracle(m, c_clean, c_noisy, alpha, logsnr, lam, stage, shape, coarse=None):
        sidx = m._scale_index(shape, c_noisy.device)
        upto = (sidx[None, :] <= stage[:, None]).unsqueeze(1).to(c_noisy.dtype)  # [B, 1, N]
        target = (sidx[None, :] == stage[:, None]).unsqueeze(1).to(c_noisy.dtype)
        seen["stage"] = stage.clone()
        return torch.zeros_like(c_noisy), upto * c_clean, target  # the exact scales <= stage, finer zero

    monkeypatch.setattr(G, "cascade_estimate", oracle)
    monkeypatch.setattr(model, "physics_energy", lambda u, xi=None, lam=None: torch.arange(u.shape[0], dtype=u.dtype))
    _, terms = model.training_loss(batch, torch.Generator().manual_seed(3))
    assert terms["bc"].item() == pytest.approx(0.0, abs=1e-10)
    final = seen["stage"] == model.cfg.levels
    expected = torch.arange(B, dtype=torch.float32)[final].sum() / max(int(final.sum()), 1)
    torch.testing.assert_close(terms["physics"], expected)
