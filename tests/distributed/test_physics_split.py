"""Per-sample physics and 3-D flows on a field split over ranks equal one process.

* 2-D physics at sp = 2: a training step (``build_training`` / ``train_step``, what
  ``launch/train.py`` runs) on a batch whose samples carry different nu, dt and forcing
  strength equals the single-process step (loss, gradient norm, updated parameters): the
  per-sample values are not split, every rank of a sample holds them whole.
* The model's physics energy of two exact Taylor-Green vortices at two viscosities in one batch,
  split over 2 ranks, is the analytic value: ~0 with each sample's own nu, 4 k^4 dnu^2 mean u^2
  with the viscosities swapped.
* 3-D Navier-Stokes (t, z, y, x): a step with a slab along z (2 ranks) and two steps with a
  pencil over (z, y) (4 ranks) equal one process.
* The physics metrics (``eval.physics.forecast_metrics``) of a split forecast equal the whole one.

One spawned job per world size; each case fails on its own with the largest relative difference.
"""
from __future__ import annotations

import math

import pytest
import torch

from sgfm_dist.parallel.testing import cached_job_results

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
RTOL = 1e-5
SEED = 1234
FIELD_2D = (12, 16, 16)           # (T, Y, X), split along y
FIELD_3D = (8, 8, 8, 8)           # (T, Z, Y, X), split along z (slab) or (z, y) (pencil)
NU, DT, FS = (1e-3, 3e-2), (0.1, 0.05), (0.0, 0.7)


def _config(dims: int, sp: int = 1, sp_grid: tuple[int, ...] = ()):
    from sgfm_dist.model.config import DiffusionConfig, ModelConfig
    from sgfm_dist.train.config import Config, OptimConfig, ParallelConfig, TrainConfig

    model = ModelConfig(modality="physics", channels=dims, spatial_dims=dims, width=8, n_blocks=1, mlp_ratio=1,
                        forcing_width=4, forcing_blocks=1, forcing_noise_channels=1, wavelet="db2",
                        levels=2 if dims == 2 else 1, fourier_features=4, cond_dim=8, kernel_size=3,
                        spectral_modes=(2,) + (4,) * dims)
    return Config(model=model, diffusion=DiffusionConfig(lambda_R=0.1, lambda_B=0.1),
                  optim=OptimConfig(lr=0.5, warmup_steps=0, schedule="constant", eps=1.0, grad_clip=0.0),
                  train=TrainConfig(steps=2, micro_batch=2, seed=SEED, device="cpu", ema_decay=0.0),
                  parallel=ParallelConfig(sp=sp, sp_grid=sp_grid, zero_stage=0))


def _model(cfg):
    """A model with every parameter perturbed (zero-initialised output layers would give trivial
    gradients), the same on every rank."""
    from sgfm_dist.model.sgfm import build_model

    torch.manual_seed(SEED)
    model = build_model(cfg.model, cfg.diffusion)
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _batch(dims: int, shape) -> dict:
    g = torch.Generator().manual_seed(SEED + 2)
    return {"field": torch.randn(2, dims, *shape, generator=g), "nu": torch.tensor(NU), "dt": torch.tensor(DT),
            "forcing_strength": torch.tensor(FS)}


def _reference(cfg, batch: dict, steps: int) -> dict:
    """One process: the model's own loss, AdamW, ``steps`` times on the same batch."""
    from sgfm_dist.train.setup import step_draws

    model = _model(cfg)
    o = cfg.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    losses = []
    n = batch["field"].shape[0]
    for step in range(steps):
        opt.zero_grad()
        # the draws train_step uses at this step: the whole global batch, positions 0..n-1
        loss = model.training_loss(batch, generator=step_draws(cfg.train.seed, step, 0, n, n, "cpu"))[0]
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return {"losses": losses, "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


def _split_steps(cfg, shape, batch: dict, steps: int) -> dict:
    from sgfm_dist.train.engine import full_parameters
    from sgfm_dist.train.setup import build_training, train_step

    t = build_training(cfg, "cpu", shape, model=_model(cfg))
    try:
        losses = [float(train_step(t, [batch]).losses["total"]) for _ in range(steps)]
        with full_parameters(t.engine) as module:
            params = {n: p.detach().clone() for n, p in module.named_parameters()}
        return {"losses": losses, "params": params}
    finally:
        t.engine.destroy()


def _step_errors(cfg, shape, batch: dict, steps: int) -> dict:
    ref, got = _reference(cfg, batch, steps), _split_steps(cfg, shape, batch, steps)
    loss = max(abs(a - b) / abs(b) for a, b in zip(got["losses"], ref["losses"]))
    params = max(float((got["params"][n] - p).abs().max()) / float(p.abs().max().clamp(min=1e-12))
                 for n, p in ref["params"].items())
    moved = max(float((ref["params"][n] - p).abs().max()) for n, p in _model(cfg).named_parameters())
    return {"loss": loss, "params": params, "moved": moved}


def _taylor_green_energy(sp: int) -> dict:
    """``SGFM.physics_energy`` of two exact decaying vortices (k = 2) at NU, frames DT apart, on a
    field split over ``sp`` ranks along y (no learned forcing: f = 0 is the truth)."""
    from dataclasses import replace

    from sgfm_dist.parallel.parallelize import parallelize_for_sampling

    cfg = _config(2)
    cfg = replace(cfg, model=replace(cfg.model, forcing_blocks=0))
    model = _model(cfg).double()
    k, (t, n, _) = 2, FIELD_2D
    grid = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)
    y, x = torch.meshgrid(grid, grid, indexing="ij")
    U = torch.stack([-torch.cos(k * x) * torch.sin(k * y), torch.sin(k * x) * torch.cos(k * y)])  # [2, Y, X]
    u = torch.stack([U[:, None] * torch.exp(-2 * nu * k * k * torch.arange(t, dtype=torch.float64) * dt)[:, None, None]
                     for nu, dt in zip(NU, DT)])                                # [2, 2, T, Y, X]
    lam = model._lambda({"nu": torch.tensor(NU, dtype=torch.float64), "dt": torch.tensor(DT, dtype=torch.float64)},
                        2, "cpu").double()
    swapped = lam.clone()
    swapped[:, 0] = lam[:, 0].flip(0)
    # P R(u) with the wrong nu is exactly -2 k^2 (nu_true - nu_used) u (u is solenoidal)
    expect = (2 * k * k * (lam[:, 0] - swapped[:, 0])) ** 2 * u.square().mean(dim=(1, 2, 3, 4))
    if sp > 1:
        domain = parallelize_for_sampling(model, sp, sp, FIELD_2D, "db2", 2, (3,))
        u = domain.shard(u)
    return {"right": model.physics_energy(u, lam=lam), "wrong": model.physics_energy(u, lam=swapped),
            "expect_wrong": expect}


def _metrics(sp: int) -> dict:
    """``forecast_metrics`` of a random ensemble forecast, whole or split over ``sp`` ranks."""
    from sgfm_dist.eval.physics import forecast_metrics
    from sgfm_dist.parallel.parallelize import parallelize_for_sampling

    from sgfm_dist.eval.physics import mean_field

    g = torch.Generator().manual_seed(SEED + 3)
    field = torch.randn(2, 2, *FIELD_2D, generator=g, dtype=torch.float64)    # [B, C, T, Y, X]
    ens = field[None] + 0.3 * torch.randn(3, *field.shape, generator=g, dtype=torch.float64)  # [M, B, C, T, Y, X]
    kw = {}
    if sp > 1:
        dom = parallelize_for_sampling(_model(_config(2)), sp, sp, FIELD_2D, "db2", 2, (3,))
        ens, field = dom.shard(ens.flatten(0, 1)).unflatten(0, (3, 2)), dom.shard(field)
        kw["domain"] = dom
    # t is whole on every rank: the forecast frames are a local slice
    return forecast_metrics(ens[:, :, :, 2:], field[:, :, 2:], field[:, :, :2], mean_field([field]), **kw)


def run_job(world_size: int) -> dict:
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    from sgfm_dist.parallel.runtime import setup_distributed

    setup_distributed("cpu")
    out = {}
    if world_size == 2:
        out["ns2d-sp2"] = _step_errors(_config(2, sp=2), FIELD_2D, _batch(2, FIELD_2D), steps=1)
        out["ns3d-slab-sp2"] = _step_errors(_config(3, sp=2), FIELD_3D, _batch(3, FIELD_3D), steps=1)
        whole, split = _taylor_green_energy(1), _taylor_green_energy(2)
        out["tg"] = {k: split[k].tolist() for k in split} | {"whole_" + k: whole[k].tolist() for k in whole}
        out["metrics"] = {"whole": _metrics(1), "split": _metrics(2)}
    if world_size == 4:
        out["ns3d-pencil-sp4"] = _step_errors(_config(3, sp=4, sp_grid=(2, 2)), FIELD_3D, _batch(3, FIELD_3D),
                                              steps=2)
    return out


@pytest.fixture(scope="module")
def results():
    return cached_job_results(run_job, pass_world_size=True, timeout_s=500, pg_timeout_s=120)


@pytest.mark.parametrize("world, case", [(2, "ns2d-sp2"), (2, "ns3d-slab-sp2"), (4, "ns3d-pencil-sp4")])
def test_split_step_with_per_sample_physics_equals_one_process(results, world, case):
    for rank, res in enumerate(results(world)):
        r = res[case]
        assert r["moved"] > 1e-3, "the reference step must move the weights"
        assert r["loss"] <= RTOL and r["params"] <= RTOL, (
            f"rank {rank} {case}: loss differs by {r['loss']:.3g}, parameters by {r['params']:.3g} (relative)")


def test_split_taylor_green_energy_is_the_analytic_one(results):
    for rank, res in enumerate(results(2)):
        r = res["tg"]
        assert max(r["right"]) < 1e-6, f"rank {rank}: exact vortices have energy {r['right']} with their own nu"
        # one-sided 2nd-order d_t on 12 frames: the wrong-nu energy is the analytic one to ~1e-3
        for got, want in zip(r["wrong"], r["expect_wrong"]):
            assert got == pytest.approx(want, rel=2e-3), (rank, r)
        for key in ("right", "wrong"):
            for a, b in zip(r[key], r["whole_" + key]):
                assert a == pytest.approx(b, rel=1e-9, abs=1e-12), (rank, key)


def test_split_metrics_equal_whole(results):
    for rank, res in enumerate(results(2)):
        whole, split = res["metrics"]["whole"], res["metrics"]["split"]
        assert whole.keys() == split.keys()
        for key, w in whole.items():
            s = split[key]
            if isinstance(w, list) and w and isinstance(w[0], float):
                assert s == pytest.approx(w, rel=1e-9, nan_ok=True), (rank, key)
            elif isinstance(w, float):
                assert s == pytest.approx(w, rel=1e-9, abs=1e-15), (rank, key)
            else:
                assert s == w, (rank, key)


def test_model_reads_each_samples_physics():
    """One process: lambda comes from the batch per sample (the config's where absent), bad values
    are refused instead of becoming NaN conditioning, and the conditioning depends on nu and dt
    (the dt branch starts at zero, so only once trained)."""
    model = _model(_config(2))
    lam = model._lambda({"nu": torch.tensor(NU), "dt": torch.tensor(DT)}, 2, "cpu")
    torch.testing.assert_close(lam, torch.tensor([[NU[0], 1.0, DT[0]], [NU[1], 1.0, DT[1]]]))
    for bad in ({"nu": torch.tensor([1e-3, float("nan")])}, {"dt": torch.tensor([0.1, 0.0])},
                {"nu": torch.tensor([1e-3, 2e-3, 3e-3])}):
        with pytest.raises(ValueError, match="batch"):
            model._lambda(bad, 2, "cpu")
    logsnr = torch.zeros(2, model.cfg.levels + 1)
    cond = model._conditions(logsnr, lam, None)
    assert not torch.allclose(cond[0], cond[1])  # nu differs
    same_nu = lam.clone()
    same_nu[:, 0] = NU[0]
    fresh = _config(2)
    from sgfm_dist.model.sgfm import build_model

    untrained = build_model(fresh.model, fresh.diffusion)
    c = untrained._conditions(logsnr, same_nu, None)
    torch.testing.assert_close(c[0], c[1])  # a zero dt branch: dt does not matter yet
    c = model._conditions(logsnr, same_nu, None)  # perturbed weights: dt matters
    assert not torch.allclose(c[0], c[1])
    # the physics energy uses each sample's nu: the same field at two viscosities differs
    u = torch.randn(1, 2, *FIELD_2D, generator=torch.Generator().manual_seed(0)).expand(2, -1, -1, -1, -1)
    with torch.no_grad():
        e = model.physics_energy(u, lam=torch.tensor([[NU[0], 0.0, DT[0]], [NU[1], 0.0, DT[0]]]))
    assert abs(float(e[0] - e[1])) > 1e-3 * float(e.max())
