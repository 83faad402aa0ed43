"""A small real world for discovery: dnsmasq, servers that accept, and a service namespace.

Layout on one scratch bridge (198.19.<k>.0/24):
  .53  `dns`   dnsmasq answering *.x.test (A, AAAA, a CNAME chain, NXDOMAIN for the rest)
  .54  `quiet` no DNS server (queries to it are never answered); accepts TCP on 443 and 9000
  .20  `api`   accepts TCP on 8080 (api.x.test resolves here)
  .10  `svc`   the service: dig and Python clients run here while depdrill captures
  many.x.test has MANY A records (198.19.<k>.100...), too many for UDP without EDNS
"""

from __future__ import annotations

import contextlib
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pytest

from depdrill.discover.model import Graph
from depdrill.discover.run import DiscoverOptions, TapChoice, run
from depdrill.netns import Target

if TYPE_CHECKING:  # the root conftest's module name is not stable across test folders
    from depdrill.testing import ScratchNet

# A TCP server accepting on the given ports and holding connections open until killed.
ACCEPTOR = """
import selectors, socket, sys
sel = selectors.DefaultSelector()
for port in sys.argv[1:]:
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(port))); s.listen(64); sel.register(s, selectors.EVENT_READ)
held = []
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        conn, _ = key.fileobj.accept(); held.append(conn)
"""


MANY = 40  # A records of many.x.test: more than fit in 512 bytes of UDP without EDNS


@dataclass
class World:
    net: ScratchNet
    svc: str
    dns: str
    quiet: str
    api: str
    processes: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def resolver(self) -> str:
        return self.net.address(53)

    @property
    def quiet_address(self) -> str:
        return self.net.address(54)

    @property
    def api_address(self) -> str:
        return self.net.address(20)

    @property
    def service_address(self) -> str:
        return self.net.address(10)

    def start(self, ns: str, *argv: str, ready: str | None = None) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.processes.append(proc)
        if ready is not None:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert ready in line, line
        return proc

    def in_service(self, script: str) -> str:
        done = self.net.exec(self.svc, "sh", "-c", script, check=False)
        return done.stdout + done.stderr

    def stop(self) -> None:
        for proc in self.processes:
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


@pytest.fixture(name="world")
def world_fixture(scratch_net: ScratchNet) -> Iterator[World]:
    """Given a resolver, two servers and a service namespace on a scratch bridge."""
    w = World(
        net=scratch_net,
        svc=scratch_net.add("svc", 10),
        dns=scratch_net.add("dns", 53),
        quiet=scratch_net.add("quiet", 54),
        api=scratch_net.add("api", 20),
    )
    a = scratch_net.address
    try:
        w.start(
            w.dns, "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
            "--conf-file=/dev/null", "--bind-interfaces", f"--listen-address={a(53)}",
            "--local=/test/", "--log-facility=/dev/null", "--pid-file=",
            f"--host-record=api.x.test,{a(20)},::ffff:{a(20)}",
            f"--host-record=edge.x.test,{a(21)}",
            "--cname=www.x.test,cdn.x.test", "--cname=cdn.x.test,edge.x.test",
            *(f"--host-record=many.x.test,{a(100 + i)}" for i in range(MANY)),
            "--srv-host=_api._tcp.x.test,api.x.test,8080", "--mx-host=x.test,mail.x.test,10",
            "--txt-record=x.test,v=spf1 -all", "--ptr-record=20.in-addr.x.test,api.x.test",
        )  # fmt: skip
        w.start(w.quiet, sys.executable, "-c", ACCEPTOR, "443", "9000", ready="ready")
        w.start(w.api, sys.executable, "-c", ACCEPTOR, "8080", ready="ready")
        _wait_for_dns(w)
        yield w
    finally:
        w.stop()


def _wait_for_dns(w: World) -> None:
    for _ in range(50):
        out = w.in_service(f"dig +short +time=1 +tries=1 @{w.resolver} api.x.test")
        if w.api_address in out:
            return
        time.sleep(0.1)
    raise AssertionError(f"dnsmasq did not answer: {out}")


class Discovery:
    """depdrill's discovery running in a thread, as the lead's audit runs it."""

    def __init__(self, options: DiscoverOptions) -> None:
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.graph: Graph | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(options,), daemon=True)

    def _run(self, options: DiscoverOptions) -> None:
        try:
            self.graph = run(options, self.stop, ready=self.ready)
        except BaseException as exc:
            self.error = exc
            self.ready.set()

    def __enter__(self) -> Discovery:
        self._thread.start()
        assert self.ready.wait(10), "capture never became ready"
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._thread.join(10)

    def result(self) -> Graph:
        self.stop.set()
        self._thread.join(10)
        if self.error is not None:
            raise self.error
        assert self.graph is not None
        return self.graph


def capture_service(
    world: World, script: str, duration_s: float = 60, tap: TapChoice = "auto"
) -> tuple[Graph, str]:
    options = DiscoverOptions(target=Target(netns=world.svc), duration_s=duration_s, tap=tap)
    with Discovery(options) as discovery:
        output = world.in_service(script)
        time.sleep(0.3)  # the last answers reach the socket
        graph = discovery.result()
    return graph, output


def client_hello(hostname: str | None) -> bytes:
    """The first flight of Python's TLS client (OpenSSL), as it would go on the wire."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no CA store: only the first flight
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=hostname)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@dataclass
class TsharkFacts:
    """What Wireshark's dissectors see in a capture, reduced to the facts discovery reports."""

    asked: dict[str, set[str]] = field(default_factory=dict)  # name -> query types
    rcodes: dict[str, set[str]] = field(default_factory=dict)  # name -> rcodes
    answers: set[tuple[str, str]] = field(default_factory=set)  # (owner, address)
    cnames: set[tuple[str, str]] = field(default_factory=set)
    endpoints: set[tuple[str, int, str]] = field(default_factory=set)
    sni: dict[tuple[str, int], str] = field(default_factory=dict)


_RCODES = {"0": "NOERROR", "2": "SERVFAIL", "3": "NXDOMAIN", "5": "REFUSED"}
_QTYPES = {"1": "A", "28": "AAAA", "5": "CNAME", "33": "SRV", "65": "HTTPS"}


def tshark_facts(pcap: str, service: str) -> TsharkFacts:
    """Run tshark on the capture and collect names, answers, endpoints and SNI it sees."""
    facts = TsharkFacts()

    def fields(display: str, *names: str) -> list[list[str]]:
        argv = ["tshark", "-n", "-r", pcap, "-Y", display, "-T", "fields"]
        for name in names:
            argv += ["-e", name]
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        return [line.split("\t") for line in out.splitlines()]

    dns_fields = ("ip.src", "dns.flags.response", "dns.qry.name", "dns.qry.type",
                  "dns.flags.rcode", "dns.resp.name", "dns.resp.type", "dns.a", "dns.aaaa",
                  "dns.cname")  # fmt: skip
    for src, response, qnames, qtypes, rcode, owners, types, a, aaaa, cname in fields(
        "dns", *dns_fields
    ):
        # tshark joins the fields of several messages in one TCP segment with commas
        names, kinds = qnames.lower().split(","), qtypes.split(",")
        if response == "0" and src == service:
            for name, kind in zip(names, kinds, strict=True):
                facts.asked.setdefault(name, set()).add(_QTYPES.get(kind, kind))
        if response == "1" and src != service:
            for name, code in zip(names, rcode.split(","), strict=True):
                facts.rcodes.setdefault(name, set()).add(_RCODES.get(code, code))
            values = {"1": iter(a.split(",")), "28": iter(aaaa.split(",")),
                      "5": iter(cname.lower().split(","))}  # fmt: skip
            for owner, kind in zip(owners.lower().split(","), types.split(","), strict=False):
                if kind in ("1", "28"):
                    facts.answers.add((owner, next(values[kind])))
                elif kind == "5":
                    facts.cnames.add((owner, next(values[kind])))
    syn = f"ip.src == {service} && tcp.flags.syn == 1 && tcp.flags.ack == 0 && tcp.port != 53"
    for dst, port in fields(syn, "ip.dst", "tcp.dstport"):
        facts.endpoints.add((dst, int(port), "tcp"))
    flows = f"ip.src == {service} && udp && !dns && !icmp && udp.srcport >= 1024"
    for dst, port in fields(flows, "ip.dst", "udp.dstport"):
        facts.endpoints.add((dst, int(port), "udp"))
    hello = f"ip.src == {service} && tls.handshake.type == 1"
    for dst, port, name in fields(
        hello, "ip.dst", "tcp.dstport", "tls.handshake.extensions_server_name"
    ):
        facts.sni[(dst, int(port))] = name.lower()
    return facts
