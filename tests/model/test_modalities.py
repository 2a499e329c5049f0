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
    ("text", "ce", ["text"]), ("video", "recon", ["video"]), ("physics", None, []),
])
def test_learned_maps_keep_their_names_and_come_first(modality, term, names):
    model = _model(modality)
    assert model.modality.readout_term == term
    children = [n for n, _ in model.named_children()]
    assert children[:len(names)] == names  # registered first: parameter order as before the seam
    assert all(any(k.startswith(n + ".") for k in model.state_dict()) for n in names)


@pytest.mark.parametrize("modality", ["text", "video", "physics"])
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


def test_prompt_kinds_are_the_modality_s():
    with pytest.raises(ValueError, match="only text models take token prompts"):
        _model("physics").generate(1, (4, 8, 8), 1, prompt_tokens=torch.tensor([[1, 2]]))
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
