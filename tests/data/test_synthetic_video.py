"""The synthetic video corpus: deterministic rendering, motion, its shards through
``tools/convert_video.py --synthetic`` and the video source making it on first use (``data.generate``)."""
from __future__ import annotations

import io
import json
import os
import sys

import numpy as np
import pytest

from sgfm_dist.data.converters.video import VideoConvertConfig, convert_synthetic_video
from sgfm_dist.data.synthetic_video import SyntheticVideoConfig, render_video, video_name
from sgfm_dist.data.urls import iter_shard_samples, resolve_shards
from sgfm_dist.parallel.mpi import SerialComm

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_rendering_is_deterministic_and_seeded():
    cfg = SyntheticVideoConfig(frames=5, size=(20, 28))
    a = render_video(3, cfg)
    assert a.shape == (5, 20, 28, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, render_video(3, SyntheticVideoConfig(frames=5, size=(20, 28))))
    assert not np.array_equal(a, render_video(4, cfg))                        # another video
    assert not np.array_equal(a, render_video(3, SyntheticVideoConfig(frames=5, size=(20, 28), seed=1)))
    assert a.std() > 10                                                       # textured, not flat
    np.testing.assert_array_equal(render_video(3, SyntheticVideoConfig(frames=3, size=(20, 28))), a[:3])


def test_motion_follows_the_speed_settings():
    still = SyntheticVideoConfig(frames=4, speed=(0.0, 0.0), spin=0.0, pan=0.0)
    v = render_video(0, still)
    assert all(np.array_equal(v[0], f) for f in v[1:])                       # nothing moves
    slow = SyntheticVideoConfig(frames=4, speed=(0.01, 0.01), spin=0.0, pan=0.0)
    fast = SyntheticVideoConfig(frames=4, speed=(0.05, 0.05), spin=0.0, pan=0.0)

    def change(cfg):
        vids = np.stack([render_video(i, cfg) for i in range(8)]).astype(float)
        return np.abs(np.diff(vids, axis=1)).mean()

    assert 0 < change(slow) < change(fast)
    spin = SyntheticVideoConfig(frames=4, speed=(0.0, 0.0), spin=0.3, pan=0.0)
    assert change(spin) > 0                                                   # rotation alone moves pixels
    pan = SyntheticVideoConfig(frames=4, speed=(0.0, 0.0), spin=0.0, pan=0.05)
    assert change(pan) > 0                                                    # so does the background


def test_frames_are_periodic():
    # shapes wrap around the border and the background has integer wavenumbers, so the step from
    # the last row / column back to the first is like any step between neighbours: no seam
    cfg = SyntheticVideoConfig(frames=4, size=(24, 24))
    v = np.stack([render_video(i, cfg) for i in range(16)]).astype(float)    # [N, F, H, W, 3]
    for axis in (2, 3):
        inner = np.abs(np.diff(v, axis=axis)).mean()
        seam = np.abs(v.take([-1], axis=axis) - v.take([0], axis=axis)).mean()
        assert 0.5 * inner < seam < 2.0 * inner, (axis, seam, inner)


@pytest.mark.parametrize("bad, message", [
    (dict(videos=0), "synthetic.videos"), (dict(size=(2, 16)), "synthetic.size"),
    (dict(speed=(0.5, 0.1)), "synthetic.speed"), (dict(fps=0), "synthetic.fps"), (dict(seed=-1), "synthetic.seed"),
])
def test_config_is_checked(bad, message):
    with pytest.raises(ValueError, match=message):
        SyntheticVideoConfig(**bad)


def test_corpus_shards_hold_the_rendered_clips(tmp_path):
    synth = SyntheticVideoConfig(videos=12, frames=6, size=(8, 12), seed=2)
    out = str(tmp_path / "c")
    s = convert_synthetic_video(synth, out, VideoConvertConfig(frames=3, val_fraction=0.25), SerialComm(),
                                progress=False)
    assert s["samples_written"] == 24 and s["stats"]["videos"] == 12               # two clips per video
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["meta"]["synthetic"]["seed"] == 2 and manifest["meta"]["size"] == [8, 12]
    seen = 0
    for split in ("train", "val"):
        for url in resolve_shards(out, split):
            for sample in iter_shard_samples(url):
                meta = json.loads(sample["json"])
                i, c = (int(v) for v in sample["__key__"][1:].split("-"))
                assert meta["split"] == split and meta["source"] == video_name(i, synth) and meta["fps"] == 8.0
                clip = np.load(io.BytesIO(sample["npy"]))
                np.testing.assert_array_equal(clip, render_video(i, synth)[3 * c:3 * c + 3])
                seen += 1
    assert seen == 24 and s["stats"]["samples_val"] > 0 and s["stats"]["samples_train"] > 0
    again = convert_synthetic_video(synth, out, VideoConvertConfig(frames=3, val_fraction=0.25), SerialComm(),
                                    progress=False)
    assert again["shards_written"] == 0                                       # a re-run finds it done
    with pytest.raises(ValueError, match="rendered at 8x12"):
        convert_synthetic_video(synth, str(tmp_path / "d"), VideoConvertConfig(frames=3, size=(16, 16)),
                                SerialComm(), progress=False)


def test_tool_writes_a_synthetic_corpus(tmp_path, capsys):
    sys.path.insert(0, REPO)
    from tools import convert_video

    out = str(tmp_path / "t")
    assert convert_video.main(["--synthetic", "6", "--out", out, "--frames", "4", "--size", "16x16",
                               "--seed", "1", "--no-progress", "--speed", "0.05", "0.05"]) == 0
    assert "6 inputs" in capsys.readouterr().out
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["meta"]["synthetic"]["speed"] == [0.05, 0.05]
    for argv in (["clip.npy", "--synthetic", "3", "--out", out], ["--out", out]):
        with pytest.raises(SystemExit):
            convert_video.main(argv)


def test_video_source_makes_the_corpus_on_first_use(tmp_path, capsys):
    from sgfm_dist.train.batches import build_train_source, global_field_shape
    from sgfm_dist.train.config_loader import load_config

    source = str(tmp_path / "made")
    cfg = load_config(os.path.join(REPO, "configs", "video_tiny.yaml"), [
        f"data.source={source}", "train.micro_batch=2",
        "data.generate='{python} tools/convert_video.py --synthetic 4 --out {source} --frames 8 --size 16x16 "
        "--val-fraction 0.5 --no-progress'"])
    batch = next(iter(build_train_source(cfg, 0, 1, num_workers=0)))
    assert "making it (data.generate)" in capsys.readouterr().err               # the log line of first use
    assert batch["frames"].shape == (2, 8, 16, 16, 3)
    assert global_field_shape(cfg) == (8, 16, 16)
    assert os.path.exists(os.path.join(source, "manifest.json"))
