"""A video corpus that needs no download: moving, rotating, textured shapes on a textured background.

Video ``i`` of a corpus is ``render_video(i, cfg)``: uint8 ``[F, H, W, 3]``, a pure function of
``(cfg.seed, i)`` and the config (numpy's ``default_rng([seed, i])``), so a corpus is the same
on every machine and any MPI rank can render any video. ``tools/convert_video.py --synthetic N``
writes it as the same clip shards real videos become (``convert_synthetic_video``), so training,
sampling and evaluation see one format.

What is in a video, and why:

* a background of a few low-frequency sinusoids per channel, panning at a small constant
  velocity (camera motion: every pixel moves, not only the shapes);
* 1 to ``max_shapes`` shapes (disc, square, triangle), each with its own colour and a striped
  texture in its own frame, so rotation is visible even on a disc; each moves at a constant
  velocity and spins at a constant angular velocity, occluding the ones drawn before it.

Everything is periodic in space: positions wrap around the frame (a shape leaving on the right
enters on the left), and the background's wavenumbers are integers. The model's convolutions,
spectral layers and wavelets are periodic, so the data is exactly what they describe; nothing
jumps at the border. Sizes and speeds are fractions of the frame, so the same config renders
the same motion at any ``size``. Edges are anti-aliased (a one-pixel ramp of the signed
distance), so sub-pixel motion changes pixels smoothly instead of in jumps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SHAPES = ("disc", "square", "triangle")


@dataclass
class SyntheticVideoConfig:
    """How the synthetic videos look and move (every field enters the corpus' fingerprint)."""

    videos: int = 256
    """Number of videos N (video i is ``render_video(i, cfg)``)."""
    frames: int = 16
    """Frames per video."""
    size: tuple[int, int] = (32, 32)
    """(H, W) of the frames."""
    seed: int = 0
    """Corpus seed: video i draws from ``numpy.random.default_rng([seed, i])``."""
    max_shapes: int = 3
    """Shapes per video, drawn uniformly from 1..max_shapes."""
    radius: tuple[float, float] = (0.12, 0.24)
    """Shape radius range, as a fraction of min(H, W)."""
    speed: tuple[float, float] = (0.02, 0.06)
    """Shape speed range, in frame widths (min(H, W)) per frame: 0.6 to 1.9 px per frame at 32x32."""
    spin: float = 0.15
    """Largest angular velocity, radians per frame (drawn uniformly in [-spin, spin])."""
    pan: float = 0.01
    """Largest background speed, in frame widths per frame (each component in [-pan, pan])."""
    fps: float = 8.0
    """Frame rate written to the clips' metadata (the motion is defined per frame)."""

    def __post_init__(self):
        for name in ("videos", "frames", "max_shapes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"synthetic.{name}: must be an integer >= 1, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"synthetic.seed: must be an integer >= 0, got {self.seed!r}")
        if len(self.size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 4 for s in self.size):
            raise ValueError(f"synthetic.size: must be (H, W) with integers >= 4, got {self.size!r}")
        self.size = (int(self.size[0]), int(self.size[1]))
        for name in ("radius", "speed"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"synthetic.{name}: need 0 <= low <= high, got {getattr(self, name)!r}")
            setattr(self, name, (float(lo), float(hi)))
        for name in ("spin", "pan"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"synthetic.{name}: must be >= 0, got {getattr(self, name)!r}")
        if not self.fps > 0:
            raise ValueError(f"synthetic.fps: must be > 0, got {self.fps!r}")


def video_name(i: int, cfg: SyntheticVideoConfig) -> str:
    """The name of video ``i`` (its split is a hash of it, like a real video's file name)."""
    return f"synthetic-s{cfg.seed}-{i:06d}"


def _background(rng: np.random.Generator, H: int, W: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(amplitude [3, K], wavenumbers ky, kx [K], phase [3, K]) of a smooth periodic background."""
    K = 3
    ky = rng.integers(-2, 3, K)
    kx = rng.integers(-2, 3, K)
    kx[(kx == 0) & (ky == 0)] = 1  # no constant term: the base colour is set apart
    amp = rng.uniform(0.03, 0.12, (3, K))
    phase = rng.uniform(0, 2 * math.pi, (3, K))
    return amp, np.stack([ky, kx]), phase


def _signed_distance(kind: str, px: np.ndarray, py: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (pixels; < 0 inside) of points (px, py) in the shape's own frame."""
    if kind == "disc":
        return np.hypot(px, py) - r
    if kind == "square":
        s = r / math.sqrt(2.0) * 1.15  # about the disc's area
        return np.maximum(np.abs(px), np.abs(py)) - s
    # equilateral triangle, circumradius ~ 1.3 r: the largest of its three edge distances
    d = None
    for a in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3):
        e = px * math.cos(a) + py * math.sin(a) - 0.65 * r
        d = e if d is None else np.maximum(d, e)
    return d


def render_video(i: int, cfg: SyntheticVideoConfig) -> np.ndarray:
    """Video ``i`` of the corpus ``cfg``: uint8 ``[frames, H, W, 3]`` (module docstring)."""
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0:
        raise ValueError(f"i: must be an integer >= 0, got {i!r}")
    rng = np.random.default_rng([cfg.seed, int(i)])
    H, W = cfg.size
    m = float(min(H, W))
    yy, xx = np.meshgrid(np.arange(H, dtype=np.float64), np.arange(W, dtype=np.float64), indexing="ij")  # [H, W]

    base = rng.uniform(0.25, 0.75, 3)
    amp, k, phase = _background(rng, H, W)
    pan = rng.uniform(-cfg.pan, cfg.pan, 2) * m  # (vy, vx) px per frame

    shapes = []
    for _ in range(int(rng.integers(1, cfg.max_shapes + 1))):
        shapes.append(dict(
            kind=SHAPES[int(rng.integers(len(SHAPES)))],
            r=rng.uniform(*cfg.radius) * m,
            pos=rng.uniform(0, 1, 2) * (H, W),
            vel=(lambda ang, sp: sp * np.array([math.sin(ang), math.cos(ang)]))(
                rng.uniform(0, 2 * math.pi), rng.uniform(*cfg.speed) * m),
            angle=rng.uniform(0, 2 * math.pi),
            spin=rng.uniform(-cfg.spin, cfg.spin),
            colour=rng.uniform(0.0, 1.0, 3),
            stripes=rng.uniform(0.6, 1.4),  # stripe periods per radius
            contrast=rng.uniform(0.15, 0.35),
        ))

    out = np.empty((cfg.frames, H, W, 3), np.uint8)
    for t in range(cfg.frames):
        # background: sinusoids with integer wavenumbers over the frame, shifted by the pan
        oy, ox = pan * t
        arg = 2 * math.pi * (k[0][:, None, None] * (yy - oy) / H + k[1][:, None, None] * (xx - ox) / W)  # [K, H, W]
        frame = base[:, None, None] + sum(amp[:, j, None, None] * np.sin(arg[j] + phase[:, j, None, None])
                                          for j in range(amp.shape[1]))  # [3, H, W]
        for s in shapes:
            cy, cx = s["pos"] + s["vel"] * t
            # nearest periodic image: a shape crossing the border shows on both sides
            dy = (yy - cy + H / 2) % H - H / 2
            dx = (xx - cx + W / 2) % W - W / 2
            a = s["angle"] + s["spin"] * t
            ca, sa = math.cos(a), math.sin(a)
            px, py = ca * dx + sa * dy, -sa * dx + ca * dy  # the shape's own frame
            alpha = np.clip(0.5 - _signed_distance(s["kind"], px, py, s["r"]), 0.0, 1.0)  # [H, W]
            # soft stripes (tanh of a sine): sharp enough to show the spin, smooth enough not to alias
            texture = 1.0 + s["contrast"] * np.tanh(3.0 * np.sin(math.pi * px / (s["r"] / s["stripes"])))
            colour = np.clip(s["colour"][:, None, None] * texture[None], 0.0, 1.0)  # [3, H, W]
            frame = frame * (1 - alpha) + colour * alpha
        out[t] = np.clip(np.rint(frame.transpose(1, 2, 0) * 255.0), 0, 255).astype(np.uint8)
    return out
