"""Video metrics on hand-made cases with known values, the baselines, the pictures, and the video
evaluation split over ranks equal to one process (``sgfm_dist.eval.video``)."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from sgfm_dist.eval.video import (MSE_FLOOR, Panel, animation_frames, forecast_panels, forecast_scores,
                                  frame_mse, frame_strip, gaussian_window, linear_forecast, persistence_forecast,
                                  psnr, ssim, ssim_map, to_pixels, window_mean, write_gif, write_mp4,
                                  write_video_files)

from .trained_run import sample, untrained_run

C1, C2 = (0.01 * 1.0) ** 2, (0.03 * 1.0) ** 2  # SSIM's stabilizers at data range 1 (Wang et al. 2004)


def _frames(B=2, C=3, T=4, H=16, W=16, seed=0, dtype=torch.float64):
    return torch.rand(B, C, T, H, W, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---- PSNR ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("offset, db", [(0.1, 20.0), (0.01, 40.0), (1 / 255, 20 * math.log10(255))])
def test_psnr_of_a_constant_offset(offset, db):
    truth = 0.5 * _frames()                                   # in [0, 0.5]: the offset stays in range
    got = psnr(truth + offset, truth)
    assert got.shape == (2, 4)
    torch.testing.assert_close(got, torch.full_like(got, db), atol=1e-9, rtol=0)


def test_psnr_is_per_clip_and_frame_and_identical_frames_hit_the_floor():
    truth = _frames(B=2, T=3)
    pred = truth.clone()
    pred[0, :, 1] += 0.1                                      # clip 0, frame 1 only
    pred[1, 0, 2] += 0.3                                      # clip 1, frame 2, one channel of three: MSE 0.03
    got = psnr(pred, truth)
    want = torch.tensor([[10 * math.log10(1 / MSE_FLOOR), 20.0, 100.0],
                         [100.0, 100.0, 10 * math.log10(1 / 0.03)]], dtype=got.dtype)
    torch.testing.assert_close(got, want, atol=1e-9, rtol=0)
    # another data range: 255 levels and a one-level error is 20 log10(255)
    torch.testing.assert_close(psnr(255 * truth + 1, 255 * truth, data_range=255.0)[0],
                               torch.full((3,), 20 * math.log10(255), dtype=got.dtype))


def test_frame_mse_is_the_mean_square():
    a, b = _frames(seed=1), _frames(seed=2)
    torch.testing.assert_close(frame_mse(a, b), (a - b).square().mean(dim=(1, 3, 4)))


# ---- SSIM ----------------------------------------------------------------------------------------

def test_window_is_the_normalized_gaussian():
    w = gaussian_window(11, 1.5)
    assert w.shape == (11,) and float(w.sum()) == pytest.approx(1.0, abs=1e-15)
    assert float(w[5] / w[6]) == pytest.approx(math.exp(0.5 / 1.5 ** 2))
    with pytest.raises(ValueError, match="odd"):
        gaussian_window(10)


def test_window_mean_is_periodic():
    x = _frames(B=1, C=1, T=1, H=12, W=12)
    g = gaussian_window(5, 1.0)
    got = window_mean(x, g)
    # the reference: a wrapped 2-D correlation written out
    want = torch.zeros_like(x)
    for i in range(5):
        for j in range(5):
            want += g[i] * g[j] * torch.roll(x, shifts=(2 - i, 2 - j), dims=(3, 4))
    torch.testing.assert_close(got, want)


def test_ssim_of_identical_frames_is_one():
    x = _frames()
    torch.testing.assert_close(ssim(x, x), torch.ones(2, 4, dtype=x.dtype))


@pytest.mark.parametrize("a, b", [(0.2, 0.6), (0.5, 0.5), (0.0, 1.0)])
def test_ssim_of_two_constant_frames(a, b):
    # flat frames: no variance, so only the luminance term (2ab + C1) / (a^2 + b^2 + C1) is left
    x = torch.full((1, 3, 2, 16, 16), a, dtype=torch.float64)
    y = torch.full_like(x, b)
    want = (2 * a * b + C1) / (a * a + b * b + C1)
    torch.testing.assert_close(ssim(x, y), torch.full((1, 2), want, dtype=x.dtype))


def test_ssim_of_a_flat_frame_against_a_checkerboard():
    # x = a flat, y = a + s n with n = (-1)^(i+j): the window mean of n is +-c, c = (sum_k w_k (-1)^k)^2,
    # var y = s^2 (1 - c^2), cov = 0, so SSIM = (2a(a + s n c) + C1) / (a^2 + (a + s n c)^2 + C1) * C2 / (s^2 (1 - c^2) + C2)
    a, s, H = 0.5, 0.1, 16
    n = torch.tensor([[(-1.0) ** (i + j) for j in range(H)] for i in range(H)], dtype=torch.float64)
    x = torch.full((1, 1, 1, H, H), a, dtype=torch.float64)
    y = a + s * n.expand(1, 1, 1, H, H)
    w = gaussian_window()
    c = float((w * torch.tensor([(-1.0) ** k for k in range(11)], dtype=torch.float64)).sum()) ** 2
    mean_y = a + s * c * n
    want = (2 * a * mean_y + C1) / (a * a + mean_y ** 2 + C1) * C2 / (s * s * (1 - c * c) + C2)
    torch.testing.assert_close(ssim_map(x, y)[0, 0, 0], want)
    assert float(ssim(x, y)) == pytest.approx(C2 / (s * s + C2), rel=1e-6)  # c ~ 1e-9: 0.0826


def test_ssim_is_symmetric_and_below_one():
    x, y = _frames(seed=3), _frames(seed=4)
    torch.testing.assert_close(ssim(x, y), ssim(y, x))
    assert bool((ssim(x, y) < 0.2).all())  # independent noise is unlike
    assert bool((ssim(x, 0.9 * x + 0.05) > ssim(x, y)).all())


def test_metrics_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match="differs from truth"):
        psnr(_frames(T=3), _frames(T=4))
    with pytest.raises(ValueError, match=r"\[B, C, T, \*S\]"):
        ssim(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))


# ---- baselines and scores ---------------------------------------------------------------------------

def test_persistence_and_linear_extrapolation():
    prompt = torch.stack([torch.full((1, 2, 3, 3), 0.2), torch.full((1, 2, 3, 3), 0.3)], dim=2)  # [1, 2, P=2, 3, 3]
    prompt[0, 1] = torch.tensor([0.8, 0.6]).reshape(2, 1, 1)  # channel 1 falls by 0.2 per frame
    pers = persistence_forecast(prompt, 4)
    assert pers.shape == (1, 2, 4, 3, 3)
    torch.testing.assert_close(pers[0, 0, :, 0, 0], torch.full((4,), 0.3))
    lin = linear_forecast(prompt, 4)
    torch.testing.assert_close(lin[0, 0, :, 0, 0], torch.tensor([0.4, 0.5, 0.6, 0.7]))
    torch.testing.assert_close(lin[0, 1, :, 0, 0], torch.tensor([0.4, 0.2, 0.0, 0.0]))  # clipped at black
    torch.testing.assert_close(linear_forecast(prompt[:, :, 1:], 3), persistence_forecast(prompt[:, :, 1:], 3))
    with pytest.raises(ValueError, match="P >= 1"):
        persistence_forecast(prompt[:, :, :0], 2)


def test_forecast_scores_of_a_known_ensemble():
    truth = 0.8 * _frames(B=2, T=3) + 0.1                     # in [0.1, 0.9]
    d = 0.05
    ens = torch.stack([truth + d, truth - d])                  # the mean is the truth
    prompt = truth[:, :, :1]                                   # persistence = first truth frame
    s = forecast_scores(ens, truth, prompt)
    assert s["horizons"] == [1, 2, 3]
    assert s["psnr_mean"] == pytest.approx([10 * math.log10(1 / MSE_FLOOR)] * 3)
    assert s["psnr_member"] == pytest.approx([-20 * math.log10(d)] * 3)
    assert s["ssim_mean"] == pytest.approx([1.0] * 3)
    assert s["spread"] == pytest.approx([d * math.sqrt(2)] * 3)  # unbiased std of {+d, -d}
    assert s["psnr_persistence"][0] == pytest.approx(10 * math.log10(1 / MSE_FLOOR))  # horizon 1 = the prompt frame
    assert s["psnr_persistence"][1] < 30 and s["psnr_linear"][0] == s["psnr_persistence"][0]
    with pytest.raises(ValueError, match="ens: expected"):
        forecast_scores(truth, truth, prompt)


def test_to_pixels_inverts_the_loader_levels():
    from sgfm_dist.data.fields import frames_to_field

    levels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16, 1).expand(1, 1, 16, 16, 3)
    px = to_pixels(frames_to_field(levels.contiguous()))
    torch.testing.assert_close(px[0, 0, 0].flatten(), torch.arange(256, dtype=torch.float32) / 255, atol=1e-6, rtol=0)


# ---- pictures ----------------------------------------------------------------------------------

def test_pictures_have_the_expected_layout(tmp_path):
    truth = _frames(B=2, T=5, H=8, W=8, dtype=torch.float32)
    ens = torch.stack([truth, truth.flip(-1), 0.5 * truth])    # [M=3, N=2, 3, T, H, W]
    panels = forecast_panels(truth, ens, prompt_frames=2)
    assert [p.title for p in panels] == ["truth", "sample 0", "sample 1", "sample 2", "mean of 3", "spread"]
    anim = animation_frames(panels, 2, scale=2)                # 2 rows of 6 tiles of 16 + 3 px, 2 px gaps
    assert anim.shape == (5, 2 * 19 + 2, 6 * 16 + 5 * 2, 3) and anim.dtype == np.uint8
    strip = frame_strip(panels, 2, scale=2)                    # one line per panel, 5 frames
    assert strip.shape == (6 * 19 + 5 * 2, 5 * 16 + 4 * 2, 3)
    # bars: grey under the truth, green under given frames, red under generated ones
    assert tuple(strip[16, 0]) == (90, 90, 90) and tuple(strip[19 + 2 + 16, 0]) == (40, 200, 80)
    assert tuple(strip[19 + 2 + 16, 2 * (16 + 2)]) == (220, 60, 60)
    np.testing.assert_array_equal(anim[0, :16, :16], np.repeat(np.repeat(panels[0].frames[0][0], 2, 0), 2, 1))
    paths = write_video_files(panels, str(tmp_path / "v"), 2, fps=4, scale=2)
    assert os.path.basename(paths[0]) == "v.gif" and paths[-1].endswith("v_strip.png")
    from PIL import Image

    gif = Image.open(paths[0])
    assert gif.n_frames == 5 and gif.size == (anim.shape[2], anim.shape[1])
    assert Image.open(paths[-1]).size == (strip.shape[1], 2 * strip.shape[0] + 8)  # the two clips' strips


def test_mp4_is_written_with_pyav(tmp_path):
    av = pytest.importorskip("av", reason="MP4 output needs PyAV")
    frames = (np.random.default_rng(0).random((6, 15, 21, 3)) * 255).astype(np.uint8)  # odd sizes are padded
    path = write_mp4(frames, str(tmp_path / "x.mp4"), fps=4)
    with av.open(path) as c:
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(decoded) == 6 and decoded[0].shape == (16, 22, 3)
    write_gif(frames, str(tmp_path / "x.gif"), fps=4)


def test_unconditional_panel():
    p = Panel("samples", [np.zeros((3, 4, 4, 3), np.uint8)] * 2)
    assert animation_frames([p], 0, scale=1).shape == (3, 2 * 7 + 2, 4, 3)


# ---- the evaluation split over ranks ------------------------------------------------------------

def _tiny_config(source: str, out_dir: str):
    from sgfm_dist.model.config import DiffusionConfig, ModelConfig
    from sgfm_dist.train.config import Config, DataConfig, EvalConfig, OptimConfig, TrainConfig

    model = ModelConfig(modality="video", data_channels=3, channels=4, width=8, n_blocks=1, mlp_ratio=1,
                        forcing_width=4, forcing_blocks=1, forcing_noise_channels=1, wavelet="haar", levels=1,
                        fourier_features=4, cond_dim=8, kernel_size=3, spectral_modes=(2, 4, 4))
    return Config(model=model, diffusion=DiffusionConfig(bc_rows=2),
                  data=DataConfig(source=source, frames=4),
                  optim=OptimConfig(warmup_steps=0), train=TrainConfig(steps=1, micro_batch=2, device="cpu", out_dir=out_dir),
                  eval=EvalConfig(n_samples=2, sample_steps=2, sampler="heun", val_batches=1, bc_eta=0.5, seed=5))


def _tiny_corpus(path: str) -> None:
    from sgfm_dist.data.converters.video import VideoConvertConfig, convert_synthetic_video
    from sgfm_dist.data.synthetic_video import SyntheticVideoConfig
    from sgfm_dist.parallel.mpi import SerialComm

    if not os.path.exists(os.path.join(path, "manifest.json")):
        convert_synthetic_video(SyntheticVideoConfig(videos=8, frames=4, size=(16, 16), seed=3), path,
                                VideoConvertConfig(frames=4, val_fraction=0.5), SerialComm(), progress=False)


def _evaluate(sp: int, source: str, out_dir: str) -> dict:
    from sgfm_dist.eval.video import evaluate_video
    from sgfm_dist.model.sgfm import build_model
    from sgfm_dist.parallel.parallelize import parallelize_for_sampling

    cfg = _tiny_config(source, out_dir)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.diffusion)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised output layers would forecast nothing
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    model.eval()
    if sp > 1:
        parallelize_for_sampling(model, sp, sp, (4, 16, 16), "haar", 1, (3,))  # y split
    return evaluate_video(model, cfg, "cpu", log=lambda *a: None, figures=True)


def run_evaluation_job(source: str, out_dir: str) -> dict:
    torch.set_num_threads(1)
    return {"whole": _evaluate(1, source, os.path.join(out_dir, "whole")),
            "split": _evaluate(2, source, os.path.join(out_dir, "split"))}


@pytest.mark.distributed
@pytest.mark.slow
def test_split_evaluation_equals_one_process(tmp_path):
    from sgfm_dist.parallel.testing import run_distributed

    _tiny_corpus(str(tmp_path / "corpus"))
    results = run_distributed(run_evaluation_job, 2, str(tmp_path / "corpus"), str(tmp_path / "out"),
                              timeout_s=300, pg_timeout_s=120)
    for rank, res in enumerate(results):
        whole, split = res["whole"], res["split"]
        assert whole["clips"] == 2 and whole["members"] == 2 and whole["horizons"] == [1, 2]
        for key, w in whole.items():
            if key == "figures":
                continue
            if isinstance(w, list) and w and isinstance(w[0], float):
                assert split[key] == pytest.approx(w, rel=1e-4, abs=1e-6), (rank, key)  # float32 sums in another order
            else:
                assert split[key] == w, (rank, key)
        assert ("figures" in split) == (rank == 0)  # rank 0 writes the pictures of the gathered clips
    assert os.path.exists(tmp_path / "out" / "split" / "eval_video_forecast.gif")
    assert os.path.exists(tmp_path / "out" / "split" / "eval_video_psnr.png")


def test_evaluation_on_one_process(tmp_path):
    _tiny_corpus(str(tmp_path / "corpus"))
    s = _evaluate(1, str(tmp_path / "corpus"), str(tmp_path / "out"))
    assert s["modality"] == "video" and s["prompt_frames"] == 2 and s["bc_eta"] == 0.5
    for key in ("psnr_mean", "psnr_member", "psnr_persistence", "psnr_linear", "ssim_mean", "spread"):
        assert len(s[key]) == 2 and all(math.isfinite(v) for v in s[key]), key
    assert {os.path.basename(f) for f in s["figures"]} >= {"eval_video_forecast.gif", "eval_video_forecast_strip.png",
                                                            "eval_video_psnr.png"}


# ---- launch/sample.py and launch/evaluate.py on a video checkpoint --------------------------------

VIDEO_TINY = ["model.channels=4", "model.width=8", "model.n_blocks=1", "model.mlp_ratio=1", "model.forcing_width=4",
              "model.wavelet=haar", "model.levels=1", "model.spectral_modes=[2, 4, 4]", "model.cond_dim=16",
              "model.fourier_features=4", "data.frames=4", "diffusion.bc_rows=2", "train.micro_batch=2",
              "eval.n_samples=2", "eval.sample_steps=2", "eval.val_batches=1", "optim.warmup_steps=0"]


@pytest.fixture(scope="module")
def video_ckpt(tmp_path_factory):
    """A run directory holding one complete checkpoint of a seeded, untrained tiny video model whose
    data is a synthetic corpus of 16x16 clips."""
    root = tmp_path_factory.mktemp("video")
    _tiny_corpus(str(root / "corpus"))
    return untrained_run(root, "video_tiny.yaml", VIDEO_TINY + [f"data.source={root / 'corpus'}", "data.generate=''"])


def test_unconditional_video_samples_and_files(video_ckpt, tmp_path):
    r = sample(video_ckpt, ensemble=2, out=str(tmp_path / "u"))
    assert r.frames.shape == (1, 2, 4, 16, 16, 3) and r.frames.dtype == np.uint8 and r.truth is None
    assert r.prompt_frames == 0 and r.step == 3
    names = {os.path.basename(p) for p in r.paths}
    assert {"u.gif", "u_strip.png", "u.npy"} <= names and all(os.path.getsize(p) > 0 for p in r.paths)
    np.testing.assert_array_equal(np.load(str(tmp_path / "u.npy")), r.frames)
    assert r.mean.shape == (1, 4, 16, 16, 3) and r.spread.shape == (1, 4, 16, 16, 3)
    # one seeded generator: the same request gives the same samples
    np.testing.assert_array_equal(sample(video_ckpt, ensemble=2, out=str(tmp_path / "u2")).frames, r.frames)
    default = sample(video_ckpt)
    assert default.paths[0] == os.path.join(video_ckpt, "samples", "video_step3.gif")


def test_forecast_keeps_the_given_frames_and_writes_mean_and_spread(video_ckpt, tmp_path):
    r = sample(video_ckpt, ensemble=3, prompt_frames=2, clips=2, out=str(tmp_path / "f"),
                eval_overrides={"sample_steps": 2, "sampler": "pc", "bc_eta": 0.5})
    assert r.frames.shape == (2, 3, 4, 16, 16, 3) and r.truth.shape == (2, 4, 16, 16, 3)
    given = r.frames[:, :, :2].astype(int) - r.truth[:, None, :2].astype(int)
    assert np.abs(given).max() <= 1  # the prompt is pasted exactly (the readout inverts the lift; uint8 rounding)
    assert np.abs(r.frames[:, :, 2:].astype(int) - r.truth[:, None, 2:]).max() > 1  # the rest is generated
    np.testing.assert_allclose(r.mean, r.frames.astype(float).mean(1), atol=1)
    np.testing.assert_allclose(r.spread, (r.frames / 255.0).std(1, ddof=1), atol=2 / 255)
    from PIL import Image

    strip = Image.open(str(tmp_path / "f_strip.png"))  # 2 clips x (truth, 3 members, mean, spread) x 4 frames
    scale = 6  # ceil(96 / 16)
    assert strip.size == (4 * 16 * scale + 3 * 2, 2 * (6 * (16 * scale + 3) + 5 * 2) + 8)


def test_sampling_at_twice_the_trained_size_and_from_a_clip_file(video_ckpt, tmp_path):
    r = sample(video_ckpt, ensemble=1, frames=8, size=(32, 32))  # 2N in t, y and x
    assert r.frames.shape == (1, 1, 8, 32, 32, 3)
    clip = (np.random.default_rng(0).random((5, 20, 24, 3)) * 255).astype(np.uint8)
    np.save(tmp_path / "clip.npy", clip)
    f = sample(video_ckpt, ensemble=2, prompt_frames=2, prompt_clip=str(tmp_path / "clip.npy"), size=(32, 32),
                out=str(tmp_path / "c"))
    from sgfm_dist.data.converters.video import resize_frame

    want = np.stack([resize_frame(clip[i], (32, 32), "crop") for i in range(2)])
    assert f.frames.shape == (1, 2, 4, 32, 32, 3) and f.truth is None
    assert np.abs(f.frames[0, :, :2].astype(int) - want[None].astype(int)).max() <= 1
    v = sample(video_ckpt, ensemble=1, prompt_frames=1, clips=1, size=(32, 32))  # val clips resized up
    assert v.truth.shape == (1, 4, 32, 32, 3)


@pytest.mark.parametrize("kw, message", [
    (dict(prompt_frames=4), "leave nothing to generate in 4 frames"),
    (dict(prompt="The "), "text prompts are for text models"),
    (dict(size=(17, 17)), "not divisible by 2\\*\\*levels"),
    (dict(prompt_clip="x.npy"), "give --prompt-frames K too"),
    (dict(prompt_frames=2, prompt_clip="/nonexistent/clip.npy"), "does not exist"),
])
def test_video_sampling_errors(video_ckpt, kw, message):
    with pytest.raises(ValueError, match=message):
        sample(video_ckpt, **kw)


def test_evaluate_checkpoint_runs_the_video_evaluation(video_ckpt, tmp_path):
    from dataclasses import replace

    from sgfm_dist.eval.evaluate import evaluate_checkpoint, evaluate_model, override_eval
    from sgfm_dist.train.inference import load_trained

    out = str(tmp_path / "eval.json")
    s = evaluate_checkpoint(video_ckpt, "cpu", {"bc_eta": 0.25}, out=out, log=lambda *a: None)
    assert s["modality"] == "video" and s["step"] == 3 and s["bc_eta"] == 0.25 and s["horizons"] == [1, 2]
    import json

    assert json.load(open(out))["psnr_mean"] == s["psnr_mean"]
    assert all(os.path.dirname(f) == video_ckpt for f in s["figures"])  # pictures in the run directory
    tm = load_trained(video_ckpt, "cpu")
    cfg = replace(tm.config, eval=override_eval(tm.config.eval, {"bc_eta": 0.25}),
                  train=replace(tm.config.train, out_dir=str(tmp_path)))
    direct = evaluate_model(tm.model, cfg, "cpu", log=lambda *a: None)
    assert direct["psnr_mean"] == s["psnr_mean"] and direct["ssim_member"] == s["ssim_member"]


def test_periodic_pictures_for_tensorboard(video_ckpt):
    from sgfm_dist.eval.evaluate import periodic_samples
    from sgfm_dist.train.inference import load_trained

    tm = load_trained(video_ckpt, "cpu")
    pics = periodic_samples(tm.model, tm.config, "cpu")
    assert set(pics) == {"samples/forecast", "samples/unconditional"}
    for image in pics.values():
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


def test_sample_command_line_options():
    import importlib.util

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location("sample_cli", os.path.join(repo, "launch", "sample.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    a = cli.parse_args(["--ckpt", "r", "--prompt-frames", "2", "--prompt-clip", "c.npy", "--size", "64x48",
                        "--frames", "16", "--bc-eta", "0.5", "--clips", "3"])
    assert (a.prompt_frames, a.prompt_clip, a.size, a.frames, a.bc_eta, a.clips) == (2, "c.npy", (64, 48), 16, 0.5, 3)
    assert cli.parse_args(["--ckpt", "r"]).bc_eta is None  # the run's eval.bc_eta
    for bad in (["--bc-eta", "-1"], ["--size", "64"], ["--prompt-frames", "-1"]):
        with pytest.raises(SystemExit):
            cli.parse_args(["--ckpt", "r"] + bad)
