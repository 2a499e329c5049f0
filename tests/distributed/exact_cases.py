"""One training step on a dp x sp mesh vs the single-process step on the same global batch,
for ZeRO 1, 2 and 3, batched into one spawned job per world size.

``run_job(world_size)`` runs on every rank (via ``run_distributed``): for every mesh
``(dp, sp)`` of that world size and every ZeRO stage it builds the same small text SGFM
(same seed), parallelizes it, takes one SGD step through DeepSpeed on this rank's share of a
fixed global batch, and compares with a reference computed on the rank itself on one device
(``LocalDomain``, plain autograd, no DeepSpeed): loss, gradient norm and updated parameters.

The reference loss is the mean over the dp groups of each group's loss, every group drawing
its diffusion times and noise from a generator seeded by its dp rank (exactly what the
distributed ranks do: the sp ranks of a group share the generator, dynamics.white_noise
draws the global field and shards it), so the two compute the same function of the same
random numbers and must agree to rounding.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

GLOBAL_BATCH = 2
FIELD = (32, 16)  # (T, L): split along t, 32 / 4 ranks = 8 rows, divisible by 2**levels
LR = 0.5
STAGES = (1, 2, 3)
SEED = 1234


def meshes(world_size: int) -> list[tuple[int, int]]:
    return {1: [(1, 1)], 2: [(1, 2), (2, 1)], 4: [(2, 2), (1, 4)]}[world_size]


def case_ids(world_size: int) -> list[str]:
    return [f"dp{dp}-sp{sp}-zero{z}" for dp, sp in meshes(world_size) for z in STAGES]


def small_model(dtype=torch.float32):
    from sgfm_dist.model.config import DiffusionConfig, ModelConfig
    from sgfm_dist.model.sgfm import build_model

    mcfg = ModelConfig(modality="text", channels=4, width=8, n_blocks=1, kernel_size=3, spectral_modes=(3, 4),
                       mlp_ratio=1, forcing_width=4, forcing_blocks=1, forcing_noise_channels=1, wavelet="db2",
                       levels=2, fourier_features=4, cond_dim=8)
    dcfg = DiffusionConfig(lambda_R=0.1, lambda_B=0.1, lambda_ce=1.0)
    torch.manual_seed(SEED)
    model = build_model(mcfg, dcfg).to(dtype)
    if getattr(getattr(model, "text", None), "logit_scale", None) is not None and model.text.logit_scale.dim() == 0:
        # DeepSpeed 0.19.8 cannot broadcast 0-dim parameters (it views each as bytes); the
        # scale broadcasts the same with shape [1]
        model.text.logit_scale = torch.nn.Parameter(model.text.logit_scale.detach().reshape(1))
    # the output projections start at zero (an untrained net predicts 0): perturb every
    # parameter so that every layer's gradient is non-trivial
    with torch.no_grad():
        g = torch.Generator().manual_seed(SEED + 1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def global_batch() -> dict:
    g = torch.Generator().manual_seed(SEED + 2)
    tokens = torch.randint(0, 256, (GLOBAL_BATCH, *FIELD), generator=g)
    tokens[:, -3:, -5:] = 256  # some pads, so the masked cross-entropy counts differ per block
    return {"tokens": tokens, "pad_mask": tokens != 256}


def group_batch(batch: dict, dp: int, dp_rank: int) -> dict:
    m = GLOBAL_BATCH // dp
    return {k: v[dp_rank * m:(dp_rank + 1) * m] for k, v in batch.items()}


def group_generator(dp_rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(SEED * 7 + dp_rank)


def reference_step(dp: int) -> dict:
    """Single device: loss, grad norm and SGD-updated parameters of the mean loss over dp groups."""
    model = small_model()
    batch = global_batch()
    losses = [model.training_loss(group_batch(batch, dp, r), generator=group_generator(r))[0] for r in range(dp)]
    loss = torch.stack(losses).mean()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
    params = {n: (p.detach() - LR * grads[n]) for n, p in model.named_parameters()}
    return {"loss": float(loss.detach()), "grad_norm": float(norm), "params": params}


def distributed_step(dp: int, sp: int, stage: int) -> dict:
    """This rank's view of one DeepSpeed step on the (dp, sp) mesh."""
    import deepspeed

    from sgfm_dist.parallel.mesh import ProcessMesh
    from sgfm_dist.parallel.parallelize import ParallelizeConfig, apply_zero, parallelize
    from sgfm_dist.train.distributed import BatchAccounting, backward_scale, initialize_engine, shard_batch
    from sgfm_dist.train.engine import TrainingLoss

    mesh = ProcessMesh.create(dp=dp, sp=sp)
    model = small_model()
    layout = mesh.layout(FIELD, (2,))
    plan = parallelize(model, mesh, layout, ParallelizeConfig(wavelet="db2", levels=2, zero_stage=stage))
    micro = GLOBAL_BATCH // dp
    base = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
            "steps_per_print": 10**9, "zero_allow_untested_optimizer": True}
    ds_config = apply_zero(base, mesh, micro, 1, stage)
    wrapper = TrainingLoss(model)
    opt = torch.optim.SGD(wrapper.parameters(), lr=LR)
    engine = initialize_engine(wrapper, ds_config, BatchAccounting(micro, 1, dp, sp), optimizer=opt)
    try:
        batch = shard_batch(group_batch(global_batch(), dp, mesh.dp_rank), plan.domain)
        loss, _ = engine(batch, generator=group_generator(mesh.dp_rank))
        engine.backward(loss * backward_scale(sp))
        engine.step()
        norm = engine.get_global_grad_norm()
        # the reported loss: mean over dp groups (every sp rank holds its group's replicated loss)
        total = loss.detach().clone()
        dist.all_reduce(total)
        total = float(total) / (dp * sp)
        params = {}
        module = engine.module.model
        ctx = deepspeed.zero.GatheredParameters(list(module.parameters())) if stage == 3 else _null()
        with ctx:
            for n, p in module.named_parameters():
                params[n] = p.detach().clone()
        return {"loss": total, "grad_norm": float(norm), "params": params}
    finally:
        engine.destroy()


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def compare(dist_res: dict, ref: dict) -> dict:
    """Relative errors of loss, grad norm and the largest parameter difference."""
    out = {"loss": abs(dist_res["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-12),
           "grad_norm": abs(dist_res["grad_norm"] - ref["grad_norm"]) / max(ref["grad_norm"], 1e-12)}
    worst, name = 0.0, ""
    for n, p in ref["params"].items():
        q = dist_res["params"][n]
        err = float((q - p).abs().max() / p.abs().max().clamp(min=1e-12))
        if err > worst:
            worst, name = err, n
    out["params"] = worst
    out["worst_param"] = name
    # the step must actually have moved the weights (a no-op update would also "match" nothing)
    out["grad_norm_ref"] = ref["grad_norm"]
    return out


def run_job(world_size: int) -> dict:
    """Every case of this world size on this rank: ``{case_id: compare(...)}`` or ``{"error": tb}``."""
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    from sgfm_dist.train.engine import setup_distributed

    setup_distributed("cpu")  # wraps the harness's group in DeepSpeed's comm layer
    refs: dict[int, dict] = {}
    results = {}
    for dp, sp in meshes(world_size):
        if dp not in refs:
            refs[dp] = reference_step(dp)
        for stage in STAGES:
            cid = f"dp{dp}-sp{sp}-zero{stage}"
            # a failing rank raises: the harness stops the others (no rank waits in a collective)
            results[cid] = compare(distributed_step(dp, sp, stage), refs[dp])
    if world_size == 2:
        results.update(sampling_cases())
    return results


SAMPLERS = ("euler_maruyama", "pc")


def sampling_cases() -> dict:
    """``generate`` on a field split over 2 sp ranks vs on one device, same seed: the gathered
    field and the tokens must agree (noise is drawn globally and sharded)."""
    from sgfm_dist.parallel.mesh import ProcessMesh
    from sgfm_dist.parallel.parallelize import ParallelizeConfig, parallelize

    mesh = ProcessMesh.create(dp=1, sp=2)
    out = {}
    for sampler in SAMPLERS:
        ref_model = small_model()
        ref = ref_model.generate(2, FIELD, steps=3, sampler=sampler, generator=torch.Generator().manual_seed(5),
                                 physics_eta=0.05)
        model = small_model()
        plan = parallelize(model, mesh, mesh.layout(FIELD, (2,)), ParallelizeConfig(wavelet="db2", levels=2))
        res = model.generate(2, FIELD, steps=3, sampler=sampler, generator=torch.Generator().manual_seed(5),
                             physics_eta=0.05)
        field = plan.domain.gather(res["field"])
        tokens = plan.domain.gather(res["tokens"].unsqueeze(1))[:, 0]
        scale = float(ref["field"].abs().max())
        # argmax tokens may flip at readout near-ties (rounding-level field differences)
        out[f"sample-{sampler}"] = {"field": float((field - ref["field"]).abs().max()) / max(scale, 1e-12),
                                    "tokens_agree": float((tokens == ref["tokens"]).float().mean())}
    return out
