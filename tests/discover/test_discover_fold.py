"""Repeated DNS exchanges counted in the kernel (discover/fold.py), in real namespaces.

The proof is differential: the ebpf tap (folding) and the nflog tap (which copies every
packet) capture the same traffic side by side, and their graphs must agree on every name,
answer, rcode, count and unanswered question.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from depdrill.artifact import to_json
from depdrill.bpf import run_statistics
from depdrill.discover import fold
from depdrill.discover.correlate import UNANSWERED_GRACE_S
from depdrill.discover.ebpf import EbpfCapture
from depdrill.discover.model import Graph, ResolvedEdge
from depdrill.discover.run import DiscoverOptions, run
from depdrill.netns import Target
from depdrill.testing import ScratchNet

# Answers A 198.18.0.7 to every question; NXDOMAIN to names starting "missing"; nothing
# to "silent"; twice to "twice"; 40 addresses to "big"; and to "ttl" with a TTL that
# changes every 7 questions (as a caching resolver's does), so new exchanges keep coming.
RESPONDER = r"""
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53) if family == socket.AF_INET else (sys.argv[1], 53, 0, int(sys.argv[2])))
print("ready", flush=True)
asked = 0
while True:
    q, peer = s.recvfrom(4096)
    asked += 1
    name = q[13:13 + q[12]]
    if name == b"silent":
        continue
    end = 12
    while q[end]:
        end += q[end] + 1
    end += 5
    if name.startswith(b"missing"):
        s.sendto(q[:2] + b"\x81\x83\x00\x01\x00\x00\x00\x00\x00\x00" + q[12:end], peer)
        continue
    ttl = 300 - asked // 7 if name == b"ttl" else 60
    count = 40 if name == b"big" else 1  # 40 addresses: an answer too long to fold
    head = b"\x81\x80\x00\x01" + count.to_bytes(2, "big") + b"\x00\x00\x00\x00"
    a = q[:2] + head + q[12:end]
    for i in range(count):  # name (a pointer), A, IN, TTL, 198.18.0.(7 + i)
        a += b"\xc0\x0c\x00\x01\x00\x01" + ttl.to_bytes(4, "big")
        a += b"\x00\x04\xc6\x12\x00" + bytes([7 + i])
    for _ in range(2 if name == b"twice" else 1):
        s.sendto(a, peer)
"""

# The service's side: a connected socket asking the same names again and again, a new
# socket (port) per question for others, questions never answered.
ASKER = r"""
import socket, struct, sys
address, scope = sys.argv[1], int(sys.argv[2])
family = socket.AF_INET6 if ":" in address else socket.AF_INET
peer = (address, 53) if family == socket.AF_INET else (address, 53, 0, scope)
def question(name, ident, qtype=1):
    wire = struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        wire += bytes([len(label)]) + label.encode()
    return wire + b"\0" + struct.pack("!HH", qtype, 1)
def ask(sock, name, ident, qtype=1, answers=1):
    sock.send(question(name, ident, qtype))
    for _ in range(answers):
        try:
            sock.recv(512)
        except OSError:
            pass
one = socket.socket(family, socket.SOCK_DGRAM); one.connect(peer); one.settimeout(1)
for i in range(300):
    ask(one, "api.fold.test", i)
    if i % 3 == 0:
        ask(one, "api.fold.test", i, qtype=28)
    if i % 10 == 0:
        ask(one, "missing.fold.test", i)
    if i % 25 == 0:
        ask(one, "twice", i, answers=2)
        ask(one, "big", i)
    ask(one, "ttl", i)
for i in range(20):
    with socket.socket(family, socket.SOCK_DGRAM) as fresh:
        fresh.connect(peer); fresh.settimeout(1)
        ask(fresh, "db.fold.test", 7)
one.settimeout(0.2)
for i in range(3):
    ask(one, "silent", 9000 + i)
print("done", flush=True)
"""


@contextmanager
def _responder(net: ScratchNet, peer: str, address: str, scope: int) -> Iterator[None]:
    argv = ["ip", "netns", "exec", peer, sys.executable, "-c", RESPONDER, address, str(scope)]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as responder:
        try:
            assert responder.stdout is not None
            assert responder.stdout.readline().strip() == "ready"
            yield
        finally:
            responder.kill()


def _link_local(net: ScratchNet, ns: str) -> tuple[str, int]:
    """The namespace's eth0 IPv6 link-local address and its scope (interface index) there."""
    for _ in range(50):  # the kernel assigns it once the link is up and DAD is done
        out = net.exec(ns, "ip", "-j", "-6", "addr", "show", "dev", "eth0", "scope", "link").stdout
        found = [a for link in json.loads(out) for a in link["addr_info"]]
        if found and not found[0].get("tentative"):
            index = json.loads(net.exec(ns, "ip", "-j", "link", "show", "eth0").stdout)[0][
                "ifindex"
            ]
            return str(found[0]["local"]), int(index)
        time.sleep(0.1)
    raise AssertionError(f"no link-local address on {ns}")


def _comparable(graph: Graph) -> dict[str, Any]:
    """The graph without its capture statistics and times (each tap stamps its own)."""
    data: dict[str, Any] = json.loads(to_json(graph))
    for key in ("created", "capture"):
        data.pop(key)
    for link in data["links"]:
        for key in ("first_seen", "last_seen"):
            link.pop(key, None)
    return data


@pytest.mark.parametrize("family", [4, 6])
def test_folded_exchanges_build_the_graph_that_every_packet_builds(
    scratch_net: ScratchNet, family: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a service and its resolver, and folds that switch maps every 4 exchanges
    monkeypatch.setattr(fold, "FLIP_AT", 4)
    svc = scratch_net.add("svc", 10)
    peer = scratch_net.add("peer", 53)
    address, own_scope, scope = scratch_net.address(53), 0, 0
    if family == 6:  # link-local: the only IPv6 the namespaces have
        address, own_scope = _link_local(scratch_net, peer)
        _, scope = _link_local(scratch_net, svc)
    with _responder(scratch_net, peer, address, own_scope):
        # When the ebpf tap (folding) and nflog capture the same questions side by side
        stop = threading.Event()
        graphs: dict[str, Graph] = {}
        threads = []
        for tap in ("ebpf", "nflog"):
            ready = threading.Event()
            options = DiscoverOptions(target=Target(netns=svc), duration_s=120, tap=tap)

            def capture(tap: str = tap, options: DiscoverOptions = options,
                        ready: threading.Event = ready) -> None:  # fmt: skip
                graphs[tap] = run(options, stop, ready)

            threads.append(threading.Thread(target=capture))
            threads[-1].start()
            assert ready.wait(30)
        asked = scratch_net.exec(svc, sys.executable, "-c", ASKER, address, str(scope))
        assert asked.stdout.strip() == "done"
        time.sleep(fold.PENDING_AGE_S + 0.5)  # the questions never answered leave the map
        stop.set()
        for thread in threads:
            thread.join()
    # Then the graphs agree on every name, answer, rcode, count and unanswered question
    folded, copied = graphs["ebpf"], graphs["nflog"]
    mine, theirs = _comparable(folded), _comparable(copied)
    assert mine == theirs, [
        (a, b) for a, b in zip(mine["links"], theirs["links"], strict=False) if a != b
    ]
    assert folded.capture.dns_messages == copied.capture.dns_messages
    assert folded.capture.kernel_drops == copied.capture.kernel_drops == 0
    # And most exchanges were counted in the kernel, not copied
    assert folded.capture.dns_folded > 300
    resolved = {link.target: link for link in folded.links if link.kind == "resolved"}
    assert resolved["name:api.fold.test"].count == 400
    assert resolved["name:missing.fold.test"].rcodes == {"NXDOMAIN": 30}
    assert resolved["name:silent"].unanswered == 3
    assert resolved["name:db.fold.test"].count == 20
    assert (resolved["name:big"].count, resolved["name:big"].unanswered) == (12, 0)


SILENT = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect((sys.argv[1], 53))
silent = bytes.fromhex("0100000100000000000006" "73696c656e74" "0000010001")  # silent A
for i in range(int(sys.argv[2]), int(sys.argv[2]) + 50):
    s.send(i.to_bytes(2, "big") + silent)
print("done", flush=True)
"""


def test_questions_never_answered_are_each_counted_however_they_leave_the_kernel(
    scratch_net: ScratchNet, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given 8 slots for held questions, and a resolver that answers none of them
    monkeypatch.setattr(fold, "SLOT_BITS", 3)
    svc = scratch_net.add("svc", 10)
    peer = scratch_net.add("peer", 53)
    with _responder(scratch_net, peer, scratch_net.address(53), 0):
        stop, ready, graphs = threading.Event(), threading.Event(), []
        options = DiscoverOptions(target=Target(netns=svc), duration_s=120, tap="ebpf")
        thread = threading.Thread(target=lambda: graphs.append(run(options, stop, ready)))
        thread.start()
        assert ready.wait(30)
        # When the service sends 50 questions, and 50 more once the first have been held
        # for longer than PENDING_AGE_S, and the capture ends once all count as unanswered
        for first in (0, 50):
            asked = scratch_net.exec(
                svc, sys.executable, "-c", SILENT, scratch_net.address(53), str(first)
            )
            assert asked.stdout.strip() == "done"
            time.sleep(max(fold.PENDING_AGE_S, UNANSWERED_GRACE_S) + 0.2)
        stop.set()
        thread.join()
    # Then every one is in the graph, unanswered: those whose slot was taken copied as they
    # went, those held handed over when a later question took their slot, or as the
    # capture ended
    (graph,) = graphs
    (silent,) = [link for link in graph.links if link.target == "name:silent"]
    assert isinstance(silent, ResolvedEdge)
    assert (silent.count, silent.unanswered) == (100, 100)
    assert graph.capture.dns_messages == 100
    assert graph.capture.dns_folded == 0


def test_the_kernel_times_the_programs_while_statistics_are_held_open(
    scratch_net: ScratchNet,
) -> None:
    # Given a folding capture and the kernel's run-time statistics switched on
    svc = scratch_net.add("svc", 10)
    peer = scratch_net.add("peer", 53)
    with (
        _responder(scratch_net, peer, scratch_net.address(53), 0),
        EbpfCapture.open(Target(netns=svc), fold=True) as capture,
    ):
        statistics = run_statistics()
        try:
            before = capture.program_run_time()
            # When the service asks a few questions
            asked = scratch_net.exec(
                svc, sys.executable, "-c", SILENT, scratch_net.address(53), "0"
            )
            assert asked.stdout.strip() == "done"
            after = capture.program_run_time()
        finally:
            os.close(statistics)
        # Then each egress run is counted, with the time it took
        spent, runs = (after["egress"][i] - before["egress"][i] for i in (0, 1))
        assert runs >= 50
        assert 0 < spent / runs < 100_000
