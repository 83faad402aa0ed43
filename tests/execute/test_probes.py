"""Probes against real servers on loopback: HTTP(S), TCP, DNS and commands."""

from __future__ import annotations

import secrets
import sys
import time
from pathlib import Path

import dns.message
import pytest
from execute_servers import Behaviour, a_record, dns_server, http_server, self_signed, tcp_listener

from depdrill.errors import InputError
from depdrill.execute.probes.registry import PROBES, make_probe
from depdrill.generate.model import CommandProbe, DnsProbe, HttpProbe, TcpProbe


def soon(seconds: float) -> float:
    return time.monotonic() + seconds


def loopback() -> str:
    a, b, c = (secrets.randbelow(200) + 20 for _ in range(3))
    return f"127.{a}.{b}.{c}"


def test_every_suite_probe_kind_has_a_probe_class() -> None:
    kinds = {m.model_fields["kind"].default for m in (HttpProbe, TcpProbe, DnsProbe, CommandProbe)}
    assert set(PROBES) == kinds


def test_http_probe_healthy_status_and_body() -> None:
    # Given a real HTTP server answering 200 "ok healthy"
    behaviour = Behaviour()
    with http_server(behaviour) as port:
        probe = make_probe(HttpProbe(url=f"http://127.0.0.1:{port}/health", body_contains="ok"))
        # When probed / Then healthy, with a latency
        obs = probe.run(soon(2))
        assert obs.ok and obs.latency_ms is not None and obs.error is None
        # When the body no longer matches / Then unhealthy with the reason
        behaviour.body = b"starting"
        obs = probe.run(soon(2))
        assert not obs.ok and obs.error == "body does not contain the expected text"
        # When the status is 503 / Then unhealthy, naming the status
        behaviour.status = 503
        assert probe.run(soon(2)).error == "HTTP 503"
        # And no connection is reused: every probe is one request on a fresh connection
        assert behaviour.hits == 3


def test_http_probe_times_out_at_the_deadline() -> None:
    # Given a server slower than the probe's deadline
    behaviour = Behaviour()
    behaviour.delay_s = 1.0
    with http_server(behaviour) as port:
        probe = make_probe(HttpProbe(url=f"http://127.0.0.1:{port}/"))
        start = time.monotonic()
        obs = probe.run(soon(0.3))
        # Then the probe gives up by the deadline, with no latency (no answer came)
        assert time.monotonic() - start < 0.6
        assert not obs.ok and obs.latency_ms is None and obs.error is not None
        assert obs.error.startswith("timeout")


def test_http_probe_refused_names_the_errno() -> None:
    with tcp_listener() as port:
        pass  # closed again: nothing listens on that port now
    obs = make_probe(HttpProbe(url=f"http://127.0.0.1:{port}/")).run(soon(1))
    assert not obs.ok and obs.error is not None and "ECONNREFUSED" in obs.error


def test_https_probe_uses_the_ca_bundle(tmp_path: Path) -> None:
    # Given an HTTPS server with a self-signed certificate
    context, cert = self_signed(tmp_path)
    with http_server(Behaviour(), tls=context) as port:
        spec = HttpProbe(url=f"https://127.0.0.1:{port}/")
        # When probed trusting that certificate / Then healthy
        assert make_probe(spec, ca_bundle=str(cert)).run(soon(2)).ok
        # When probed with the system trust store / Then a TLS error, not healthy
        obs = make_probe(spec).run(soon(2))
        assert not obs.ok and obs.error is not None and obs.error.startswith("TLS")


def test_tcp_probe() -> None:
    with tcp_listener() as port:
        obs = make_probe(TcpProbe(host="127.0.0.1", port=port)).run(soon(1))
        assert obs.ok and obs.latency_ms is not None
    obs = make_probe(TcpProbe(host="127.0.0.1", port=port)).run(soon(1))
    assert not obs.ok and "ECONNREFUSED" in (obs.error or "")


def test_dns_probe_answer_nxdomain_and_silence() -> None:
    # Given a real name server on a loopback address, port 53
    address = loopback()
    with dns_server(a_record("198.19.0.7"), host=address):
        assert make_probe(DnsProbe(server=address, name="api.lab.test")).run(soon(1)).ok
        obs = make_probe(DnsProbe(server=address, name="missing.lab.test")).run(soon(1))
        assert not obs.ok and obs.error == "DNS NXDOMAIN" and obs.latency_ms is not None

    def silent(query: dns.message.Message) -> None:
        return None

    with dns_server(silent, host=address):
        obs = make_probe(DnsProbe(server=address, name="api.lab.test")).run(soon(0.3))
        assert not obs.ok and (obs.error or "").startswith("timeout")


def test_command_probe_needs_permission_and_reports_exit_status() -> None:
    spec = CommandProbe(argv=[sys.executable, "-c", "import sys; sys.exit(3)"])
    # Given a suite's command probe without --allow-commands / Then refused as input
    with pytest.raises(InputError, match="--allow-commands"):
        make_probe(spec)
    # When allowed / Then the exit status decides
    assert make_probe(spec, allow_commands=True).run(soon(5)).error == "exit status 3"
    ok = CommandProbe(argv=["true"])
    assert make_probe(ok, allow_commands=True).run(soon(5)).ok
    slow = make_probe(CommandProbe(argv=["sleep", "5"]), allow_commands=True)
    start = time.monotonic()
    obs = slow.run(soon(0.3))
    assert not obs.ok and (obs.error or "").startswith("timeout") and time.monotonic() - start < 2
    missing = make_probe(CommandProbe(argv=["/nonexistent/depdrill"]), allow_commands=True)
    assert "ENOENT" in (missing.run(soon(1)).error or "")


def test_probes_never_raise_on_unresolvable_host() -> None:
    obs = make_probe(HttpProbe(url="http://no-such-host.invalid/")).run(soon(1))
    assert not obs.ok and (obs.error or "").startswith("cannot resolve host")
