"""The DNS fast path against dnspython on generated and mutated messages: never a different answer.

The suite runs 20 000 messages; the full differential run sets DDT_DNS_DIFFERENTIAL:
`DDT_DNS_DIFFERENTIAL=1000000 .venv/bin/python -m pytest -q -p no:cacheprovider
tests/discover/test_discover_fastdns.py` (about a minute per million on one core).
"""

from __future__ import annotations

import os
import random

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from depdrill.discover import fastdns
from depdrill.discover.dns import DnsParser, parse_with_dnspython

COUNT = int(os.environ.get("DDT_DNS_DIFFERENTIAL", "20000"))
BASE_MESSAGES = 1500
QTYPES = ["A", "AAAA", "CNAME", "SRV", "HTTPS", "MX", "TXT", "PTR", "NS", "SOA", "ANY", "CAA",
          "SVCB", "NULL", "TYPE65280", "OPT"]  # fmt: skip
RCODES = [0, 0, 0, 3, 3, 2, 5, 1, 4, 9, 16, 23]


def _label(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.75:
        return bytes(rng.choice(b"abcdefxyzABCXYZ0123456789-_") for _ in range(rng.randint(1, 12)))
    if roll < 0.9:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    return bytes(rng.choice(b'.\\"()@$; *') for _ in range(rng.randint(1, 4)))


def _name(rng: random.Random, pool: list[dns.name.Name]) -> dns.name.Name:
    if pool and rng.random() < 0.4:  # shared suffixes and repeats: compression pointers
        base = rng.choice(pool)
        if rng.random() < 0.5:
            return base
        try:
            return dns.name.Name([_label(rng), *base.labels])
        except dns.name.NameTooLong:
            return base
    labels = [_label(rng) for _ in range(rng.randint(0, 4))]
    if rng.random() < 0.03:
        labels = [b"x" * 63] * 3 + [b"y" * rng.randint(55, 61)]  # near the 255 limit
    name = dns.name.Name([*labels, b""])
    pool.append(name)
    return name


def _rdata(rng: random.Random, rdtype: str, pool: list[dns.name.Name]) -> dns.rdata.Rdata:
    if rdtype == "A":
        text = ".".join(str(rng.randrange(256)) for _ in range(4))
    elif rdtype == "AAAA":
        groups = [rng.choice([0, 0, 0, rng.randrange(65536)]) for _ in range(8)]
        text = ":".join(f"{g:x}" for g in groups)
        if rng.random() < 0.2:
            text = f"::ffff:{rng.randrange(256)}.1.2.{rng.randrange(256)}"
    elif rdtype in ("CNAME", "NS", "PTR"):
        text = _name(rng, pool).to_text()
    elif rdtype == "MX":
        text = f"{rng.randrange(100)} {_name(rng, pool).to_text()}"
    elif rdtype == "TXT":
        text = '"v=spf1 -all" "x"'
    elif rdtype == "SOA":
        text = f"{_name(rng, pool)} {_name(rng, pool)} {rng.randrange(2**32)} 7200 900 1209600 60"
    else:
        text = f"0 0 {rng.randrange(65536)} {_name(rng, pool)}"  # SRV
    return dns.rdata.from_text(dns.rdataclass.IN, rdtype, text)


def _message(rng: random.Random) -> bytes:
    pool: list[dns.name.Name] = []
    qname = _name(rng, pool)
    qtype = rng.choice(QTYPES)
    edns = rng.choice([-1, -1, 0, 0])
    options = [dns.edns.GenericOption(65001, b"ab")] if edns == 0 and rng.random() < 0.3 else []
    try:
        query = dns.message.make_query(qname, qtype, use_edns=edns, options=options)
    except Exception:
        query = dns.message.make_query(qname, "A", use_edns=edns)
    query.id = rng.randrange(65536)
    if rng.random() < 0.3:
        return query.to_wire()
    message = dns.message.make_response(query)
    rcode = rng.choice(RCODES)
    if rcode > 15 and edns < 0:
        rcode = 3
    message.set_rcode(dns.rcode.Rcode.make(rcode))
    if rng.random() < 0.1:
        message.flags |= dns.flags.TC
    if rng.random() < 0.03:
        message.set_opcode(dns.opcode.NOTIFY)
    owner = qname
    for _ in range(rng.choice([0, 1, 1, 2, 2, 3, 5])):
        rdtype = rng.choice(["A"] * 6 + ["AAAA"] * 3 + ["CNAME"] * 3 + ["MX", "TXT", "SRV"])
        if rng.random() < 0.3:
            owner = _name(rng, pool)
        ttl = rng.choice([0, 60, 300, rng.randrange(2**32)])
        message.answer.append(dns.rrset.from_rdata(owner, ttl, _rdata(rng, rdtype, pool)))
    for _ in range(rng.choice([0, 0, 1, 2])):
        rdtype = rng.choice(["SOA", "NS", "NS", "A"])
        rrset = dns.rrset.from_rdata(_name(rng, pool), 3600, _rdata(rng, rdtype, pool))
        message.authority.append(rrset)
    for _ in range(rng.choice([0, 0, 1])):
        rdtype = rng.choice(["A", "AAAA", "TXT"])
        rrset = dns.rrset.from_rdata(_name(rng, pool), 60, _rdata(rng, rdtype, pool))
        message.additional.append(rrset)
    return message.to_wire()


def _mutate(rng: random.Random, wire: bytes) -> bytes:
    data = bytearray(wire)
    for _ in range(rng.randint(1, 3)):
        roll = rng.random()
        at = rng.randrange(len(data)) if data else 0
        if roll < 0.3 and data:
            data[at] = rng.randrange(256)
        elif roll < 0.45:
            del data[at:]
        elif roll < 0.6 and len(data) > 1:
            data[at : at + 2] = bytes([0xC0 | rng.randrange(4), rng.randrange(256)])
        elif roll < 0.75 and len(data) >= 12:
            count = 4 + 2 * rng.randrange(4)
            data[count : count + 2] = rng.randrange(4).to_bytes(2, "big")
        elif roll < 0.85:
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        else:
            data += data[12:][: rng.randint(0, 60)]
    return bytes(data)


def test_fast_path_agrees_with_dnspython_on_generated_and_mutated_messages() -> None:
    # Given messages built by dnspython (compressed names, odd bytes, EDNS, CNAME sets,
    # authority and additional records, extended rcodes) and mutated copies of them
    rng = random.Random(20261127)
    base = [_message(rng) for _ in range(BASE_MESSAGES)]
    checked = handled = handled_base = 0
    disagreements: list[str] = []
    while checked < COUNT:
        wire = base[checked % len(base)] if checked < len(base) else _mutate(rng, rng.choice(base))
        # When both read it
        fast = fastdns.parse(wire)
        # Then the fast path either hands it over or says exactly what dnspython says
        if fast is not None:
            handled += 1
            handled_base += checked < len(base)
            expected = parse_with_dnspython(wire)
            if fast != expected and len(disagreements) < 5:
                disagreements.append(f"{wire.hex()}: fast {fast} != dnspython {expected}")
        checked += 1
    assert disagreements == []
    # And it handles most well-formed messages itself, and a fair share of mutated ones
    assert handled_base > 0.4 * len(base), (handled_base, len(base))
    assert handled > 0.1 * COUNT, (handled, COUNT)


def test_a_compression_loop_and_a_forward_pointer_are_left_to_dnspython() -> None:
    # Given a question whose name points at itself, and one that points forward
    header = bytes.fromhex("abcd01000001000000000000")
    loop = header + b"\xc0\x0c\x00\x01\x00\x01"
    forward = header + b"\xc0\x20\x00\x01\x00\x01" + b"\x00" * 30
    # When read, Then the fast path declines both and the parser counts them malformed
    assert fastdns.parse(loop) is None and fastdns.parse(forward) is None
    parser = DnsParser()
    assert parser.parse(loop) is None and parser.parse(forward) is None
    assert parser.malformed == 2


def test_a_typical_answer_is_read_by_the_fast_path() -> None:
    # Given a response with a CNAME, two A records and an EDNS record
    query = dns.message.make_query("WWW.Example.test", "A", use_edns=0)
    query.id = 4242
    response = dns.message.make_response(query)
    response.answer.append(
        dns.rrset.from_text("www.example.test.", 30, "IN", "CNAME", "edge.test.")
    )
    response.answer.append(
        dns.rrset.from_text("edge.test.", 20, "IN", "A", "198.19.1.1", "198.19.1.2")
    )
    wire = response.to_wire()
    # When read, Then the fast path gives names, answers and rcode as dnspython does
    fast = fastdns.parse(wire)
    assert fast is not None and fast == parse_with_dnspython(wire)
    assert fast.qname == "www.example.test" and fast.rcode == "NOERROR" and fast.id == 4242
    assert sorted((r.owner, r.rtype, r.value) for r in fast.answers) == [
        ("edge.test", "A", "198.19.1.1"),
        ("edge.test", "A", "198.19.1.2"),
        ("www.example.test", "CNAME", "edge.test"),
    ]
