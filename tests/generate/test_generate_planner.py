"""The planner turns a graph into the tests a person would expect, and nothing unsafe."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from depdrill.discover.model import Graph
from depdrill.errors import InputError
from depdrill.generate import planner
from depdrill.generate.model import (
    BlackholeFault,
    DnsBlackholeFault,
    HttpProbe,
    LatencyFault,
    Slo,
    Suite,
)
from depdrill.generate.planner import GenerateOptions, options_from_cli, parse_latency
from depdrill.netns import Target


def _ids(suite: Suite) -> list[str]:
    return [t.id for t in suite.tests]


def test_every_reached_dependency_gets_a_blackhole_and_a_ladder(
    graph: Graph, options: GenerateOptions
) -> None:
    # Given the shop graph and default options
    # When the suite is planned
    suite = planner.run(graph, options)
    # Then each reached dependency has a blackhole; TCP ones a 100/1000 ms ladder; the UDP
    # sink none; one resolver test and one certificate check for the TLS endpoint
    assert _ids(suite) == [
        "blackhole:api.payments.lab.test",
        "blackhole:cache.lab.test",
        "blackhole:statsd.lab.test",
        "blackhole:v6.lab.test",
        "cert:api.payments.lab.test:443",
        "dns:resolver",
        "latency-100ms:api.payments.lab.test",
        "latency-100ms:cache.lab.test",
        "latency-100ms:v6.lab.test",
        "latency-1000ms:api.payments.lab.test",
        "latency-1000ms:cache.lab.test",
        "latency-1000ms:v6.lab.test",
    ]
    assert suite.service.name == "shop"
    assert suite.service.target == Target(netns="ddl-svc")


def test_faults_carry_the_addresses_ports_and_protocols_seen(
    graph: Graph, options: GenerateOptions
) -> None:
    # Given the shop graph, where 198.18.0.11 was reached with SNI api.payments.lab.test
    # but never appeared in an answer
    suite = planner.run(graph, options)
    by_id = {t.id: t for t in suite.tests}
    # Then the blackhole covers both addresses, on the port and protocol seen
    api = by_id["blackhole:api.payments.lab.test"].fault
    assert api == BlackholeFault(
        addresses=["198.18.0.10", "198.18.0.11"], ports=[443], protocols=["tcp"]
    )
    statsd = by_id["blackhole:statsd.lab.test"].fault
    assert isinstance(statsd, BlackholeFault) and statsd.protocols == ["udp"]
    # And the latency fault delays the receive path of TCP only
    slow = by_id["latency-1000ms:cache.lab.test"].fault
    assert slow == LatencyFault(
        addresses=["198.18.0.20"],
        ports=[6379],
        protocols=["tcp"],
        delay_ms=1000,
        direction="receive",
    )
    # And the resolver test silences both resolvers the service queried
    assert by_id["dns:resolver"].fault == DnsBlackholeFault(resolvers=["198.18.0.2", "198.18.0.3"])
    # And the certificate check names the address, port and SNI
    check = by_id["cert:api.payments.lab.test:443"].check
    assert check is not None and (check.address, check.port, check.sni) == (
        "198.18.0.10",
        443,
        "api.payments.lab.test",
    )


def test_why_says_what_discovery_saw(graph: Graph, options: GenerateOptions) -> None:
    suite = planner.run(graph, options)
    why = {t.id: t.why for t in suite.tests}
    assert why["blackhole:api.payments.lab.test"] == (
        "seen 412 queries, 2 addresses, port 443/tcp, 128 flows, TLS, "
        "via CNAME edge.payments.lab.test"
    )
    assert why["dns:resolver"] == "seen 470 queries to 2 resolvers (198.18.0.2, 198.18.0.3)"
    assert "earliest expiry 2026-12-08" in why["cert:api.payments.lab.test:443"]


def test_names_without_traffic_get_no_fault_and_a_note(
    graph: Graph, options: GenerateOptions
) -> None:
    # Given names resolved but never reached, an NXDOMAIN, a UDP-only sink and a hostile name
    suite = planner.run(graph, options)
    # Then none of them yields a fault test, and the suite says why for each
    assert not any(
        t.dependency in {"unused.lab.test", "nx.lab.test"} or "evil" in t.id for t in suite.tests
    )
    notes = "\n".join(suite.notes)
    assert "unused.lab.test: resolved but never reached" in notes
    assert "nx.lab.test: resolved to nothing" in notes
    assert "statsd.lab.test: reached over UDP only; no latency tests" in notes
    assert "evil\\nname lab.test: not a plain DNS name" in notes


def test_no_fault_is_ever_wider_than_the_addresses_seen(
    graph: Graph, options: GenerateOptions
) -> None:
    # Given every dependency's own addresses and endpoints
    deps = {d.name: d for d in graph.dependencies()}
    suite = planner.run(graph, options)
    # Then every fault names at least one address, each one the dependency resolved or reached
    for test in suite.tests:
        fault = test.fault
        if isinstance(fault, BlackholeFault | LatencyFault):
            assert test.dependency is not None
            dep = deps[test.dependency]
            seen = {*dep.addresses, *(e.address for e in dep.endpoints)}
            assert fault.addresses and set(fault.addresses) <= seen
            assert fault.ports and set(fault.ports) <= set(dep.ports)


def test_the_same_graph_gives_the_same_suite(
    make_graph: Callable[..., Graph], options: GenerateOptions
) -> None:
    # Given the same graph twice, the second with its nodes and links in reverse order
    first = make_graph()
    second = first.model_copy(update={"nodes": first.nodes[::-1], "links": first.links[::-1]})
    # Then the suites are equal, and `created` is the end of the capture, not the clock
    assert planner.run(first, options) == planner.run(second, options)
    assert planner.run(first, options).created == first.capture.ended


def test_a_pinned_creation_time_wins(graph: Graph, options: GenerateOptions) -> None:
    pinned = datetime(2030, 1, 1, tzinfo=UTC)
    suite = planner.run(graph, options.model_copy(update={"created": pinned}))
    assert suite.created == pinned


def test_include_and_exclude_globs(graph: Graph, options: GenerateOptions) -> None:
    # Given an include of *.lab.test and an exclude of the cache
    chosen = options.model_copy(update={"include": ["*.lab.test"], "exclude": ["cache.*"]})
    suite = planner.run(graph, chosen)
    deps = {t.dependency for t in suite.tests} - {None}
    # Then the cache is gone (and said so), the others stay
    assert deps == {"api.payments.lab.test", "statsd.lab.test", "v6.lab.test"}
    assert "cache.lab.test: left out by --include/--exclude" in suite.notes


def test_latency_ladder_and_jitter_from_options(graph: Graph, options: GenerateOptions) -> None:
    chosen = options.model_copy(update={"latency_ms": [250, 2000], "jitter_ms": 20})
    suite = planner.run(graph, chosen)
    latency = [t for t in suite.tests if isinstance(t.fault, LatencyFault)]
    assert sorted({t.fault.delay_ms for t in latency if isinstance(t.fault, LatencyFault)}) == [
        250,
        2000,
    ]
    assert all(isinstance(t.fault, LatencyFault) and t.fault.jitter_ms == 20 for t in latency)


def test_no_probe_is_refused(graph: Graph) -> None:
    with pytest.raises(InputError, match=r"give a probe, e\.g\. --probe http://"):
        planner.run(graph, GenerateOptions())


def test_no_target_anywhere_is_refused(graph: Graph, options: GenerateOptions) -> None:
    # Given a graph from a pcap (no namespace) and no --netns
    offline = graph.model_copy(update={"target_spec": None, "target": "pcap capture.pcap"})
    with pytest.raises(InputError, match="names no namespace or process"):
        planner.run(offline, options)
    # When a target is given, it is used
    suite = planner.run(offline, options.model_copy(update={"target": Target(pid=4242)}))
    assert suite.service.target == Target(pid=4242)


def test_parse_latency() -> None:
    assert parse_latency("100ms,1s") == [100, 1000]
    assert parse_latency("1000, 100ms ,100") == [100, 1000]
    for bad in ("fast", "0ms", "61s", "1.5ms", "-3ms"):
        with pytest.raises(InputError, match="latency step"):
            parse_latency(bad)


def test_options_from_cli_keeps_a_previous_suites_thresholds(
    graph: Graph, options: GenerateOptions
) -> None:
    # Given a suite whose SLO a person tightened
    old = planner.run(graph, options)
    old = old.model_copy(
        update={"service": old.service.model_copy(update={"slo": Slo(p95_ms=300.0)})}
    )
    # When options are built from it with only --success-ratio given
    built = options_from_cli(previous=old, success_ratio=0.99, latency="200ms")
    # Then the edited p95 stays, the flag wins, probes come from the old suite
    assert built.slo == Slo(p95_ms=300.0, success_ratio=0.99)
    assert built.probes == [HttpProbe(url="http://198.18.0.100:8080/health")]
    assert built.latency_ms == [200]


def test_options_from_cli_refuses_a_bad_probe_url() -> None:
    with pytest.raises(InputError, match="not an http:// or https:// URL"):
        options_from_cli(probes=["ftp://x"])


def test_a_regeneration_chooses_tests_the_way_the_suite_was_made(
    graph: Graph, options: GenerateOptions
) -> None:
    # Given a suite made with a 250 ms / 2 s ladder, jitter and the v6 API left out
    made = options.model_copy(
        update={"latency_ms": [250, 2000], "jitter_ms": 10, "exclude": ["v6.*"]}
    )
    old = planner.run(graph, made)
    # When it is regenerated with no ladder or filter given
    again = planner.regenerate(graph, old, options_from_cli(previous=old))
    # Then the same tests come out, the same way
    assert again == old
    assert old.defaults.selection is not None
    assert old.defaults.selection.latency_ms == [250, 2000]


def test_flows_to_unnamed_addresses_are_noted_not_tested(
    graph: Graph, options: GenerateOptions
) -> None:
    # Given a flow to 198.18.0.60:9000, an address no answer or SNI named
    suite = planner.run(graph, options)
    # Then no fault touches it, and the suite says so
    assert not any("198.18.0.60" in getattr(t.fault, "addresses", []) for t in suite.tests)
    assert (
        "1 connection to addresses no name resolved to (198.18.0.60:9000/tcp): no tests "
        "(a fault needs a dependency's name to follow)"
    ) in suite.notes
