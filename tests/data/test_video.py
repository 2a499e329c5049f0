"""tools/convert_video.py: frame directories and arrays to clips, resizing, bad input, the video source."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sgfm_dist.data.converters.video import VideoConvertConfig, convert_video, resize_frame
from sgfm_dist.data.fields import VIDEO_LEVELS, build_video_source, frames_to_field
from sgfm_dist.parallel.mpi import SerialComm
from sgfm_dist.data.urls import iter_shard_samples, resolve_shards
from sgfm_dist.train.trainer import batch_to_device


def _frames(n, h=6, w=10, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _inputs(root):
    """A frame directory (7 PNGs), an .npy (9 frames) and a grayscale .npz (5 frames), all 6x10."""
    vids = {"a": _frames(7, seed=1), "b": _frames(9, seed=2), "c": _frames(5, seed=3)[..., 0]}
    (root / "a").mkdir(parents=True)
    for i, f in enumerate(vids["a"]):
        Image.fromarray(f).save(root / "a" / f"{i:04d}.png")
    np.save(root / "b.npy", vids["b"])
    np.savez(root / "c.npz", frames=vids["c"])
    vids["c"] = np.repeat(vids["c"][..., None], 3, axis=-1)
    return vids


def _convert(inputs, out, **kw):
    kw.setdefault("val_fraction", 0.0)
    return convert_video([str(i) for i in inputs], str(out), VideoConvertConfig(**kw), SerialComm(), progress=False)


@pytest.mark.parametrize("frames, stride", [(3, None), (2, 3), (5, 1)])
def test_clips_are_the_input_frames(tmp_path, frames, stride):
    vids = _inputs(tmp_path / "in")
    _convert([tmp_path / "in"], tmp_path / "out", frames=frames, stride=stride, shard_samples=4)
    by_source = {"a": "v000000", "b": "v000001", "c": "v000002"}  # sorted inputs: a/, b.npy, c.npz
    samples = [s for url in resolve_shards(str(tmp_path / "out"), "train") for s in iter_shard_samples(url)]
    step = stride or frames
    expect = sum((len(v) - frames) // step + 1 for v in vids.values() if len(v) >= frames)
    assert len(samples) == expect
    for s in samples:
        meta = json.loads(s["json"])
        name = [k for k, p in by_source.items() if s["__key__"].startswith(p)][0]
        clip = np.load(io.BytesIO(s["npy"]))
        start = meta["start_frame"]
        np.testing.assert_array_equal(clip, vids[name][start:start + frames])
        assert meta["fps"] == 30.0


def test_resize_modes():
    frame = np.zeros((20, 40, 3), np.uint8)
    frame[:, 10:30] = 200  # a centred block: 'crop' to a square keeps only it
    crop = resize_frame(frame, (8, 8), "crop")
    assert crop.shape == (8, 8, 3) and (crop[:, 1:-1] == 200).all()  # edges blend bilinearly
    assert resize_frame(frame, (8, 8), "stretch")[:, 0].max() == 0  # stretching keeps the black border
    stretch = resize_frame(np.full((20, 40, 3), 77, np.uint8), (5, 7), "stretch")
    assert stretch.shape == (5, 7, 3) and (stretch == 77).all()


def test_source_batches_and_frame_step(tmp_path):
    vids = _inputs(tmp_path / "in")
    _convert([tmp_path / "in" / "b.npy"], tmp_path / "out", frames=2, frame_step=2, size=(4, 4), resize="stretch")
    src = build_video_source(str(tmp_path / "out"), "train", batch_size=2, shuffle=False, shuffle_buffer=1)
    batch = next(iter(src))
    assert "field" not in batch  # uint8 frames as stored; the float field is made on the device
    assert batch["frames"].shape == (2, 2, 4, 4, 3) and batch["frames"].dtype == torch.uint8
    assert batch["fps"].tolist() == [15.0, 15.0]  # every other frame of a 30 fps input
    first = resize_frame(vids["b"][0], (4, 4), "stretch")
    ids = batch["sample_ids"]
    b = ids.index("v000000-000000@0")
    np.testing.assert_array_equal(batch["frames"][b, 0].numpy(), first)
    field = batch_to_device(batch, "cpu")["field"]  # what the trainer feeds the model
    assert field.shape == (2, 3, 2, 4, 4) and field.dtype == torch.float32
    assert field.min() >= -1 and field.max() <= 1
    torch.testing.assert_close(field[b, :, 0], torch.from_numpy(first).permute(2, 0, 1).float() / 127.5 - 1)


def _host_float_field(frames: np.ndarray) -> np.ndarray:
    """The loader's conversion before it handed out uint8 (commit bedea33), the reference:
    uint8 [B, T, H, W, C] -> float32 [B, C, T, H, W] in [-1, 1] with numpy on the host."""
    out = np.empty((frames.shape[0], frames.shape[4], *frames.shape[1:4]), np.float32)
    for i, clip in enumerate(frames):
        np.divide(clip.transpose(3, 0, 1, 2), np.float32(127.5), out=out[i], dtype=np.float32)
        np.subtract(out[i], np.float32(1.0), out=out[i])
    return out


def test_frames_to_field_is_bitwise_the_host_conversion():
    levels = np.arange(256, dtype=np.uint8)
    frames = np.random.default_rng(1).integers(0, 256, (2, 3, 8, 6, 3), dtype=np.uint8)  # [B, T, H, W, C]
    frames.reshape(-1)[:256] = levels  # every level occurs
    assert set(np.unique(frames).tolist()) == set(range(256))
    want = _host_float_field(frames)
    got = frames_to_field(torch.from_numpy(frames))
    assert got.dtype == torch.float32 and got.is_contiguous()
    np.testing.assert_array_equal(got.numpy().view(np.int32), want.view(np.int32))  # bit for bit
    # the gather other devices use: the level table is the host arithmetic, level by level
    np.testing.assert_array_equal(VIDEO_LEVELS.view(np.int32), _host_float_field(
        np.broadcast_to(levels.reshape(1, 1, 1, 256, 1), (1, 1, 1, 256, 3)).copy())[0, 0, 0, 0].view(np.int32))
    with pytest.raises(ValueError, match="frames: expected a uint8 tensor"):
        frames_to_field(torch.from_numpy(want))


@pytest.mark.gpu
def test_frames_to_field_on_cuda_is_bitwise_the_host_conversion():
    frames = np.random.default_rng(2).integers(0, 256, (2, 4, 8, 8, 3), dtype=np.uint8)
    frames.reshape(-1)[:256] = np.arange(256, dtype=np.uint8)
    got = frames_to_field(torch.from_numpy(frames).cuda())
    assert got.is_cuda and got.dtype == torch.float32
    np.testing.assert_array_equal(got.cpu().numpy().view(np.int32), _host_float_field(frames).view(np.int32))


def test_bad_video_input_is_named(tmp_path):
    (tmp_path / "mixed").mkdir()
    Image.fromarray(_frames(1)[0]).save(tmp_path / "mixed" / "0.png")
    Image.fromarray(_frames(1, h=8)[0]).save(tmp_path / "mixed" / "1.png")
    with pytest.raises(ValueError, match="1.png.*--size"):
        _convert([tmp_path / "mixed"], tmp_path / "o1", frames=1)
    _convert([tmp_path / "mixed"], tmp_path / "o2", frames=1, size=(4, 4))
    np.save(tmp_path / "tall.npy", _frames(3, h=7))
    np.save(tmp_path / "wide.npy", _frames(3, h=6))
    with pytest.raises(ValueError, match="wide.npy: frames are 6x10.*tall.npy has 7x10.*--size"):
        _convert([tmp_path / "tall.npy", tmp_path / "wide.npy"], tmp_path / "o3", frames=2)
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="clip.mp4"):
        _convert([tmp_path / "clip.mp4"], tmp_path / "o4")
    np.save(tmp_path / "short.npy", _frames(2))
    with pytest.raises(ValueError, match="no sample survived.*too_short"):
        _convert([tmp_path / "short.npy"], tmp_path / "o5", frames=4)
    np.save(tmp_path / "float.npy", np.zeros((3, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="float.npy.*uint8"):
        _convert([tmp_path / "float.npy"], tmp_path / "o6")
    with pytest.raises(ValueError, match="matches no file"):
        _convert([tmp_path / "*.avi"], tmp_path / "o7")


def _write_mp4(path, frames: np.ndarray, fps: int) -> int:
    """Encode uint8 [N, H, W, 3] frames as H.264 in an .mp4 with PyAV; returns the largest pixel error
    the codec may make (0: lossless RGB, 1: lossless 4:4:4 YUV, whose RGB round trip rounds)."""
    import av

    codec, pix_fmt, tolerance = (("libx264rgb", "rgb24", 0) if "libx264rgb" in av.codecs_available
                                 else ("libx264", "yuv444p", 1))
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        stream.options = {"qp": "0"}  # lossless
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())
    return tolerance


def test_mp4_round_trip(tmp_path):
    pytest.importorskip("av", reason="decoding video files needs PyAV (pip install av, the [video] extra)")
    t, y, x = np.meshgrid(np.arange(7), np.arange(16), np.arange(24), indexing="ij")
    frames = np.stack([(x * 10 + t * 9) % 256, (y * 15) % 256, (x + y + t * 30) % 256], axis=-1).astype(np.uint8)
    tolerance = _write_mp4(tmp_path / "clip.mp4", frames, fps=12)
    _convert([tmp_path / "clip.mp4"], tmp_path / "out", frames=3, stride=2, shard_samples=2)
    samples = [s for url in resolve_shards(str(tmp_path / "out"), "train") for s in iter_shard_samples(url)]
    assert len(samples) == 3  # starts 0, 2, 4 of 7 frames
    for s in samples:
        meta = json.loads(s["json"])
        clip = np.load(io.BytesIO(s["npy"]))
        assert meta["fps"] == 12.0 and clip.shape == (3, 16, 24, 3)
        start = meta["start_frame"]
        assert np.abs(clip.astype(int) - frames[start:start + 3]).max() <= tolerance

