"""The modality seam: every modality of the config has a field layout and a modality object, the
model asks that object (never the config) for its encoder, readout term, decode and prompts,
and the learned maps keep their state-dict names."""
from __future__ import annotations

import pytest
import torch

from sgfm_dist.model.config import LAYOUTS, DiffusionConfig, ModelConfig
from sgfm_dist.model.modalities import MODALITIES, build_modality
from sgfm_dist.model.sgfm import build_model

SMALL = dict(width=8, n_blocks=1, forcing_width=4, forcing_blocks=1, cond_dim=16, fourier_features=4,
             wavelet="haar", levels=1)


def _model(modality: str, **kw):
    channels = {"text": 4, "video": 4, "physics": 2}.get(modality, 3)
    torch.manual_seed(0)
    return build_model(ModelConfig(modality=modality, channels=channels, **{**SMALL, **kw}),
                       DiffusionConfig(lambda_R=0.0, lambda_B=0.0)).double().eval()


def _batch(modality: str):
    g = torch.Generator().manual_seed(1)
    if modality == "text":
        tokens = torch.randint(0, 256, (2, 4, 8), generator=g)
        return {"tokens": tokens, "pad_mask": tokens != 256}
    if modality == "video":
        return {"field": torch.rand(2, 3, 4, 8, 8, generator=g, dtype=torch.float64) * 2 - 1}
    if modality == "physics":
        return {"field": torch.randn(2, 2, 4, 8, 8, generator=g, dtype=torch.float64)}
    return {"field": torch.rand(2, 3, 16, generator=g, dtype=torch.float64) * 2 - 1}


def test_every_layout_has_a_modality_and_back():
    literal = ModelConfig.__dataclass_fields__["modality"].type
    for name in LAYOUTS:
        assert name in MODALITIES and name in literal
        assert build_modality(ModelConfig(modality=name, channels=2 if name != "text" else 4)).name == name
    assert set(MODALITIES) == set(LAYOUTS)


@pytest.mark.parametrize("modality, term, names", [
    ("text", "ce", ["text"]), ("video", "recon", ["video"]), ("physics", None, []), ("timeseries", None, []),
])
def test_learned_maps_keep_their_names_and_come_first(modality, term, names):
    model = _model(modality)
    assert model.modality.readout_term == term
    children = [n for n, _ in model.named_children()]
    assert children[:len(names)] == names  # registered first: parameter order as before the seam
    assert all(any(k.startswith(n + ".") for k in model.state_dict()) for n in names)


@pytest.mark.parametrize("modality", ["text", "video", "physics", "timeseries"])
def test_training_loss_terms_follow_the_modality(modality):
    model = _model(modality)
    _, terms = model.training_loss(_batch(modality), torch.Generator().manual_seed(0))
    term = model.modality.readout_term
    assert set(terms) == {"diff"} | ({term} if term else set())
    assert all(torch.isfinite(v) for v in terms.values())


def test_decode_outputs_per_modality():
    out = _model("text").generate(2, (4, 8), 2, sampler="heun")
    assert out["tokens"].shape == (2, 4, 8) and out["field"].shape == (2, 4, 4, 8)
    out = _model("video").generate(1, (4, 8, 8), 1, sampler="heun")
    assert out["frames"].shape == (1, 3, 4, 8, 8)
    out = _model("physics").generate(1, (4, 8, 8), 1, sampler="heun")
    assert set(out) == {"field"}
    out = _model("timeseries").generate(3, (16,), 2, sampler="heun")  # a reflected window of T = 8
    assert out["field"].shape == (3, 3, 16) and out["series"].shape == (3, 8, 3)
    assert 0 <= out["series"].min() and out["series"].max() <= 1


def test_prompt_kinds_are_the_modality_s():
    with pytest.raises(ValueError, match="only text models take token prompts"):
        _model("physics").generate(1, (4, 8, 8), 1, prompt_tokens=torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="time series are generated unconditionally"):
        _model("timeseries").generate(1, (16,), 1, prompt_field=torch.zeros(1, 3, 2))
    with pytest.raises(ValueError, match="text models take prompt_tokens"):
        _model("text").generate(1, (4, 8), 1, prompt_field=torch.zeros(1, 4, 1, 8))
    # a video prompt is given in frame channels and lifted by the model's own map
    model = _model("video")
    frames = torch.rand(1, 3, 2, 8, 8, dtype=torch.float64) * 2 - 1
    out = model.generate(1, (4, 8, 8), 2, sampler="heun", prompt_field=frames)
    torch.testing.assert_close(out["field"][:, :, :2], model.video.encode(frames))


def test_encode_errors_name_the_field_layout():
    with pytest.raises(ValueError, match=r"needs key 'field' \(\[B, C, T, Y, X\]\)"):
        _model("physics").encode({"tokens": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"expected a float tensor \[B, 3, T, Y, X\]"):
        _model("video").encode({"field": torch.zeros(1, 4, 4, 8, 8)})
    with pytest.raises(ValueError, match="only text models have an embedding"):
        _model("physics").embedding_matrix()


def test_time_series_physics_is_off_unless_asked_for():
    from sgfm_dist.model.config import ModelConfig

    m = _model("timeseries")
    assert m.cfg.physics is False and m.forcing_net is None and m.dcfg.lambda_R == 0.0
    # configured: the residual term and the forcing come back (t is the series' one flow axis)
    torch.manual_seed(0)
    on = build_model(ModelConfig(modality="timeseries", channels=3, physics=True, **SMALL),
                     DiffusionConfig(lambda_R=0.5, lambda_B=0.0)).double()
    assert on.forcing_net is not None and on.cfg.flow_axes() == (2,)
    _, terms = on.training_loss(_batch("timeseries"), torch.Generator().manual_seed(0))
    assert set(terms) == {"diff", "physics"} and torch.isfinite(terms["physics"])
    assert _model("physics").forcing_net is not None and _model("physics").dcfg.lambda_R == 0.0  # as configured


def test_position_features_tell_a_window_s_ends_from_its_middle():
    m = _model("timeseries")
    assert m.cfg.positions == 4 and m.score_net.in_ch == 3 + 8  # C + 2 K d
    assert _model("physics").cfg.positions == 0 and _model("physics").score_net.in_ch == 2
    pos = m.position_features(torch.zeros(2, 3, 16, dtype=torch.float64))  # [2, 8, 16]
    assert pos.shape == (2, 8, 16)
    torch.testing.assert_close(pos[0, 0], torch.cos(2 * torch.pi * (torch.arange(16, dtype=torch.float64) + 0.5) / 16))
    # cosines are mirror-symmetric (a reflected window's two halves see the same), sines are not
    torch.testing.assert_close(pos[0, 0::2], pos[0, 0::2].flip(-1))
    torch.testing.assert_close(pos[0, 1::2], -pos[0, 1::2].flip(-1))
    # the network is no longer shift-equivariant: a rolled input does not give a rolled output
    x = torch.randn(1, 3, 16, dtype=torch.float64)
    cond = torch.randn(1, 16, dtype=torch.float64)
    with torch.no_grad():
        for p in m.score_net.out.parameters():
            p.normal_()
        y = m.score_net(torch.cat([x, m.position_features(x)], 1), cond)
        y_rolled = m.score_net(torch.cat([x.roll(4, -1), m.position_features(x)], 1), cond)
    assert (y.roll(4, -1) - y_rolled).abs().max() > 1e-3


@pytest.mark.parametrize("modality", ["text", "video", "physics", "timeseries"])
def test_training_under_bf16_autocast_matches_fp32(modality):
    """GPU training runs with ``train.precision: bf16`` (DeepSpeed's torch_autocast around the
    forward). Found on an H200: the DWT levels' GEMMs ran under autocast and wrote bf16 products
    into float32 buffers, so no SGFM could train on a GPU at the default precision. The networks
    may run in bf16; the transforms stay float32 (ops/wavelets.py ``_full_precision``), and the
    loss with its physics and L_BC terms matches the fp32 one to bf16's precision."""
    channels = {"text": 4, "video": 4, "physics": 2}.get(modality, 3)
    torch.manual_seed(0)
    model = build_model(ModelConfig(modality=modality, channels=channels, **SMALL),
                        DiffusionConfig(lambda_R=0.1, lambda_B=0.1)).float()
    batch = {k: v.float() if v.is_floating_point() else v for k, v in _batch(modality).items()}
    ref, _ = model.training_loss(batch, torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, terms = model.training_loss(batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.dtype == torch.float32 and all(torch.isfinite(v) for v in terms.values())
    torch.testing.assert_close(loss, ref, rtol=5e-2, atol=1e-3)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
