"""What a modality is to the model: an encoder (batch -> clean field ``u0``), a readout (field ->
outputs, and the readout loss term that trains it) and a prompt (the known first positions or
t-slices). The field layout itself (axes, flow axes, network defaults) is
``config.LAYOUTS``; the data sources are ``sgfm_dist.train.batches``'s, the metrics and sample
writers ``sgfm_dist.eval``'s.

    text        ids [B, T, L] -> embedding field [B, C, T, L]; tied logits; cross-entropy "ce"
    video       frames [B, D, T, H, W] -> 1x1 lift [B, C, T, H, W]; tied readout; MSE "recon"
    physics     velocity [B, k, T, H, W] used raw; no readout term
    timeseries  windows [B, T, F] in [0, 1] -> 2x - 1, t made periodic -> [B, F, N]; no readout term;
                decode folds the field back to [n, T, F] (``ops.series``)

``SGFM`` holds one :class:`Modality` (``model.modality``) and asks it, never the config, for
anything that differs between modalities, so the diffusion, the networks, the samplers, the
parallelism and the training loop do not branch on the kind of data (DESIGN.md rule 14).

A modality object holds no tensors: its learned maps (``modules()``) are registered on the
SGFM under their own names (``model.text``, ``model.video``), so parameter order and
state-dict keys are the model's as they always were, and the methods take the model to reach
them (and its domain and dtypes).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.series import field_to_series
from .config import ModelConfig
from .fields import TextField, VideoLift

# ``model`` below is an ``sgfm_dist.model.sgfm.SGFM`` (typed nn.Module: sgfm.py imports this module).


class Modality:
    """The base: a field used raw from ``batch["field"]``, no readout term, field prompts."""

    name = ""
    readout_term: str | None = None
    """Name of the readout loss term in ``SGFM.training_loss`` (weight ``diffusion.lambda_ce``); None: none."""
    counts_tokens = False
    """Whether batches carry text tokens (throughput is then also logged per token)."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg

    # ------------------------------------------------------------------ construction
    def modules(self) -> dict[str, nn.Module]:
        """The learned data <-> field maps, registered on the SGFM under these names."""
        return {}

    @property
    def data_channels(self) -> int:
        """Channels of ``batch["field"]`` and of a prompt field as the data holds them."""
        return self.cfg.channels

    def field_description(self, channels: str = "C") -> str:
        """``[B, C, T, ...]`` as the error messages name the field."""
        return f"[B, {channels}, " + ", ".join(a.upper() for a in self.cfg.layout.axes) + "]"

    # ------------------------------------------------------------------ encode
    def encode(self, model: nn.Module, batch: dict) -> Tensor:
        """The clean field ``u0`` ``[B, C, *S]`` of a batch (checked; shape checked by the caller)."""
        cfg = self.cfg
        if "field" not in batch:
            raise ValueError(f"batch: a {cfg.modality} batch needs key 'field' ({self.field_description()}); "
                             f"got keys {sorted(batch)}" + ("; a loader's uint8 'frames' become the field in "
                             "sgfm_dist.train.trainer.batch_to_device (data.fields.frames_to_field)"
                             if "frames" in batch else ""))
        x = batch["field"]
        want = self.data_channels
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim != 2 + cfg.field_ndim \
                or x.shape[1] != want:
            raise ValueError(f"batch['field']: expected a float tensor {self.field_description(str(want))}, got"
                             f"  {tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        return self.lift(model, x.to(model.math_dtype))

    def lift(self, model: nn.Module, x: Tensor) -> Tensor:
        """Data channels ``[B, D, *S]`` -> field ``[B, C, *S]`` (identity for raw fields)."""
        return x

    # ------------------------------------------------------------------ readout
    def readout_loss(self, model: nn.Module, u_hat: Tensor, batch: dict, logsnr: Tensor,
                     weight: Tensor | None = None) -> Tensor | None:
        """The readout term of the estimate ``u_hat`` made at noise level ``logsnr [B]``; ``weight
        [B]`` selects samples (cascade: the final stage). None when the modality has no readout."""
        return None

    def rounding_temperature(self, round_to_vocab: bool, vocab_temperature: float) -> float | None:
        """The sampler's rounding temperature (``generation.Denoiser``); None: no rounding."""
        return None

    def decode(self, model: nn.Module, u: Tensor, prompt=None) -> dict:
        """What a generated field ``u [n, C, *S_local]`` reads out to, beyond the field itself
        (per cell, so a split field decodes block by block)."""
        return {}

    # ------------------------------------------------------------------ prompts
    def prompt(self, model: nn.Module, prompt_tokens: Tensor | None, prompt_field: Tensor | None, n: int,
               like: Tensor):
        """The ``generation.Prompt`` of ``n`` samples shaped like ``like [n, C, *S_local]``, or None."""
        from .generation import field_prompt

        if prompt_tokens is not None:
            raise ValueError(f"prompt_tokens: only text models take token prompts (modality={self.cfg.modality!r}); "
                             f"use prompt_field")
        if prompt_field is None:
            return None
        return field_prompt(model, prompt_field, n, like, self.data_channels, lambda pf: self.lift(model, pf))


class TextModality(Modality):
    """Byte / token ids embedded into a field, read out by the tied transpose (``fields.TextField``)."""

    name = "text"
    readout_term = "ce"
    counts_tokens = True

    def modules(self) -> dict[str, nn.Module]:
        return {"text": TextField(self.cfg.vocab_size, self.cfg.channels, self.cfg.pad_id)}

    def encode(self, model: nn.Module, batch: dict) -> Tensor:
        if "tokens" not in batch:
            raise ValueError(f"batch: a text batch needs key 'tokens' (Long [B, T, L]); got keys {sorted(batch)}")
        tokens = batch["tokens"]
        model.text.check_tokens(tokens, "batch['tokens']")
        if tokens.ndim != 3:
            raise ValueError(f"batch['tokens']: expected [B, T, L], got shape {tuple(tokens.shape)}")
        return model.text.encode(tokens).to(model.math_dtype)

    def readout_loss(self, model, u_hat, batch, logsnr, weight=None):
        """Masked cross-entropy (nats per real token) of the tied readout of ``u_hat``."""
        dom = model.domain
        tokens = batch["tokens"].long()  # [B, T, L]
        mask = batch.get("pad_mask")
        mask = (tokens != self.cfg.pad_id) if mask is None else mask.bool()
        # chunked, the V-wide logits recomputed in backward: the full [B, T, L, V] is never kept
        ce = model.text.cross_entropy(u_hat, logsnr, tokens)  # [B, T, L]
        m = mask.to(ce.dtype)
        if weight is not None:
            m = m * weight.reshape(-1, 1, 1).to(ce.dtype)
        num, den = dom.sum(((ce * m).sum(dim=(1, 2)))), dom.sum(m.sum(dim=(1, 2)))
        return num.sum() / den.sum().clamp(min=1)

    def rounding_temperature(self, round_to_vocab, vocab_temperature):
        return vocab_temperature if round_to_vocab else None

    def decode(self, model, u, prompt=None):
        clean = torch.full((u.shape[0],), model.dcfg.logsnr_max, device=u.device)  # the final estimate is clean
        tokens = model.text.logits(u, clean).argmax(-1)  # [n, T, L]
        if prompt is not None and prompt.ids is not None:
            # the readout's bias could outvote an exact prompt embedding: write the ids
            tokens = torch.where(prompt.mask[:, 0].bool(), prompt.ids.expand_as(tokens), tokens)
        return {"tokens": tokens}

    def prompt(self, model, prompt_tokens, prompt_field, n, like):
        from .generation import token_prompt

        if prompt_tokens is not None:
            return token_prompt(model, prompt_tokens, n, like)
        if prompt_field is not None:
            raise ValueError("prompt_field: text models take prompt_tokens")
        return None


class VideoModality(Modality):
    """RGB frames lifted to C channels by a 1x1 map, read out by its tied transpose (``fields.VideoLift``)."""

    name = "video"
    readout_term = "recon"

    def modules(self) -> dict[str, nn.Module]:
        return {"video": VideoLift(self.cfg.data_channels, self.cfg.channels)}

    @property
    def data_channels(self) -> int:
        return self.cfg.data_channels

    def lift(self, model, x):
        return model.video.encode(x)  # [B, C, *S]

    def readout_loss(self, model, u_hat, batch, logsnr, weight=None):
        """MSE of the tied readout of ``u_hat`` against the frames."""
        dom = model.domain
        frames = batch["field"].to(u_hat.dtype)
        err = (model.video.readout(u_hat) - frames).square().flatten(1).sum(1)  # [B]
        err = dom.sum(err) / (frames.shape[1] * dom.numel(frames))
        if weight is not None:
            return (err * weight).sum() / weight.sum().clamp(min=1)
        return err.mean()

    def decode(self, model, u, prompt=None):
        return {"frames": model.video.readout(u)}  # [n, D, *S]


class PhysicsModality(Modality):
    """A velocity field used raw (channels = its components)."""

    name = "physics"


# ---------------------------------------------------------------------------- time series
class TimeSeriesModality(Modality):
    """Windows of a multivariate series: the field is made by the data source
    (``sgfm_dist.data.timeseries``, before the sp ranks split it along t) and used raw."""

    name = "timeseries"

    def decode(self, model, u, prompt=None):
        # folding needs the whole t axis: a split field is gathered by the sample writer first
        if getattr(model.domain, "is_split", False):
            return {}
        return {"series": field_to_series(u, self.cfg.series_padding)}  # [n, T, F]

    def prompt(self, model, prompt_tokens, prompt_field, n, like):
        if prompt_tokens is not None or prompt_field is not None:
            raise ValueError("prompt: time series are generated unconditionally (a prompt of first steps would "
                             "also have to fix their mirror image at the end of the reflected field)")
        return None


MODALITIES: dict[str, type[Modality]] = {"text": TextModality, "video": VideoModality, "physics": PhysicsModality,
                                         "timeseries": TimeSeriesModality}
"""The :class:`Modality` of each ``ModelConfig.modality``."""


def build_modality(cfg: ModelConfig) -> Modality:
    """The modality object of ``cfg.modality``."""
    if cfg.modality not in MODALITIES:
        raise ValueError(f"model.modality: no modality {cfg.modality!r} (have {sorted(MODALITIES)})")
    return MODALITIES[cfg.modality](cfg)
