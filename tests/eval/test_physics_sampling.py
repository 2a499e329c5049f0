"""The physics evaluation registered for ``launch/evaluate.py`` / ``launch/train.py``, the physics
sample writer of ``launch/sample.py`` and the Leray projection of samples
(``sgfm_dist.eval.physics``), on a seeded untrained tiny model and a tiny simulated corpus."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from sgfm_dist.eval import physics as P
from sgfm_dist.ops import spectral

from .trained_run import sample, untrained_run

TINY = ["model.width=8", "model.n_blocks=1", "model.mlp_ratio=1", "model.forcing_width=4", "model.wavelet=haar",
        "model.levels=1", "model.spectral_modes=[2, 4, 4]", "model.cond_dim=16", "model.fourier_features=4",
        "data.frames=4", "diffusion.bc_rows=1", "diffusion.prompt_training=0.5", "train.micro_batch=2",
        "eval.n_samples=2", "eval.sample_steps=2", "eval.sampler=heun", "eval.val_batches=1", "optim.warmup_steps=0"]


def _tiny_corpus(path: str) -> None:
    from sgfm_dist.data.converters.physics import NSConfig, simulate_ns
    from sgfm_dist.parallel.mpi import SerialComm

    if not os.path.exists(os.path.join(path, "manifest.json")):
        cfg = NSConfig(grid=16, frames=4, trajectories=6, nu=1e-3, nu_max=1e-2, k_max=3.0, val_fraction=0.5, seed=0)  # 2 val, 4 train
        simulate_ns(path, cfg, SerialComm(), progress=False)


@pytest.fixture(scope="module")
def ns_ckpt(tmp_path_factory):
    """A run directory holding one complete checkpoint of a seeded, untrained tiny 2-D physics
    model whose data is a simulated corpus of 16x16 trajectories of 4 snapshots."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ns")
    _tiny_corpus(str(root / "corpus"))
    return untrained_run(root, "ns2d_tiny.yaml", TINY + [f"data.source={root / 'corpus'}", "data.generate=''"])


# ---- the Leray projection of samples ------------------------------------------------------------

def test_projection_removes_a_known_gradient_and_keeps_a_solenoidal_field():
    """u = (Taylor-Green, divergence-free) + grad(cos y cos 2x): the projection returns exactly the
    Taylor-Green part, whose divergence is 0, and leaves the Taylor-Green field itself unchanged."""
    from sgfm_dist.model.config import ModelConfig
    from sgfm_dist.model.sgfm import build_model
    from sgfm_dist.model.config import DiffusionConfig

    model = build_model(ModelConfig(modality="physics", channels=2, width=8, n_blocks=1, mlp_ratio=1,
                                    forcing_width=4, forcing_blocks=1, wavelet="haar", levels=1,
                                    spectral_modes=(2, 4, 4), cond_dim=16, fourier_features=4), DiffusionConfig())
    n = 16
    y, x = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) * 2 * math.pi / n,) * 2, indexing="ij")
    tg = torch.stack([torch.sin(x) * torch.cos(y), -torch.cos(x) * torch.sin(y)])        # (u_y, u_x): div 0
    grad = torch.stack([-torch.sin(y) * torch.cos(2 * x), -2 * torch.cos(y) * torch.sin(2 * x)])  # grad(cos y cos 2x)
    u = (tg + grad)[None, :, None].expand(2, 2, 4, n, n).float()                       # [B, C, T, Y, X]
    before = P.divergence_ratio(u)
    assert float(before.min()) > 0.5  # the gradient part diverges
    out = P.project_samples(u, model)
    assert out.dtype == torch.float64  # float32 rounding alone would leave ~1e-6 of divergence at 64^2
    torch.testing.assert_close(out, tg[None, :, None].expand_as(u), atol=1e-6, rtol=0)
    assert float(P.divergence_ratio(out).max()) <= 1e-12
    tg_field = tg[None, :, None].expand_as(u).float()
    torch.testing.assert_close(P.project_samples(tg_field, model), tg_field.double(), atol=1e-6, rtol=0)


def test_spectral_resize_keeps_a_band_limited_field_at_the_common_points():
    n = 16
    y, x = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) * 2 * math.pi / n,) * 2, indexing="ij")
    u = torch.stack([torch.sin(x) * torch.cos(2 * y), -2 * torch.cos(x) * torch.sin(2 * y)])[None, :, None]  # div 0
    big = P.spectral_resize(u, (32, 32))
    assert big.shape == (1, 2, 1, 32, 32)
    torch.testing.assert_close(big[..., ::2, ::2], u, atol=1e-12, rtol=0)
    assert float(P.divergence_ratio(big)) < 1e-12
    torch.testing.assert_close(P.spectral_resize(big, (16, 16)), u, atol=1e-12, rtol=0)


# ---- registration --------------------------------------------------------------------------------

def test_physics_is_registered_for_evaluation_and_sampling():
    from sgfm_dist.eval.evaluate import EVALUATIONS
    from sgfm_dist.eval.sampling import SAMPLE_WRITERS

    assert "physics" in EVALUATIONS and EVALUATIONS["physics"].periodic is not None
    assert "physics" in SAMPLE_WRITERS


def test_evaluate_checkpoint_runs_the_physics_evaluation(ns_ckpt, tmp_path):
    from sgfm_dist.eval.evaluate import evaluate_checkpoint

    out = str(tmp_path / "eval.json")
    s = evaluate_checkpoint(ns_ckpt, "cpu", {"bc_eta": 0.25}, out=out, log=lambda *a: None)
    assert s["modality"] == "physics" and s["step"] == 3 and s["bc_eta"] == 0.25 and s["horizons"] == [1, 2, 3]
    assert s["prompt_frames"] == 1 and s["members"] == 2
    for key in ("rmse_mean", "rmse_member", "rmse_persistence", "rmse_climatology", "spread_skill", "crps"):
        assert len(s[key]) == 3 and all(math.isfinite(v) for v in s[key]), key
    assert s["divergence_ratio"] <= 1e-6  # forecasts are Leray-projected
    assert json.load(open(out))["rmse_mean"] == s["rmse_mean"]
    names = {os.path.basename(f) for f in s["figures"]}
    assert names == {"eval_physics_vorticity.png", "eval_physics_spectrum.png", "eval_physics_rmse.png"}
    assert all(os.path.dirname(f) == ns_ckpt and os.path.getsize(f) > 0 for f in s["figures"])


def test_periodic_pictures_for_tensorboard(ns_ckpt):
    from sgfm_dist.eval.evaluate import periodic_samples
    from sgfm_dist.train.inference import load_trained

    tm = load_trained(ns_ckpt, "cpu")
    pics = periodic_samples(tm.model, tm.config, "cpu")
    assert set(pics) == {"samples/forecast", "samples/unconditional"}
    for image in pics.values():
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


# ---- the sample writer ----------------------------------------------------------------------------

def test_unconditional_samples_are_projected_and_written(ns_ckpt, tmp_path):
    r = sample(ns_ckpt, ensemble=2, out=str(tmp_path / "u"))
    assert r.fields.shape == (1, 2, 2, 4, 16, 16) and r.truth is None and r.prompt_frames == 0 and r.step == 3
    assert r.divergence_ratio <= 1e-6 and r.fields.dtype == torch.float64
    assert float(P.divergence_ratio(r.fields.flatten(0, 1)).max()) <= 1e-6
    assert float(P.divergence_ratio(torch.from_numpy(np.load(str(tmp_path / "u.npy"))).flatten(0, 1)).max()) <= 1e-6
    names = {os.path.basename(p) for p in r.paths}
    assert names == {"u_vorticity.png", "u_spectrum.png", "u_spread.png", "u.npy", "u_stats.npz"}
    np.testing.assert_array_equal(np.load(str(tmp_path / "u.npy")), r.fields.numpy())
    stats = np.load(str(tmp_path / "u_stats.npz"))
    np.testing.assert_allclose(stats["mean"], r.fields.mean(1).numpy(), atol=1e-6)
    assert stats["spread"].shape == (1, 4, 16, 16)
    # one seeded generator: the same request gives the same samples
    torch.testing.assert_close(sample(ns_ckpt, ensemble=2, out=str(tmp_path / "u2")).fields, r.fields)
    assert sample(ns_ckpt).paths[0] == os.path.join(ns_ckpt, "samples", "physics_step3_vorticity.png")


def test_forecast_keeps_the_given_snapshots_and_writes_mean_and_spread(ns_ckpt, tmp_path):
    r = sample(ns_ckpt, ensemble=3, prompt_frames=1, clips=2, out=str(tmp_path / "f"),
                eval_overrides={"sample_steps": 2, "sampler": "pc", "bc_eta": 0.5})
    assert r.fields.shape == (2, 3, 2, 4, 16, 16) and r.truth.shape == (2, 2, 4, 16, 16)
    # the prompt is pasted exactly; the projection changes the (solenoidal) data by roundoff only
    torch.testing.assert_close(r.fields[:, :, :, :1], r.truth[:, None, :, :1].expand(-1, 3, -1, -1, -1, -1).double(),
                               atol=1e-5, rtol=0)
    assert float((r.fields[:, :, :, 1:] - r.truth[:, None, :, 1:]).abs().max()) > 1e-2  # the rest is generated
    torch.testing.assert_close(r.mean, r.fields.mean(1))
    want = r.fields.std(1, unbiased=True).square().mean(1).sqrt()  # [N, T, H, W]
    torch.testing.assert_close(r.spread, want)
    assert float(r.spread[:, 0].max()) < 1e-5 and float(r.spread[:, 1:].min()) >= 0
    assert r.divergence_ratio <= 1e-6


def test_sampling_at_twice_the_trained_size_and_from_a_trajectory_file(ns_ckpt, tmp_path):
    r = sample(ns_ckpt, ensemble=1, frames=8, size=(32, 32))  # 2N in t, y and x
    assert r.fields.shape == (1, 1, 2, 8, 32, 32) and r.divergence_ratio <= 1e-6
    n = 20
    y, x = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) * 2 * math.pi / n,) * 2, indexing="ij")
    tg = torch.stack([torch.sin(x) * torch.cos(y), -torch.cos(x) * torch.sin(y)])    # [2, 20, 20]
    np.save(tmp_path / "traj.npy", tg[None].expand(3, -1, -1, -1).numpy().astype(np.float32))  # [T, C, H, W]
    f = sample(ns_ckpt, ensemble=2, prompt_frames=1, prompt_clip=str(tmp_path / "traj.npy"), size=(32, 32),
                out=str(tmp_path / "c"))
    assert f.fields.shape == (1, 2, 2, 4, 32, 32) and f.truth is None
    y2, x2 = torch.meshgrid(*(torch.arange(32, dtype=torch.float64) * 2 * math.pi / 32,) * 2, indexing="ij")
    want = torch.stack([torch.sin(x2) * torch.cos(y2), -torch.cos(x2) * torch.sin(y2)])
    torch.testing.assert_close(f.fields[0, :, :, 0], want[None].expand(2, -1, -1, -1).double(), atol=1e-5, rtol=0)
    v = sample(ns_ckpt, ensemble=1, prompt_frames=1, clips=1, size=(32, 32))       # val trajectories resampled up
    assert v.truth.shape == (1, 2, 4, 32, 32)


@pytest.mark.parametrize("kw, message", [
    (dict(prompt_frames=4), "leave nothing to generate in 4 frames"),
    (dict(prompt="The "), "text prompts are for text models"),
    (dict(size=(17, 17)), "not divisible by 2\\*\\*levels"),
    (dict(size=(16, 16, 16)), "has 3 extents"),  # a 2-D flow has 2 spatial axes
    (dict(prompt_clip="x.npy"), "give --prompt-frames K too"),
    (dict(prompt_frames=1, prompt_clip="/nonexistent/traj.npy"), "does not exist"),
])
def test_physics_sampling_errors(ns_ckpt, kw, message):
    with pytest.raises(ValueError, match=message):
        sample(ns_ckpt, **kw)


def test_trajectory_file_of_the_wrong_layout_names_the_file(tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((4, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="bad.npy holds shape \\(4, 3, 8, 8\\); expected a trajectory \\[T, 2"):
        P.read_trajectory(str(tmp_path / "bad.npy"), 1, 2)


def test_vorticity_strip_layout():
    ens = torch.randn(3, 2, 2, 4, 8, 8)                                       # [M, N, C, T, H, W]
    truth = torch.randn(2, 2, 4, 8, 8)
    img = P.vorticity_strip(truth, ens, 1, (3, 4), scale=2)
    # per trajectory: truth, 3 members, mean, spread = 6 rows of (16 + 3) px, 2 px apart; 8 px between trajectories
    assert img.dtype == np.uint8 and img.shape == (2 * (6 * 19 + 5 * 2) + 8, 4 * 16 + 3 * 2, 3)
    assert spectral is not None


# ---- the evaluation split over ranks ------------------------------------------------------------

def run_split_evaluation_job(ckpt: str, out_dir: str) -> dict:
    from dataclasses import replace

    from sgfm_dist.eval.evaluate import evaluate_checkpoint, evaluate_model
    from sgfm_dist.train.inference import load_trained

    torch.set_num_threads(1)
    split = evaluate_checkpoint(ckpt, "cpu", {}, out=os.path.join(out_dir, "split.json"), log=lambda *a: None)
    tm = load_trained(ckpt, "cpu")  # a model of its own on every rank: the whole field, no collective
    cfg = replace(tm.config, train=replace(tm.config.train, out_dir=os.path.join(out_dir, "whole")))
    whole = P.evaluate_physics(tm.model, cfg, "cpu", log=lambda *a: None, figures=False)
    assert evaluate_model is not None
    return {"whole": whole, "split": split}


@pytest.mark.distributed
@pytest.mark.slow
def test_split_evaluation_equals_one_process(ns_ckpt, tmp_path):
    """``launch/evaluate.py`` under a launcher: the field split over 2 ranks (y), each evaluating its
    block, gives the numbers of one process on every rank; rank 0 alone writes the JSON and figures."""
    from sgfm_dist.parallel.testing import run_distributed

    results = run_distributed(run_split_evaluation_job, 2, ns_ckpt, str(tmp_path), timeout_s=300, pg_timeout_s=120)
    for rank, res in enumerate(results):
        whole, split = res["whole"], res["split"]
        assert whole["trajectories"] == 2 and whole["horizons"] == [1, 2, 3]
        for key, w in whole.items():
            if isinstance(w, list) and w and isinstance(w[0], float):
                assert split[key] == pytest.approx(w, rel=1e-4, abs=1e-6, nan_ok=True), (rank, key)  # sums reordered
            elif isinstance(w, float):
                assert split[key] == pytest.approx(w, rel=1e-4, abs=1e-7), (rank, key)
            else:
                assert split[key] == w, (rank, key)
        assert ("figures" in split) == (rank == 0)
    assert os.path.exists(tmp_path / "split.json")
    assert os.path.exists(os.path.join(ns_ckpt, "eval_physics_vorticity.png"))


def test_spectrum_tool_against_the_simulator(tmp_path):
    """``tools/physics_spectrum.py``: the corpus' own trajectories as samples give zero error in every
    band; halved amplitudes give 3/4 (energy scales with the square)."""
    import importlib.util

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location("physics_spectrum", os.path.join(repo, "tools", "physics_spectrum.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    _tiny_corpus(str(tmp_path / "corpus"))
    truth = tool.read_truth(str(tmp_path / "corpus"), 4)                       # [6, 2, 4, 16, 16]
    assert truth.shape == (6, 2, 4, 16, 16)
    np.save(tmp_path / "s.npy", truth[:, None].float().numpy())                # [N, M=1, C, T, H, W]
    np.save(tmp_path / "half.npy", 0.5 * truth[:, None].float().numpy())
    for name, want in (("s", 0.0), ("half", 0.75)):
        out = tmp_path / f"{name}.json"
        assert tool.main(["--samples", str(tmp_path / f"{name}.npy"), "--truth", str(tmp_path / "corpus"),
                          "--json", str(out), "--plot", str(tmp_path / f"{name}.png")]) == 0
        errors = [v for v in json.load(open(out))["rel_error"] if math.isfinite(v)]
        assert errors and all(abs(v - want) < 1e-5 for v in errors), (name, errors)
