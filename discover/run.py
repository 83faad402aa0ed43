"""The discover stage: capture (live or from a file), build the graph; merge graphs for --append."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import Field, model_validator

from depdrill.artifact import Frozen, sha256_file, utcnow
from depdrill.discover.capture import LiveCapture, read_pcap
from depdrill.discover.correlate import EXAMPLES, GraphBuilder, describe
from depdrill.discover.dissect import DNS_PORT, Dissector, PacketEvent
from depdrill.discover.dns import DnsMessage
from depdrill.discover.ebpf import EbpfCapture
from depdrill.discover.fold import Repeat
from depdrill.discover.model import (
    BlindSpot,
    BlindSpotCode,
    CaptureStats,
    Edge,
    EndpointNode,
    Graph,
    NamesEdge,
    Node,
    QueriesEdge,
    ResolvedEdge,
    Seen,
)
from depdrill.discover.packets import Segment, decode_ip, ipv4_text
from depdrill.errors import CapabilityError
from depdrill.netns import Target

TapChoice = Literal["auto", "ebpf", "nflog", "packet"]


class DiscoverOptions(Frozen):
    """What to watch and for how long. Exactly one of `target` (live) or `pcap` (offline)."""

    target: Target | None = None
    pcap: Path | None = None
    duration_s: float = Field(default=30.0, gt=0)
    label: str | None = None
    max_names: int = Field(default=10_000, ge=1)
    # Live only: how packets reach discovery. "ebpf": a tcx program on each device keeps
    # what discovery reads (every packet pays a few header tests in JITed code); "nflog":
    # nft rules in the namespace log it (a few rule tests; a logged packet is dear);
    # "packet": a packet socket with a BPF filter (every packet pays the tap's hook);
    # "auto": the first of these that can be used there, and the graph says why not the
    # others.
    tap: TapChoice = "auto"
    # Live, ebpf tap only: a UDP question and answer that repeat an exchange already copied
    # are counted in the kernel (discover/fold.py); False copies every packet to depdrill.
    fold: bool = True
    # Offline only: the service's own addresses, when guessing them from who sends DNS
    # queries is not enough (a capture taken on a host with several clients).
    service_addresses: list[str] = []

    @model_validator(mode="after")
    def _one_source(self) -> DiscoverOptions:
        if (self.target is None) == (self.pcap is None):
            raise ValueError("discover needs exactly one of a target or a pcap file")
        return self

    def describe(self) -> str:
        if self.target is not None:
            return self.target.describe()
        return f"pcap {self.pcap}"

    def service_label(self) -> str:
        if self.label:
            return self.label
        if self.target is not None:
            return self.target.netns or f"pid {self.target.pid}"
        return Path(str(self.pcap)).stem


def run(
    options: DiscoverOptions,
    stop: threading.Event | None = None,
    ready: threading.Event | None = None,
) -> Graph:
    """Capture until the duration passes or `stop` is set (live), or read the file; the graph.

    `ready` is set once the live capture is filtering packets, so a caller can start traffic.
    """
    if options.pcap is not None:
        graph = _offline(options, options.pcap)
        if ready is not None:
            ready.set()
        return graph
    assert options.target is not None
    started = utcnow()
    capture, fallback = open_tap(options.target, options.tap, options.fold)
    with contextlib.closing(capture):
        builder = GraphBuilder(
            capture.service_addresses, options.service_label(), max_names=options.max_names
        )
        dissector = Dissector()
        if isinstance(capture, EbpfCapture):
            capture.on_repeat = functools.partial(_add_repeat, builder, dissector)
        if ready is not None:
            ready.set()
        frames = capture.frames(options.duration_s, stop, background=True)
        _feed_live(builder, dissector, frames)
        stats = CaptureStats(
            started=started,
            ended=utcnow(),
            interfaces=capture.interfaces,
            tap=capture.tap,
            tap_fallback=fallback,
            bpf_filter=capture.filter if capture.tap == "packet" else "",
            nft_ruleset=capture.filter if capture.tap == "nflog" else "",
            ebpf_program=capture.filter if capture.tap == "ebpf" else "",
            dns_folded=capture.folded if isinstance(capture, EbpfCapture) else 0,
            packets=capture.packet_count,
            dns_messages=dissector.dns_messages,
            malformed=dissector.malformed,
            kernel_drops=capture.kernel_drops,
        )
    return builder.build(options.describe(), options.target, stats)


class Tap(Protocol):
    """A live capture, whichever way its packets come in."""

    @property
    def tap(self) -> str: ...

    interfaces: list[str]
    service_addresses: list[str]
    filter: str
    kernel_drops: int
    packet_count: int

    def frames(
        self, duration_s: float, stop: threading.Event | None = None, background: bool = False
    ) -> Iterator[tuple[float, bytes]]: ...

    def close(self) -> None: ...


def open_tap(target: Target, choice: TapChoice = "auto", fold: bool = True) -> tuple[Tap, str]:
    """The capture `choice` asks for; with "auto", the first tap that opens there, and why
    the ones before it did not ("" when the first did). `fold`: as DiscoverOptions.fold."""
    from depdrill.bpf import BpfUnavailable
    from depdrill.discover.nflog import NflogCapture, NflogUnavailable

    if choice == "packet":
        return LiveCapture.open(target), ""
    if choice == "nflog":
        return NflogCapture.open(target), ""
    if choice == "ebpf":
        return EbpfCapture.open(target, fold=fold), ""
    reasons: list[str] = []
    try:
        return EbpfCapture.open(target, fold=fold), ""
    except BpfUnavailable as exc:
        reasons.append(f"ebpf: {exc}")
    try:
        return NflogCapture.open(target), "; ".join(reasons)
    except NflogUnavailable as exc:
        reasons.append(f"nflog: {exc}")
    why = "; ".join(reasons)
    try:
        return LiveCapture.open(target), why
    except CapabilityError as exc:
        raise CapabilityError(f"{exc} (and {why})") from None


def _offline(options: DiscoverOptions, path: Path) -> Graph:
    addresses = options.service_addresses or _guess_service_addresses(read_pcap(path))
    builder = GraphBuilder(addresses, options.service_label(), max_names=options.max_names)
    dissector = Dissector()
    span: dict[str, float] = {}  # the capture window: first and last packet times

    def timed() -> Iterator[tuple[float, Segment | None]]:
        for t, seg in read_pcap(path):
            span.setdefault("first", t)
            span["last"] = t
            yield t, seg

    packets = _feed(builder, dissector, timed())
    first = datetime.fromtimestamp(span["first"], UTC) if span else utcnow()
    last = datetime.fromtimestamp(span["last"], UTC) if span else first
    stats = CaptureStats(
        started=first,
        ended=last,
        bpf_filter="",
        packets=packets,
        dns_messages=dissector.dns_messages,
        malformed=dissector.malformed,
    )
    graph = builder.build(options.describe(), None, stats)
    return graph.model_copy(update={"inputs": {path.name: sha256_file(path)}})


def _feed(
    builder: GraphBuilder,
    dissector: Dissector,
    packets: Iterable[tuple[float, Segment | None]],
) -> int:
    """Every packet through the dissector into the builder; how many there were."""
    count = 0
    for t, seg in packets:
        count += 1
        if seg is not None:
            builder.add(dissector.event(t, seg))
    return count


def _feed_live(
    builder: GraphBuilder, dissector: Dissector, frames: Iterable[tuple[float, bytes]]
) -> None:
    """Every captured IP packet into the builder, the common shape read inline.

    An IPv4 packet with a plain 20-byte header, not a later fragment, carrying UDP, is
    nearly every DNS message: it becomes its PacketEvent here, exactly as decode_ip and
    Dissector.event would make it (tests/discover/test_discover_run.py holds them equal),
    without the Segment and the calls between. Everything else takes that general path.
    """
    add, event, parse = builder.add, dissector.event, dissector.parser.parse
    new, address, udp_event = tuple.__new__, ipv4_text, PacketEvent
    for t, packet in frames:
        size = len(packet)
        if (
            size >= 28
            and packet[0] == 0x45
            and packet[9] == 17
            and not (packet[6] & 0x1F or packet[7])
        ):
            total = packet[2] << 8 | packet[3]
            end = size if total < 20 or total > size else total
            if end >= 28:
                sport, dport = packet[20] << 8 | packet[21], packet[22] << 8 | packet[23]
                messages: tuple[DnsMessage, ...] = ()
                if (sport == DNS_PORT or dport == DNS_PORT) and end > 28:
                    parsed = parse(packet[28:end])
                    if parsed is not None:
                        messages = (parsed,)
                src, dst = address(packet[12:16]), address(packet[16:20])
                fields = (t, src, dst, sport, dport, "udp", False, messages, False, None)
                add(new(udp_event, fields))
                continue
        seg = decode_ip(packet)
        if seg is not None:
            add(event(t, seg))


def _add_repeat(builder: GraphBuilder, dissector: Dissector, repeat: Repeat) -> None:
    """Exchanges the kernel counted (discover/fold.py): each message read once, its effect
    on the graph and the capture's counts taken `repeat.times` times."""
    parser = dissector.parser
    messages, malformed = parser.messages, parser.malformed
    events = []
    for t, packet in ((repeat.question_time, repeat.question), (repeat.answer_time, repeat.answer)):
        seg = decode_ip(packet)
        assert seg is not None  # fold.question_packet and answer_packet make them whole
        events.append(dissector.event(t, seg))
    parser.messages += (parser.messages - messages) * (repeat.times - 1)
    parser.malformed += (parser.malformed - malformed) * (repeat.times - 1)
    builder.add_repeats(events[0], events[1], repeat.times)


def _guess_service_addresses(packets: Iterable[tuple[float, Segment | None]]) -> list[str]:
    """Who sends DNS queries is the service; a forwarding resolver both asks and is asked."""
    asking: set[str] = set()
    asked: set[str] = set()
    connecting: set[str] = set()
    for _, seg in packets:
        if seg is None:
            continue
        if seg.dport == DNS_PORT and seg.sport != DNS_PORT:
            asking.add(seg.src)
            asked.add(seg.dst)
        elif seg.syn:
            connecting.add(seg.src)
    return sorted((asking - asked) or asking or connecting)


# -- merging (--append) ------------------------------------------------------------------


def merge(old: Graph, new: Graph) -> Graph:
    """`new` folded into `old`: counts add, first/last seen widen, sets unite."""
    nodes: dict[str, Node] = {n.id: n for n in old.nodes}
    for node in new.nodes:
        before = nodes.get(node.id)
        if isinstance(node, EndpointNode) and isinstance(before, EndpointNode) and not node.tls:
            node = node.model_copy(update={"tls": before.tls})
        nodes[node.id] = node
    edges: dict[tuple[str, str, str], Edge] = {(e.source, e.target, e.kind): e for e in old.links}
    for edge in new.links:
        key = (edge.source, edge.target, edge.kind)
        before_edge = edges.get(key)
        edges[key] = edge if before_edge is None else _merge_edge(before_edge, edge)
    links = sorted(edges.values(), key=lambda e: (e.source, e.target, e.kind))
    capture = CaptureStats(
        started=min(old.capture.started, new.capture.started),
        ended=max(old.capture.ended, new.capture.ended),
        interfaces=sorted(set(old.capture.interfaces) | set(new.capture.interfaces)),
        # How packets came in: the latest capture's way (the daemon's captures share one).
        tap=new.capture.tap or old.capture.tap,
        tap_fallback=new.capture.tap_fallback if new.capture.tap else old.capture.tap_fallback,
        bpf_filter=new.capture.bpf_filter or old.capture.bpf_filter,
        nft_ruleset=new.capture.nft_ruleset or old.capture.nft_ruleset,
        ebpf_program=new.capture.ebpf_program or old.capture.ebpf_program,
        packets=old.capture.packets + new.capture.packets,
        dns_messages=old.capture.dns_messages + new.capture.dns_messages,
        dns_folded=old.capture.dns_folded + new.capture.dns_folded,
        malformed=old.capture.malformed + new.capture.malformed,
        kernel_drops=old.capture.kernel_drops + new.capture.kernel_drops,
        flows=old.capture.flows + new.capture.flows,
    )
    return new.model_copy(
        update={
            "created": utcnow(),
            "inputs": {**old.inputs, **new.inputs},
            "capture": capture,
            "nodes": sorted(nodes.values(), key=lambda n: n.id),
            "links": links,
            "blind_spots": _merge_blind_spots(old, new, list(nodes.values()), links),
        }
    )


def _merge_edge(old: Edge, new: Edge) -> Edge:
    if isinstance(new, NamesEdge) and isinstance(old, NamesEdge):
        return new if new.via == "sni" else old
    if not (isinstance(new, Seen) and isinstance(old, Seen)):
        return new  # CNAME and answer edges: the newer TTL
    update: dict[str, Any] = {
        "count": old.count + new.count,
        "first_seen": _pick(min, old.first_seen, new.first_seen),
        "last_seen": _pick(max, old.last_seen, new.last_seen),
    }
    if isinstance(new, ResolvedEdge) and isinstance(old, ResolvedEdge):
        rcodes = dict(old.rcodes)
        for code, n in new.rcodes.items():
            rcodes[code] = rcodes.get(code, 0) + n
        update |= {
            "qtypes": sorted(set(old.qtypes) | set(new.qtypes)),
            "rcodes": dict(sorted(rcodes.items())),
            "unanswered": old.unanswered + new.unanswered,
            "truncated": old.truncated + new.truncated,
            "expansions": sorted(set(old.expansions) | set(new.expansions))[:EXAMPLES],
            "expansion_queries": old.expansion_queries + new.expansion_queries,
        }
    if isinstance(new, QueriesEdge) and isinstance(old, QueriesEdge):
        tcp = old.tcp_queries + new.tcp_queries
        update |= {"tcp_queries": tcp, "transport": "tcp" if tcp == update["count"] else "udp"}
    return new.model_copy(update=update)


def _pick(choose: Any, a: datetime | None, b: datetime | None) -> datetime | None:
    present = [t for t in (a, b) if t is not None]
    return choose(present) if present else None


def _merge_blind_spots(
    old: Graph, new: Graph, nodes: list[Node], links: list[Edge]
) -> list[BlindSpot]:
    spots: dict[BlindSpotCode, BlindSpot] = {}
    for spot in [*old.blind_spots, *new.blind_spots]:
        if spot.code == BlindSpotCode.UNNAMED_FLOWS:
            continue  # recounted below: a later capture may have named an endpoint
        before = spots.get(spot.code)
        count = spot.count + (before.count if before else 0)
        examples = sorted(set(spot.examples) | set(before.examples if before else []))
        spots[spot.code] = BlindSpot(
            code=spot.code,
            message=describe(spot.code, count),
            count=count,
            examples=examples[:EXAMPLES],
        )
    named = {e.source for e in links if isinstance(e, NamesEdge)}
    unnamed = sorted(
        f"{n.address}:{n.port}/{n.proto}"
        for n in nodes
        if isinstance(n, EndpointNode) and n.id not in named
    )
    if unnamed:
        code = BlindSpotCode.UNNAMED_FLOWS
        spots[code] = BlindSpot(
            code=code,
            message=describe(code, len(unnamed)),
            count=len(unnamed),
            examples=unnamed[:EXAMPLES],
        )
    return sorted(spots.values(), key=lambda s: s.code)
