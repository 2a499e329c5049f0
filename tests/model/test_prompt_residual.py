"""``diffusion.prompt_residual``: the slices after a prompt diffused as increments over its last
slice (``losses.prompt_increments``), in training and sampling, on hand-made fields."""
from __future__ import annotations

import pytest
import torch

from sgfm_dist.model.config import DiffusionConfig, ModelConfig
from sgfm_dist.model.losses import prompt_increments
from sgfm_dist.model.sgfm import build_model

TINY = dict(width=8, n_blocks=1, spectral_modes=2, forcing_width=4, forcing_blocks=1, wavelet="haar", levels=1,
            cond_dim=16, fourier_features=4)


def _model(residual: bool = True, prompt_training: float = 1.0, bc_rows: int = 2):
    torch.manual_seed(0)
    return build_model(ModelConfig(**TINY, modality="physics", channels=2),
                       DiffusionConfig(lambda_R=1e-2, lambda_B=0.1, bc_rows=bc_rows, prompt_training=prompt_training,
                                       prompt_residual=residual))


def test_increments_of_a_known_field_and_their_inverse():
    u = torch.arange(2 * 1 * 4 * 2, dtype=torch.float64).reshape(2, 1, 4, 2)  # [B, C, T, X]
    d = prompt_increments(u, 2, torch.tensor([True, False]))
    # sample 0: slices 2, 3 minus slice 1 = [2, 3]; slices 0, 1 kept; sample 1 untouched
    assert d[0, 0].tolist() == [[0, 1], [2, 3], [2, 2], [4, 4]]
    assert torch.equal(d[1], u[1])
    assert torch.equal(prompt_increments(d, 2, torch.tensor([True, False]), undo=True), u)
    assert torch.equal(prompt_increments(u, 4), u)  # no slice after the prompt
    with pytest.raises(ValueError, match="need 1 <= rows <= T=4, got 0"):
        prompt_increments(u, 0)


def test_residual_needs_prompted_training():
    with pytest.raises(ValueError, match="diffusion.prompt_residual"):
        DiffusionConfig(prompt_residual=True, prompt_training=0.0)


def test_training_loss_with_increments_is_finite_and_differs():
    batch = {"field": torch.randn(2, 2, 8, 8, 8, generator=torch.Generator().manual_seed(1))}
    plain, _ = _model(False).training_loss(batch, torch.Generator().manual_seed(0))
    total, terms = _model(True).training_loss(batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(total) and set(terms) == {"diff", "physics", "bc"}
    assert not torch.equal(total, plain)
    # a field constant in t has zero increments after the prompt: the diffused field holds only the prompt
    const = {"field": torch.randn(2, 2, 1, 8, 8, generator=torch.Generator().manual_seed(2)).expand(-1, -1, 8, -1, -1)}
    _, t = _model(True).training_loss(const, torch.Generator().manual_seed(0))
    assert torch.isfinite(t["diff"])


def test_generate_returns_states_with_the_prompt_exact_and_checks_its_length():
    model = _model(True).eval()
    prompt = torch.randn(2, 2, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    out = model.generate(2, (8, 8, 8), 2, sampler="heun", prompt_field=prompt, physics_eta=0.1,
                         generator=torch.Generator().manual_seed(0))["field"]
    torch.testing.assert_close(out[:, :, :2], prompt, atol=1e-5, rtol=1e-5)
    # the same weights and noise without increments give other states: the network's output is read
    # as increments over the last prompt slice, not as states
    plain = _model(False).eval()
    plain.load_state_dict(model.state_dict())
    ref = plain.generate(2, (8, 8, 8), 2, sampler="heun", prompt_field=prompt,
                         generator=torch.Generator().manual_seed(0))["field"]
    assert not torch.allclose(out[:, :, 2:], ref[:, :, 2:])
    with pytest.raises(ValueError, match="diffusion.bc_rows=2 given slices; got a prompt of 1"):
        model.generate(2, (8, 8, 8), 2, sampler="heun", prompt_field=prompt[:, :, :1])
