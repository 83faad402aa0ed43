"""Traffic the capture tests share: a UDP echo on port 53 in a namespace of its own."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from depdrill.testing import ScratchNet

ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], 53))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(4096); s.sendto(data, peer)
"""


@contextmanager
def udp_echo(net: ScratchNet, host: int) -> Iterator[None]:
    """A UDP echo on port 53 at the namespace for `host`, until the block ends."""
    peer = net.add("peer", host)
    with subprocess.Popen(
        ["ip", "netns", "exec", peer, sys.executable, "-c", ECHO, net.address(host)],
        stdout=subprocess.PIPE,
        text=True,
    ) as echo:
        try:
            assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
            yield
        finally:
            echo.kill()
