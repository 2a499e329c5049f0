"""Per-process count of the bytes and messages this rank sends, by primitive.

The halo exchange and the FFT transposes add what they put on the wire (bytes addressed to
*other* ranks; the block a rank keeps in an all-to-all is not counted), so benchmarks and
tests can compare the traffic with the analytic minimum without a profiler.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class CommStats:
    """Running totals since the last :meth:`reset`."""

    bytes_sent: dict = field(default_factory=lambda: defaultdict(int))
    """Bytes sent to other ranks, keyed by primitive ("halo", "transpose", "allreduce", "gather")."""
    messages: dict = field(default_factory=lambda: defaultdict(int))
    """Point-to-point messages (or collective calls) issued, same keys."""

    def add(self, kind: str, nbytes: int, messages: int = 1) -> None:
        self.bytes_sent[kind] += int(nbytes)
        self.messages[kind] += int(messages)

    def reset(self) -> None:
        self.bytes_sent.clear()
        self.messages.clear()

    def snapshot(self) -> dict:
        return {"bytes_sent": dict(self.bytes_sent), "messages": dict(self.messages)}


COMM_STATS = CommStats()
"""The process-wide counter the primitives write to."""
