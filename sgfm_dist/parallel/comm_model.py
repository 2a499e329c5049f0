"""Latency-bandwidth model of the communication of the split operators (docs/communication_model.md).

Predicts, from message sizes, per-message latency and per-GPU bandwidth, the time one rank
spends communicating in

* a distributed projection (one forward + one inverse rfft of a ``[B, C, N0, N1, N2]`` field
  over all three axes: slab = 2 all-to-alls over all sp ranks, pencil ``p0 x p1`` = 2 over
  groups of ``p1`` and 2 over groups of ``p0``);
* a halo exchange of width ``w`` on the split axes (one message to each neighbour per axis);
* a J-level DWT (a forward halo of the filter's reach per level on the shrinking field).

Model: an all-to-all over ``g`` ranks in which a rank sends ``V`` bytes costs
``sum over peers of alpha(peer) + V_on/beta_on + V_off/beta_off``, peers on the same node
(NVLink) and on other nodes (InfiniBand) taking their share of ``V``; sp ranks are
contiguous, so a group of consecutive ranks fills nodes first and a strided group (mesh
dim 0 of a pencil) lands on other nodes as soon as ``p1 >= gpus_per_node``. A halo exchange
posts both messages at once: ``alpha + 2 m / beta`` per axis. No overlap with compute and
no congestion beyond the per-GPU link are modelled. Run ``python -m
sgfm_dist.parallel.comm_model`` for the tables in the doc.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Network:
    """Per-GPU link figures of a GPU cluster (defaults: H100 nodes, NVLink4 + NDR InfiniBand)."""

    gpus_per_node: int = 8
    """GPUs sharing one NVLink domain."""
    alpha_on: float = 3e-6
    """Seconds of latency per message between GPUs of one node."""
    alpha_off: float = 10e-6
    """Seconds of latency per message between nodes (NCCL send/recv over InfiniBand)."""
    beta_on: float = 150e9
    """Bytes/s one GPU sustains to its node peers in an all-to-all (NVLink4, effective)."""
    beta_off: float = 22e9
    """Bytes/s one GPU sustains to other nodes (one 200 Gb/s NDR port per GPU, effective)."""

    def __post_init__(self):
        if self.gpus_per_node < 1 or min(self.alpha_on, self.alpha_off) < 0 or min(self.beta_on, self.beta_off) <= 0:
            raise ValueError(f"Network: need gpus_per_node >= 1, latencies >= 0, bandwidths > 0; got {self}")


def _peers_on_node(group: int, stride: int, net: Network) -> int:
    """Peers of a rank, in a group of ``group`` ranks spaced ``stride`` apart, on its own node."""
    per_node = max(1, net.gpus_per_node // stride) if stride < net.gpus_per_node else 1
    return min(group, per_node) - 1


def all_to_all_time(nbytes_sent: float, group: int, stride: int, net: Network) -> float:
    """Seconds for one all-to-all in which this rank sends ``nbytes_sent`` to ``group - 1`` peers."""
    if group <= 1:
        return 0.0
    on = _peers_on_node(group, stride, net)
    off = group - 1 - on
    per_peer = nbytes_sent / (group - 1)
    return on * net.alpha_on + off * net.alpha_off + on * per_peer / net.beta_on + off * per_peer / net.beta_off


def projection_time(shape, batch: int, channels: int, itemsize: int, grid, net: Network) -> float:
    """Seconds of communication of one forward + inverse distributed rfft over all axes of a 3-D
    field of global ``shape`` split over ``grid`` = ``(p,)`` (slab) or ``(p0, p1)`` (pencil)."""
    cells = math.prod(shape[:-1]) * (shape[-1] // 2 + 1) * batch * channels
    p = math.prod(grid)
    local = cells * 2 * itemsize / p  # complex bytes a rank holds in spectral space
    if len(grid) == 1:
        return 2 * all_to_all_time(local * (p - 1) / p, p, 1, net)
    p0, p1 = grid
    t = all_to_all_time(local * (p1 - 1) / p1, p1, 1, net) + all_to_all_time(local * (p0 - 1) / p0, p0, p1, net)
    return 2 * t


def halo_time(shape, batch: int, channels: int, itemsize: int, grid, width: int, net: Network) -> float:
    """Seconds of one halo exchange of ``width`` cells per side on every split axis (the first
    ``len(grid)`` axes of ``shape``), both neighbours at once."""
    t, local = 0.0, [n / p for n, p in zip(shape, grid)] + list(shape[len(grid):])
    for k, p in enumerate(grid):
        if p == 1:
            continue
        face = math.prod(local) / local[k]
        msg = width * face * batch * channels * itemsize
        # neighbours along the fastest mesh dim share the node unless the node boundary falls
        # between them; charge the slower link whenever the group spans nodes
        stride = grid[1] if (len(grid) == 2 and k == 0) else 1
        spans = p * stride > net.gpus_per_node
        alpha, beta = (net.alpha_off, net.beta_off) if spans else (net.alpha_on, net.beta_on)
        t += alpha + 2 * msg / beta
    return t


def dwt_halo_time(shape, batch: int, channels: int, itemsize: int, grid, reach: int, levels: int,
                  net: Network) -> float:
    """Seconds of the halo exchanges of a ``levels``-level forward DWT (reach per level)."""
    return sum(halo_time([n >> j for n in shape], batch, channels, itemsize, grid, reach, net) for j in range(levels))


def split_limit(extent: int, levels: int = 0, reach: int = 0, inverse_reach: int = 0) -> int:
    """Most ranks one axis of ``extent`` cells can be split over: one cell each, and for a
    ``levels``-level DWT every block a multiple of ``2**levels`` holding ``reach`` cells at the
    coarsest input and ``inverse_reach`` coarse cells at the coarsest output."""
    unit = 2 ** levels
    need = max(1, unit, 2 ** max(levels - 1, 0) * reach, unit * inverse_reach)
    need = -(-need // unit) * unit
    return extent // need


def pencil_grid(p: int, shape, net: Network) -> tuple[int, int]:
    """``(p0, p1)`` with ``p1`` (contiguous ranks) up to one node, ``p0 * p1 = p``, both <= their axis."""
    p1 = min(p, net.gpus_per_node, shape[1])
    while p % p1:
        p1 -= 1
    return p // p1, p1


def table(shape=(1024, 1024, 1024), batch: int = 1, channels: int = 3, itemsize: int = 4,
          ranks=(8, 16, 32, 64, 128, 256, 512, 1024), net: Network | None = None,
          halo_channels: int = 64, halo_width: int = 1, dwt_reach: int = 3, dwt_inverse_reach: int = 2,
          dwt_levels: int = 3) -> str:
    """Markdown table of predicted per-step communication milliseconds."""
    net = net or Network()
    rows = ["| GPUs | slab proj. ms | pencil grid | pencil proj. ms | faster | conv halo ms (slab / pencil) "
            "| DWT db4 J=3 halo ms (slab / pencil) |",
            "| ---: | ---: | :---: | ---: | :---: | ---: | ---: |"]
    slab_max = split_limit(shape[0])
    dwt_lim = [split_limit(n, dwt_levels, dwt_reach, dwt_inverse_reach) for n in shape]
    dwt_max = dwt_lim[0]
    for p in ranks:
        g = pencil_grid(p, shape, net)
        tp = projection_time(shape, batch, channels, itemsize, g, net) * 1e3
        hp = halo_time(shape, batch, halo_channels, itemsize, g, halo_width, net) * 1e3
        dp = (f"{dwt_halo_time(shape, batch, channels, itemsize, g, dwt_reach, dwt_levels, net) * 1e3:.3f}"
              if all(pk <= lim for pk, lim in zip(g, dwt_lim)) else "n/a")
        if p <= slab_max:
            ts = projection_time(shape, batch, channels, itemsize, (p,), net) * 1e3
            hs = halo_time(shape, batch, halo_channels, itemsize, (p,), halo_width, net) * 1e3
            ds = (f"{dwt_halo_time(shape, batch, channels, itemsize, (p,), dwt_reach, dwt_levels, net) * 1e3:.3f}"
                  if p <= dwt_max else "n/a")
            best = "slab" if ts <= tp else "pencil"
            rows.append(f"| {p} | {ts:.2f} | {g[0]}x{g[1]} | {tp:.2f} | {best} | {hs:.3f} / {hp:.3f} | {ds} / {dp} |")
        else:
            rows.append(f"| {p} | n/a (> {slab_max} planes) | {g[0]}x{g[1]} | {tp:.2f} | pencil | n/a / {hp:.3f} "
                        f"| n/a / {dp} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[1024, 1024, 1024])
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--itemsize", type=int, default=4, help="bytes per real number (4: fp32)")
    args = parser.parse_args(argv)
    print(table(tuple(args.shape), args.batch, args.channels, args.itemsize))


if __name__ == "__main__":
    main()
