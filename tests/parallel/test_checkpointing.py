"""Activation checkpointing (``parallel.activation_checkpointing``): ``full`` stores each block's
input, ``selective`` also the outputs of its products and FFTs (torchtitan's op-level policy)
and recomputes the element-wise ops. Both must leave the loss and every gradient of the plain
model unchanged bit for bit, for the SGFM (every modality) and the transformer baseline. The
split-field case (the recomputation runs the halo exchanges and FFT transposes again) is in
tests/distributed/test_exact_step.py::test_checkpointed_step_equals_single_process."""
from __future__ import annotations

import copy

import pytest
import torch

from sgfm_dist.model.config import DiffusionConfig, ModelConfig
from sgfm_dist.model.sgfm import build_model
from sgfm_dist.parallel.parallelize import (ParallelizeConfig, _saved_by_selective_checkpointing,
                                            apply_activation_checkpointing)
from sgfm_dist.train.config import ParallelConfig
from sgfm_dist.validation import ConfigError

SMALL = dict(width=8, n_blocks=2, forcing_width=4, forcing_blocks=1, cond_dim=16, fourier_features=4,
             wavelet="haar", levels=1)


def _case(modality: str):
    g = torch.Generator().manual_seed(1)
    if modality == "transformer":
        cfg = ModelConfig(modality="text", kind="transformer", tf_layers=2, tf_width=32, tf_heads=2,
                          wavelet="haar", levels=1)
        tokens = torch.randint(0, 256, (2, 4, 8), generator=g)
        return cfg, {"tokens": tokens}
    channels = {"text": 4, "video": 4, "physics": 2}.get(modality, 3)
    cfg = ModelConfig(modality=modality, channels=channels, **SMALL)
    if modality == "text":
        tokens = torch.randint(0, 256, (2, 4, 8), generator=g)
        return cfg, {"tokens": tokens, "pad_mask": tokens != 256}
    shape = {"video": (2, 3, 4, 8, 8), "physics": (2, 2, 4, 8, 8)}.get(modality, (2, 3, 16))
    return cfg, {"field": torch.rand(*shape, generator=g) * 2 - 1}


def _loss_and_grads(model, batch):
    loss, _ = model.training_loss(batch, generator=torch.Generator().manual_seed(0))
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


@pytest.mark.parametrize("mode", ["full", "selective", True])
@pytest.mark.parametrize("modality", ["text", "video", "physics", "timeseries", "transformer"])
def test_checkpointing_changes_no_bit(modality, mode):
    cfg, batch = _case(modality)
    torch.manual_seed(0)
    plain = build_model(cfg, DiffusionConfig(lambda_R=0.1, lambda_B=0.1))
    wrapped = copy.deepcopy(plain)
    assert apply_activation_checkpointing(wrapped, mode) >= 2
    loss_ref, grads_ref = _loss_and_grads(plain, batch)
    loss, grads = _loss_and_grads(wrapped, batch)
    assert torch.equal(loss, loss_ref)
    for (name, _), g, g_ref in zip(plain.named_parameters(), grads, grads_ref):
        assert (g is None) == (g_ref is None), name
        if g is not None:
            assert torch.equal(g, g_ref), f"{name}: gradient differs under {mode!r} checkpointing"


def test_selective_policy_saves_products_and_ffts_only():
    saved = _saved_by_selective_checkpointing()
    aten = torch.ops.aten
    for op in (aten.mm.default, aten.addmm.default, aten.convolution.default, aten._fft_r2c.default,
               aten._fft_c2r.default):
        assert op in saved
    for op in (aten.gelu.default, aten.mul.Tensor, aten.add.Tensor, aten.rsqrt.default, aten.cat.default):
        assert op not in saved


def test_modes_are_validated_where_they_are_set():
    assert ParallelConfig(activation_checkpointing="selective").activation_checkpointing == "selective"
    assert ParallelConfig(activation_checkpointing=True).activation_checkpointing is True
    with pytest.raises(ConfigError, match="parallel.activation_checkpointing"):
        ParallelConfig(activation_checkpointing="partial")
    with pytest.raises(ValueError, match="activation_checkpointing"):
        ParallelizeConfig(activation_checkpointing="partial")
    with pytest.raises(ValueError, match="mode"):
        apply_activation_checkpointing(torch.nn.Module(), "sometimes")
