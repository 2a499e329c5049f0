"""``diffusion.prompt_residual``: the slices after a prompt diffused as increments over its last
slice (``losses.prompt_increments``), in training and sampling, on hand-made fields."""
from __future__ import annotations

import pytest
import torch

from sgfm_dist.model.config import DiffusionConfig, ModelConfig
from sgfm_dist.model.losses import first_rows_mask, given_prompt_mask, prompt_increments
from sgfm_dist.model.sgfm import build_model
from sgfm_dist.ops.draws import SampleDraws

TINY = dict(width=8, n_blocks=1, spectral_modes=2, forcing_width=4, forcing_blocks=1, wavelet="haar", levels=1,
            cond_dim=16, fourier_features=4)


def _model(residual: bool = True, prompt_training: float = 1.0, bc_rows: int = 2, prompt_lengths=None):
    torch.manual_seed(0)
    return build_model(ModelConfig(**TINY, modality="physics", channels=2),
                       DiffusionConfig(lambda_R=1e-2, lambda_B=0.1, bc_rows=bc_rows, prompt_training=prompt_training,
                                       prompt_residual=residual, prompt_lengths=prompt_lengths))


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
    # any prompt length: the slices after a prompt of 1 or 3 are increments over its last slice
    for P in (1, 3):
        longer = torch.randn(2, 2, P, 8, 8, generator=torch.Generator().manual_seed(4))
        got = model.generate(2, (8, 8, 8), 2, sampler="heun", prompt_field=longer,
                             generator=torch.Generator().manual_seed(0))["field"]
        torch.testing.assert_close(got[:, :, :P], longer, atol=1e-5, rtol=1e-5)
        assert torch.isfinite(got).all()


def test_increments_with_a_prompt_length_per_sample():
    u = torch.randn(3, 2, 5, 4, generator=torch.Generator().manual_seed(5))  # [B, C, T, X]
    rows, given = torch.tensor([1, 3, 5]), torch.tensor([True, True, False])
    d = prompt_increments(u, rows, given)
    # by hand: sample 0 over slice 0, sample 1 over slice 2, sample 2 (not given) untouched
    torch.testing.assert_close(d[0, :, 1:], u[0, :, 1:] - u[0, :, :1], rtol=0, atol=0)
    torch.testing.assert_close(d[0, :, :1], u[0, :, :1], rtol=0, atol=0)
    torch.testing.assert_close(d[1, :, 3:], u[1, :, 3:] - u[1, :, 2:3], rtol=0, atol=0)
    torch.testing.assert_close(d[1, :, :3], u[1, :, :3], rtol=0, atol=0)
    assert torch.equal(d[2], u[2])
    for b in range(3):  # one sample at a time with its own int length: the same
        one = prompt_increments(u[b:b + 1], int(rows[b]), given[b:b + 1])
        torch.testing.assert_close(d[b:b + 1], one, rtol=0, atol=1e-7)
    torch.testing.assert_close(prompt_increments(d, rows, given, undo=True), u, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"integer prompt lengths in \[1, T=5\]"):
        prompt_increments(u, torch.tensor([0, 1, 2]))


def test_masks_with_a_prompt_length_per_sample():
    u = torch.zeros(2, 1, 4, 3)
    m = first_rows_mask(u, torch.tensor([1, 3]))
    assert m.shape == (2, 1, 4, 3)
    assert m[0, 0, :, 0].tolist() == [1, 0, 0, 0] and m[1, 0, :, 0].tolist() == [1, 1, 1, 0]
    assert torch.equal(m[1:], first_rows_mask(u, 3).expand(1, -1, -1, -1))
    g = given_prompt_mask(u, torch.tensor([1, 3]), torch.tensor([False, True]))
    assert g[0].sum() == 0 and torch.equal(g[1], m[1])


def _draws(positions, global_batch=3):
    return SampleDraws(7, 0, tuple(positions), global_batch)


def test_prompt_lengths_of_one_length_equal_bc_rows():
    """A drawn length from [2, 2] is bc_rows = 2: the same loss (the draws are per sample and purpose)."""
    batch = {"field": torch.randn(3, 2, 8, 8, 8, generator=torch.Generator().manual_seed(6))}
    fixed, ft = _model(True, 0.5, bc_rows=2).training_loss(batch, _draws(range(3)))
    drawn, dt = _model(True, 0.5, bc_rows=1, prompt_lengths=[2, 2]).training_loss(batch, _draws(range(3)))
    torch.testing.assert_close(drawn, fixed, rtol=1e-6, atol=0)
    for k in ft:
        torch.testing.assert_close(dt[k], ft[k], rtol=1e-6, atol=0)


def test_drawn_prompt_lengths_are_each_samples_own():
    """The batch loss with lengths drawn from [1, 6] is the mean of each sample's loss trained with
    its drawn length as bc_rows (noise-free prompt, increments and L_BC all use that length)."""
    field = torch.randn(3, 2, 8, 8, 8, generator=torch.Generator().manual_seed(8))
    draws = _draws(range(3))
    k = draws.randint(6, "prompt_length") + 1  # [3] the lengths the model draws
    assert len(set(k.tolist())) > 1, "the test needs different lengths in the batch"
    total, _ = _model(True, 0.5, prompt_lengths=[1, 6]).training_loss({"field": field}, draws)
    one_by_one = [_model(True, 0.5, bc_rows=int(k[j])).training_loss({"field": field[j:j + 1]}, _draws([j]))[0]
                  for j in range(3)]
    torch.testing.assert_close(total, torch.stack(one_by_one).mean(), rtol=1e-5, atol=0)


def test_prompt_lengths_are_checked():
    with pytest.raises(ValueError, match="diffusion.prompt_lengths"):
        DiffusionConfig(prompt_lengths=[3, 2])
    with pytest.raises(ValueError, match="diffusion.prompt_lengths"):
        DiffusionConfig(prompt_lengths=[0, 2])
    # lengths beyond the field are capped at T - 1: [5, 9] on 8 slices trains k = 5..7, [5, 5] on 4 slices k = 3
    model = _model(True, 0.5, prompt_lengths=[5, 9])
    field = torch.randn(3, 2, 8, 8, 8)
    for draws in (_draws(range(3)), _draws(range(3), 6)):
        k = model._training_prompt_rows(field, draws, True)
        assert ((k >= 5) & (k <= 7)).all()
    k = _model(True, 0.5, prompt_lengths=[5, 5])._training_prompt_rows(field[:, :, :4], _draws(range(3)), True)
    assert k.tolist() == [3, 3, 3]


def test_prompt_condition_feeds_the_clean_prompt_and_its_mask():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY, modality="physics", channels=2),
                        DiffusionConfig(lambda_R=1e-2, bc_rows=2, prompt_training=0.5, prompt_residual=True,
                                        prompt_condition=True, prompt_lengths=[1, 3]))
    assert model.score_net.in_ch == 2 + 3  # the noisy field, the clean prompt (2 channels) and its mask
    u = torch.randn(2, 2, 8, 4, 4)
    mask = first_rows_mask(u, torch.tensor([1, 3]))
    given = model.prompt_inputs(u, mask)
    assert torch.equal(given[:, 2:], mask) and torch.equal(given[:, :2], u * mask)
    assert given[0, :2, 1:].abs().sum() == 0 and torch.equal(given[1, :2, :3], u[1, :, :3])
    with torch.no_grad():  # the output projection starts at zero: give it weights so inputs matter
        model.score_net.out.weight.normal_(generator=torch.Generator().manual_seed(1))
    draws = SampleDraws(7, 0, (0, 1), 2)
    field = torch.randn(2, 2, 8, 8, 8, generator=torch.Generator().manual_seed(9))
    total, terms = model.training_loss({"field": field}, draws)
    assert torch.isfinite(total) and set(terms) == {"diff", "physics", "bc"}
    total.backward()
    assert model.score_net.lift.weight.grad[:, 2:].abs().sum() > 0  # the condition channels are trained
    # sampling: the prompt reaches the network (a prompt changes the generated slices' estimate),
    # and is exact in the result
    model.eval()
    prompt = torch.randn(2, 2, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    out = model.generate(2, (8, 8, 8), 2, sampler="heun", prompt_field=prompt,
                         generator=torch.Generator().manual_seed(0))["field"]
    torch.testing.assert_close(out[:, :, :2], prompt, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="diffusion.prompt_condition"):
        DiffusionConfig(prompt_condition=True, prompt_training=0.0)
