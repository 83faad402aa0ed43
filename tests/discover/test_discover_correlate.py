"""The graph builder and merge on real DNS wire data: folding, bounds, encrypted DNS, merging."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import dns.message
import dns.rcode
import dns.rrset
from discover_world import client_hello

from depdrill.artifact import to_json
from depdrill.discover.correlate import GraphBuilder
from depdrill.discover.dissect import Dissector
from depdrill.discover.model import (
    SERVICE_ID,
    BlindSpotCode,
    CaptureStats,
    ConnectsEdge,
    EndpointNode,
    Graph,
    NameNode,
    ResolvedEdge,
    ResolverNode,
    endpoint_id,
    name_id,
    resolver_id,
)
from depdrill.discover.packets import TCP_ACK, TCP_SYN, Segment
from depdrill.discover.run import merge

SVC, RES = "198.19.1.10", "198.19.1.53"
STATS = CaptureStats(
    started=datetime(2026, 1, 1, tzinfo=UTC), ended=datetime(2026, 1, 1, tzinfo=UTC)
)


class Traffic:
    """Real DNS messages (dnspython) in segments between the service and its resolver."""

    def __init__(self, max_names: int = 10_000) -> None:
        self.builder = GraphBuilder([SVC], "svc", max_names=max_names)
        self.dissector = Dissector()
        self.t = 1_767_225_600.0  # 2026-01-01
        self.port = 40000

    def send(self, seg: Segment) -> None:
        self.t += 0.01
        self.builder.add(self.dissector.event(self.t, seg))

    def lookup(
        self, name: str, *answers: str, rcode: int = dns.rcode.NOERROR, qtype: str = "A"
    ) -> None:
        self.port += 1
        query = dns.message.make_query(name, qtype)
        response = dns.message.make_response(query)
        response.set_rcode(rcode)
        for answer in answers:
            response.answer.append(dns.rrset.from_text(name + ".", 60, "IN", qtype, answer))
        self.send(Segment(SVC, RES, self.port, 53, "udp", query.to_wire()))
        self.send(Segment(RES, SVC, 53, self.port, "udp", response.to_wire()))

    def connect(self, address: str, port: int) -> None:
        self.port += 1
        self.send(Segment(SVC, address, self.port, port, "tcp", b"", TCP_SYN, 1))

    def graph(self) -> Graph:
        end = datetime.fromtimestamp(self.t + 5, UTC)
        return self.builder.build("test", None, STATS.model_copy(update={"ended": end}))


def _names(graph: Graph) -> set[str]:
    return {n.name for n in graph.nodes if isinstance(n, NameNode)}


def _resolved(graph: Graph, name: str) -> ResolvedEdge:
    edge = next(e for e in graph.links if e.target == name_id(name) and e.kind == "resolved")
    assert isinstance(edge, ResolvedEdge)
    return edge


def test_search_path_expansions_fold_into_the_name_that_succeeded() -> None:
    # Given a resolver library walking its search path before the bare name succeeds
    traffic = Traffic()
    for suffix in ("ns.svc.cluster.local", "svc.cluster.local", "cluster.local"):
        traffic.lookup(f"api.{suffix}", rcode=dns.rcode.NXDOMAIN)
    traffic.lookup("api", "198.19.1.20")
    traffic.lookup("gone.test", rcode=dns.rcode.NXDOMAIN)
    # When the graph is built
    graph = traffic.graph()
    # Then the expansions are folded into `api` and counted as a storm, not as dependencies
    assert _names(graph) == {"api", "gone.test"}
    api = _resolved(graph, "api")
    assert api.expansion_queries == 3
    assert api.expansions == sorted(
        f"api.{s}" for s in ("ns.svc.cluster.local", "svc.cluster.local", "cluster.local")
    )
    storm = next(s for s in graph.blind_spots if s.code == BlindSpotCode.NXDOMAIN_STORM)
    assert storm.count == 3
    # And a name that simply does not exist stays, with its NXDOMAIN
    assert _resolved(graph, "gone.test").rcodes == {"NXDOMAIN": 1}


def test_a_flood_of_names_is_bounded_and_said() -> None:
    # Given a limit of 20 names and 300 random subdomains of two domains
    traffic = Traffic(max_names=20)
    for i in range(150):
        traffic.lookup(f"r{i}.flood.test", rcode=dns.rcode.NXDOMAIN)
        traffic.lookup(f"r{i}.spam.example.co.uk", rcode=dns.rcode.NXDOMAIN)
    # When the graph is built
    graph = traffic.graph()
    # Then 20 names are kept and the rest fold under their registered domains
    names = _names(graph)
    assert {"*.flood.test", "*.example.co.uk"} <= names and len(names) == 22
    assert _resolved(graph, "*.flood.test").count == 140
    spot = next(s for s in graph.blind_spots if s.code == BlindSpotCode.AGGREGATED)
    assert spot.count == 280 and "*.flood.test" in spot.examples


def test_dns_over_tls_and_https_are_resolvers_we_cannot_read() -> None:
    # Given a SYN to port 853 and a ClientHello to a public DoH name
    traffic = Traffic()
    traffic.connect("198.19.1.99", 853)
    traffic.connect("198.19.1.98", 443)
    hello = client_hello("dns.google")
    traffic.send(Segment(SVC, "198.19.1.98", traffic.port, 443, "tcp", hello, TCP_ACK | 0x08, 2))
    # When the graph is built
    graph = traffic.graph()
    # Then both are resolver nodes (dot, doh), not endpoints, and the blind spot names them
    dot = graph.node(resolver_id("198.19.1.99", 853))
    doh = graph.node(resolver_id("198.19.1.98", 443))
    assert isinstance(dot, ResolverNode) and dot.transport == "dot"
    assert isinstance(doh, ResolverNode) and doh.transport == "doh"
    assert not [n for n in graph.nodes if isinstance(n, EndpointNode)]
    spot = next(s for s in graph.blind_spots if s.code == BlindSpotCode.ENCRYPTED_DNS)
    assert spot.examples == ["198.19.1.98:443 (doh)", "198.19.1.99:853 (dot)"]


def test_answers_seen_without_their_query_still_count_as_lookups() -> None:
    # Given a response whose query was sent before the capture began
    traffic = Traffic()
    query = dns.message.make_query("early.test", "A")
    response = dns.message.make_response(query)
    response.answer.append(dns.rrset.from_text("early.test.", 60, "IN", "A", "198.19.1.7"))
    traffic.send(Segment(RES, SVC, 53, 41000, "udp", response.to_wire()))
    # Then the name is resolved once, with its answer, and nothing is unanswered
    graph = traffic.graph()
    assert _resolved(graph, "early.test").count == 1
    assert _resolved(graph, "early.test").rcodes == {"NOERROR": 1}
    assert graph.node(resolver_id(RES)) is not None


def test_udp_replies_of_a_server_in_the_namespace_are_not_dependencies() -> None:
    # Given the service answering a syslog client from port 514, and sending to statsd
    traffic = Traffic()
    traffic.send(Segment(SVC, "198.19.1.30", 514, 40123, "udp", b"reply"))
    traffic.send(Segment(SVC, "198.19.1.31", 40124, 8125, "udp", b"hits:1|c"))
    traffic.send(Segment(SVC, "198.19.1.31", 40124, 8125, "udp", b"hits:1|c"))
    # Then only statsd is an endpoint, counted as one flow
    graph = traffic.graph()
    endpoints = [n.id for n in graph.nodes if isinstance(n, EndpointNode)]
    assert endpoints == [endpoint_id("198.19.1.31", 8125, "udp")]
    flow = next(e for e in graph.links if isinstance(e, ConnectsEdge))
    assert flow.count == 1


def test_queries_to_a_dns_server_inside_the_namespace_are_not_the_services_lookups() -> None:
    # Given a client outside asking a DNS server that runs in the service's namespace
    traffic = Traffic()
    query = dns.message.make_query("inbound.test", "A")
    traffic.send(Segment("198.19.1.40", SVC, 40000, 53, "udp", query.to_wire()))
    # Then it is not a name the service depends on
    assert "inbound.test" not in _names(traffic.graph())


def _scenario() -> Traffic:
    traffic = Traffic()
    traffic.lookup("b.test", "198.19.1.21")
    traffic.lookup("a.test", "198.19.1.20")
    traffic.connect("198.19.1.21", 443)
    traffic.connect("198.19.1.20", 80)
    traffic.connect("198.19.1.22", 9000)
    return traffic


def test_the_graph_is_deterministic() -> None:
    # Given the same traffic twice
    one, two = _scenario().graph(), _scenario().graph()
    # Then the files are identical but for their creation time, with sorted nodes and links
    strip = lambda g: {k: v for k, v in json.loads(to_json(g)).items() if k != "created"}  # noqa: E731
    assert strip(one) == strip(two)
    assert [n.id for n in one.nodes] == sorted(n.id for n in one.nodes)
    assert one.links == sorted(one.links, key=lambda e: (e.source, e.target, e.kind))


def test_merge_adds_counts_widens_times_and_recounts_unnamed_flows() -> None:
    # Given two captures of the same service, the second naming the endpoint the first did not
    first = _scenario().graph()
    later = Traffic()
    later.t += 3600
    later.lookup("c.test", "198.19.1.22")
    later.connect("198.19.1.22", 9000)
    later.lookup("a.test", "198.19.1.20")
    second = later.graph()
    assert any(s.code == BlindSpotCode.UNNAMED_FLOWS for s in first.blind_spots)
    # When merged
    merged = merge(first, second)
    # Then counts add up and first/last seen span both captures
    a = _resolved(merged, "a.test")
    assert a.count == 2
    assert a.first_seen == _resolved(first, "a.test").first_seen
    assert a.last_seen == _resolved(second, "a.test").last_seen
    flows = {e.target: e.count for e in merged.links if isinstance(e, ConnectsEdge)}
    assert flows[endpoint_id("198.19.1.22", 9000, "tcp")] == 2
    # And the endpoint named later is no longer a blind spot; all names are kept
    assert not any(s.code == BlindSpotCode.UNNAMED_FLOWS for s in merged.blind_spots)
    assert _names(merged) == {"a.test", "b.test", "c.test"}
    assert merged.capture.packets == first.capture.packets + second.capture.packets
    # And the merged graph is a valid graph file
    assert Graph.from_raw(json.loads(to_json(merged))).node(SERVICE_ID) is not None


def _exchange(
    name: str,
    rcode: dns.rcode.Rcode = dns.rcode.NOERROR,
    asked_as: str | None = None,
    answer: str = "",
) -> tuple[bytes, bytes]:
    query = dns.message.make_query(name, "A", id=0)
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    if answer:
        response.answer.append(dns.rrset.from_text(name + ".", 60, "IN", "A", answer))
    if asked_as is not None:  # an answer to another question than the one asked
        response = dns.message.make_response(dns.message.make_query(asked_as, "A", id=0))
    return query.to_wire(), response.to_wire()


def test_repeats_counted_in_the_kernel_build_the_graph_each_exchange_would() -> None:
    # Given exchanges of every kind the kernel can fold (answered, NXDOMAIN, an answer to
    # another question than the one asked, a server in the namespace answering), 40 of
    # each from ports of their own, and one question never answered
    cases = [
        (SVC, RES, _exchange("api.test", answer="198.19.1.7")),
        (SVC, RES, _exchange("missing.test", dns.rcode.NXDOMAIN)),
        (SVC, RES, _exchange("asked.test", asked_as="told.test")),
        (RES, SVC, _exchange("inside.test", answer="198.19.1.8")),
    ]
    one_by_one, folded = Traffic(), Traffic()
    last: list[tuple[float, float]] = []
    for client, server, (question, answer) in cases:
        for port in range(41000, 41040):
            one_by_one.send(Segment(client, server, port, 53, "udp", question))
            one_by_one.send(Segment(server, client, 53, port, "udp", answer))
        last.append((one_by_one.t - 0.01, one_by_one.t))
    silent = _exchange("silent.test")[0]
    one_by_one.send(Segment(SVC, RES, 41999, 53, "udp", silent))
    # When the folded side sees the first of each and is given the other 39 as repeats,
    # timed as the last of them (port and ID zero: a fold spans them)
    for (client, server, (question, answer)), (asked_at, told_at) in zip(cases, last, strict=True):
        folded.send(Segment(client, server, 40999, 53, "udp", question))
        folded.send(Segment(server, client, 53, 40999, "udp", answer))
        ask = folded.dissector.event(asked_at, Segment(client, server, 0, 53, "udp", question))
        told = folded.dissector.event(told_at, Segment(server, client, 53, 0, "udp", answer))
        folded.builder.add_repeats(ask, told, 39)
    folded.t = one_by_one.t - 0.01
    folded.send(Segment(SVC, RES, 41999, 53, "udp", silent))
    # Then both graphs count the same lookups, answers, rcodes and unanswered questions
    mine, theirs = json.loads(to_json(folded.graph())), json.loads(to_json(one_by_one.graph()))
    for graph in (mine, theirs):
        graph.pop("created")
        for link in graph["links"]:
            link.pop("first_seen", None)  # the folded side's first pairs came earlier
    assert mine == theirs
    graph = folded.graph()
    assert _resolved(graph, "api.test").count == 40
    assert _resolved(graph, "missing.test").rcodes == {"NXDOMAIN": 40}
    assert _resolved(graph, "asked.test").unanswered == 40
    assert _resolved(graph, "told.test").count == 40
    assert "inside.test" not in _names(graph)
    assert _resolved(graph, "silent.test").unanswered == 1
