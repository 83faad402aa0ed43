"""Live discovery inside a real namespace: dig against dnsmasq, real TCP/UDP/TLS clients."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import scapy.layers.l2  # noqa: F401  (registers the Ethernet link type for rdpcap)
from discover_world import MANY, Discovery, TsharkFacts, World, capture_service, tshark_facts
from discover_world import world_fixture as world_fixture  # the `world` fixture
from scapy.utils import rdpcap, wrpcapng

from depdrill.discover.model import (
    SERVICE_ID,
    AnswerEdge,
    BlindSpotCode,
    CnameEdge,
    ConnectsEdge,
    EndpointNode,
    Graph,
    NamesEdge,
    QueriesEdge,
    ResolvedEdge,
    ResolverNode,
    address_id,
    endpoint_id,
    name_id,
    resolver_id,
)
from depdrill.discover.run import DiscoverOptions, TapChoice, run
from depdrill.errors import TargetError
from depdrill.netns import Target

# Real clients: dig for DNS (UDP, and TCP with +tcp), Python sockets for flows, Python's ssl
# for a ClientHello with SNI sent to an address that no answer ever named.
CLIENT = """
import socket, ssl, sys
api, quiet = sys.argv[1], sys.argv[2]
s = socket.create_connection((api, 8080), timeout=2); s.close()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.sendto(b"hits:1|c", (api, 8125)); u.close()
s = socket.create_connection((quiet, 9000), timeout=2); s.close()
ctx = ssl.create_default_context()
raw = socket.create_connection((quiet, 443), timeout=2)
try:
    ctx.wrap_socket(raw, server_hostname="hard.x.test").close()
except OSError:
    pass
finally:
    raw.close()
print("client done")
"""


def _traffic(world: World) -> str:
    r, q = world.resolver, world.quiet_address
    dig = "dig +time=1 +tries=1"
    return f"""
{dig} @{q} lost.x.test A
sleep 0.6
{dig} @{r} api.x.test A
{dig} @{r} api.x.test AAAA
{dig} @{r} www.x.test A
{dig} @{r} missing.x.test A
{dig} +tcp @{r} api.x.test A
python3 -c '{CLIENT}' {world.api_address} {q}
"""


def _link(graph: Graph, source: str, target: str, kind: str) -> object:
    found = [e for e in graph.links if (e.source, e.target, e.kind) == (source, target, kind)]
    assert len(found) == 1, f"no {kind} edge {source} -> {target}"
    return found[0]


@pytest.mark.parametrize("tap", ["ebpf", "nflog", "packet"])
def test_live_capture_sees_names_answers_chains_endpoints_and_blind_spots(
    world: World, tap: TapChoice
) -> None:
    # Given depdrill capturing inside the service's namespace, through each tap
    # When the service resolves names with dig and opens TCP, UDP and TLS connections
    graph, output = capture_service(world, _traffic(world), tap=tap)
    assert "client done" in output, output

    # Then the resolver it asked is a node, with UDP and TCP queries counted
    resolver = resolver_id(world.resolver)
    assert isinstance(graph.node(resolver), ResolverNode)
    queries = _link(graph, SERVICE_ID, resolver, "queries")
    assert isinstance(queries, QueriesEdge)
    assert queries.count == 5 and queries.tcp_queries == 1
    # And each name with its query types and rcodes
    api = _link(graph, SERVICE_ID, name_id("api.x.test"), "resolved")
    assert isinstance(api, ResolvedEdge)
    assert api.qtypes == ["A", "AAAA"] and api.rcodes == {"NOERROR": 3} and api.count == 3
    missing = _link(graph, SERVICE_ID, name_id("missing.x.test"), "resolved")
    assert isinstance(missing, ResolvedEdge) and missing.rcodes == {"NXDOMAIN": 1}
    # And the answers: A and AAAA, and the CNAME chain www -> cdn -> edge -> address
    a = world.api_address
    assert isinstance(_link(graph, name_id("api.x.test"), address_id(a), "answer"), AnswerEdge)
    aaaa = _link(graph, name_id("api.x.test"), address_id(f"::ffff:{a}"), "answer")
    assert isinstance(aaaa, AnswerEdge) and aaaa.rtype == "AAAA"
    assert isinstance(
        _link(graph, name_id("www.x.test"), name_id("cdn.x.test"), "cname"), CnameEdge
    )
    _link(graph, name_id("cdn.x.test"), name_id("edge.x.test"), "cname")
    _link(graph, name_id("edge.x.test"), address_id(world.net.address(21)), "answer")
    # And the query nobody answered
    lost = _link(graph, SERVICE_ID, name_id("lost.x.test"), "resolved")
    assert isinstance(lost, ResolvedEdge) and lost.unanswered == 1 and lost.rcodes == {}

    # Then the endpoints the service reached, with ports and protocols, DNS itself excluded
    endpoints = {n.id for n in graph.nodes if isinstance(n, EndpointNode)}
    q = world.quiet_address
    assert endpoints == {
        endpoint_id(a, 8080, "tcp"),
        endpoint_id(a, 8125, "udp"),
        endpoint_id(q, 9000, "tcp"),
        endpoint_id(q, 443, "tcp"),
    }
    connects = _link(graph, SERVICE_ID, endpoint_id(a, 8080, "tcp"), "connects")
    assert isinstance(connects, ConnectsEdge) and connects.count == 1
    # And they are named by the answer that carried their address, or by TLS SNI
    named = _link(graph, endpoint_id(a, 8080, "tcp"), name_id("api.x.test"), "names")
    assert isinstance(named, NamesEdge) and named.via == "answer"
    sni = _link(graph, endpoint_id(q, 443, "tcp"), name_id("hard.x.test"), "names")
    assert isinstance(sni, NamesEdge) and sni.via == "sni"

    # Then what sniffing could not tie to a name is said, not guessed
    spots = {s.code: s for s in graph.blind_spots}
    assert spots[BlindSpotCode.UNNAMED_FLOWS].examples == [f"{q}:9000/tcp"]
    assert spots[BlindSpotCode.UNANSWERED].examples == ["lost.x.test"]
    assert BlindSpotCode.CAPTURE_DROPS not in spots and BlindSpotCode.MALFORMED not in spots
    # And the capture statistics describe the capture
    assert graph.capture.interfaces == ["eth0"] and graph.capture.kernel_drops == 0
    assert graph.capture.dns_messages == 11 and graph.capture.tap == tap
    described = {
        "packet": ("port 53", graph.capture.bpf_filter),
        "nflog": ("th sport 53 log group", graph.capture.nft_ruleset),
        "ebpf": ("tcx ingress and egress on eth0", graph.capture.ebpf_program),
    }
    assert [name for name, (text, field) in described.items() if text in field] == [tap]
    # And the dependency view follows the chain to the endpoints
    deps = {d.name: d for d in graph.dependencies()}
    assert deps["api.x.test"].ports == [8080, 8125]
    assert deps["www.x.test"].canonical == "edge.x.test"


def test_stop_event_ends_a_long_capture_promptly(world: World) -> None:
    # Given a capture asked to run for a minute
    options = DiscoverOptions(target=Target(netns=world.svc), duration_s=60)
    with Discovery(options) as discovery:
        # When the stop event is set
        started = time.monotonic()
        graph = discovery.result()
        # Then it returns within half a second, with an (empty) graph
        assert time.monotonic() - started < 0.5
    assert [n.id for n in graph.nodes] == [SERVICE_ID]


def test_capture_ends_when_the_duration_passes(world: World) -> None:
    # Given a short capture with no stop event
    options = DiscoverOptions(target=Target(netns=world.svc), duration_s=0.3)
    started = time.monotonic()
    # When it runs, Then it returns after about its duration
    run(options)
    assert 0.3 <= time.monotonic() - started < 1.5


def test_missing_namespace_is_one_clear_error() -> None:
    # Given a namespace that does not exist
    options = DiscoverOptions(target=Target(netns="ddt-no-such-ns"), duration_s=1)
    # When discovery runs, Then it refuses with a TargetError naming it
    with pytest.raises(TargetError, match="ddt-no-such-ns"):
        run(options)


def test_pcap_written_by_tcpdump_gives_the_same_graph(world: World, tmp_path: Path) -> None:
    # Given tcpdump writing a pcap inside the service namespace while depdrill captures live
    pcap = tmp_path / "svc.pcap"
    tcpdump = world.start(
        world.svc, "tcpdump", "-i", "eth0", "-U", "-w", str(pcap), "--immediate-mode"
    )
    time.sleep(0.5)
    graph, output = capture_service(world, _traffic(world))
    time.sleep(0.3)
    tcpdump.terminate()
    tcpdump.wait(5)
    assert "client done" in output
    # When the pcap is read offline
    offline = run(DiscoverOptions(pcap=pcap, label=world.svc))
    # Then it finds the same nodes, edges and counts as the live capture
    assert _shape(offline) == _shape(graph)
    assert {s.code for s in offline.blind_spots} == {s.code for s in graph.blind_spots}
    assert offline.inputs == {"svc.pcap": offline.inputs["svc.pcap"]}
    # And the same capture as pcapng reads the same
    pcapng = tmp_path / "svc.pcapng"
    wrpcapng(str(pcapng), rdpcap(str(pcap)))
    assert _shape(run(DiscoverOptions(pcap=pcapng, label=world.svc))) == _shape(graph)
    # And what depdrill found is what tshark's own dissectors find in the same pcap
    _agrees_with_tshark(offline, tshark_facts(str(pcap), world.service_address))


def _agrees_with_tshark(graph: Graph, facts: TsharkFacts) -> None:
    by_id = {n.id: n for n in graph.nodes}
    resolved = {
        by_id[e.target].name: e  # type: ignore[union-attr]
        for e in graph.links
        if isinstance(e, ResolvedEdge)
    }
    assert {n: set(e.qtypes) for n, e in resolved.items()} == facts.asked
    assert {n: set(e.rcodes) for n, e in resolved.items() if e.rcodes} == facts.rcodes
    answers = {
        (by_id[e.source].name, by_id[e.target].address)  # type: ignore[union-attr]
        for e in graph.links
        if isinstance(e, AnswerEdge)
    }
    assert answers == facts.answers
    cnames = {
        (by_id[e.source].name, by_id[e.target].name)  # type: ignore[union-attr]
        for e in graph.links
        if isinstance(e, CnameEdge)
    }
    assert cnames == facts.cnames
    endpoints = {(n.address, n.port, n.proto) for n in graph.nodes if isinstance(n, EndpointNode)}
    assert endpoints == facts.endpoints
    sni = {
        (by_id[e.source].address, by_id[e.source].port): by_id[e.target].name  # type: ignore[union-attr]
        for e in graph.links
        if isinstance(e, NamesEdge) and e.via == "sni"
    }
    assert sni == facts.sni


def _shape(graph: Graph) -> dict[tuple[str, str, str], int]:
    return {(e.source, e.target, e.kind): getattr(e, "count", 0) for e in graph.links} | {
        (n.id, "", "node"): 0 for n in graph.nodes
    }


def test_run_can_be_stopped_from_another_thread_while_traffic_flows(world: World) -> None:
    # Given a capture and a client resolving in a loop
    options = DiscoverOptions(target=Target(netns=world.svc), duration_s=30)
    loop = subprocess.Popen(
        ["ip", "netns", "exec", world.svc, "sh", "-c",
         f"while true; do dig +short @{world.resolver} api.x.test >/dev/null; done"],
    )  # fmt: skip
    try:
        with Discovery(options) as discovery:
            time.sleep(0.5)
            stopped = threading.Event()
            started = time.monotonic()
            graph = discovery.result()
            stopped.set()
            # Then it stops within half a second even under traffic
            assert time.monotonic() - started < 0.5
    finally:
        loop.kill()
        loop.wait()
    assert graph.node(name_id("api.x.test")) is not None


# Two queries written in one send() on a TCP connection to dnsmasq: one segment, two messages.
PIPELINED = """
import socket, sys
import dns.message
resolver = sys.argv[1]
wires = [dns.message.make_query(n, "A").to_wire() for n in ("api.x.test", "edge.x.test")]
s = socket.create_connection((resolver, 53), timeout=2)
s.sendall(b"".join(len(w).to_bytes(2, "big") + w for w in wires))
got = b""
while got.count(b"x") < 2 or len(got) < 60:
    chunk = s.recv(4096)
    if not chunk:
        break
    got += chunk
s.close()
print("pipelined done")
"""


@pytest.mark.parametrize("tap", ["ebpf", "nflog", "packet"])
def test_tcp_dns_with_two_messages_in_one_segment(world: World, tap: TapChoice) -> None:
    # Given a client that writes two length-prefixed queries in one TCP segment
    script = f"{sys.executable} -c '{PIPELINED}' {world.resolver}"
    # When depdrill captures it
    graph, output = capture_service(world, script, tap=tap)
    assert "pipelined done" in output, output
    # Then both names are seen as asked over TCP, and both answers are read
    queries = _link(graph, SERVICE_ID, resolver_id(world.resolver), "queries")
    assert isinstance(queries, QueriesEdge) and queries.tcp_queries == 2
    assert queries.transport == "tcp"
    for name in ("api.x.test", "edge.x.test"):
        edge = _link(graph, SERVICE_ID, name_id(name), "resolved")
        assert isinstance(edge, ResolvedEdge) and edge.rcodes == {"NOERROR": 1}
    _link(graph, name_id("edge.x.test"), address_id(world.net.address(21)), "answer")


def test_without_privilege_the_error_says_so(world: World) -> None:
    # Given depdrill run as root but with every capability dropped
    code = (
        "from depdrill.discover.run import run, DiscoverOptions\n"
        "from depdrill.netns import Target\n"
        "from depdrill.errors import CapabilityError\n"
        "try:\n"
        f"    run(DiscoverOptions(target=Target(netns='{world.svc}'), duration_s=0.2))\n"
        "except CapabilityError as exc:\n"
        "    print('CapabilityError:', exc)\n"
    )
    done = subprocess.run(
        ["setpriv", "--inh-caps=-all", "--bounding-set=-all", sys.executable, "-P", "-c", code],
        capture_output=True,
        text=True,
        check=False,
    )
    # Then discovery refuses with a CapabilityError in one line
    assert done.stdout.startswith("CapabilityError:"), done.stdout + done.stderr
    assert done.stdout.count("\n") == 1


@pytest.mark.parametrize("tap", ["ebpf", "nflog", "packet"])
def test_a_truncated_answer_retried_over_tcp_is_seen_both_ways(
    world: World, tap: TapChoice
) -> None:
    # Given a name with more A records than fit in 512 bytes, asked without EDNS
    script = f"dig +noedns +time=1 +tries=1 @{world.resolver} many.x.test A"
    # When dig gets a truncated UDP answer and retries over TCP
    graph, output = capture_service(world, script, tap=tap)
    assert "Truncated, retrying in TCP mode" in output, output
    # Then the name shows the truncation, both lookups and every address from the TCP answer
    edge = _link(graph, SERVICE_ID, name_id("many.x.test"), "resolved")
    assert isinstance(edge, ResolvedEdge)
    assert edge.truncated == 1 and edge.count == 2 and edge.rcodes == {"NOERROR": 2}
    queries = _link(graph, SERVICE_ID, resolver_id(world.resolver), "queries")
    assert isinstance(queries, QueriesEdge) and queries.tcp_queries == 1
    answers = [e for e in graph.links if isinstance(e, AnswerEdge)]
    assert len(answers) == MANY


def test_a_pid_target_captures_in_that_process_namespace(world: World) -> None:
    # Given a process living in the service namespace (as a container's would)
    pid = world.start(world.svc, "sleep", "30").pid  # `ip netns exec` execs, no fork
    svc_ns = Path(f"/run/netns/{world.svc}").stat().st_ino
    for _ in range(100):  # until `ip` has entered the namespace and exec'd
        if Path(f"/proc/{pid}/ns/net").stat().st_ino == svc_ns:
            break
        time.sleep(0.01)
    options = DiscoverOptions(target=Target(pid=pid), duration_s=30)
    # When depdrill captures by pid while the service resolves a name
    with Discovery(options) as discovery:
        world.in_service(f"dig +time=1 +tries=1 @{world.resolver} api.x.test A")
        time.sleep(0.3)
        graph = discovery.result()
    # Then it saw the lookup, and says which target it watched
    assert graph.node(name_id("api.x.test")) is not None
    assert graph.target == f"pid {pid}"


def test_search_path_expansions_of_the_system_resolver_fold_into_the_name(world: World) -> None:
    # Given the service's resolv.conf with a Kubernetes-like search path and ndots:5
    # (`ip netns exec` bind-mounts /etc/netns/<ns>/resolv.conf over /etc/resolv.conf)
    conf_dir = Path("/etc/netns") / world.svc
    conf_dir.mkdir(parents=True)
    try:
        (conf_dir / "resolv.conf").write_text(
            f"nameserver {world.resolver}\nsearch ns.svc.x.test svc.x.test\noptions ndots:5\n"
        )
        # When glibc resolves api.x.test through its search path
        graph, output = capture_service(world, "getent ahostsv4 api.x.test")
    finally:
        for child in conf_dir.iterdir():
            child.unlink()
        conf_dir.rmdir()
    assert world.api_address in output, output
    # Then the expansions are folded into api.x.test, and their cost is a blind spot
    api = _link(graph, SERVICE_ID, name_id("api.x.test"), "resolved")
    assert isinstance(api, ResolvedEdge)
    assert api.expansions == ["api.x.test.ns.svc.x.test", "api.x.test.svc.x.test"]
    assert api.expansion_queries == 2
    assert graph.node(name_id("api.x.test.svc.x.test")) is None
    storm = next(s for s in graph.blind_spots if s.code == BlindSpotCode.NXDOMAIN_STORM)
    assert storm.count == 2


def test_other_query_types_and_refusals_are_recorded(world: World) -> None:
    # Given the service asking for SRV, MX, TXT, PTR and HTTPS records, and a name
    # outside the resolver's zone (which it refuses)
    r = world.resolver
    script = "\n".join(
        f"dig +time=1 +tries=1 @{r} {name} {qtype}"
        for name, qtype in [("_api._tcp.x.test", "SRV"), ("x.test", "MX"), ("x.test", "TXT"),
                            ("20.in-addr.x.test", "PTR"), ("api.x.test", "HTTPS"),
                            ("outside.example", "A")]
    )  # fmt: skip
    # When depdrill captures
    graph, output = capture_service(world, script)
    assert "status: REFUSED" in output, output

    # Then each name carries its query types and rcodes
    def resolved(name: str) -> ResolvedEdge:
        edge = _link(graph, SERVICE_ID, name_id(name), "resolved")
        assert isinstance(edge, ResolvedEdge)
        return edge

    assert resolved("_api._tcp.x.test").qtypes == ["SRV"]
    assert resolved("x.test").qtypes == ["MX", "TXT"]
    assert resolved("x.test").rcodes == {"NOERROR": 2}
    assert resolved("20.in-addr.x.test").qtypes == ["PTR"]
    assert resolved("api.x.test").qtypes == ["HTTPS"]
    assert resolved("outside.example").rcodes == {"REFUSED": 1}
