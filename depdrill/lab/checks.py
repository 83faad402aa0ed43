"""Is each lab component answering? One check per role, each bounded to about a second."""

from __future__ import annotations

import json
import os
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode

from depdrill.lab.model import ComponentHealth, LabState, Layout, Role

TIMEOUT_S = 1.0


def check(role: Role, layout: Layout, state: LabState) -> ComponentHealth:
    pid = state.pids.get(role)
    names = {d.role: d.name for d in layout.dependencies}
    name = {"svc": "demo service", "dns": "dnsmasq"}.get(role) or names[role]
    if pid is None or not _in_namespace(pid, layout.netns(role)):
        return ComponentHealth(role=role, name=name, ok=False, detail="process not running")
    probe = _CHECKS[role]
    try:
        detail = probe(layout, state)
    except (OSError, ValueError, dns.exception.DNSException) as exc:
        return ComponentHealth(role=role, name=name, ok=False, detail=_reason(exc))
    return ComponentHealth(role=role, name=name, ok=True, detail=detail)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        return str(exc.reason)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _in_namespace(pid: int, netns: str) -> bool:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{netns}").st_ino
    except OSError:
        return False


def _dns(layout: Layout, state: LabState) -> str:
    dep = layout.dependency("pay")
    query = dns.message.make_query(dep.name, "A")
    answer = dns.query.udp(query, state.resolver, timeout=TIMEOUT_S)
    if answer.rcode() != dns.rcode.NOERROR or not answer.answer:
        raise ValueError(f"{dep.name}: {dns.rcode.to_text(answer.rcode())}, no answer")
    return f"answers {dep.name} from {state.resolver}:53"


def _https(role: Role) -> Callable[[Layout, LabState], str]:
    def probe(layout: Layout, state: LabState) -> str:
        dep = layout.dependency(role)
        context = ssl.create_default_context(cafile=state.ca_bundle)
        with (
            socket.create_connection((dep.address, dep.port), timeout=TIMEOUT_S) as raw,
            context.wrap_socket(raw, server_hostname=dep.name) as tls,
        ):
            cert = tls.getpeercert() or {}
            return f"TLS {tls.version()} on {dep.address}:{dep.port}, until {cert.get('notAfter')}"

    return probe


def _redis(layout: Layout, state: LabState) -> str:
    dep = layout.dependency("cache")
    with socket.create_connection((dep.address, dep.port), timeout=TIMEOUT_S) as conn:
        conn.sendall(b"*1\r\n$4\r\nPING\r\n")
        reply = conn.recv(64)
    if not reply.startswith(b"+PONG"):
        raise ValueError(f"PING answered {reply[:40]!r}")
    return f"redis PONG on {dep.address}:{dep.port}"


def _udp_sink(layout: Layout, state: LabState) -> str:
    """A UDP sink answers nothing: look for its bound socket in its namespace instead."""
    dep = layout.dependency("met")
    pid = state.pids["met"]
    wanted = f"{socket.inet_aton(dep.address)[::-1].hex().upper()}:{dep.port:04X}"
    table = Path(f"/proc/{pid}/net/udp").read_text()
    if not any(line.split()[1] == wanted for line in table.splitlines()[1:]):
        raise ValueError(f"nothing bound on {dep.address}:{dep.port}/udp")
    return f"bound on {dep.address}:{dep.port}/udp"


def _service(layout: Layout, state: LabState) -> str:
    # The service may wait up to ~1.5 s on its own dependencies; allow for it.
    with urllib.request.urlopen(state.service_url, timeout=TIMEOUT_S * 3) as answer:
        body = json.loads(answer.read())
    return f"/health {answer.status} in {body.get('elapsed_ms')} ms"


_CHECKS: dict[Role, Callable[[Layout, LabState], str]] = {
    "dns": _dns,
    "pay": _https("pay"),
    "rec": _https("rec"),
    "cache": _redis,
    "met": _udp_sink,
    "svc": _service,
}
