"""The transformer baseline (``model.kind: transformer``): parameter matching, causality, the
key/value cache, the masked loss, its seams into the pipeline (``build_model``, ``set_domain``,
activation checkpointing) and a few training steps through ``build_training`` / ``train_step``."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from sgfm_dist.model.config import DiffusionConfig, ModelConfig
from sgfm_dist.model.sgfm import SGFM, build_model
from sgfm_dist.model.transformer import (ByteTransformer, match_params, resolve_shape, sgfm_param_count,
                                         transformer_param_count)
from sgfm_dist.validation import ConfigError

SMALL = dict(modality="text", kind="transformer", tf_layers=2, tf_width=32, tf_heads=2, wavelet="haar", levels=1)


def small_model(seed: int = 0, **kw) -> ByteTransformer:
    torch.manual_seed(seed)
    return build_model(ModelConfig(**{**SMALL, **kw}), DiffusionConfig())


def tokens(B=2, T=4, L=8, seed=1):
    return torch.randint(0, 256, (B, T, L), generator=torch.Generator().manual_seed(seed))


def test_build_model_dispatches_on_kind():
    assert isinstance(small_model(), ByteTransformer)
    assert isinstance(build_model(ModelConfig(width=8, n_blocks=1, channels=4), DiffusionConfig()), SGFM)


def test_param_count_formula_is_the_module():
    for layers, width, heads, r in ((1, 32, 1, 4), (3, 64, 2, 2), (2, 48, 3, 4)):
        m = small_model(tf_layers=layers, tf_width=width, tf_heads=heads, tf_mlp_ratio=r)
        assert sum(p.numel() for p in m.parameters()) == transformer_param_count(257, width, layers, r)


def test_matched_to_text_tiny_sgfm_within_5_percent():
    from sgfm_dist.train.config_loader import load_config

    cfg = load_config("configs/transformer_tiny.yaml")
    target = sgfm_param_count(cfg.model, cfg.diffusion)
    sgfm = load_config("configs/text_tiny.yaml")
    assert cfg.model.kind == "transformer" and dataclasses.replace(cfg.model, kind="sgfm", tf_layers=0,
                                                                    tf_width=0) == sgfm.model
    torch.manual_seed(0)
    assert target == sum(p.numel() for p in build_model(sgfm.model, sgfm.diffusion).parameters())
    shape = resolve_shape(cfg.model, cfg.diffusion)
    n = transformer_param_count(cfg.model.vocab_size, shape.width, shape.layers, shape.mlp_ratio)
    assert abs(n - target) / target <= 0.05, (n, target)
    assert shape.width % shape.heads == 0 and shape.head_dim >= 32


@pytest.mark.parametrize("target", [200_000, 1_000_000, 2_802_754, 25_000_000])
def test_match_params_within_tolerance(target):
    s = match_params(target, 257)
    n = transformer_param_count(257, s.width, s.layers, s.mlp_ratio)
    assert abs(n - target) / target <= 0.05
    assert s.width % 16 == 0 and s.width % s.heads == 0 and s.head_dim % 2 == 0


def test_sgfm_param_count_does_not_draw_from_the_rng():
    cfg = ModelConfig(width=8, n_blocks=1, channels=4)
    state = torch.random.get_rng_state()
    sgfm_param_count(cfg, DiffusionConfig())
    assert torch.equal(state, torch.random.get_rng_state())


def test_config_checks():
    with pytest.raises(ConfigError, match="model.kind"):
        ModelConfig(modality="physics", channels=2, kind="transformer")
    with pytest.raises(ConfigError, match="tf_layers"):
        ModelConfig(kind="transformer", tf_layers=2)
    with pytest.raises(ConfigError, match="tf_width"):
        ModelConfig(kind="transformer", tf_layers=2, tf_width=30, tf_heads=4)
    with pytest.raises(ConfigError, match="model.kind"):
        ModelConfig(kind="gpt")


def test_causal_every_logit_depends_only_on_earlier_bytes():
    m = small_model().eval()
    x = tokens(1, 4, 8).flatten(1)  # [1, 32]
    inputs = m.inputs(x)
    base = m(inputs)
    j = 17
    changed = inputs.clone()
    changed[0, j] = (changed[0, j] + 1) % 256
    out = m(changed)
    torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=0)
    assert (out[:, j:] - base[:, j:]).abs().amax() > 1e-4


def test_cached_decoding_equals_full_forward():
    m = small_model().eval()
    x = m.inputs(tokens(2, 2, 8).flatten(1))  # [2, 16]
    full = m(x)
    caches = [dict() for _ in m.blocks]
    first = m(x[:, :5], caches)
    steps = [m(x[:, i:i + 1], caches, start=i) for i in range(5, x.shape[1])]
    torch.testing.assert_close(torch.cat([first] + steps, 1), full, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_loss_is_masked_mean_of_exact_nll():
    m = small_model().eval()
    t = tokens()
    mask = torch.ones_like(t, dtype=torch.bool)
    mask[1, -1, 3:] = False
    t[1, -1, 3:] = 256
    loss, terms = m.training_loss({"tokens": t, "pad_mask": mask})
    # a pad's value does not matter: it is masked as a target and only feeds masked positions
    t2 = t.clone()
    t2[1, -1, 5:] = 7
    loss2, _ = m.training_loss({"tokens": t2, "pad_mask": mask})
    assert float(loss) == pytest.approx(float(loss2), rel=1e-6)
    # the explicit product of next-byte probabilities
    logp = torch.log_softmax(m(m.inputs(t.flatten(1))), -1)
    nll = -logp.gather(-1, t.flatten(1)[..., None])[..., 0]
    ref = (nll * mask.flatten(1)).sum() / mask.sum()
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)
    assert set(terms) == {"ce"}


def test_generate_shapes_prompt_and_no_pad():
    m = small_model()
    g = torch.Generator().manual_seed(0)
    prompt = torch.tensor([[72, 105]])
    out = m.generate(3, (2, 8), steps=10, sampler="pc", prompt_tokens=prompt, generator=g, vocab_temperature=0.7)
    ids = out["tokens"]
    assert ids.shape == (3, 2, 8)
    assert (ids.flatten(1)[:, :2] == prompt).all()
    assert int(ids.max()) < 256
    again = m.generate(3, (2, 8), prompt_tokens=prompt, generator=torch.Generator().manual_seed(0))["tokens"]
    assert torch.equal(ids, again)


def test_set_domain_refuses_a_split():
    from sgfm_dist.ops.domain import LOCAL

    m = small_model()
    m.set_domain(LOCAL)

    class Split:  # any domain but the LocalDomain
        pass

    with pytest.raises(ValueError, match="parallel.sp=1"):
        m.set_domain(Split())


def test_activation_checkpointing_wraps_the_blocks():
    from sgfm_dist.parallel.parallelize import apply_activation_checkpointing

    m = small_model()
    t = tokens()
    loss_ref = m.training_loss({"tokens": t})[0]
    loss_ref.backward()
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    assert apply_activation_checkpointing(m) == 2
    loss = m.training_loss({"tokens": t})[0]
    loss.backward()
    assert float(loss.detach()) == float(loss_ref.detach())
    for g, p in zip(grads, m.parameters()):
        torch.testing.assert_close(p.grad, g)


def _train_job(steps: int):
    """On the one spawned rank: ``steps`` optimizer steps on the built-in corpus through
    ``build_training`` / ``train_step`` (what ``launch/train.py`` runs)."""
    from sgfm_dist.parallel import runtime
    from sgfm_dist.train.batches import batch_to_device, build_train_source, global_field_shape
    from sgfm_dist.train.config import Config, DataConfig, OptimConfig, TrainConfig
    from sgfm_dist.train.setup import build_training, train_step

    runtime.setup_distributed("cpu")
    cfg = Config(model=ModelConfig(**SMALL), data=DataConfig(rows=4, row_len=32),
                 optim=OptimConfig(lr=3e-3, warmup_steps=2), train=TrainConfig(steps=steps, micro_batch=4,
                                                                             device="cpu", seed=0))
    t = build_training(cfg, "cpu", global_field_shape(cfg))
    batches = iter(build_train_source(cfg, 0, 1, num_workers=0))
    fixed = batch_to_device(next(batches), "cpu")
    losses = [train_step(t, [fixed]).losses for _ in range(steps)]
    t.engine.destroy()
    return {"losses": [r["total"] for r in losses], "ce": [r["ce"] for r in losses], "n_params": t.n_params}


@pytest.mark.slow
def test_a_few_steps_through_the_training_path_reduce_the_loss():
    from sgfm_dist.parallel.testing import run_distributed

    (res,) = run_distributed(_train_job, 1, 12, timeout_s=300)
    losses = res["losses"]
    assert losses == res["ce"]
    assert losses[0] == pytest.approx(5.55, abs=0.3)  # ~ log 257 at initialisation
    assert losses[-1] < losses[0] - 1.0, losses
