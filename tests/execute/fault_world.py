"""A small world for injector tests: a service namespace, a dependency, a control host.

    service 198.19.k.2  ->  dependency 198.19.k.3 (TCP 7001-7003, UDP sink)
                        ->  control    198.19.k.4 (TCP 7001)

Servers are sockets opened inside the namespaces and served by one thread in the test
process; everything is closed at teardown.
"""

from __future__ import annotations

import contextlib
import errno
import selectors
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest

from depdrill.artifact import utcnow
from depdrill.execute.injectors.base import FaultContext
from depdrill.netns import Target, entered

PORTS = (7001, 7002, 7003)


@dataclass
class FaultWorld:
    service: Target
    dependency: str
    control: str
    canary: Target  # a sibling of the service (the control host): no fault may touch it
    stop: threading.Event = field(default_factory=threading.Event)

    def ctx(
        self, run_id: str = "t1", seconds: float = 30, protected: frozenset[str] = frozenset()
    ) -> FaultContext:
        return FaultContext(
            target=self.service,
            run_id=run_id,
            test_id="test",
            deadline=utcnow() + timedelta(seconds=seconds),
            protected=protected,
        )

    def connect(
        self, address: str, port: int, timeout: float = 1.0, source: Target | None = None
    ) -> tuple[str, float]:
        """A TCP connect from inside the service (or `source`): (outcome, milliseconds)."""
        with entered(source or self.service):
            sock = socket.socket()
        with sock:
            sock.settimeout(timeout)
            began = time.perf_counter()
            try:
                sock.connect((address, port))
                outcome = "connected"
            except TimeoutError:
                outcome = "timeout"
            except OSError as exc:
                outcome = errno.errorcode.get(exc.errno or 0, str(exc))
            return outcome, (time.perf_counter() - began) * 1000

    def send_udp(self, address: str, port: int) -> str:
        """A UDP datagram from inside the service: "sent" or the local error."""
        with entered(self.service):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            try:
                sock.sendto(b"depdrill test", (address, port))
                return "sent"
            except OSError as exc:
                return errno.errorcode.get(exc.errno or 0, str(exc))

    def nft_tables(self) -> str:
        return _in(self.service, "nft", "list", "tables")

    def nft_ruleset(self) -> str:
        return _in(self.service, "nft", "list", "ruleset")

    def tagged_rules(self) -> list[str]:
        return [
            line
            for binary in ("iptables-legacy-save", "ip6tables-legacy-save")
            for line in _in(self.service, binary, "-t", "mangle").splitlines()
            if "depdrill" in line
        ]


def _in(target: Target, *argv: str) -> str:
    return subprocess.run(
        [*target.exec_prefix(), *argv], capture_output=True, text=True, check=True
    ).stdout


def _serve(listeners: list[socket.socket], stop: threading.Event) -> None:
    with selectors.DefaultSelector() as selector:
        for listener in listeners:
            selector.register(listener, selectors.EVENT_READ)
        while not stop.is_set():
            for key, _ in selector.select(0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock.type == socket.SOCK_STREAM:
                    with contextlib.suppress(OSError):
                        conn, _ = sock.accept()
                        conn.close()
                else:
                    with contextlib.suppress(OSError):
                        sock.recv(2048)


def _listeners(target: Target, address: str, tcp: tuple[int, ...]) -> list[socket.socket]:
    opened = []
    with entered(target):
        for port in tcp:
            server = socket.socket()
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind((address, port))
            server.listen(512)
            opened.append(server)
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.bind((address, tcp[0]))
        opened.append(sink)
    return opened


@pytest.fixture(name="fault_world")
def fault_world_fixture(scratch_net: Any) -> Iterator[FaultWorld]:
    """Given a service, a dependency and a control host on a scratch bridge."""
    net = scratch_net
    service, dependency, control = net.add("s", 2), net.add("d", 3), net.add("c", 4)
    world = FaultWorld(
        Target(netns=service), net.address(3), net.address(4), canary=Target(netns=control)
    )
    sockets = _listeners(Target(netns=dependency), world.dependency, PORTS)
    sockets += _listeners(Target(netns=control), world.control, PORTS[:1])
    server = threading.Thread(target=_serve, args=(sockets, world.stop), daemon=True)
    server.start()
    try:
        # The first packets of a fresh namespace wait for ARP: settle that before measuring.
        for address in (world.dependency, world.control):
            assert world.connect(address, PORTS[0])[0] == "connected"
        yield world
    finally:
        world.stop.set()
        server.join()
        for sock in sockets:
            sock.close()
