"""Test helpers shipped with the package: throwaway namespaces on a per-run bridge.

Every namespace, interface and bridge is named `ddt<run><n>...` and removed at teardown,
even when the test failed. The lab (198.18.0.0/16) never collides with these.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

RUN = secrets.token_hex(2)  # 4 hex chars: names stay under IFNAMSIZ (15)
_counter = itertools.count(1)


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True)


@dataclass
class ScratchNet:
    """A bridge on the host with namespaces attached: 198.19.<k>.1 is the host side."""

    index: int
    bridge: str
    subnet: int
    namespaces: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)

    @property
    def host_address(self) -> str:
        return f"198.19.{self.subnet}.1"

    def address(self, host: int) -> str:
        return f"198.19.{self.subnet}.{host}"

    def add(self, role: str, host: int) -> str:
        """A namespace with one veth on the bridge at 198.19.<k>.<host>; returns its name."""
        n = next(_counter)
        name = f"ddt{RUN}-{self.index}{role}"[:31]
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        outer, inner = f"ddt{RUN}{n}o", f"ddt{RUN}{n}i"
        sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
        self.links.append(outer)
        sh("ip", "link", "set", outer, "master", self.bridge, "up")
        sh("ip", "link", "set", inner, "netns", name)
        sh("ip", "-n", name, "link", "set", inner, "name", "eth0")
        sh("ip", "-n", name, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
        sh("ip", "-n", name, "link", "set", "eth0", "up")
        sh("ip", "-n", name, "link", "set", "lo", "up")
        sh("ip", "-n", name, "route", "add", "default", "via", self.host_address)
        return name

    def exec(self, ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", ns, *argv, check=check)

    def teardown(self) -> None:
        for ns in self.namespaces:
            pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            sh("ip", "netns", "del", ns, check=False)
        for link in self.links:
            sh("ip", "link", "del", link, check=False)
        sh("ip", "link", "del", self.bridge, check=False)


@contextlib.contextmanager
def scratch_bridge(index: int, bridge: str) -> Iterator[ScratchNet]:
    """A fresh bridge on a free 198.19.x.0/24, with everything added to it removed after."""
    net = ScratchNet(index=index, bridge=bridge, subnet=free_subnet())
    try:
        sh("ip", "link", "add", net.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{net.host_address}/24", "dev", net.bridge)
        sh("ip", "link", "set", net.bridge, "up")
        yield net
    finally:
        net.teardown()


def free_subnet() -> int:
    routes = sh("ip", "-4", "route", "show").stdout
    for _ in range(200):
        k = secrets.randbelow(250) + 2
        if f"198.19.{k}." not in routes:
            return k
    raise RuntimeError("no free 198.19.x.0/24 subnet")
