"""A 1-D time-series field split along t over sp = 1, 2 and 4 ranks trains and samples like one process:
one ``train_step`` through ``build_training`` (the functions ``launch/train.py`` runs) against
the single-device step on the same batch (loss, gradient norm, updated parameters; Adam's eps 1
as in ``exact_cases``: the first update is then a smooth function of the gradient), and
``generate`` on the split field against the whole field for the same seed. Joint and cascade
diffusion, reflected field of the Sines windows (T = 16 -> N = 32, 2 levels: 8 cells per rank at
sp = 4; the spectral layers' transpose splits the 4 samples there, no field axis being whole)."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.distributed

SEED, LR, T, B = 4321, 0.5, 16, 4
MODES = ("joint", "cascade")


def make_config(mode: str, sp: int = 1):
    from sgfm_dist.model.config import DiffusionConfig, ModelConfig
    from sgfm_dist.train.config import Config, DataConfig, OptimConfig, ParallelConfig, TrainConfig

    model = ModelConfig(modality="timeseries", channels=3, width=8, n_blocks=1, mlp_ratio=1, kernel_size=3,
                        spectral_modes=4, wavelet="db2", levels=2, fourier_features=4, cond_dim=8)
    return Config(model=model, diffusion=DiffusionConfig(mode=mode, lambda_B=0.1),
                  data=DataConfig(source="sines", frames=T),
                  optim=OptimConfig(lr=LR, warmup_steps=0, schedule="constant", eps=1.0, grad_clip=0.0),
                  train=TrainConfig(steps=1, micro_batch=B, seed=SEED, device="cpu", ema_decay=0.0),
                  parallel=ParallelConfig(sp=sp))


def small_model(cfg):
    from sgfm_dist.model.sgfm import build_model

    torch.manual_seed(SEED)
    model = build_model(cfg.model, cfg.diffusion)
    with torch.no_grad():  # the output projection starts at zero: perturb so every layer has a gradient
        g = torch.Generator().manual_seed(SEED + 1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def batch(cfg) -> dict:
    from sgfm_dist.train.batches import build_train_source

    return next(iter(build_train_source(cfg, 0, 1, num_workers=0)))  # {"field" [B, 3, 2T]}


def job() -> dict:
    """On every rank of a P-rank group: the sp = P step and sample vs the one-device ones."""
    import os

    import torch.distributed as dist

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    from sgfm_dist.parallel.parallelize import parallelize_for_sampling
    from sgfm_dist.parallel.runtime import setup_distributed
    from sgfm_dist.train.batches import global_field_shape
    from sgfm_dist.train.engine import full_parameters
    from sgfm_dist.train.setup import build_training, step_draws, train_step

    setup_distributed("cpu")
    world = dist.get_world_size()
    out = {}
    for mode in MODES:
        # one device: plain autograd and AdamW on the whole field
        cfg1 = make_config(mode)
        ref = small_model(cfg1)
        whole = batch(cfg1)
        n = whole["field"].shape[0]
        loss, _ = ref.training_loss(whole, generator=step_draws(cfg1.train.seed, 0, 0, n, n, "cpu"))
        loss.backward()
        ref_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters()]))
        o = cfg1.optim
        torch.optim.AdamW(ref.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay).step()

        # sp = P: the field split along t by build_training, one train_step
        cfg = make_config(mode, sp=world)
        shape = global_field_shape(cfg)
        t = build_training(cfg, "cpu", shape, model=small_model(cfg))
        try:
            res = train_step(t, [whole])
            with full_parameters(t.engine) as module:
                worst = max(float((p.detach() - q.detach()).abs().max() / q.detach().abs().max().clamp(min=1e-12))
                            for (_, p), (_, q) in zip(module.named_parameters(), ref.named_parameters()))
            layout = getattr(t.plan.domain, "layout", None)  # None: one rank, the local domain
            split_axes = tuple(layout.split_axes) if layout is not None else ()
        finally:
            t.engine.destroy()
        total = torch.tensor(res.losses["total"], dtype=torch.float64)
        dist.all_reduce(total)
        out[f"step-{mode}"] = {"loss": abs(float(total) / world - float(loss)) / abs(float(loss)),
                               "grad_norm": abs(res.grad_norm - float(ref_norm)) / float(ref_norm),
                               "params": worst, "shape": shape, "split": split_axes}

        # sampling: the split field equals the whole one for the same seed
        whole_s = small_model(cfg1).generate(2, shape, steps=3, sampler="pc", generator=torch.Generator().manual_seed(7))
        model = small_model(cfg1)
        domain = parallelize_for_sampling(model, world, world, shape, "db2", 2, (2,))
        split_s = model.generate(2, shape, steps=3, sampler="pc", generator=torch.Generator().manual_seed(7))
        u = domain.gather(split_s["field"])
        out[f"sample-{mode}"] = float((u - whole_s["field"]).abs().max() / whole_s["field"].abs().max())
        out[f"series-{mode}"] = ("series" in whole_s and "series" not in split_s
                                 and tuple(whole_s["series"].shape) == (2, T, 3))
    return out


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda p: f"sp{p}")
def results(request):
    from sgfm_dist.parallel.testing import run_distributed

    return run_distributed(job, request.param, timeout_s=400, pg_timeout_s=120)


@pytest.mark.parametrize("mode", MODES)
def test_split_step_equals_one_process(results, mode):
    for rank, r in enumerate(results):
        s = r[f"step-{mode}"]
        assert s["shape"] == (2 * T,)  # N = 2T reflected cells
        assert s["split"] == ((2,) if len(results) > 1 else ())  # split along t (tensor dim 2)
        for key in ("loss", "grad_norm", "params"):
            assert s[key] <= 1e-5, f"rank {rank} {mode}: {key} differs from one process by {s[key]:.3g} (relative)"


@pytest.mark.parametrize("mode", MODES)
def test_split_sampling_equals_whole(results, mode):
    for rank, r in enumerate(results):
        assert r[f"sample-{mode}"] <= 1e-5, f"rank {rank} {mode}: split sample differs by {r[f'sample-{mode}']:.3g}"
        # the folded series needs the whole t axis: only the unsplit model decodes it
        if len(results) > 1:
            assert r[f"series-{mode}"]
