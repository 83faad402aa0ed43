"""What the runner derives from a suite before any fault: selection, protected addresses,
control endpoints. Pure functions over the suite model."""

from __future__ import annotations

import pytest

from depdrill.errors import InputError
from depdrill.execute.proof import Endpoint
from depdrill.execute.runner import control_endpoints, protected_addresses, select
from depdrill.generate.model import (
    BlackholeFault,
    CertCheck,
    DnsBlackholeFault,
    DnsProbe,
    HttpProbe,
    LatencyFault,
    ServiceSpec,
    Suite,
    SuiteTest,
    TcpProbe,
)
from depdrill.netns import Target

API = BlackholeFault(addresses=["198.19.0.10"], ports=[443])
CACHE = LatencyFault(addresses=["198.19.0.11", "198.19.0.12"], delay_ms=100)
STATSD = BlackholeFault(addresses=["198.19.0.13"], ports=[8125], protocols=["udp"])
DNS = DnsBlackholeFault(resolvers=["198.19.0.2"])


def make_suite() -> Suite:
    return Suite(
        service=ServiceSpec(
            name="shop",
            target=Target(netns="svc"),
            probes=[
                HttpProbe(url="http://127.0.0.1:8080/health"),
                TcpProbe(host="127.0.0.2", port=80),
                DnsProbe(server="127.0.0.3", name="x.test"),
            ],
        ),
        tests=[
            SuiteTest(id="blackhole:api.test", fault=API),
            SuiteTest(id="latency-100ms:cache.test", fault=CACHE),
            SuiteTest(id="blackhole:statsd.test", fault=STATSD),
            SuiteTest(id="dns-blackhole", fault=DNS),
            SuiteTest(
                id="cert:api.test:8443",
                check=CertCheck(address="198.19.0.14", port=8443, sni="api.test"),
            ),
        ],
    )


def test_select_by_id_and_glob() -> None:
    tests = make_suite().tests
    assert [t.id for t in select(tests, [])] == [t.id for t in tests]
    assert [t.id for t in select(tests, ["blackhole:*"])] == [
        "blackhole:api.test",
        "blackhole:statsd.test",
    ]
    assert [t.id for t in select(tests, ["dns-blackhole", "cert:*"])] == [
        "dns-blackhole",
        "cert:api.test:8443",
    ]
    with pytest.raises(InputError, match="no test id matches nope"):
        select(tests, ["nope"])


def test_protected_addresses_are_every_probe_target_and_our_end() -> None:
    # Given probes on loopback / Then their targets, and the host's end of the path
    protected = protected_addresses(make_suite())
    assert {"127.0.0.1", "127.0.0.2", "127.0.0.3"} <= protected


def test_unresolvable_probe_url_is_input_error() -> None:
    suite = make_suite()
    bad = suite.service.model_copy(update={"probes": [HttpProbe(url="http://nx.invalid/")]})
    with pytest.raises(InputError, match=r"cannot resolve 'nx\.invalid'"):
        protected_addresses(suite.model_copy(update={"service": bad}))


def test_controls_come_from_other_dependencies() -> None:
    suite = make_suite()
    # Given a fault on the API / Then TCP endpoints of the suite and the resolver
    controls = control_endpoints(suite, API)
    assert Endpoint("tcp", "198.19.0.11", 443) in controls  # no ports: any port is caught
    assert Endpoint("dns", "198.19.0.2", 53) in controls
    assert Endpoint("tcp", "198.19.0.14", 8443) in controls
    assert all(c.address != "198.19.0.13" for c in controls)  # UDP-only: nothing answers
    # Given a DNS fault / Then never the resolver itself
    assert all(c.kind != "dns" for c in control_endpoints(suite, DNS))
