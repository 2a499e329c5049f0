"""Two "nodes" on one machine: two network namespaces joined by a veth pair, each with its own
address (10.77.0.1 and 10.77.0.2 by default) and its own loopback. A process started with
``ip netns exec NS ...`` sees only its namespace's interfaces, so two ranks in different
namespaces can reach each other only over the veth, by TCP, as two machines would.

Used by tests/distributed/test_multinode_netns.py; also a command line (as root)::

    python -m tests.distributed.netns_nodes up   [--suffix S]   # prints the names and addresses
    python -m tests.distributed.netns_nodes down [--suffix S]

Names carry a suffix (the pid by default) so concurrent runs do not collide.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: exit {p.returncode}: {p.stderr.strip()}")
    return p


@dataclass
class Node:
    ns: str      # network namespace
    dev: str     # its end of the veth pair
    addr: str    # its address on the veth
    host: str    # its host name (in /etc/netns/NS/hosts, which ``ip netns exec`` mounts on /etc/hosts)

    def prefix(self) -> list[str]:
        """Command prefix running a program on this node: in its network namespace
        (``ip netns exec NS``) and a UTS namespace of its own named ``host`` (``unshare --uts``),
        so ``socket.gethostname()`` is this node's name and resolves to its veth address."""
        return ["ip", "netns", "exec", self.ns, "unshare", "--uts", "sh", "-c", f'hostname {self.host} && exec "$@"',
                "sh"]

    def link(self, up: bool) -> None:
        """Bring this node's end of the veth down (the cable is cut) or up again."""
        _ip("-n", self.ns, "link", "set", self.dev, "up" if up else "down")

    def counters(self) -> tuple[int, int]:
        """(rx bytes, tx bytes) of this node's veth end."""
        base = f"/sys/class/net/{self.dev}/statistics/"
        out = subprocess.run(["ip", "netns", "exec", self.ns, "cat", base + "rx_bytes", base + "tx_bytes"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.split()
        return int(out[0]), int(out[1])


def names(suffix: str) -> tuple[Node, Node]:
    # interface names are limited to 15 characters
    s = suffix[-8:]
    return (Node(f"sgfmA{suffix}", f"vA{s}", "10.77.0.1", f"node0-{s}"),
            Node(f"sgfmB{suffix}", f"vB{s}", "10.77.0.2", f"node1-{s}"))


HOSTS_DIR = "/etc/netns"


def down(suffix: str) -> None:
    """Remove both namespaces (deleting a namespace deletes the veth ends in it); never raises."""
    for node in names(suffix):
        _ip("netns", "delete", node.ns, check=False)
        shutil.rmtree(os.path.join(HOSTS_DIR, node.ns), ignore_errors=True)
    for node in names(suffix):  # an end not yet moved into its namespace
        _ip("link", "delete", node.dev, check=False)
    try:
        os.rmdir(HOSTS_DIR)  # only when no other namespace has a file there
    except OSError:
        pass


def up(suffix: str) -> tuple[Node, Node]:
    """Create the two namespaces and the veth pair between them; on any failure remove what was made."""
    a, b = names(suffix)
    try:
        for node in (a, b):
            _ip("netns", "add", node.ns)
        _ip("link", "add", a.dev, "type", "veth", "peer", "name", b.dev)
        for node in (a, b):
            _ip("link", "set", node.dev, "netns", node.ns)
            _ip("-n", node.ns, "addr", "add", f"{node.addr}/24", "dev", node.dev)
            _ip("-n", node.ns, "link", "set", node.dev, "up")
            _ip("-n", node.ns, "link", "set", "lo", "up")
            os.makedirs(os.path.join(HOSTS_DIR, node.ns), exist_ok=True)
            with open(os.path.join(HOSTS_DIR, node.ns, "hosts"), "w") as f:
                f.write(f"127.0.0.1 localhost\n{a.addr} {a.host}\n{b.addr} {b.host}\n")
    except BaseException:
        down(suffix)
        raise
    return a, b


def unavailable() -> str | None:
    """Why two namespaces cannot be made here (None when they can): not root, no ``ip``, no
    ``unshare``, or ``ip netns add`` refused (e.g. a container without CAP_SYS_ADMIN)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "ip netns needs root (euid is not 0)"
    for tool in ("ip", "unshare"):
        if not shutil.which(tool):
            return f"`{tool}` is not on the PATH (iproute2 / util-linux)"
    probe = f"sgfmprobe{os.getpid()}"
    p = _ip("netns", "add", probe, check=False)
    if p.returncode != 0:
        return f"`ip netns add` is not permitted here: {p.stderr.strip() or f'exit {p.returncode}'}"
    try:
        p = _ip("link", "add", f"vp{os.getpid()}"[-15:], "type", "veth", "peer", "name", f"vq{os.getpid()}"[-15:],
                check=False)
        if p.returncode != 0:
            return f"`ip link add ... type veth` is not permitted here: {p.stderr.strip()}"
        _ip("link", "delete", f"vp{os.getpid()}"[-15:], check=False)
        q = subprocess.run(["ip", "netns", "exec", probe, "unshare", "--uts", "true"], capture_output=True,
                           text=True, timeout=30)
        if q.returncode != 0:
            return f"`unshare --uts` is not permitted here: {q.stderr.strip()}"
    finally:
        _ip("netns", "delete", probe, check=False)
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["up", "down"])
    p.add_argument("--suffix", default=str(os.getpid()))
    args = p.parse_args(argv)
    if args.action == "down":
        down(args.suffix)
        return 0
    why = unavailable()
    if why:
        print(why, file=sys.stderr)
        return 1
    for node in up(args.suffix):
        print(f"{node.ns} {node.dev} {node.addr} {node.host}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
