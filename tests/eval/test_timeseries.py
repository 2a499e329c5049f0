"""The TimeGAN protocol on hand-made cases with known values, the 2-D views, and the time-series
evaluation / sample writer behind ``launch/evaluate.py`` and ``launch/sample.py`` (a tiny
untrained checkpoint: these check the plumbing; docs/results.md has the trained scores)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from sgfm_dist.data.timeseries import sines
from sgfm_dist.eval import timeseries as ts
from sgfm_dist.eval.timeseries import (Protocol, discriminative_score, pca_2d, predictive_score, real_halves,
                                       timegan_scores, tsne_2d)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK = Protocol(disc_steps=300, pred_steps=1500, batch_size=64, repetitions=2)


def _target_constant(n: int, value: float, seed: int) -> np.ndarray:
    """[n, 12, 3]: features 0, 1 random in [0, 1], feature 2 (the predicted one) constant."""
    x = np.random.default_rng(seed).uniform(size=(n, 12, 3)).astype(np.float32)
    x[..., 2] = value
    return x


# ---------------------------------------------------------------------------- discriminative
def test_discriminative_trivially_separable_is_one_half():
    real = sines(400, 24, 5, seed=1)
    assert discriminative_score(real, np.zeros_like(real), QUICK) == 0.5


def test_discriminative_of_identical_data_is_near_zero():
    real = sines(1000, 24, 5, seed=1)
    # the same sequences as both classes: nothing to learn, the held-out accuracy stays near 1/2
    assert discriminative_score(real, real.copy(), QUICK, seed=3) < 0.06


def test_discriminative_is_seeded():
    real, fake = sines(300, 24, 5, seed=1), sines(300, 24, 5, seed=2)
    q = Protocol(disc_steps=20, batch_size=32)
    assert discriminative_score(real, fake, q, seed=5) == discriminative_score(real, fake, q, seed=5)


# ---------------------------------------------------------------------------- predictive
def test_predictive_of_a_constant_target_is_zero():
    """Feature F-1 is 0.3 everywhere in both sets: the predictor learns the constant."""
    assert predictive_score(_target_constant(400, 0.3, 1), _target_constant(400, 0.3, 2), QUICK) < 0.02


def test_predictive_trained_on_the_wrong_constant_is_the_gap():
    """Trained where feature F-1 is 0.9, tested where it is 0.3: every step is off by 0.6."""
    mae = predictive_score(_target_constant(400, 0.3, 1), _target_constant(400, 0.9, 2), QUICK)
    assert abs(mae - 0.6) < 0.03


def test_predictive_needs_two_features():
    with pytest.raises(ValueError, match="at least 2 features"):
        predictive_score(np.zeros((4, 5, 1)), np.zeros((4, 5, 1)), QUICK)
    with pytest.raises(ValueError, match=r"differ in \[T, F\]"):
        predictive_score(np.zeros((4, 5, 2)), np.zeros((4, 6, 2)), QUICK)


# ---------------------------------------------------------------------------- repetitions and floor
def test_scores_over_repetitions_and_the_real_floor():
    real = sines(600, 24, 5, seed=1)
    q = Protocol(disc_steps=30, pred_steps=30, batch_size=32, repetitions=3)
    s = timegan_scores(real, np.zeros_like(real), q)
    for key in ("discriminative", "predictive"):
        runs = s[key]["runs"]
        assert len(runs) == 3 and s[key]["mean"] == pytest.approx(np.mean(runs))
        assert s[key]["std"] == pytest.approx(np.std(runs))
    a, b = real_halves(real, seed=0)
    assert len(a) == len(b) == 300
    assert not ({x.tobytes() for x in a} & {x.tobytes() for x in b})  # disjoint halves


# ---------------------------------------------------------------------------- 2-D views
def test_pca_matches_numpy_and_projects_both_sets_alike():
    real = sines(300, 24, 5, seed=1)
    r2, s2 = pca_2d(real, real)
    np.testing.assert_allclose(r2, s2)
    flat = real.astype(np.float64).mean(2)
    centred = flat - flat.mean(0)
    _, sv, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(np.abs(r2), np.abs(centred @ vt[:2].T), atol=1e-8)
    np.testing.assert_allclose(r2.var(0, ddof=1), sv[:2] ** 2 / (len(flat) - 1), rtol=1e-8)


def test_tsne_separates_separated_sets():
    real = sines(150, 24, 5, seed=1)
    fake = np.clip(real + 0.4, 0, 1)
    r2, s2 = tsne_2d(real, fake, perplexity=20, iterations=250)
    pts = np.concatenate([r2, s2])
    labels = np.r_[np.zeros(len(r2)), np.ones(len(s2))]
    d = ((pts[:, None] - pts[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert (labels[d.argmin(1)] == labels).mean() > 0.95  # nearest neighbours share their set


# ---------------------------------------------------------------------------- a model's evaluation and samples
TINY = ["model.width=8", "model.n_blocks=1", "model.cond_dim=16", "model.fourier_features=4",
        "model.spectral_modes=4", "train.micro_batch=4", "eval.sample_steps=2"]


def _checkpoint(run, overrides):
    from sgfm_dist.model.sgfm import build_model
    from sgfm_dist.train import checkpoint
    from sgfm_dist.train.config_loader import config_to_dict, load_config

    cfg = load_config(os.path.join(REPO, "configs", "sines.yaml"), TINY + [f"train.out_dir={run}"] + overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.diffusion)
    tag = checkpoint.tag_for_step(2)
    os.makedirs(os.path.join(run, "checkpoints", tag))
    raw = config_to_dict(cfg)
    torch.save({"config": raw, "step": 2, "ema": {"shadow": model.state_dict()}},
               os.path.join(run, "checkpoints", tag, checkpoint.MODEL_STATES))
    checkpoint.mark_complete(os.path.join(run, "checkpoints"), tag, 2, raw)
    return cfg


def test_evaluate_checkpoint_runs_the_protocol_and_writes_views(tmp_path, monkeypatch):
    from sgfm_dist.eval.evaluate import evaluate_checkpoint

    run = str(tmp_path / "run")
    _checkpoint(run, [])
    monkeypatch.setattr(ts, "PROTOCOL", Protocol(disc_steps=3, pred_steps=3, batch_size=16, repetitions=2))
    monkeypatch.setattr("sgfm_dist.data.timeseries.SINES_SEQUENCES", 64)  # a small "real" set
    logged = []
    s = evaluate_checkpoint(run, "cpu", {"sample_steps": 1}, log=logged.append)
    assert s["modality"] == "timeseries" and s["n_real"] == s["n_synthetic"] == 64 and s["step"] == 2
    for part in (s["discriminative"], s["predictive"], s["floor"]["discriminative"], s["floor"]["predictive"]):
        assert len(part["runs"]) == 2 and 0 <= part["mean"] <= 1
    for name in ("pca", "tsne", "samples"):
        assert os.path.dirname(s["plots"][name]) == run and os.path.getsize(s["plots"][name]) > 1000
    assert json.load(open(os.path.join(run, "eval_step2.json")))["length"] == 24
    assert any("real vs real (floor)" in line for line in logged)


def test_sample_checkpoint_writes_series_in_data_units(tmp_path):
    from sgfm_dist.data.converters.timeseries import SeriesConvertConfig, convert_timeseries
    from sgfm_dist.eval.sampling import SampleOptions, sample_checkpoint
    from sgfm_dist.parallel.mpi import SerialComm

    g = np.random.default_rng(0)
    raw = np.cumsum(g.normal(size=(60, 2)), 0) * [3.0, 0.5] + [10.0, -2.0]
    np.save(tmp_path / "s.npy", raw)
    data = str(tmp_path / "shards")
    convert_timeseries([str(tmp_path / "s.npy")], data, SeriesConvertConfig(length=8), SerialComm(), progress=False)
    run = str(tmp_path / "run")
    _checkpoint(run, ["model.channels=2", f"data.source={data}"])
    out = str(tmp_path / "samples" / "x.npy")
    r = sample_checkpoint(run, SampleOptions(ensemble=3, out=out, eval_overrides={"sample_steps": 2, "seed": 4}),
                          "cpu", log=lambda *a: None)
    assert r.series.shape == (3, 8, 2) and r.names == ["0", "1"]
    lo, hi = raw.min(0), raw.max(0)
    np.testing.assert_allclose(r.series.numpy(), r.normalized.numpy() * (hi - lo) + lo, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.load(r.path), r.series.numpy())
    rows = open(r.csv).read().splitlines()
    assert rows[0] == "sample,t,0,1" and len(rows) == 1 + 3 * 8
    assert os.path.getsize(r.png) > 1000
    with pytest.raises(ValueError, match="generated unconditionally"):
        sample_checkpoint(run, SampleOptions(prompt="x"), "cpu", log=lambda *a: None)
