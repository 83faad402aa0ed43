"""A fast path for the DNS messages services send most; anything else goes to dnspython.

It reads plain QUERY-opcode messages with at most one question of a common type, answers
of A, AAAA and CNAME, authority of SOA and NS, additional of A, AAAA and an empty OPT, all
class IN, and returns exactly what dnspython's parse would summarise to, or None ("not
understood: ask dnspython"), including on every error: dnspython alone decides what is
malformed. Its rules mirror dnspython 2.9's wire reader (names: backward pointers only, at
most 16 hops, a pointer's target ending before the name that points at it; rdata read
exactly to its length; TTLs above 2^31-1 read as 0; one CNAME per owner, the last one;
duplicate records once; the smallest TTL of an RRset). tests/discover/test_discover_fastdns.py
checks it against dnspython on generated and mutated messages.
"""

from __future__ import annotations

import struct
from typing import Final

import dns.ipv6
import dns.rcode
import dns.rdatatype

from depdrill.discover.dns import DnsMessage, Record

_HEADER: Final = struct.Struct("!HHHHHH")
_QUESTION: Final = struct.Struct("!HH")
_RR: Final = struct.Struct("!HHIH")
_IN: Final = 1
_A, _NS, _CNAME, _SOA, _AAAA, _OPT = 1, 2, 5, 6, 28, 41
_ANSWER, _AUTHORITY, _ADDITIONAL = 1, 2, 3
_MAX_HOPS: Final = 16
_MAX_NAME: Final = 255
_ESCAPED: Final = b'"().;\\@$'
_PLAIN: Final = bytes(c for c in range(0x21, 0x7F) if c not in _ESCAPED)
_PLAIN_OR_DOT: Final = _PLAIN + b"."
_QTYPES: Final = {
    t: dns.rdatatype.to_text(dns.rdatatype.RdataType.make(t))
    for t in (1, 2, 5, 6, 12, 15, 16, 28, 33, 43, 48, 64, 65, 99, 255, 257)
}
_RCODES: Final = [dns.rcode.to_text(dns.rcode.Rcode.make(v)) for v in range(4096)]
_ALLOWED: Final = {
    _ANSWER: frozenset({_A, _AAAA, _CNAME}),
    _AUTHORITY: frozenset({_SOA, _NS}),
    _ADDITIONAL: frozenset({_A, _AAAA}),
}


def _labels(wire: bytes, pos: int, end: int) -> tuple[list[bytes], int] | None:
    """The labels of the name at pos (end: where the enclosing read must stop) and where
    the reader continues, or None for anything dnspython would refuse."""
    labels: list[bytes] = []
    biggest = start = pos
    after = -1  # where the reader continues: after the first pointer, if there is one
    hops = 0
    total = 1
    while True:
        if pos >= end:
            return None
        count = wire[pos]
        pos += 1
        if count == 0:
            break
        if count < 64:
            if pos + count > end:
                return None
            labels.append(wire[pos : pos + count])
            pos += count
            total += count + 1
        elif count >= 192:
            if pos >= end:
                return None
            pointer = (count & 0x3F) << 8 | wire[pos]
            pos += 1
            if pointer >= biggest:
                return None
            hops += 1
            if hops > _MAX_HOPS or start > end:
                return None
            if after < 0:
                after = pos
            end = start  # the target must end before this part of the name begins
            biggest = start = pos = pointer
        else:
            return None
    if total > _MAX_NAME:
        return None
    return labels, pos if after < 0 else after


def _text(labels: list[bytes]) -> str:
    """As dnspython's to_text(omit_final_dot=True), lower-cased."""
    if not labels:
        return "."
    joined = b".".join(labels)
    # No byte to escape, and the only dots the ones joining labels: the text is the bytes.
    if not joined.translate(None, _PLAIN_OR_DOT) and joined.count(46) == len(labels) - 1:
        return joined.lower().decode("ascii")
    return ".".join(_label_text(label) for label in labels).lower()


def _label_text(label: bytes) -> str:
    if not label.translate(None, _PLAIN):
        return label.decode("ascii")
    return "".join(
        "\\" + chr(c) if c in _ESCAPED else chr(c) if 0x20 < c < 0x7F else f"\\{c:03d}"
        for c in label
    )


def parse(wire: bytes) -> DnsMessage | None:
    """The summary dnspython would give, or None when this path does not handle the message."""
    size = len(wire)
    if size < 12:
        return None
    msg_id, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(wire)
    if flags & 0x7800 or qdcount > 1:  # not opcode QUERY, or several questions
        return None
    pos = 12
    qname = qtype = None
    if qdcount:
        name = _labels(wire, pos, size)
        if name is None or name[1] + 4 > size:
            return None
        rdtype, rdclass = _QUESTION.unpack_from(wire, name[1])
        qtype = _QTYPES.get(rdtype)
        if rdclass != _IN or qtype is None:
            return None
        qname, pos = _text(name[0]), name[1] + 4
    if not (ancount or nscount or arcount):  # a query, or an answer with no records at all
        return tuple.__new__(
            DnsMessage,
            (msg_id, flags & 0x8000 != 0, _RCODES[flags & 0x000F], flags & 0x0200 != 0, qname,
             qtype, ()),
        )  # fmt: skip
    # (owner lower-cased, type) -> [owner text, ttl, {value key: value text}], in first-seen order
    rrsets: dict[tuple[tuple[bytes, ...], int], list[object]] = {}
    ednsflags = 0
    have_opt = False
    for section, count in ((_ANSWER, ancount), (_AUTHORITY, nscount), (_ADDITIONAL, arcount)):
        allowed = _ALLOWED[section]
        for _ in range(count):
            owner = _labels(wire, pos, size)
            if owner is None or owner[1] + 10 > size:
                return None
            rdtype, rdclass, ttl, rdlen = _RR.unpack_from(wire, owner[1])
            pos = owner[1] + 10
            end = pos + rdlen
            if end > size:
                return None
            if rdtype == _OPT:
                if section != _ADDITIONAL or have_opt or owner[0] or rdlen:
                    return None
                have_opt, ednsflags, pos = True, ttl, end
                continue
            if rdclass != _IN or rdtype not in allowed:
                return None
            value: str | None = None
            key: object = None
            if rdtype == _A:
                if rdlen != 4:
                    return None
                value = key = f"{wire[pos]}.{wire[pos + 1]}.{wire[pos + 2]}.{wire[pos + 3]}"
            elif rdtype == _AAAA:
                if rdlen != 16:
                    return None
                key = wire[pos:end]
                value = dns.ipv6.inet_ntoa(key)
            elif rdtype in (_CNAME, _NS):
                target = _labels(wire, pos, end)
                if target is None or target[1] != end:
                    return None
                key = tuple(label.lower() for label in target[0])
                value = _text(target[0])
            else:  # SOA: two names and five 32-bit numbers, exactly
                mname = _labels(wire, pos, end)
                rname = _labels(wire, mname[1], end) if mname is not None else None
                if rname is None or rname[1] + 20 != end:
                    return None
            pos = end
            if section != _ANSWER:
                continue
            ttl = 0 if ttl > 0x7FFFFFFF else ttl
            owner_key = (tuple(label.lower() for label in owner[0]), rdtype)
            rrset = rrsets.get(owner_key)
            if rrset is None:
                rrsets[owner_key] = [_text(owner[0]), ttl, {key: value}]
                continue
            values: dict[object, str | None] = rrset[2]  # type: ignore[assignment]
            rrset[1] = min(rrset[1], ttl)  # type: ignore[call-overload]
            if rdtype == _CNAME:  # a singleton type: the last one replaces the others
                values.clear()
            values.setdefault(key, value)
    answers = (
        tuple(
            Record(rrset[0], _FOLLOWED[rdtype], rrset[1], value)  # type: ignore[arg-type]
            for (_, rdtype), rrset in rrsets.items()
            for value in rrset[2].values()  # type: ignore[attr-defined]
        )
        if rrsets
        else ()
    )
    # tuple.__new__: the NamedTuple's own constructor is a Python function, a third of the cost
    return tuple.__new__(
        DnsMessage,
        (
            msg_id,
            flags & 0x8000 != 0,
            _RCODES[(flags & 0x000F) | ((ednsflags >> 20) & 0xFF0)],
            flags & 0x0200 != 0,
            qname,
            qtype,
            answers,
        ),
    )


_FOLLOWED: Final = {_A: "A", _AAAA: "AAAA", _CNAME: "CNAME"}
