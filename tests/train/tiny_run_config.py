"""The typed config of the tiny text runs that the elastic-resume and re-sharding tests launch
through ``Trainer.fit``: one model (8 wide, one block, haar J=2 on 8 x 16 byte fields), a global
batch of ``global_batch`` samples however it is spread (``grad_accum = global_batch / (dp x
micro_batch)``), no checkpoints or evaluations unless the test asks."""
from __future__ import annotations


def tiny_text_config(out_dir: str, dp: int, sp: int, stop_at: int, *, steps: int, global_batch: int,
                     micro_batch: int, zero_stage: int = 0):
    from sgfm_dist.model.config import DiffusionConfig, ModelConfig
    from sgfm_dist.train.config import (Config, DataConfig, LoggingConfig, OptimConfig, ParallelConfig,
                                        TrainConfig)

    model = ModelConfig(modality="text", channels=4, width=8, n_blocks=1, mlp_ratio=1, forcing_width=4,
                        forcing_blocks=1, forcing_noise_channels=1, wavelet="haar", levels=2, kernel_size=3,
                        spectral_modes=(2, 4), fourier_features=4, cond_dim=8)
    return Config(model=model, diffusion=DiffusionConfig(prompt_training=0.25, lambda_R=0.1, lambda_B=0.1),
                  data=DataConfig(rows=8, row_len=16, seed=5),
                  optim=OptimConfig(lr=1e-2, warmup_steps=2, grad_clip=1.0),
                  train=TrainConfig(steps=steps, stop_at=stop_at, micro_batch=micro_batch,
                                    grad_accum=global_batch // (dp * micro_batch), seed=3, device="cpu",
                                    ema_decay=0.9, out_dir=out_dir, ckpt_interval=0, eval_interval=0),
                  logging=LoggingConfig(log_interval=1, progress=False, tensorboard_dir=""),
                  parallel=ParallelConfig(dp=dp, sp=sp, zero_stage=zero_stage))
