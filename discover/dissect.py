"""Turn decoded segments into packet events: DNS messages (UDP and TCP streams) and TLS SNI."""

from __future__ import annotations

from collections import OrderedDict
from typing import Final, NamedTuple

from depdrill.discover.dns import DnsMessage, DnsParser, TcpDnsStream
from depdrill.discover.model import Proto
from depdrill.discover.packets import TCP_FIN, TCP_RST, Segment
from depdrill.discover.sni import is_client_hello, server_name

DNS_PORT: Final = 53
_MAX_TCP_STREAMS: Final = 1024  # each may hold up to 64 KiB of a partial message


class PacketEvent(NamedTuple):
    """What one packet tells discovery: who talked to whom, and any DNS or TLS name in it."""

    time: float
    src: str
    dst: str
    sport: int
    dport: int
    proto: Proto
    syn: bool = False
    dns: tuple[DnsMessage, ...] = ()
    client_hello: bool = False
    sni: str | None = None


class Dissector:
    """Stateful: DNS over TCP needs its streams reassembled across segments."""

    def __init__(self) -> None:
        self.parser = DnsParser()
        self._streams: OrderedDict[tuple[str, int, str, int], TcpDnsStream] = OrderedDict()
        self.tcp_gaps = 0

    @property
    def malformed(self) -> int:
        return self.parser.malformed

    @property
    def dns_messages(self) -> int:
        return self.parser.messages

    def event(self, time: float, seg: Segment) -> PacketEvent:
        dns_port = DNS_PORT in (seg.sport, seg.dport)
        messages: tuple[DnsMessage, ...] = ()
        client_hello, sni = False, None
        if seg.proto == "udp":
            if dns_port and seg.payload:
                parsed = self.parser.parse(seg.payload)
                messages = (parsed,) if parsed is not None else ()
        elif dns_port:
            messages = self._tcp_dns(seg)
        elif is_client_hello(seg.payload):
            client_hello, sni = True, server_name(seg.payload)
        return PacketEvent(
            time, seg.src, seg.dst, seg.sport, seg.dport, seg.proto, seg.syn, messages,
            client_hello, sni,
        )  # fmt: skip

    def _tcp_dns(self, seg: Segment) -> tuple[DnsMessage, ...]:
        key = (seg.src, seg.sport, seg.dst, seg.dport)
        if seg.syn or (seg.flags & (TCP_FIN | TCP_RST) and not seg.payload):
            self._drop(key)
            if seg.syn:
                self._stream(key, (seg.seq + 1) & 0xFFFFFFFF)
            return ()
        if not seg.payload:
            return ()
        stream = self._streams.get(key) or self._stream(key, None)
        gaps = stream.gaps
        wires = stream.feed(seg.seq, seg.payload)
        self.tcp_gaps += stream.gaps - gaps
        if seg.flags & (TCP_FIN | TCP_RST):
            self._drop(key)
        parsed = (self.parser.parse(wire) for wire in wires)
        return tuple(m for m in parsed if m is not None)

    def _stream(self, key: tuple[str, int, str, int], next_seq: int | None) -> TcpDnsStream:
        if len(self._streams) >= _MAX_TCP_STREAMS:
            self._streams.popitem(last=False)
        stream = self._streams[key] = TcpDnsStream(next_seq)
        return stream

    def _drop(self, key: tuple[str, int, str, int]) -> None:
        self._streams.pop(key, None)
