"""The header decoder against packets built by scapy: link types, IPv6 extensions, fragments."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.layers.l2 import CookedLinux, CookedLinuxV2, Dot1Q, Ether

from depdrill.discover.packets import (
    LINKTYPE_ETHERNET,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_RAW,
    Segment,
    decode_frame,
    decode_ip,
)

V6_SRC, V6_DST = "::ffff:198.19.1.10", "::ffff:198.19.1.53"


def test_ipv4_udp_and_tcp_syn() -> None:
    # Given an IPv4 UDP datagram and a TCP SYN
    udp = bytes(IP(src="198.19.1.10", dst="198.19.1.53") / UDP(sport=5353, dport=53) / b"hi")
    syn = bytes(IP(src="198.19.1.10", dst="198.19.1.20") / TCP(sport=4000, dport=443, seq=7))
    # Then both decode with addresses, ports, payload and flags
    assert decode_ip(udp) == Segment("198.19.1.10", "198.19.1.53", 5353, 53, "udp", b"hi")
    seg = decode_ip(syn)
    assert seg is not None and seg.syn and seg.seq == 7 and seg.dport == 443


def test_a_syn_ack_is_not_a_connection_attempt() -> None:
    synack = bytes(IP(src="198.19.1.20", dst="198.19.1.10") / TCP(flags="SA"))
    seg = decode_ip(synack)
    assert seg is not None and not seg.syn


def test_ipv6_with_extension_headers_reaches_the_transport() -> None:
    # Given IPv6 with hop-by-hop and destination options, then TCP with a payload
    pkt = IPv6(src=V6_SRC, dst=V6_DST) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
    pkt = pkt / TCP(sport=1, dport=53, flags="PA") / b"\x00\x02ab"
    # Then the segment is found behind the extensions
    seg = decode_ip(bytes(pkt))
    assert seg is not None and (seg.src, seg.dport, seg.payload) == (V6_SRC, 53, b"\x00\x02ab")


def test_only_first_fragments_carry_ports() -> None:
    # Given the first and a later fragment of an IPv4 and an IPv6 datagram
    first4 = IP(src="198.19.1.1", dst="198.19.1.2", flags="MF") / UDP(dport=53) / b"x"
    later4 = IP(src="198.19.1.1", dst="198.19.1.2", frag=10, proto=17) / b"tail"
    later6 = IPv6(src=V6_SRC, dst=V6_DST) / IPv6ExtHdrFragment(offset=5, nh=17) / b"tail"
    # Then the first decodes, the later ones (no transport header) do not
    assert decode_ip(bytes(first4)) is not None
    assert decode_ip(bytes(later4)) is None
    assert decode_ip(bytes(later6)) is None


def test_link_types_ethernet_vlan_sll_sll2_raw() -> None:
    # Given the same datagram framed by each link layer
    ip = IP(src="198.19.1.10", dst="198.19.1.53") / UDP(sport=1, dport=53) / b"q"
    frames = {
        LINKTYPE_ETHERNET: bytes(Ether() / ip),
        LINKTYPE_LINUX_SLL: bytes(CookedLinux(proto=0x0800) / ip),
        LINKTYPE_LINUX_SLL2: bytes(CookedLinuxV2(proto=0x0800) / ip),
        LINKTYPE_RAW: bytes(ip),
    }
    vlan = bytes(Ether() / Dot1Q(vlan=5) / ip)
    # Then each decodes to the same segment
    expected = decode_ip(bytes(ip))
    assert expected is not None
    for linktype, frame in frames.items():
        assert decode_frame(frame, linktype) == expected, linktype
    assert decode_frame(vlan, LINKTYPE_ETHERNET) == expected


def test_ethernet_padding_does_not_leak_into_the_payload() -> None:
    # Given a short frame padded to Ethernet's minimum
    frame = bytes(Ether() / IP(src="198.19.1.1", dst="198.19.1.2") / UDP() / b"ab") + b"\0" * 10
    # Then the payload ends where IP's total length says
    seg = decode_frame(frame, LINKTYPE_ETHERNET)
    assert seg is not None and seg.payload == b"ab"


@given(st.binary(max_size=200), st.sampled_from([0, 1, 12, 101, 113, 228, 229, 276, 9999]))
@settings(max_examples=400, deadline=None)
def test_arbitrary_frames_never_raise(frame: bytes, linktype: int) -> None:
    # Given any bytes of any link type, When decoded, Then a segment or None comes back
    result = decode_frame(frame, linktype)
    assert result is None or result.proto in ("tcp", "udp")
