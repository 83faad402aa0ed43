"""The DNS parser and the TCP stream reassembler against well-formed, broken and hostile input."""

from __future__ import annotations

import random
import struct

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
from hypothesis import given, settings
from hypothesis import strategies as st

from depdrill.discover.correlate import GraphBuilder
from depdrill.discover.dissect import Dissector
from depdrill.discover.dns import DnsParser, Record, TcpDnsStream
from depdrill.discover.model import CaptureStats
from depdrill.discover.packets import Segment


def _response() -> bytes:
    query = dns.message.make_query("WWW.Example.TEST", "A", id=4242)
    response = dns.message.make_response(query)
    response.answer.append(
        dns.rrset.from_text("www.example.test.", 300, "IN", "CNAME", "edge.example.test.")
    )
    response.answer.append(
        dns.rrset.from_text("edge.example.test.", 60, "IN", "A", "198.19.1.2", "198.19.1.3")
    )
    response.answer.append(dns.rrset.from_text("edge.example.test.", 60, "IN", "TXT", '"x"'))
    return response.to_wire()


RESPONSE = _response()  # an rrset is a set: one wire form for the whole module


def test_a_response_yields_question_rcode_and_followed_answers() -> None:
    # Given a real response with a CNAME, two A records and a TXT record
    parser = DnsParser()
    # When it is parsed
    msg = parser.parse(RESPONSE)
    # Then the question is lower-cased, and CNAME and A answers are kept (TXT is not followed)
    assert msg is not None and msg.response and msg.rcode == "NOERROR"
    assert (msg.qname, msg.qtype) == ("www.example.test", "A")
    assert msg.answers[0] == Record("www.example.test", "CNAME", 300, "edge.example.test")
    assert sorted(msg.answers[1:], key=lambda r: r.value) == [
        Record("edge.example.test", "A", 60, "198.19.1.2"),
        Record("edge.example.test", "A", 60, "198.19.1.3"),
    ]
    assert parser.messages == 1 and parser.malformed == 0


def test_rcodes_truncation_and_aaaa_are_reported() -> None:
    # Given an NXDOMAIN, a truncated response and an AAAA answer
    query = dns.message.make_query("nope.test", "AAAA")
    nx = dns.message.make_response(query)
    nx.set_rcode(dns.rcode.NXDOMAIN)
    tc = dns.message.make_response(query)
    tc.flags |= dns.flags.TC
    six = dns.message.make_response(query)
    six.answer.append(dns.rrset.from_text("nope.test.", 5, "IN", "AAAA", "::ffff:198.19.1.9"))
    parser = DnsParser()
    # When each is parsed, Then each says what it is
    assert (m := parser.parse(nx.to_wire())) is not None and m.rcode == "NXDOMAIN"
    assert (m := parser.parse(tc.to_wire())) is not None and m.truncated
    assert (m := parser.parse(six.to_wire())) is not None
    assert m.answers == (Record("nope.test", "AAAA", 5, "::ffff:198.19.1.9"),)


def test_identical_messages_with_new_ids_keep_their_own_id() -> None:
    # Given the same question asked twice with different IDs (the parse cache's case)
    wire = bytearray(dns.message.make_query("api.test", "A").to_wire())
    parser = DnsParser()
    ids = []
    for msg_id in (1, 2, 1):
        wire[:2] = msg_id.to_bytes(2, "big")
        parsed = parser.parse(bytes(wire))
        assert parsed is not None
        ids.append(parsed.id)
    # Then each parse reports its own ID
    assert ids == [1, 2, 1]


def test_compression_pointer_loops_are_counted_not_followed() -> None:
    # Given a question whose name is a pointer to itself, and two pointers to each other
    header = struct.pack("!6H", 0x1234, 0x0100, 1, 0, 0, 0)
    self_loop = header + b"\xc0\x0c" + b"\x00\x01\x00\x01"
    pair_loop = header + b"\x01a\xc0\x0e" + b"\xc0\x0c" + b"\x00\x01\x00\x01"
    parser = DnsParser()
    # When they are parsed, Then both are malformed and nothing raised
    assert parser.parse(self_loop) is None
    assert parser.parse(pair_loop) is None
    assert parser.malformed == 2


def test_every_truncation_of_a_response_is_survived() -> None:
    # Given a real response cut at every length
    wire = RESPONSE
    parser = DnsParser()
    # When each prefix is parsed
    results = [parser.parse(wire[:n]) for n in range(len(wire) + 1)]
    # Then only the whole message parses with all answers, and every shorter one is counted
    assert results[-1] is not None and len(results[-1].answers) == 3
    assert parser.malformed + parser.messages == len(wire) + 1
    assert parser.malformed >= len(wire) - 40


def test_oversized_and_garbage_messages_are_counted() -> None:
    # Given a header announcing 65535 answers followed by 64 KiB of noise, and pure noise
    rng = random.Random(7)
    huge = struct.pack("!6H", 1, 0x8180, 1, 65535, 0, 0) + rng.randbytes(65000)
    parser = DnsParser()
    # When parsed, Then each is refused and counted
    assert parser.parse(huge) is None
    assert parser.parse(b"\x00" * 5) is None
    assert parser.malformed == 2


def test_names_are_kept_as_received_with_odd_bytes_escaped() -> None:
    # Given a query for a name with a dot inside a label, a NUL byte and UTF-8 (not IDNA) bytes
    header = struct.pack("!6H", 9, 0x0100, 1, 0, 0, 0)
    name = b"\x03a.b\x04c\x00d\xc3\x03\xc3\xa9x\x04TEST\x00"
    parser = DnsParser()
    # When parsed
    msg = parser.parse(header + name + b"\x00\x01\x00\x01")
    # Then the name keeps every byte, escaped in presentation form and lower-cased
    assert msg is not None
    assert msg.qname == "a\\.b.c\\000d\\195.\\195\\169x.test"


@given(st.binary(max_size=600))
@settings(max_examples=300, deadline=None)
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    # Given any bytes, When parsed as UDP DNS and as a TCP stream, Then nothing raises
    parser = DnsParser()
    parser.parse(data)
    assert parser.messages + parser.malformed == 1
    stream = TcpDnsStream()
    for wire in stream.feed(0, data):
        parser.parse(wire)


def _framed(*wires: bytes) -> bytes:
    return b"".join(len(w).to_bytes(2, "big") + w for w in wires)


def test_tcp_segment_with_several_messages_yields_them_all() -> None:
    # Given two queries and a response in one TCP segment
    q1 = dns.message.make_query("a.test", "A").to_wire()
    q2 = dns.message.make_query("b.test", "AAAA").to_wire()
    stream = TcpDnsStream(next_seq=1000)
    # When fed, Then all three come out, in order
    assert stream.feed(1000, _framed(q1, q2, RESPONSE)) == [q1, q2, RESPONSE]


def test_tcp_message_split_across_segments_and_retransmitted_is_rebuilt_once() -> None:
    # Given a response split in three segments, the middle one retransmitted (with overlap)
    data = _framed(RESPONSE)
    a, b, c = data[:1], data[1:30], data[30:]
    stream = TcpDnsStream(next_seq=0)
    # When fed in order with the retransmission
    out = stream.feed(0, a) + stream.feed(1, b) + stream.feed(1, b) + stream.feed(20, data[20:])
    # Then the message comes out exactly once, and the overlap is not duplicated
    assert out == [RESPONSE] and stream.gaps == 0
    assert stream.feed(30, c) == [] and stream.buffer == bytearray()  # old data again: nothing


def test_tcp_gap_drops_the_partial_message_and_resynchronises() -> None:
    # Given the first half of a message, then a lost segment, then a whole new message
    first = _framed(RESPONSE)
    second = _framed(dns.message.make_query("c.test", "A").to_wire())
    stream = TcpDnsStream(next_seq=0)
    assert stream.feed(0, first[:10]) == []
    # When the next segment arrives after a gap
    out = stream.feed(len(first) + 100, second)
    # Then the gap is counted and the new message still parses
    assert stream.gaps == 1
    assert out == [second[2:]]


def test_a_hundred_thousand_mutated_messages_through_parser_and_builder() -> None:
    # Given real queries and responses, mutated (bytes flipped, cut, spliced) 100 000 times
    seeds = [dns.message.make_query("api.x.test", "A").to_wire(), RESPONSE]
    rng = random.Random(1)
    dissector = Dissector()
    builder = GraphBuilder(["198.19.0.10"], "svc", max_names=500)
    fed = 0
    for i in range(100_000):
        wire = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            op, at = rng.random(), rng.randrange(len(wire) + 1)
            if op < 0.6 and at < len(wire):
                wire[at] = rng.randrange(256)
            elif op < 0.8:
                del wire[at:]
            else:
                wire[at:at] = rng.randbytes(rng.randint(1, 8))
        if i % 2:
            seg = Segment("198.19.0.53", "198.19.0.10", 53, 40000, "udp", bytes(wire))
        else:
            seg = Segment("198.19.0.10", "198.19.0.53", 40000, 53, "udp", bytes(wire))
        # When each goes through the dissector and the graph builder
        fed += bool(wire)
        builder.add(dissector.event(i / 1000, seg))
    # Then every message was either parsed or counted, and a valid graph comes out
    assert dissector.dns_messages + dissector.malformed == fed > 98_000
    assert dissector.malformed > 1000
    start = CaptureStats.model_validate({"started": 0, "ended": 100})
    graph = builder.build("fuzz", None, start.model_copy(update={"malformed": dissector.malformed}))
    assert len([n for n in graph.nodes if n.kind == "name"]) <= 500 + 50 + 1
    assert graph.model_dump_json()
