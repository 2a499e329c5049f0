"""The named loss functions: the composite loss of Eq. 38 (every term with its own weight, none
dropped, none swapped) and the boundary loss of Eq. 44 against a hand computation; the split
domain is checked by the distributed suites, this file stays single-process."""
from __future__ import annotations

import itertools

import pytest
import torch

from sgfm_dist.model.config import DiffusionConfig, ModelConfig
from sgfm_dist.model.losses import boundary_loss, composite_loss, first_rows_mask, loss_weights
from sgfm_dist.model.sgfm import build_model

# distinct terms and weights, so any swap of weights or a dropped term changes the total
TERMS = {"diff": 0.8125, "physics": 2.5, "bc": 0.375, "ce": 5.25}
WEIGHTS = {"diff": 1.0, "physics": 0.01, "bc": 0.1, "ce": 0.5}


def _terms(dtype=torch.float32) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=dtype) for k, v in TERMS.items()}


def test_composite_loss_is_the_weighted_sum_in_order():
    terms = _terms()
    expected = ((1.0 * terms["diff"] + 0.01 * terms["physics"]) + 0.1 * terms["bc"]) + 0.5 * terms["ce"]
    got = composite_loss(terms, WEIGHTS)
    assert torch.equal(got, expected)  # exactly: same terms, same weights, same order of additions
    assert abs(float(got) - sum(WEIGHTS[k] * v for k, v in TERMS.items())) < 1e-6


def test_composite_loss_changes_when_weights_are_swapped():
    terms = _terms(torch.float64)
    ref = composite_loss(terms, WEIGHTS)
    names = list(WEIGHTS)
    for perm in itertools.permutations(names):
        if list(perm) == names:
            continue
        swapped = {k: WEIGHTS[p] for k, p in zip(names, perm)}
        assert not torch.equal(composite_loss(terms, swapped), ref), perm


@pytest.mark.parametrize("dropped", list(TERMS))
def test_composite_loss_counts_every_term(dropped):
    terms = _terms(torch.float64)
    without = {k: v for k, v in terms.items() if k != dropped}
    assert not torch.equal(composite_loss(without, WEIGHTS), composite_loss(terms, WEIGHTS))
    # a weight of 0 is how a term is turned off; a term with no weight is an error, not a 0 or 1
    with pytest.raises(ValueError, match=dropped):
        composite_loss(terms, {k: w for k, w in WEIGHTS.items() if k != dropped})
    with pytest.raises(ValueError, match="at least one"):
        composite_loss({}, WEIGHTS)


def test_composite_loss_gradient_is_the_weights():
    terms = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in TERMS.items()}
    composite_loss(terms, WEIGHTS).backward()
    assert {k: float(t.grad) for k, t in terms.items()} == WEIGHTS


def test_loss_weights_follow_the_config():
    w = loss_weights(DiffusionConfig(lambda_R=0.02, lambda_B=0.3, lambda_ce=4.0))
    assert w == {"diff": 1.0, "physics": 0.02, "bc": 0.3, "ce": 4.0, "recon": 4.0}


@pytest.mark.parametrize("modality", ["text", "physics"])
def test_training_total_is_the_composite_of_its_terms(modality):
    """``SGFM.training_loss`` forms its total with composite_loss and the config's weights."""
    torch.manual_seed(0)
    ch = 4 if modality == "text" else 2
    cfg = ModelConfig(modality=modality, channels=ch, width=8, n_blocks=1, spectral_modes=2, forcing_width=4,
                      forcing_blocks=1, wavelet="haar", levels=1, cond_dim=16, fourier_features=4)
    dcfg = DiffusionConfig(lambda_R=0.03, lambda_B=0.2, lambda_ce=0.7)
    model = build_model(cfg, dcfg)
    g = torch.Generator().manual_seed(1)
    if modality == "text":
        batch = {"tokens": torch.randint(0, 256, (2, 4, 8), generator=g)}
    else:
        batch = {"field": torch.randn(2, 2, 4, 4, 4, generator=g)}
    total, terms = model.training_loss(batch, torch.Generator().manual_seed(0))
    assert list(terms)[:3] == ["diff", "physics", "bc"]
    assert torch.equal(total.detach(), composite_loss(terms, loss_weights(dcfg)))


def test_boundary_loss_equals_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    B, C, T, X = 2, 3, 4, 5
    u = torch.randn(B, C, T, X, generator=g, dtype=torch.float64)
    u0 = torch.randn(B, C, T, X, generator=g, dtype=torch.float64)
    mask = torch.zeros(1, 1, T, X, dtype=torch.float64)
    mask[0, 0, 0, :] = 1  # the first row
    mask[0, 0, 1, :2] = 1  # and two cells of the second: a prompt that ends mid-row
    want = []
    for b in range(B):
        s, cnt = 0.0, 0
        for c in range(C):
            for t in range(T):
                for x in range(X):
                    if mask[0, 0, t, x] == 1:
                        s += float(u[b, c, t, x] - u0[b, c, t, x]) ** 2
                        cnt += 1
        want.append(s / cnt)
    got = boundary_loss(u, u0, mask)
    assert got.shape == (B,)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-14, atol=0)
    # no masked cell: no constraint (0, not a division by zero)
    assert torch.equal(boundary_loss(u, u0, torch.zeros_like(mask)), torch.zeros(B, dtype=torch.float64))


def test_first_rows_mask_marks_the_initial_condition():
    u = torch.zeros(2, 3, 8, 4)
    m = first_rows_mask(u, 3)
    assert m.shape == (1, 1, 8, 4) and m.dtype == u.dtype
    assert torch.equal(m[0, 0, :3], torch.ones(3, 4)) and torch.equal(m[0, 0, 3:], torch.zeros(5, 4))
    # L_BC on the first rows is the mean square misfit of exactly those rows
    u0 = torch.randn(2, 3, 8, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(boundary_loss(u, u0, m), u0[:, :, :3].square().mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match="prompt length"):
        first_rows_mask(u, -1)


def test_bc_penalizes_the_prompt_frames(monkeypatch):
    """L_BC in training masks diffusion.bc_rows frames (the prompt length), and a prompt of that many
    frames is guided by the same mask: one penalty for the frames a forecast is given."""
    from sgfm_dist.model import sgfm as sgfm_module
    from sgfm_dist.model.config import DiffusionConfig, ModelConfig
    from sgfm_dist.model.generation import field_prompt

    cfg = ModelConfig(modality="video", channels=4, width=8, n_blocks=1, mlp_ratio=1, forcing_width=4,
                      wavelet="haar", levels=1, fourier_features=4, cond_dim=8, spectral_modes=(2, 4, 4))
    model = sgfm_module.build_model(cfg, DiffusionConfig(bc_rows=3, lambda_B=1.0))
    rows = []

    def spy(u, k, domain=None):
        rows.append(k)
        return first_rows_mask(u, k, domain)

    monkeypatch.setattr(sgfm_module, "first_rows_mask", spy)
    frames = torch.rand(2, 3, 6, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    _, terms = model.training_loss({"field": frames}, torch.Generator().manual_seed(0))
    assert rows == [3] and "bc" in terms
    like = torch.zeros(2, 4, 6, 8, 8)
    prompt = field_prompt(model, frames[:1, :, :3], 2, like, 3, model.video.encode)
    assert torch.equal(prompt.mask, first_rows_mask(like, 3))
