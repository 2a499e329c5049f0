"""Random draws of a training step as a function of (seed, global step, global sample index).

A training step consumes the global batch of ``G`` samples at global sample indices
``n = step * G + j``, ``j`` in ``[0, G)`` the sample's position in the global batch (the data
order puts them there, whatever dp, sp or DataLoader workers are: ``sgfm_dist/data/stream.py``).
:class:`SampleDraws` gives every random number of that step (diffusion noise, noise levels
tau, forcing noise xi, the prompt-training draw and prompt length, the cascade stage) from a generator of its own
per sample and purpose, seeded by a hash of ``(seed, 0, n, purpose)`` (numpy's ``SeedSequence``).
So a sample's draws do not depend on which rank holds it, in which micro-batch, nor on how
its field is split (noise is drawn as the sample's *global* field, then ``domain.shard``-ed by
the caller: ``dynamics.white_noise``), and a run resumed onto another (dp, sp) continues the
same sequence.

The noise levels stay stratified over the whole global batch (lower variance than independent
draws): ``tau_j = (u_step + j / G) mod 1`` with one uniform ``u_step`` per step, seeded by
``(seed, 1, step)``.

Cost: one ``torch.Generator`` per sample and purpose (~10 us to seed), negligible next to a
step at these batch sizes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

PURPOSES = {"tau": 1, "noise": 2, "prompt": 3, "stage": 4, "forcing": 5, "prompt_length": 6}
"""The independent random streams of a sample (fixed ids: changing one changes every run's draws)."""


def seed_of(*words: int) -> int:
    """A 64-bit seed hashed from non-negative integers (numpy ``SeedSequence``)."""
    for w in words:
        if int(w) < 0:
            raise ValueError(f"seed_of: words must be integers >= 0, got {words}")
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(1, np.uint64)[0])


@dataclass(frozen=True)
class SampleDraws:
    """The random draws of ``len(positions)`` samples of global step ``step`` (module docstring).

    ``positions``: each sample's position ``j`` in the global batch of ``global_batch`` samples,
    in the order of the batch's rows. Duck-types as a generator where the model draws
    (``device``; ``dynamics.white_noise`` draws per sample from it)."""

    seed: int
    """``train.seed``."""
    step: int
    """The global step (0-based: the number of optimizer steps taken before it)."""
    positions: tuple[int, ...]
    """Position of each row of the batch in the global batch, ``0 <= j < global_batch``."""
    global_batch: int
    """``G``: samples per global step (dp x micro_batch x grad_accum)."""
    device: str | torch.device = "cpu"
    """Device of the generators (numbers drawn on CPU and on CUDA differ)."""

    def __post_init__(self):
        if not isinstance(self.global_batch, int) or self.global_batch < 1:
            raise ValueError(f"global_batch: must be an integer >= 1, got {self.global_batch!r}")
        if not isinstance(self.step, int) or self.step < 0:
            raise ValueError(f"step: must be an integer >= 0, got {self.step!r}")
        bad = [j for j in self.positions if not 0 <= j < self.global_batch]
        if bad:
            raise ValueError(f"positions: {bad[:4]} lie outside the global batch [0, {self.global_batch})")

    @classmethod
    def contiguous(cls, seed: int, step: int, first: int, count: int, global_batch: int,
                   device: str | torch.device = "cpu") -> "SampleDraws":
        """Draws of the ``count`` samples at positions ``first, ..., first + count - 1``."""
        return cls(int(seed), int(step), tuple(range(first, first + count)), int(global_batch), device)

    def __len__(self) -> int:
        return len(self.positions)

    def indices(self) -> list[int]:
        """Global sample indices ``step * G + j``."""
        return [self.step * self.global_batch + j for j in self.positions]

    def generator(self, i: int, purpose: str) -> torch.Generator:
        """The generator of row ``i`` for ``purpose`` (one of ``PURPOSES``)."""
        n = self.step * self.global_batch + self.positions[i]
        return torch.Generator(device=self.device).manual_seed(seed_of(self.seed, 0, n, PURPOSES[purpose]))

    def check_batch(self, batch_size: int) -> None:
        if batch_size != len(self.positions):
            raise ValueError(f"SampleDraws: a batch of {batch_size} samples, but draws for {len(self.positions)} "
                             f"positions {list(self.positions[:4])}...")

    def stratified_tau(self) -> Tensor:
        """Noise levels ``(u_step + j / G) mod 1`` [B] (float32)."""
        g = torch.Generator(device=self.device).manual_seed(seed_of(self.seed, 1, self.step, PURPOSES["tau"]))
        u = torch.rand(1, generator=g, device=self.device)  # [1]
        j = torch.tensor(self.positions, dtype=torch.float32, device=self.device)  # [B]
        return (u + j / self.global_batch) % 1.0

    def uniform(self, purpose: str) -> Tensor:
        """One U[0, 1) per sample [B]."""
        return torch.cat([torch.rand(1, generator=self.generator(i, purpose), device=self.device)
                          for i in range(len(self))])

    def randint(self, high: int, purpose: str) -> Tensor:
        """One integer in ``[0, high)`` per sample [B] (int64)."""
        return torch.cat([torch.randint(0, high, (1,), generator=self.generator(i, purpose), device=self.device)
                          for i in range(len(self))])

    def normal(self, shape: tuple[int, ...], dtype: torch.dtype, purpose: str) -> Tensor:
        """Standard normal ``[B, *shape]``; row i from its own generator (``shape``: ONE sample's
        global extents, so the numbers do not depend on the split)."""
        return torch.stack([torch.randn(shape, generator=self.generator(i, purpose), dtype=dtype, device=self.device)
                            for i in range(len(self))])
