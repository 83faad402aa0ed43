"""Netlink framing shared by depdrill's two nfnetlink speakers: nf_tables and nfnetlink_queue.

Layouts are the kernel's (linux/netlink.h, linux/netfilter/nfnetlink.h). Standard library
only: the NFQUEUE release process imports this, and it should start fast.
"""

from __future__ import annotations

import socket
import struct
from typing import Final

NETLINK_NETFILTER: Final = 12
NLMSG_ERROR: Final = 2
NLM_F_REQUEST: Final = 0x1
NLM_F_ACK: Final = 0x4
NLMSG: Final = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
NFGEN: Final = struct.Struct("=BBH")  # family, version, resource id (big-endian)
ATTR: Final = struct.Struct("=HH")  # length, type
_ERROR_CODE: Final = struct.Struct("=i")


def attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    length = ATTR.size + len(payload)
    return ATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def nfnl_message(
    subsystem: int, kind: int, family: int, resource: int, flags: int, seq: int, attrs: bytes
) -> bytes:
    """An nfnetlink message: the netlink header, nfgenmsg, then the attributes."""
    body = NFGEN.pack(family, 0, socket.htons(resource)) + attrs
    return NLMSG.pack(NLMSG.size + len(body), subsystem << 8 | kind, flags, seq, 0) + body


def error_code(reply: bytes, offset: int = 0) -> int:
    """The errno an NLMSG_ERROR message at `offset` carries (0: an acknowledgement)."""
    (code,) = _ERROR_CODE.unpack_from(reply, offset + NLMSG.size)
    return -int(code)


def find_attr(data: bytes, start: int, end: int, kind: int) -> bytes | None:
    """The payload of the first attribute of `kind` between `start` and `end`, or None.
    (For cold paths: the per-packet readers walk their attributes inline.)"""
    while start + ATTR.size <= end:
        length, found = ATTR.unpack_from(data, start)
        if length < ATTR.size:
            return None
        if found & 0x3FFF == kind:  # without the nested and byte-order flags
            return data[start + ATTR.size : start + length]
        start += (length + 3) & ~3
    return None
