"""Decode link, IP and transport headers into segments: only what discovery needs, never raising.

A hand-written decoder instead of scapy's dissection: scapy builds a Python object per layer
per packet, which is the difference between thousands and tens of thousands of packets a
second. Anything odd (short headers, non-first fragments, unknown protocols) decodes to None.
"""

from __future__ import annotations

import socket
import struct
from typing import Final, NamedTuple

from depdrill.discover.model import Proto

TCP_FIN: Final = 0x01
TCP_SYN: Final = 0x02
TCP_RST: Final = 0x04
TCP_ACK: Final = 0x10

# pcap link types (https://www.tcpdump.org/linktypes.html)
LINKTYPE_NULL: Final = 0
LINKTYPE_ETHERNET: Final = 1
LINKTYPE_RAW_BSD: Final = 12
LINKTYPE_RAW_OPENBSD: Final = 14
LINKTYPE_RAW: Final = 101
LINKTYPE_LINUX_SLL: Final = 113
LINKTYPE_IPV4: Final = 228
LINKTYPE_IPV6: Final = 229
LINKTYPE_LINUX_SLL2: Final = 276

_ETH_IPV4: Final = 0x0800
_ETH_IPV6: Final = 0x86DD
_ETH_VLANS: Final = (0x8100, 0x88A8, 0x9100)
_IPV6_EXTENSIONS: Final = (0, 43, 60)  # hop-by-hop, routing, destination options
_IPV6_FRAGMENT: Final = 44


class Segment(NamedTuple):
    """One TCP or UDP packet: addresses as text, the transport payload as bytes."""

    src: str
    dst: str
    sport: int
    dport: int
    proto: Proto
    payload: bytes
    flags: int = 0  # TCP flags; 0 for UDP
    seq: int = 0  # TCP sequence number; 0 for UDP

    @property
    def syn(self) -> bool:
        """A connection attempt: SYN without ACK."""
        return self.flags & (TCP_SYN | TCP_ACK) == TCP_SYN


def decode_frame(frame: bytes, linktype: int) -> Segment | None:
    """A captured frame of the given pcap link type to a Segment, or None."""
    try:
        ip = _network_layer(frame, linktype)
        return decode_ip(ip) if ip is not None else None
    except (IndexError, struct.error, ValueError, OSError):
        return None


def _network_layer(frame: bytes, linktype: int) -> bytes | None:
    if linktype in (LINKTYPE_RAW, LINKTYPE_RAW_BSD, LINKTYPE_RAW_OPENBSD):
        return frame
    if linktype in (LINKTYPE_IPV4, LINKTYPE_IPV6):
        return frame
    if linktype == LINKTYPE_ETHERNET:
        offset, ethertype = 14, int.from_bytes(frame[12:14], "big")
        while ethertype in _ETH_VLANS:
            ethertype = int.from_bytes(frame[offset + 2 : offset + 4], "big")
            offset += 4
        return frame[offset:] if ethertype in (_ETH_IPV4, _ETH_IPV6) else None
    if linktype == LINKTYPE_LINUX_SLL:
        ethertype = int.from_bytes(frame[14:16], "big")
        return frame[16:] if ethertype in (_ETH_IPV4, _ETH_IPV6) else None
    if linktype == LINKTYPE_LINUX_SLL2:
        ethertype = int.from_bytes(frame[0:2], "big")
        return frame[20:] if ethertype in (_ETH_IPV4, _ETH_IPV6) else None
    if linktype == LINKTYPE_NULL:
        return frame[4:]
    return None


def decode_ip(packet: bytes) -> Segment | None:
    """An IPv4 or IPv6 packet to a Segment, or None for anything else or anything broken."""
    try:
        if not packet:
            return None
        version = packet[0] >> 4
        if version == 4:
            return _ipv4(packet)
        if version == 6:
            return _ipv6(packet)
    except (IndexError, struct.error, ValueError, OSError):
        pass
    return None


_IPV4_HEADER: Final = struct.Struct("!BxHxxHxB2x4s4s")


def _ipv4(packet: bytes) -> Segment | None:
    first, total, fragment, proto, src, dst = _IPV4_HEADER.unpack_from(packet)
    header_len = (first & 0x0F) * 4
    if header_len < 20 or len(packet) < header_len:
        return None
    if fragment & 0x1FFF:  # not the first fragment: no ports
        return None
    # A capture may pad short frames or offload may leave total 0 (TSO): trust the shorter.
    end = min(len(packet), total) if total >= header_len else len(packet)
    return _transport(proto, ipv4_text(src), ipv4_text(dst), packet[header_len:end])


_ADDRESS_TEXT: dict[bytes, str] = {}
_MAX_ADDRESSES: Final = 65536


def ipv4_text(raw: bytes) -> str:
    """An IPv4 address as text; a service talks to few addresses, so remember them."""
    text = _ADDRESS_TEXT.get(raw)
    if text is None:
        if len(_ADDRESS_TEXT) >= _MAX_ADDRESSES:
            _ADDRESS_TEXT.clear()
        text = _ADDRESS_TEXT[raw] = socket.inet_ntop(socket.AF_INET, raw)
    return text


def _ipv6(packet: bytes) -> Segment | None:
    if len(packet) < 40:
        return None
    payload_len = int.from_bytes(packet[4:6], "big")
    next_header = packet[6]
    end = min(len(packet), 40 + payload_len) if payload_len else len(packet)
    src = socket.inet_ntop(socket.AF_INET6, packet[8:24])
    dst = socket.inet_ntop(socket.AF_INET6, packet[24:40])
    offset = 40
    for _ in range(8):  # a bounded walk: a loop of extension headers is not a packet
        if next_header in _IPV6_EXTENSIONS:
            next_header, offset = packet[offset], offset + (packet[offset + 1] + 1) * 8
        elif next_header == _IPV6_FRAGMENT:
            if int.from_bytes(packet[offset + 2 : offset + 4], "big") & 0xFFF8:
                return None
            next_header, offset = packet[offset], offset + 8
        else:
            break
    if offset > end:
        return None
    return _transport(next_header, src, dst, packet[offset:end])


def _transport(proto: int, src: str, dst: str, data: bytes) -> Segment | None:
    if proto == 17 and len(data) >= 8:
        sport, dport = struct.unpack_from("!HH", data)
        return Segment(src, dst, sport, dport, "udp", bytes(data[8:]))
    if proto == 6 and len(data) >= 20:
        sport, dport, seq = struct.unpack_from("!HHI", data)
        offset = (data[12] >> 4) * 4
        if offset < 20:
            return None
        return Segment(src, dst, sport, dport, "tcp", bytes(data[offset:]), data[13], seq)
    return None
