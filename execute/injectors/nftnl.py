"""nf_tables over raw netlink, for the one rule libnftables cannot write: an xt NFQUEUE target.

nft's own `queue` expression needs CONFIG_NFT_QUEUE, which many kernels (this one included)
leave out, and libnftables cannot express an xtables target at all. nft_compat runs the
xtables NFQUEUE target inside an nf_tables rule, which is what iptables-nft does; this
module sends that rule itself, in one batch, from a netlink socket it keeps open. The table
carries the owner flag, so when the socket closes (this process ending by SIGKILL
included) the kernel removes it, as it does depdrill's other tables.

Layouts are the kernel's (linux/netfilter/nf_tables.h, nfnetlink.h, xt_NFQUEUE.h).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from depdrill.netlink import (
    NETLINK_NETFILTER,
    NLM_F_ACK,
    NLM_F_REQUEST,
    NLMSG,
    NLMSG_ERROR,
    attr,
    error_code,
    nfnl_message,
)

NFNL_SUBSYS_NFTABLES: Final = 10
NFNL_MSG_BATCH_BEGIN: Final = 0x10
NFNL_MSG_BATCH_END: Final = 0x11
NFT_MSG_NEWTABLE: Final = 0
NFT_MSG_DELTABLE: Final = 2
NFT_MSG_NEWCHAIN: Final = 3
NFT_MSG_NEWRULE: Final = 6
NLM_F_EXCL: Final = 0x200
NLM_F_CREATE: Final = 0x400
NLM_F_APPEND: Final = 0x800
NLA_F_NESTED: Final = 0x8000
NFT_TABLE_F_OWNER: Final = 0x2
NFT_REG_1: Final = 1
NFT_META_MARK: Final = 3
NFT_CMP_EQ: Final = 0
NF_ACCEPT: Final = 1
NFQ_FLAG_BYPASS: Final = 0x1
NFQUEUE_REVISION: Final = 3

FAMILIES: Final = {"ip": socket.AF_INET, "ip6": socket.AF_INET6}  # NFPROTO_IPV4, NFPROTO_IPV6
HOOKS: Final = {"input": 1, "output": 3}  # NF_INET_LOCAL_IN, NF_INET_LOCAL_OUT

_REPLY_BUFFER: Final = 1 << 16
REPLY_TIMEOUT_S: Final = 5.0


class NetlinkError(Exception):
    """The kernel refused a batch; `errno` is its reason."""

    def __init__(self, code: int, what: str) -> None:
        super().__init__(f"{what}: {os.strerror(code)}")
        self.errno = code


@dataclass(frozen=True)
class QueueRule:
    """Packets carrying `mark` (all its bits) go to NFQUEUE `queue`, bypassed if none reads."""

    family: str  # "ip" or "ip6", as iptables-nft: not every kernel takes xt targets in inet
    table: str
    hook: str  # "input" or "output"
    priority: int
    mark: int
    queue: int

    def text(self) -> str:
        """The table as `nft list` shows it (the rule itself is sent as nft_compat's target)."""
        return (
            f"table {self.family} {self.table} {{\n\tflags owner;\n\tchain queue {{\n"
            f"\t\ttype filter hook {self.hook} priority {self.priority}; policy accept;\n"
            f"\t\tmeta mark & 0x{self.mark:08x} == 0x{self.mark:08x} "
            f"queue num {self.queue} bypass\n\t}}\n}}\n"
        )


def _nest(kind: int, *attrs: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(attrs))


def _string(kind: int, text: str) -> bytes:
    return attr(kind, text.encode() + b"\0")


def _u32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("!I", value))


def _expression(name: str, *data: bytes) -> bytes:
    return _nest(1, _string(1, name), _nest(2, *data))  # NFTA_LIST_ELEM{NAME, DATA}


def _value(kind: int, raw: bytes) -> bytes:
    return _nest(kind, attr(1, raw))  # NFTA_DATA_VALUE


def _message(kind: int, family: int, flags: int, seq: int, attrs: bytes) -> bytes:
    return nfnl_message(NFNL_SUBSYS_NFTABLES, kind, family, 0, flags, seq, attrs)


def _batch_edge(kind: int, seq: int) -> bytes:
    """A batch's begin or end message: no subsystem in its type, nf_tables as its resource."""
    return nfnl_message(0, kind, socket.AF_UNSPEC, NFNL_SUBSYS_NFTABLES, NLM_F_REQUEST, seq, b"")


def queue_rule_messages(rule: QueueRule, seq: int) -> list[bytes]:
    """The table, its base chain and its one rule, as nf_tables messages."""
    family = FAMILIES[rule.family]
    create = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    mark = struct.pack("=I", rule.mark)  # the mark register holds host byte order
    # struct xt_NFQ_info_v3 { u16 queuenum; u16 queues_total; u16 flags; }, padded to 8
    info = struct.pack("=HHH2x", rule.queue, 1, NFQ_FLAG_BYPASS)
    expressions = _nest(
        4,  # NFTA_RULE_EXPRESSIONS
        _expression("meta", _u32(2, NFT_META_MARK), _u32(1, NFT_REG_1)),  # KEY, DREG
        _expression(
            "bitwise",
            _u32(1, NFT_REG_1),  # SREG
            _u32(2, NFT_REG_1),  # DREG
            _u32(3, len(mark)),  # LEN
            _value(4, mark),  # MASK
            _value(5, b"\0" * len(mark)),  # XOR
        ),
        _expression("cmp", _u32(1, NFT_REG_1), _u32(2, NFT_CMP_EQ), _value(3, mark)),
        _expression("target", _string(1, "NFQUEUE"), _u32(2, NFQUEUE_REVISION), attr(3, info)),
    )
    return [
        _message(
            NFT_MSG_NEWTABLE,
            family,
            create,
            seq,
            _string(1, rule.table) + _u32(2, NFT_TABLE_F_OWNER),  # NAME, FLAGS
        ),
        _message(
            NFT_MSG_NEWCHAIN,
            family,
            create,
            seq + 1,
            _string(1, rule.table)  # TABLE
            + _string(3, "queue")  # NAME
            + _nest(4, _u32(1, HOOKS[rule.hook]), _u32(2, rule.priority & 0xFFFFFFFF))
            + _u32(5, NF_ACCEPT)  # POLICY
            + _string(7, "filter"),  # TYPE
        ),
        _message(
            NFT_MSG_NEWRULE,
            family,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND,
            seq + 2,
            _string(1, rule.table) + _string(2, "queue") + expressions,
        ),
    ]


class NftSocket:
    """One nf_tables netlink socket; the owner of the tables it creates.

    Create it inside the namespace it acts on (a netlink socket belongs to the namespace
    of the thread that opens it). Thread-safe.
    """

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self._sock.bind((0, 0))
            self._sock.settimeout(REPLY_TIMEOUT_S)
        except OSError:
            self._sock.close()
            raise
        self._seq = 1
        self._lock = threading.Lock()

    def add(self, *rules: QueueRule) -> None:
        """Create each rule's table, chain and rule, in one transaction (all or nothing)."""
        self._transact(
            lambda seq: [
                m for i, r in enumerate(rules) for m in queue_rule_messages(r, seq + 3 * i)
            ],
            3 * len(rules),
            f"cannot add table {', '.join(r.table for r in rules)}",
        )

    def delete(self, family: str, table: str) -> None:
        """Delete a table this socket owns, with everything in it."""
        self._transact(
            lambda seq: [
                _message(
                    NFT_MSG_DELTABLE,
                    FAMILIES[family],
                    NLM_F_REQUEST | NLM_F_ACK,
                    seq,
                    _string(1, table),
                )
            ],
            1,
            f"cannot delete table {table}",
        )

    def _transact(self, build: Callable[[int], list[bytes]], count: int, what: str) -> None:
        """Send `count` messages, numbered from the sequence number `build` is given, as one
        batch, and wait for every one to be acknowledged."""
        with self._lock:
            if self._sock.fileno() < 0:
                raise NetlinkError(errno.EBADF, what)
            begin = self._seq
            first, end = begin + 1, begin + 1 + count
            messages = build(first)
            batch = (
                _batch_edge(NFNL_MSG_BATCH_BEGIN, begin)
                + b"".join(messages)
                + _batch_edge(NFNL_MSG_BATCH_END, end)
            )
            self._seq = end + 1
            self._sock.send(batch)
            self._await_acks(range(first, end), range(begin, end + 1), what)

    def _await_acks(self, wanted: range, ours: range, what: str) -> None:
        """Every message was asked to ACK; the first error, if any, is the batch's answer.

        An error may also answer the batch's begin or end message (EPERM, for one).
        """
        pending = set(wanted)
        while pending:
            reply = self._sock.recv(_REPLY_BUFFER)
            offset = 0
            while offset + NLMSG.size <= len(reply):
                length, kind, _, seq, _ = NLMSG.unpack_from(reply, offset)
                if length < NLMSG.size:
                    break
                if kind == NLMSG_ERROR and seq in ours:
                    code = error_code(reply, offset)
                    if code:
                        raise NetlinkError(code, what)
                    pending.discard(seq)
                offset += (length + 3) & ~3

    def close(self) -> None:
        """Close the socket: the kernel removes every table it owns."""
        with self._lock:
            self._sock.close()

    @property
    def closed(self) -> bool:
        return self._sock.fileno() < 0
