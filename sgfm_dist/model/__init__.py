"""The SGFM model: text/video/physics fields, score and forcing networks, wavelet-space
diffusion and samplers.

    config.py     ModelConfig, DiffusionConfig (typed, validated)
    layers.py     PeriodicConv, SpectralConv, ChannelRMSNorm, FiLM, FourierFeatures
    networks.py   FieldNet (score / forcing networks), ConditionEmbedding
    fields.py     TextField (embedding + tied readout), VideoLift
    modalities.py Modality per ModelConfig.modality: encoder, readout term, decode, prompts (the seam)
    diffusion.py  schedules, per-level shifts, forward process, eps-DSM loss
    samplers.py   sample_euler_maruyama / sample_heun / sample_pc, get_taus, ensemble_stats
    losses.py     the composite loss (Eq. 38) and the boundary loss L_BC (Eq. 44)
    generation.py the cascade estimate, Denoiser, PromptConstraint, GuidanceEnergy (k-diffusion style)
    sgfm.py       SGFM (training_loss, generate, denoising_cross_entropy, set_domain), build_model

Nothing here imports torch.distributed, mpi4py or deepspeed: a split field is handled by
swapping the model's domain (``SGFM.set_domain``).
"""
from .config import DiffusionConfig, ModelConfig
from .sgfm import SGFM, build_model, wavelet_energy_per_level
from . import transformer  # noqa: F401  (registers model.kind "transformer" in sgfm.MODEL_KINDS)

__all__ = ["DiffusionConfig", "ModelConfig", "SGFM", "build_model", "wavelet_energy_per_level"]
