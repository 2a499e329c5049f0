"""One training step on a dp x sp mesh vs the single-process step on the same global batch,
through the functions ``launch/train.py`` runs (``build_training`` and ``train_step``), for
ZeRO 0-3, text and physics fields, joint and cascade diffusion, and physics forecasting (prompt
lengths drawn per sample, increments, the prompt as a clean input); batched into one spawned job
per world size.

``run_job(world_size)`` runs on every rank (via ``run_distributed``): for every mesh
``(dp, sp)`` of that world size, every field / mode and every ZeRO stage it builds the same
small SGFM (same seed and perturbation), hands it to ``build_training`` with a typed
``Config``, takes one ``train_step`` on this rank's dp group's share of a fixed global batch,
and compares with a reference computed on the rank itself on one device (``LocalDomain``,
plain autograd and ``torch.optim.AdamW``, no DeepSpeed): loss, gradient norm, updated
parameters and the EMA.

The reference loss is the mean over the dp groups of each group's loss, every sample drawing
its diffusion time and noise from ``step_draws`` at its position in the global batch (exactly
what the distributed ranks do: the draws of a sample depend on its global index only, not on
dp or sp; dynamics.white_noise draws each sample's global field and shards it), so the two
compute the same function of the same random numbers and must agree to rounding. (The mean
over groups, not one loss of the whole batch: the text cross-entropy averages over the real
tokens of a micro-batch.)

Adam's epsilon is 1 here: the first Adam update is ``lr * g / (|g| + eps)``, which with the
usual tiny epsilon is ``lr * sign(g)`` and would turn a rounding-level difference of a
near-zero gradient component into a full ``2 lr`` step; with eps = 1 the update is a smooth
function of the gradient, so comparing parameters after the step checks the gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

GLOBAL_BATCH = 2
LR = 0.5
STAGES = (0, 1, 2, 3)
SEED = 1234
# field extents per kind: text (T, L) split along t; physics (T, Y, X) split along y
FIELDS = {"text": (32, 16), "physics": (16, 32, 16)}
VARIANTS = ("text-joint", "text-cascade", "physics-joint", "physics-cascade", "physics-prompt")
# physics-prompt: joint diffusion with forecasting on: noise-free prompts of lengths drawn per sample,
# increments over the last given slice and the prompt as a clean network input
# activation checkpointing (parallel.activation_checkpointing): the recomputation in backward
# runs the halo exchanges and FFT transposes again; one field, ZeRO 0, every mesh
CHECKPOINT_VARIANT, CHECKPOINT_MODES = "physics-joint", ("full", "selective")


def meshes(world_size: int) -> list[tuple[int, int]]:
    return {1: [(1, 1)], 2: [(1, 2), (2, 1)], 4: [(2, 2), (1, 4)]}[world_size]


def case_id(variant: str, dp: int, sp: int, stage: int) -> str:
    return f"{variant}-dp{dp}-sp{sp}-zero{stage}"


def make_config(variant: str, dp: int = 1, sp: int = 1, stage: int = 0, checkpointing: bool | str = False):
    """The typed run config of one case (what a YAML file would give)."""
    from sgfm_dist.model.config import DiffusionConfig, ModelConfig
    from sgfm_dist.train.config import Config, DataConfig, OptimConfig, ParallelConfig, TrainConfig

    kind, mode = variant.split("-")
    common = dict(width=8, n_blocks=1, mlp_ratio=1, forcing_width=4, forcing_blocks=1, forcing_noise_channels=1,
                  wavelet="db2", levels=2, fourier_features=4, cond_dim=8)
    if kind == "text":
        model = ModelConfig(modality="text", channels=4, kernel_size=3, spectral_modes=(3, 4), **common)
        data = DataConfig(rows=FIELDS["text"][0], row_len=FIELDS["text"][1])
    else:
        model = ModelConfig(modality="physics", channels=2, kernel_size=3, spectral_modes=(2, 4, 4), **common)
        data = DataConfig()
    # the two samples of the global batch: one given its prompt, one not, prompt lengths 1 and 3 drawn
    forecast = dict(prompt_training=0.75, prompt_residual=True, prompt_condition=True, prompt_lengths=(1, 7))
    return Config(model=model,
                  diffusion=DiffusionConfig(mode="joint" if mode == "prompt" else mode, lambda_R=0.1, lambda_B=0.1,
                                            lambda_ce=1.0, **(forecast if mode == "prompt" else {})),
                  data=data,
                  optim=OptimConfig(lr=LR, warmup_steps=0, schedule="constant", eps=1.0, grad_clip=0.0),
                  train=TrainConfig(steps=1, micro_batch=GLOBAL_BATCH // dp, seed=SEED, device="cpu",
                                    ema_decay=0.0),
                  parallel=ParallelConfig(dp=dp, sp=sp, zero_stage=stage, activation_checkpointing=checkpointing))


def small_model(cfg):
    """``build_model`` of ``cfg`` with every parameter perturbed (the output projections start
    at zero: an untrained net predicts 0, and its layers would get trivial gradients)."""
    from sgfm_dist.model.sgfm import build_model

    torch.manual_seed(SEED)
    model = build_model(cfg.model, cfg.diffusion)
    with torch.no_grad():
        g = torch.Generator().manual_seed(SEED + 1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def global_batch(kind: str) -> dict:
    g = torch.Generator().manual_seed(SEED + 2)
    if kind == "text":
        tokens = torch.randint(0, 256, (GLOBAL_BATCH, *FIELDS["text"]), generator=g)
        tokens[:, -3:, -5:] = 256  # some pads, so the masked cross-entropy counts differ per block
        return {"tokens": tokens, "pad_mask": tokens != 256}
    field = torch.randn(GLOBAL_BATCH, 2, *FIELDS["physics"], generator=g)  # [B, 2, T, Y, X]
    # per-sample physical parameters, different in each sample
    return {"field": field, "nu": torch.tensor([1e-3, 3e-2]), "forcing_strength": torch.tensor([0.5, 1.0])}


def group_batch(batch: dict, dp: int, dp_rank: int) -> dict:
    m = GLOBAL_BATCH // dp
    return {k: v[dp_rank * m:(dp_rank + 1) * m] for k, v in batch.items()}


def reference_step(variant: str, dp: int) -> dict:
    """Single device: loss, grad norm and AdamW-updated parameters of the mean loss over dp groups."""
    from sgfm_dist.train.setup import step_draws

    cfg = make_config(variant, dp)
    model = small_model(cfg)
    batch = global_batch(variant.split("-")[0])
    m = GLOBAL_BATCH // dp
    losses = [model.training_loss(group_batch(batch, dp, r),
                                  generator=step_draws(SEED, 0, r * m, m, GLOBAL_BATCH, "cpu"))[0]
              for r in range(dp)]
    loss = torch.stack(losses).mean()
    loss.backward()
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()]))
    o = cfg.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    opt.step()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"loss": float(loss.detach()), "grad_norm": float(norm), "params": params}


def distributed_step(variant: str, dp: int, sp: int, stage: int, checkpointing: bool | str = False) -> dict:
    """This rank's view of one ``train_step`` on the (dp, sp) mesh, ZeRO ``stage``."""
    from sgfm_dist.train.engine import full_parameters
    from sgfm_dist.train.setup import build_training, train_step

    cfg = make_config(variant, dp, sp, stage, checkpointing)
    kind = variant.split("-")[0]
    t = build_training(cfg, "cpu", FIELDS[kind], model=small_model(cfg))
    try:
        result = train_step(t, [group_batch(global_batch(kind), dp, t.plan.dp_rank)])
        # the reported loss: mean over dp groups (every sp rank holds its group's replicated loss)
        total = torch.tensor(result.losses["total"], dtype=torch.float64)
        dist.all_reduce(total)
        with full_parameters(t.engine) as module:
            params = {n: p.detach().clone() for n, p in module.named_parameters()}
        ema = {n: v.clone() for n, v in t.ema.full_shadow().items()}  # ema_decay 0: the updated weights
        return {"loss": float(total) / (dp * sp), "grad_norm": result.grad_norm, "params": params, "ema": ema}
    finally:
        t.engine.destroy()


def compare(dist_res: dict, ref: dict) -> dict:
    """Relative errors of loss, grad norm, the largest parameter difference and the EMA's."""
    out = {"loss": abs(dist_res["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-12),
           "grad_norm": abs(dist_res["grad_norm"] - ref["grad_norm"]) / max(ref["grad_norm"], 1e-12)}
    worst, name, ema_worst = 0.0, "", 0.0
    for n, p in ref["params"].items():
        scale = float(p.abs().max().clamp(min=1e-12))
        err = float((dist_res["params"][n] - p).abs().max()) / scale
        if err > worst:
            worst, name = err, n
        if n in dist_res["ema"]:
            ema_worst = max(ema_worst, float((dist_res["ema"][n].to(p.dtype) - p).abs().max()) / scale)
    out.update(params=worst, worst_param=name, ema=ema_worst)
    # the step must actually have moved the weights (a no-op update would also "match" nothing)
    out["grad_norm_ref"] = ref["grad_norm"]
    return out


def run_job(world_size: int) -> dict:
    """Every case of this world size on this rank: ``{case_id: compare(...)}``."""
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    from sgfm_dist.parallel.runtime import setup_distributed

    setup_distributed("cpu")  # wraps the harness's group in DeepSpeed's comm layer
    results = {}
    for variant in VARIANTS:
        refs: dict[int, dict] = {}
        for dp, sp in meshes(world_size):
            if dp not in refs:
                refs[dp] = reference_step(variant, dp)
            for stage in STAGES:
                # a failing rank raises: the harness stops the others (no rank waits in a collective)
                results[case_id(variant, dp, sp, stage)] = compare(distributed_step(variant, dp, sp, stage), refs[dp])
            if variant == CHECKPOINT_VARIANT:
                for mode in CHECKPOINT_MODES:
                    results[f"{case_id(variant, dp, sp, 0)}-ckpt-{mode}"] = compare(
                        distributed_step(variant, dp, sp, 0, mode), refs[dp])
    if world_size == 2:
        results.update(sampling_cases())
    return results


SAMPLERS = ("euler_maruyama", "pc")


def sampling_cases() -> dict:
    """``generate`` on a field split over 2 sp ranks vs on one device, same seed: the gathered
    field and the tokens must agree (noise is drawn globally and sharded)."""
    from sgfm_dist.parallel.parallelize import parallelize_for_sampling

    cfg = make_config("text-joint")
    field = FIELDS["text"]
    out = {}
    for sampler in SAMPLERS:
        ref = small_model(cfg).generate(2, field, steps=3, sampler=sampler,
                                        generator=torch.Generator().manual_seed(5), physics_eta=0.05)
        model = small_model(cfg)
        domain = parallelize_for_sampling(model, 2, 2, field, "db2", 2, (2,))
        res = model.generate(2, field, steps=3, sampler=sampler, generator=torch.Generator().manual_seed(5),
                             physics_eta=0.05)
        u = domain.gather(res["field"])
        tokens = domain.gather(res["tokens"].unsqueeze(1))[:, 0]
        scale = float(ref["field"].abs().max())
        # argmax tokens may flip at readout near-ties (rounding-level field differences)
        out[f"sample-{sampler}"] = {"field": float((u - ref["field"]).abs().max()) / max(scale, 1e-12),
                                    "tokens_agree": float((tokens == ref["tokens"]).float().mean())}
    return out
