"""Videos -> WebDataset shards of fixed-size clips (``tools/convert_video.py``).

Inputs: directories of frame images (every directory that directly holds images is one
video, frames in file-name order), ``.npy`` / ``.npz`` arrays ``[N, H, W, 3]`` or ``[N, H, W]``
(uint8), and video files (.mp4, .avi, .mov, .mkv, .webm) when PyAV or imageio is installed.
A sample is one clip of F frames: ``<key>.npy`` uint8 ``[F, H, W, 3]`` and ``<key>.json``
(``fps`` of the clip, ``source``, ``start_frame``, ``frame_step``, ``split``). Clips start every
``stride`` (sub-sampled) frames; a video shorter than F frames gives none (counted).

Resizing (``size=(H, W)``): 'crop' scales the frame to cover H x W and cuts the centre,
'stretch' scales to H x W ignoring the aspect ratio. Without ``size`` every frame of every
video must have the same size (mixed sizes are a ValueError naming the file). The split is
by a hash of the video's name, so all clips of one video land in the same split.

``convert_synthetic_video`` writes the generated corpus of ``sgfm_dist.data.synthetic_video``
(moving, rotating, textured shapes; no download) through the same clip cutting and shards.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Literal, Sequence

import fsspec
import numpy as np

from ..corpus import split_of
from ..shards import TAR_OVERHEAD, PlanItem, json_bytes, npy_bytes
from ..synthetic_video import SyntheticVideoConfig, render_video, video_name
from .common import run_conversion

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")
ARRAY_SUFFIXES = (".npy", ".npz")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


@dataclass
class VideoConvertConfig:
    """Options of a video conversion (all of them enter the plan fingerprint)."""

    frames: int = 16
    """F: frames per clip."""
    stride: int | None = None
    """Frames between clip starts, counted after frame_step (None: F, non-overlapping clips)."""
    frame_step: int = 1
    """Keep every frame_step-th frame (the clip's fps is the source fps / frame_step)."""
    size: tuple[int, int] | None = None
    """(H, W) of the stored frames; None keeps the input size (then all inputs must agree)."""
    resize: Literal["crop", "stretch"] = "crop"
    """'crop': cover H x W and cut the centre; 'stretch': scale to H x W."""
    fps: float = 30.0
    """Frame rate recorded for image directories and arrays (video files carry their own)."""
    npz_key: str | None = None
    """Array name in .npz inputs (None: the only array, or 'frames')."""
    val_fraction: float = 0.05
    """Share of videos in the 'val' split (hash of the video name)."""
    shard_samples: int | None = 1000
    """At most this many clips per shard (None: no limit)."""
    shard_mb: float | None = 512.0
    """About this many MB per shard (None: no limit)."""

    def __post_init__(self):
        for name in ("frames", "frame_step"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {v!r}")
        if self.stride is not None and (not isinstance(self.stride, int) or self.stride < 1):
            raise ValueError(f"stride: must be None or an integer >= 1, got {self.stride!r}")
        if self.size is not None:
            if len(self.size) != 2 or any(not isinstance(s, int) or s < 1 for s in self.size):
                raise ValueError(f"size: must be (H, W) with positive integers, got {self.size!r}")
            self.size = (int(self.size[0]), int(self.size[1]))
        if self.resize not in ("crop", "stretch"):
            raise ValueError(f"resize: must be 'crop' or 'stretch', got {self.resize!r}")
        if not self.fps > 0:
            raise ValueError(f"fps: must be > 0, got {self.fps}")
        if not 0.0 <= self.val_fraction <= 1.0:
            raise ValueError(f"val_fraction: must lie in [0, 1], got {self.val_fraction}")
        if self.shard_samples is not None and self.shard_samples < 1:
            raise ValueError(f"shard_samples: must be >= 1, got {self.shard_samples}")

    @property
    def clip_stride(self) -> int:
        return self.stride or self.frames


# ---- inputs --------------------------------------------------------------------------

def list_video_inputs(sources: Sequence[str]) -> list[str]:
    """Videos of the given files/directories/globs: files as they are, frame directories with a trailing '/'."""
    if not sources:
        raise ValueError("inputs: no input given")
    out: list[str] = []
    for source in sources:
        fs, root = fsspec.core.url_to_fs(source)
        proto = source.split("://", 1)[0] + "://" if "://" in source else ""
        if any(c in root for c in "*?["):
            paths = sorted(fs.glob(root))
            if not paths:
                raise ValueError(f"input: the pattern {source!r} matches no file")
        elif not fs.exists(root):
            raise FileNotFoundError(f"input: {source!r} does not exist")
        else:
            paths = [root]
        found = []
        for path in paths:
            if fs.isfile(path):
                if not path.lower().endswith(ARRAY_SUFFIXES + VIDEO_SUFFIXES):
                    raise ValueError(f"input: {proto + path} is not a video, .npy or .npz file or a frame directory")
                found.append(proto + path)
                continue
            files = sorted(fs.find(path))
            dirs = sorted({os.path.dirname(f) for f in files if f.lower().endswith(IMAGE_SUFFIXES)})
            found += [proto + d.rstrip("/") + "/" for d in dirs]
            found += [proto + f for f in files if f.lower().endswith(ARRAY_SUFFIXES + VIDEO_SUFFIXES)]
        if not found:
            raise ValueError(f"input: {source!r} holds no video, array or frame directory")
        out += [f for f in sorted(found) if f not in out]
    return out


def _frame_files(video: str) -> list[str]:
    fs, root = fsspec.core.url_to_fs(video)
    proto = video.split("://", 1)[0] + "://" if "://" in video else ""
    return [proto + p for p in sorted(fs.ls(root, detail=False)) if p.lower().endswith(IMAGE_SUFFIXES)]


def _open_image(path: str):
    from PIL import Image

    with fsspec.open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    return img


def _image_size(path: str) -> tuple[int, int]:
    from PIL import Image

    with fsspec.open(path, "rb") as f:
        w, h = Image.open(f).size  # header only
    return h, w


def _load_array(path: str, npz_key: str | None) -> np.ndarray:
    with fsspec.open(path, "rb") as f:
        data = f.read()
    import io

    try:
        obj = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:
        raise ValueError(f"{path}: not a readable .npy/.npz array ({type(e).__name__}: {e})") from None
    if isinstance(obj, np.lib.npyio.NpzFile):
        keys = list(obj.keys())
        key = npz_key or ("frames" if "frames" in keys else (keys[0] if len(keys) == 1 else None))
        if key is None or key not in keys:
            raise ValueError(f"{path}: cannot tell which array holds the frames (arrays {keys}); pass --npz-key")
        obj = obj[key]
    arr = obj
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{path}: expected frames [N, H, W], [N, H, W, 1|3|4], got shape {obj.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"{path}: expected uint8 frames, got dtype {arr.dtype}")
    return arr


def _decode_video(path: str) -> tuple[np.ndarray, float]:
    """All frames [N, H, W, 3] uint8 and the fps of a video file, through PyAV or imageio."""
    try:
        import av  # type: ignore
    except ImportError:
        av = None
    if av is not None:
        try:
            with fsspec.open(path, "rb") as f, av.open(f) as container:
                if not container.streams.video:
                    raise ValueError("no video stream")
                stream = container.streams.video[0]
                fps = float(stream.average_rate or 0) or 30.0
                frames = [fr.to_ndarray(format="rgb24") for fr in container.decode(stream)]
        except (av.error.FFmpegError, ValueError) as e:
            raise ValueError(f"{path}: cannot decode the video ({type(e).__name__}: {e})") from None
        if not frames:
            raise ValueError(f"{path}: the video stream holds no frame")
        return np.stack(frames), fps
    try:
        import imageio.v3 as iio  # type: ignore
    except ImportError:
        raise ValueError(f"{path}: decoding video files needs PyAV or imageio (pip install av, or "
                         f"imageio[pyav]); neither is installed. Convert it to frames or .npy instead") from None
    with fsspec.open(path, "rb") as f:
        data = f.read()
    frames = iio.imread(data, index=None, extension=os.path.splitext(path)[1])
    meta = iio.immeta(data, extension=os.path.splitext(path)[1])
    return np.asarray(frames)[..., :3], float(meta.get("fps", 30.0))


class VideoInput:
    """One input video: frame count, frame size and fps from ``probe``, frames on demand."""

    def __init__(self, path: str, cfg: VideoConvertConfig):
        self.path, self.cfg = path, cfg
        self.is_dir = path.endswith("/")
        self.is_array = path.lower().endswith(ARRAY_SUFFIXES)
        self._files: list[str] | None = None
        self._frames: np.ndarray | None = None
        self._fps = cfg.fps

    def probe(self) -> tuple[int, tuple[int, int], float]:
        """(number of frames, (H, W), fps); frames of mixed sizes are an error naming the file without cfg.size."""
        if self.is_dir:
            self._files = _frame_files(self.path)
            sizes = [_image_size(f) for f in self._files]
            if self.cfg.size is None:
                for f, s in zip(self._files, sizes):
                    if s != sizes[0]:
                        raise ValueError(f"{f}: frame of size {s[0]}x{s[1]} (HxW) in a video whose first frame "
                                         f"{self._files[0]} is {sizes[0][0]}x{sizes[0][1]}; pass --size HxW to resize")
            return len(self._files), sizes[0], self._fps
        if self.is_array:
            self._frames = _load_array(self.path, self.cfg.npz_key)
        else:
            self._frames, self._fps = _decode_video(self.path)
        return self._frames.shape[0], tuple(self._frames.shape[1:3]), self._fps

    def frame(self, i: int) -> np.ndarray:
        """Frame ``i`` (original numbering) as uint8 [H, W, 3] (call ``probe`` first)."""
        if self.is_dir:
            return np.asarray(_open_image(self._files[i]).convert("RGB"))
        f = self._frames[i]  # [H, W, c]
        if f.shape[-1] == 1:
            f = np.repeat(f, 3, axis=-1)
        return f[..., :3]


def resize_frame(frame: np.ndarray, size: tuple[int, int] | None, mode: str) -> np.ndarray:
    """uint8 [h, w, 3] -> [H, W, 3] by centre crop after covering scale, or by stretching (bilinear)."""
    if size is None or frame.shape[:2] == tuple(size):
        return frame
    from PIL import Image

    H, W = size
    img = Image.fromarray(frame)
    if mode == "stretch":
        return np.array(img.resize((W, H), Image.BILINEAR))
    h, w = frame.shape[:2]
    scale = max(H / h, W / w)
    nh, nw = max(H, round(h * scale)), max(W, round(w * scale))
    img = img.resize((nw, nh), Image.BILINEAR)
    top, left = (nh - H) // 2, (nw - W) // 2
    return np.array(img.crop((left, top, left + W, top + H)))


# ---- conversion ----------------------------------------------------------------------

def _clips(i: int, wanted: set, frame, fps: float, source: str, split_key: str, cfg: VideoConvertConfig,
           extra: dict | None = None):
    """The samples ``(c, {"__key__", "npy", "json"})`` of the wanted clips ``c`` of input ``i``, whose
    original frame ``k`` is ``frame(k)`` (uint8 [h, w, 3]); the split is a hash of ``split_key``."""
    step = cfg.frame_step
    split = split_of(split_key.encode(), cfg.val_fraction)
    for c in sorted(wanted):
        first = c * cfg.clip_stride * step
        clip = np.stack([resize_frame(frame(first + j * step), cfg.size, cfg.resize)
                         for j in range(cfg.frames)])  # [F, H, W, 3]
        meta = dict(fps=fps / step, source=source, start_frame=first, frame_step=step, frames=cfg.frames,
                    size=list(clip.shape[1:3]), split=split, **(extra or {}))
        yield c, {"__key__": f"v{i:06d}-{c:06d}", "npy": npy_bytes(clip), "json": json_bytes(meta)}


def clip_count(n_frames: int, cfg: VideoConvertConfig) -> int:
    """Clips of a video with ``n_frames`` frames (after sub-sampling by frame_step)."""
    n = -(-n_frames // cfg.frame_step)
    return 0 if n < cfg.frames else (n - cfg.frames) // cfg.clip_stride + 1


def convert_video(inputs: Sequence[str], out: str, cfg: VideoConvertConfig, comm, overwrite: bool = False,
                  progress: bool = True) -> dict:
    """Convert videos to clip shards under ``out`` (any fsspec URL); returns the run summary."""
    videos = list_video_inputs(inputs)
    names = [v.rstrip("/") for v in videos]

    sizes: dict[int, tuple[int, int]] = {}  # native frame size per video scanned on this rank

    def scan(i: int, stats: dict) -> list[PlanItem]:
        n, hw, _ = VideoInput(videos[i], cfg).probe()
        sizes[i] = tuple(int(v) for v in hw)
        stats["videos"] = stats.get("videos", 0) + 1
        stats["frames_in"] = stats.get("frames_in", 0) + n
        clips = clip_count(n, cfg)
        if clips == 0:
            stats["too_short"] = stats.get("too_short", 0) + 1
        H, W = cfg.size or hw
        split = split_of(os.path.basename(names[i]).encode(), cfg.val_fraction)
        return [PlanItem(i, c, split, cfg.frames * H * W * 3 + 2 * TAR_OVERHEAD) for c in range(clips)]

    def check_sizes() -> None:
        """Without a target size, every video must share one frame size (a batch needs equal shapes)."""
        if cfg.size is not None:
            return
        merged = {i: s for part in comm.allgather(sizes) for i, s in part.items()}
        first = min(merged)
        for i in sorted(merged):
            if merged[i] != merged[first]:
                raise ValueError(f"{names[i]}: frames are {merged[i][0]}x{merged[i][1]} (HxW) but {names[first]} "
                                 f"has {merged[first][0]}x{merged[first][1]}; pass --size HxW to resize all videos")

    def produce(i: int, wanted: set):
        video = VideoInput(videos[i], cfg)
        _, _, fps = video.probe()
        yield from _clips(i, wanted, video.frame, fps, names[i], os.path.basename(names[i]), cfg)

    options = dict(asdict(cfg))
    max_bytes = None if cfg.shard_mb is None else int(cfg.shard_mb * 1e6)
    return run_conversion("video", comm, videos, scan, produce, out, options, cfg.shard_samples, max_bytes,
                          overwrite=overwrite, progress=progress, meta=dict(size=cfg.size, frames=cfg.frames),
                          after_scan=check_sizes)


def convert_synthetic_video(synth: SyntheticVideoConfig, out: str, cfg: VideoConvertConfig, comm,
                            overwrite: bool = False, progress: bool = True) -> dict:
    """Render the synthetic corpus ``synth`` (``sgfm_dist.data.synthetic_video``) and write it as
    clip shards under ``out``, exactly as ``convert_video`` writes real videos: ``cfg`` cuts each
    video of ``synth.frames`` frames into clips (frames, stride, frame_step) and splits videos by
    a hash of their names. ``cfg.size``, if given, must be ``synth.size`` (render at the size you
    want rather than resampling). Deterministic: the same options give the same shards on any
    number of ranks. Returns the run summary."""
    if cfg.size is not None and tuple(cfg.size) != tuple(synth.size):
        raise ValueError(f"size: the synthetic videos are rendered at {synth.size[0]}x{synth.size[1]}; "
                         f"got a resize to {cfg.size[0]}x{cfg.size[1]} (render at that size instead)")
    names = [video_name(i, synth) for i in range(synth.videos)]
    H, W = synth.size

    def scan(i: int, stats: dict) -> list[PlanItem]:
        stats["videos"] = stats.get("videos", 0) + 1
        stats["frames_in"] = stats.get("frames_in", 0) + synth.frames
        clips = clip_count(synth.frames, cfg)
        if clips == 0:
            stats["too_short"] = stats.get("too_short", 0) + 1
        split = split_of(names[i].encode(), cfg.val_fraction)
        return [PlanItem(i, c, split, cfg.frames * H * W * 3 + 2 * TAR_OVERHEAD) for c in range(clips)]

    def produce(i: int, wanted: set):
        frames = render_video(i, synth)  # [F, H, W, 3], rendered once for all its clips
        yield from _clips(i, wanted, frames.__getitem__, synth.fps, names[i], names[i], cfg,
                          extra=dict(synthetic_seed=synth.seed))

    options = dict(asdict(cfg), synthetic=asdict(synth))
    max_bytes = None if cfg.shard_mb is None else int(cfg.shard_mb * 1e6)
    return run_conversion("video", comm, names, scan, produce, out, options, cfg.shard_samples, max_bytes,
                          overwrite=overwrite, progress=progress,
                          meta=dict(size=list(synth.size), frames=cfg.frames, synthetic=asdict(synth)))
