"""Build the dependency graph from packet events: queries, answers, flows, and their names.

"The service" is whoever sends from the namespace's own addresses. Its DNS traffic makes
resolver and name nodes; answers tie names to addresses; its TCP SYNs and UDP flows make
endpoints; an endpoint gets its name from an answer that carried its address, or from the
SNI of a ClientHello it was sent. Memory is bounded: past `max_names` distinct names, new
ones fold under their registered domain, and the graph says so.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

from depdrill.discover.dissect import DNS_PORT, PacketEvent
from depdrill.discover.dns import DnsMessage
from depdrill.discover.model import (
    SERVICE_ID,
    AddressNode,
    AnswerEdge,
    BlindSpot,
    BlindSpotCode,
    CaptureStats,
    CnameEdge,
    ConnectsEdge,
    Edge,
    EndpointNode,
    Graph,
    NameNode,
    NamesEdge,
    Node,
    Proto,
    QueriesEdge,
    ResolvedEdge,
    ResolverNode,
    ServiceNode,
    address_id,
    endpoint_id,
    name_id,
    resolver_id,
)
from depdrill.netns import Target

DOT_PORT: Final = 853
HTTPS_PORT: Final = 443
# Public DNS-over-HTTPS services: a connection to one of these is name resolution we cannot read.
DOH_NAMES: Final = frozenset(
    {
        "dns.google", "dns.google.com", "cloudflare-dns.com", "mozilla.cloudflare-dns.com",
        "one.one.one.one", "1dot1dot1dot1.cloudflare-dns.com", "security.cloudflare-dns.com",
        "family.cloudflare-dns.com", "dns.quad9.net", "dns9.quad9.net", "dns.nextdns.io",
        "doh.opendns.com", "dns.adguard-dns.com", "doh.cleanbrowsing.org",
    }
)  # fmt: skip
DOH_ADDRESSES: Final = frozenset(
    {
        "1.1.1.1", "1.0.0.1", "8.8.8.8", "8.8.4.4", "9.9.9.9", "149.112.112.112",
        "208.67.222.222", "208.67.220.220", "94.140.14.14", "94.140.15.15",
        "2606:4700:4700::1111", "2606:4700:4700::1001", "2001:4860:4860::8888",
        "2001:4860:4860::8844", "2620:fe::fe", "2620:fe::9",
    }
)  # fmt: skip
UNANSWERED_GRACE_S: Final = 0.5  # a query this close to the end may be answered after it
MAX_PENDING: Final = 65536
MAX_UDP_FLOWS: Final = 65536
MAX_NAMES_PER_ADDRESS: Final = 16
EXAMPLES: Final = 10
PAST_ENDPOINT_LIMIT: Final = "(connections to endpoints past the limit)"
PAST_ANSWER_LIMIT: Final = "(answers past the limit)"


def describe(code: BlindSpotCode, count: int) -> str:
    """The one-line message of a blind spot, from its count (so merged graphs can recount)."""
    return {
        BlindSpotCode.ENCRYPTED_DNS: f"{count} connection(s) carry DNS over TLS or HTTPS: "
        "the names they resolve are not visible",
        BlindSpotCode.UNANSWERED: f"{count} quer(y/ies) never answered",
        BlindSpotCode.UNNAMED_FLOWS: f"{count} endpoint(s) reached at addresses never seen "
        "in a DNS answer nor named by TLS SNI (hard-coded, cached, or resolved before capture)",
        BlindSpotCode.CAPTURE_DROPS: f"the kernel dropped {count} packet(s) before capture "
        "read them: the graph may be missing traffic",
        BlindSpotCode.MALFORMED: f"{count} DNS message(s) could not be parsed and were skipped",
        BlindSpotCode.NXDOMAIN_STORM: f"{count} lookup(s) spent on search-path expansions "
        "that did not exist before the name itself resolved",
        BlindSpotCode.AGGREGATED: f"{count} lookup(s), answer(s) or connection(s) past the "
        "limits of distinct names, answers and endpoints were folded under their registered "
        "domain or left out",
    }[code]


def registered_domain(name: str) -> str:
    """The registrable part of a name, by a heuristic (no public suffix list): `b.example.com`
    -> `example.com`, `a.b.example.co.uk` -> `example.co.uk`."""
    labels = name.split(".")
    keep = 3 if len(labels) >= 3 and len(labels[-1]) == 2 and len(labels[-2]) <= 3 else 2
    return ".".join(labels[-keep:])


def _time(t: float | None) -> datetime | None:
    return datetime.fromtimestamp(t, UTC) if t is not None else None


@dataclass
class _Seen:
    count: int = 0
    first: float | None = None
    last: float | None = None

    def hit(self, t: float, count: int = 1) -> None:
        self.count += count
        self.first = t if self.first is None else min(self.first, t)
        self.last = t if self.last is None else max(self.last, t)


@dataclass
class _Lookups(_Seen):
    qtypes: set[str] = field(default_factory=set)
    rcodes: Counter[str] = field(default_factory=Counter)
    unanswered: int = 0
    truncated: int = 0


@dataclass
class _Resolver(_Seen):
    transport: str = "dns"
    tcp: int = 0

    def main_transport(self) -> str:
        return "tcp" if self.count and self.tcp == self.count else "udp"


PendingKey = tuple[str, int, str, int, int, str, str]
EndpointKey = tuple[str, int, Proto]


class GraphBuilder:
    """Feed PacketEvents in time order with `add`, then `build` the Graph."""

    def __init__(
        self,
        service_addresses: Iterable[str],
        label: str,
        max_names: int = 10_000,
        max_endpoints: int = 10_000,
    ) -> None:
        self.service_addresses = frozenset(service_addresses)
        self.label = label
        self.max_names = max_names
        self.max_endpoints = max_endpoints
        self.max_answers = 10 * max_names
        self._lookups: dict[str, _Lookups] = {}
        self._known_names: set[str] = set()
        self._folded_names: set[str] = set()
        self._resolvers: dict[tuple[str, int], _Resolver] = {}
        # The TTL each record had in the latest answer that carried it, and that answer's time.
        self._cnames: dict[tuple[str, str], tuple[int, float]] = {}
        self._answers: dict[tuple[str, str], tuple[str, int, float]] = {}
        self._answered_for: dict[str, set[str]] = {}  # address -> names asked that gave it
        self._endpoints: dict[tuple[str, int, Proto], _Seen] = {}
        self._sni: dict[tuple[str, int, Proto], str] = {}
        self._udp_flows: set[tuple[str, int, str, int]] = set()
        self._pending: OrderedDict[PendingKey, float] = OrderedDict()
        self._unpaired_port = 0  # below zero: the ports of repeated questions (add_repeats)
        self._encrypted_dns: Counter[str] = Counter()
        self._aggregated: Counter[str] = Counter()
        self.last_time: float | None = None

    # -- events --------------------------------------------------------------------------

    def add(self, ev: PacketEvent) -> None:
        self._saw(ev.time)
        outbound = ev.src in self.service_addresses
        inbound = ev.dst in self.service_addresses
        for message in ev.dns:
            if outbound and not message.response and ev.dport == DNS_PORT:
                self._query(ev, message)
            elif inbound and message.response and ev.sport == DNS_PORT:
                self._response(ev, message)
        if not outbound or DNS_PORT in (ev.sport, ev.dport):
            return
        if ev.proto == "tcp":
            self._tcp(ev)
        else:
            self._udp(ev)

    def add_repeats(self, question: PacketEvent, answer: PacketEvent, count: int) -> None:
        """`count` exchanges of this question and this answer, each answered (the eBPF tap
        paired them in the kernel: discover/fold.py), the last asked at `question.time`:
        what adding each pair would do, at the cost of one."""
        asked = question.dns[0] if len(question.dns) == 1 else None
        told = answer.dns[0] if len(answer.dns) == 1 else None
        paired = (
            asked is not None
            and told is not None
            and question.src in self.service_addresses
            and answer.dst in self.service_addresses
            and question.dport == DNS_PORT == answer.sport
            and not asked.response
            and told.response
            and asked.qname is not None
            and (asked.qname, asked.qtype or "?") == (told.qname, told.qtype or "?")
        )
        if not paired:
            if question.src in self.service_addresses or answer.dst in self.service_addresses:
                # Not a pair the graph matches (an answer to another question): each as it
                # came, each question under a port of its own, as the real ones had.
                for _ in range(count):
                    self._unpaired_port -= 1
                    self.add(question._replace(sport=self._unpaired_port))
                    self.add(answer._replace(dport=self._unpaired_port))
            else:  # neither side is the service's: nothing but the time counts
                self.add(answer)
            return
        assert asked is not None and told is not None and asked.qname is not None
        self._saw(answer.time)
        self._resolver(question.dst, question.dport, "dns").hit(question.time, count)
        name = self._name(asked.qname, lookup=True)
        lookups = self._lookups_of(name)
        lookups.hit(question.time, count)
        lookups.qtypes.add(asked.qtype or "?")
        self._answered(name, lookups, answer, told, count)

    def _saw(self, t: float) -> None:
        self.last_time = t if self.last_time is None else max(self.last_time, t)

    def _query(self, ev: PacketEvent, msg: DnsMessage) -> None:
        resolver = self._resolver(ev.dst, ev.dport, "dns")
        resolver.hit(ev.time)
        resolver.tcp += ev.proto == "tcp"
        if msg.qname is None:
            return
        name = self._name(msg.qname, lookup=True)
        lookups = self._lookups_of(name)
        lookups.hit(ev.time)
        lookups.qtypes.add(msg.qtype or "?")
        key = (ev.src, ev.sport, ev.dst, ev.dport, msg.id, msg.qname, msg.qtype or "?")
        if key not in self._pending:
            if len(self._pending) >= MAX_PENDING:
                (_, _, _, _, _, old_name, _), _ = self._pending.popitem(last=False)
                self._lookups_of(self._name(old_name)).unanswered += 1
            self._pending[key] = ev.time

    def _response(self, ev: PacketEvent, msg: DnsMessage) -> None:
        if msg.qname is None:
            return
        name = self._name(msg.qname)
        lookups = self._lookups_of(name)
        key = (ev.dst, ev.dport, ev.src, ev.sport, msg.id, msg.qname, msg.qtype or "?")
        if self._pending.pop(key, None) is None:
            # The query went out before the capture began: the lookup still happened.
            self._name(msg.qname, lookup=True)
            lookups.hit(ev.time)
            lookups.qtypes.add(msg.qtype or "?")
            self._resolver(ev.src, ev.sport, "dns").hit(ev.time)
        self._answered(name, lookups, ev, msg)

    def _answered(
        self, name: str, lookups: _Lookups, ev: PacketEvent, msg: DnsMessage, count: int = 1
    ) -> None:
        """What `count` answers like `msg` (to a lookup of `name`) add to the graph."""
        lookups.rcodes[msg.rcode] += count
        lookups.truncated += count * (msg.truncated and ev.proto == "udp")
        for record in msg.answers:
            if len(self._answers) + len(self._cnames) >= self.max_answers:
                self._aggregated[PAST_ANSWER_LIMIT] += count
                break
            owner = self._name(record.owner)
            if record.rtype == "CNAME":
                alias = (owner, self._name(record.value))
                if ev.time >= self._cnames.get(alias, (0, ev.time))[1]:
                    self._cnames[alias] = (record.ttl, ev.time)
            else:
                key = (owner, record.value)
                if ev.time >= self._answers.get(key, ("", 0, ev.time))[2]:
                    self._answers[key] = (record.rtype, record.ttl, ev.time)
                asked = self._answered_for.setdefault(record.value, set())
                if len(asked) < MAX_NAMES_PER_ADDRESS:
                    asked.add(name)

    def _tcp(self, ev: PacketEvent) -> None:
        key: EndpointKey = (ev.dst, ev.dport, "tcp")
        if ev.syn and ev.dport == DOT_PORT:
            self._encrypted(ev.dst, ev.dport, "dot", ev.time)
        elif ev.syn:
            self._endpoint(key, ev.time)
        if ev.client_hello:
            if ev.sni in DOH_NAMES or (ev.dst in DOH_ADDRESSES and ev.dport == HTTPS_PORT):
                self._encrypted(ev.dst, ev.dport, "doh", ev.time)
            elif ev.dport != DOT_PORT:
                if key not in self._endpoints:  # the SYN came before the capture
                    self._endpoint(key, ev.time)
                if ev.sni and key in self._endpoints:
                    self._sni[key] = self._name(ev.sni)

    def _udp(self, ev: PacketEvent) -> None:
        if ev.sport < 1024 <= ev.dport:  # a server in the namespace answering its client
            return
        flow = (ev.src, ev.sport, ev.dst, ev.dport)
        new = flow not in self._udp_flows
        if new:
            if len(self._udp_flows) >= MAX_UDP_FLOWS:
                self._udp_flows.clear()  # old flows may count again: counts are approximate
            self._udp_flows.add(flow)
        key: EndpointKey = (ev.dst, ev.dport, "udp")
        if new:
            self._endpoint(key, ev.time)
        elif key in self._endpoints:
            self._endpoints[key].hit(ev.time, 0)

    # -- bounded state -------------------------------------------------------------------

    def _name(self, name: str, lookup: bool = False) -> str:
        """The name as stored: itself, or past the limit its registered-domain bucket (a
        `lookup` is counted against the bucket, so the blind spot says how many were folded)."""
        if name in self._known_names:
            return name
        if len(self._known_names) < self.max_names:
            self._known_names.add(name)
            return name
        folded = "*." + registered_domain(name)
        if folded not in self._folded_names:
            # A flood of random registered domains too: one last bucket bounds it.
            if len(self._folded_names) >= max(1, self.max_names // 10):
                folded = "*"
            else:
                self._folded_names.add(folded)
        self._aggregated[folded] += lookup
        return folded

    def _lookups_of(self, name: str) -> _Lookups:
        lookups = self._lookups.get(name)
        if lookups is None:
            lookups = self._lookups[name] = _Lookups()
        return lookups

    def _resolver(self, address: str, port: int, transport: str) -> _Resolver:
        resolver = self._resolvers.get((address, port))
        if resolver is None:
            resolver = self._resolvers[(address, port)] = _Resolver(transport=transport)
        return resolver

    def _encrypted(self, address: str, port: int, transport: str, t: float) -> None:
        resolver = self._resolver(address, port, transport)
        resolver.transport = transport
        resolver.hit(t)
        resolver.tcp += 1
        self._encrypted_dns[f"{address}:{port} ({transport})"] += 1
        self._endpoints.pop((address, port, "tcp"), None)

    def _endpoint(self, key: EndpointKey, t: float) -> None:
        seen = self._endpoints.get(key)
        if seen is None:
            if len(self._endpoints) >= self.max_endpoints:
                self._aggregated[PAST_ENDPOINT_LIMIT] += 1
                return
            seen = self._endpoints[key] = _Seen()
        seen.hit(t)

    # -- the graph -----------------------------------------------------------------------

    def build(self, target: str, target_spec: Target | None, capture: CaptureStats) -> Graph:
        end = max(self.last_time or 0.0, capture.ended.timestamp())
        for (_, _, _, _, _, qname, _), sent in self._pending.items():
            if sent <= end - UNANSWERED_GRACE_S:
                self._lookups_of(self._name(qname)).unanswered += 1
        self._pending.clear()
        folded_into = self._search_expansions()

        nodes: dict[str, Node] = {SERVICE_ID: ServiceNode(label=self.label)}
        links: list[Edge] = []
        for (address, port), resolver in self._resolvers.items():
            rid = resolver_id(address, port)
            nodes[rid] = ResolverNode(
                id=rid,
                address=address,
                port=port,
                transport=resolver.transport,
            )
            links.append(
                QueriesEdge(
                    source=SERVICE_ID, target=rid, transport=resolver.main_transport(),
                    tcp_queries=resolver.tcp, count=resolver.count,
                    first_seen=_time(resolver.first), last_seen=_time(resolver.last),
                )
            )  # fmt: skip
        expansions: dict[str, list[str]] = {}
        for expansion, name in folded_into.items():
            expansions.setdefault(name, []).append(expansion)
        for name, lookups in self._lookups.items():
            if name in folded_into:
                continue
            self._name_node(nodes, name)
            folded = sorted(expansions.get(name, []))
            links.append(
                ResolvedEdge(
                    source=SERVICE_ID, target=name_id(name), qtypes=sorted(lookups.qtypes),
                    rcodes=dict(sorted(lookups.rcodes.items())), unanswered=lookups.unanswered,
                    truncated=lookups.truncated, count=lookups.count,
                    first_seen=_time(lookups.first), last_seen=_time(lookups.last),
                    expansions=folded[:EXAMPLES],
                    expansion_queries=sum(self._lookups[f].count for f in folded),
                )
            )  # fmt: skip
        for (owner, alias), (ttl, _) in self._cnames.items():
            self._name_node(nodes, owner)
            self._name_node(nodes, alias)
            links.append(CnameEdge(source=name_id(owner), target=name_id(alias), ttl=ttl))
        for (owner, address), (rtype, ttl, _) in self._answers.items():
            self._name_node(nodes, owner)
            family = 6 if ":" in address else 4
            aid = address_id(address)
            nodes.setdefault(aid, AddressNode(id=aid, address=address, family=family))
            links.append(
                AnswerEdge(source=name_id(owner), target=address_id(address), rtype=rtype, ttl=ttl)
            )
        unnamed: list[str] = []
        for (address, port, proto), seen in self._endpoints.items():
            eid = endpoint_id(address, port, proto)
            nodes[eid] = EndpointNode(id=eid, address=address, port=port, proto=proto)
            links.append(
                ConnectsEdge(
                    source=SERVICE_ID, target=eid, count=seen.count,
                    first_seen=_time(seen.first), last_seen=_time(seen.last),
                )
            )  # fmt: skip
            sni = self._sni.get((address, port, proto))
            if sni is not None:
                self._name_node(nodes, sni)
                links.append(NamesEdge(source=eid, target=name_id(sni), via="sni"))
            named_by_answer = sorted(self._answered_for.get(address, set()) - {sni})
            for name in named_by_answer:
                self._name_node(nodes, name)
                links.append(NamesEdge(source=eid, target=name_id(name), via="answer"))
            if sni is None and not named_by_answer:
                unnamed.append(f"{address}:{port}/{proto}")

        graph = Graph(
            target=target,
            target_spec=target_spec,
            capture=capture.model_copy(
                update={"flows": sum(s.count for s in self._endpoints.values())}
            ),
            blind_spots=self._blind_spots(capture, unnamed, folded_into),
            nodes=sorted(nodes.values(), key=lambda n: n.id),
            links=sorted(links, key=lambda e: (e.source, e.target, e.kind)),
        )
        return graph

    def _name_node(self, nodes: dict[str, Node], name: str) -> None:
        nid = name_id(name)
        if nid not in nodes:
            nodes[nid] = NameNode(id=nid, name=name)

    def _search_expansions(self) -> dict[str, str]:
        """NXDOMAIN-only names that are a resolved name plus a suffix (`api.ns.svc.cluster.local`
        for `api`): the resolver library walking its search path. Maps each to the name."""
        succeeded = {n for n, lk in self._lookups.items() if lk.rcodes.get("NOERROR")}
        involved = {n for pair in self._cnames for n in pair} | {o for o, _ in self._answers}
        folded: dict[str, str] = {}
        for name, lookups in self._lookups.items():
            if set(lookups.rcodes) != {"NXDOMAIN"} or name in involved:
                continue
            cut = name.rfind(".")
            while cut > 0:
                if name[:cut] in succeeded:
                    folded[name] = name[:cut]
                    break
                cut = name.rfind(".", 0, cut)
        return folded

    def _blind_spots(
        self, capture: CaptureStats, unnamed: list[str], folded_into: dict[str, str]
    ) -> list[BlindSpot]:
        spots: list[BlindSpot] = []

        def spot(code: BlindSpotCode, count: int, examples: Iterable[str]) -> None:
            if count:
                spots.append(
                    BlindSpot(
                        code=code,
                        message=describe(code, count),
                        count=count,
                        examples=sorted(examples)[:EXAMPLES],
                    )
                )

        spot(
            BlindSpotCode.ENCRYPTED_DNS,
            sum(self._encrypted_dns.values()),
            self._encrypted_dns,
        )
        unanswered = {n: lk.unanswered for n, lk in self._lookups.items() if lk.unanswered}
        spot(BlindSpotCode.UNANSWERED, sum(unanswered.values()), unanswered)
        spot(BlindSpotCode.UNNAMED_FLOWS, len(unnamed), unnamed)
        spot(BlindSpotCode.CAPTURE_DROPS, capture.kernel_drops, [])
        spot(BlindSpotCode.MALFORMED, capture.malformed, [])
        spot(
            BlindSpotCode.NXDOMAIN_STORM,
            sum(self._lookups[n].count for n in folded_into),
            folded_into,
        )
        spot(BlindSpotCode.AGGREGATED, sum(self._aggregated.values()), self._aggregated)
        return sorted(spots, key=lambda s: s.code)
