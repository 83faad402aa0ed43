"""DNS exchanges that repeat, counted in the kernel: the eBPF tap's answer to a service that
resolves the same name for every request.

Such a service sends the same question and gets the same answer thousands of times a
second, and copying each of them to the reader costs depdrill's CPU (about 3.5 us a packet
to read, dissect and add to the graph), which on a small host meets the service's. Here
the tap's programs (discover/ebpf.py) pair a question with its answer in the kernel and,
when both are byte for byte (the ID aside) an exchange already seen in full, only count it.

How a question and its answer travel:

- **The question** (UDP to port 53, sent by the namespace, at most FOLD_Q bytes) is held:
  its key (client, resolver, ports, ID), time and bytes go into a slot of the `pending`
  array chosen by a hash of the key, nothing to the ring. A slot is claimed with an atomic
  compare-and-exchange (FREE, BUSY, HELD), so two CPUs never write one; a question whose
  slot is taken goes to the ring as before. (A hash map did the same at twice the cost
  in the kernel: its update and delete take a lock and allocate.)
- **Its answer** (UDP from port 53, at most FOLD_A bytes) finds the held question in the
  slot of its key, and takes it (HELD to BUSY). When a fold (the current epoch's map) holds
  this exact question and this exact answer (compared byte by byte, not by hash: names
  are attacker-chosen text), the program adds one to the fold's count: nothing is copied.
  Otherwise it writes the held question to the ring (a record of its own, which the
  reader turns back into the packet it was), lets the answer go to the ring as any
  packet, and starts a fold for the pair (count 0: this one went in full). An answer with
  no held question goes to the ring as before.
- **A question never answered** stays in its slot until a later question needs the slot
  (it then goes to the ring first, once held for PENDING_AGE_S) or the capture ends (the
  reader reads the array once the programs are detached). Either way it reaches the graph
  with its own time and counts as unanswered exactly as before; an answer that comes
  after it left its slot goes to the ring and still finds it in the graph. Only the
  program that moved a slot from HELD to BUSY hands its question on, so none is counted
  twice or lost.

The reader adds each fold's new count to the graph every round (`Folds.collect`): the same
effect as that many questions and answers (GraphBuilder.add_repeats). Folds live in two
maps; when the current one holds FLIP_AT exchanges (answers whose TTL counts down make a
new one every second), the programs are switched to the other, and one round later the
old one is read for the last time and emptied: memory stays bounded and nothing counted
is lost.
"""

from __future__ import annotations

import mmap
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from depdrill.bpf import (
    FP,
    HELPER_KTIME_NS,
    HELPER_MAP_LOOKUP,
    HELPER_MAP_UPDATE,
    HELPER_RINGBUF_RESERVE,
    HELPER_RINGBUF_SUBMIT,
    HELPER_SKB_LOAD_BYTES,
    MAP_ARRAY,
    MAP_HASH,
    MAP_PERCPU_ARRAY,
    NOEXIST,
    R0,
    R1,
    R2,
    R3,
    R4,
    R5,
    R6,
    R7,
    R8,
    R9,
    RB_NO_WAKEUP,
    Asm,
    create_map,
    delete,
    entries,
    update,
)

FOLD_Q: Final = 256  # the longest question held (a name of 255 bytes and EDNS fit)
FOLD_A: Final = 512  # the longest answer folded: classic DNS's UDP limit
SLOT_BITS: Final = 12  # 4096 questions held at once, a slot each (by the hash of its key)
FOLD_ENTRIES: Final = 2048  # distinct exchanges per epoch's map
FLIP_AT: Final = 1024  # exchanges in the current map that make the programs switch maps
PENDING_AGE_S: Final = 1.0  # a question held this long unanswered may give up its slot
RETIRE_S: Final = 0.1  # after a switch, what a program still runs on the old map is done
GOLDEN: Final = 0x9E3779B97F4A7C15  # 2^64 / phi: the slot hash's multiplier

# The pending key: client and resolver addresses (16 bytes each, IPv4 in the first 4),
# client port, resolver port, ID (as on the wire), IP version.
PENDING_KEY: Final = struct.Struct("=16s16s2s2s2sBx")
# A held question: when it was sent (monotonic ns), its hash, its length, its bytes (ID
# zeroed, padded with zeros to the word).
PV_TQ, PV_QHASH, PV_QLEN, PV_Q = 0, 8, 16, 24
PENDING_VALUE: Final = PV_Q + FOLD_Q + 8
# A slot of the pending array: its state, the key, the held question.
ST, SKEY, SP = 0, 8, 8 + PENDING_KEY.size
SLOT_SIZE: Final = SP + PENDING_VALUE
FREE, BUSY, HELD = 0, 1, 2  # a slot's states: BUSY while one program writes or takes it
# A fold's key: client, resolver, resolver port, IP version, the question's and answer's hashes.
FOLD_KEY: Final = struct.Struct("=16s16s2sB5xQQ")
# A fold: its count, the last question's and answer's times, the answer's length, the
# first question (a held question's layout), the answer's bytes (ID zeroed).
FV_COUNT, FV_LAST_Q, FV_LAST_A, FV_ALEN, FV_P, FV_A = 0, 8, 16, 24, 32, 32 + PENDING_VALUE
FOLD_VALUE: Final = FV_A + FOLD_A + 8
FOLD_HEAD: Final = struct.Struct("=QQQI")  # count, last question's and answer's times, length
HELD_HEAD: Final = struct.Struct("=QQI")  # a held question's time, hash, length

FNV_OFFSET: Final = 0xCBF29CE484222325
FNV_PRIME: Final = 0x100000001B3
# A held question given to the reader travels in the ring as a record of its own: the
# usual head (its time; HELD_BODY bytes; HELD_MARK where a packet's length would be), then
# the slot's key and question.
QUESTION_RECORD: Final = 512
RECORD_HEAD: Final = 16  # discover/ebpf.py's RECORD: time, bytes copied, length
HELD_BODY: Final = PENDING_KEY.size + PENDING_VALUE
HELD_MARK: Final = 0xFFFFFFFF

# The program's stack, below discover/ebpf.py's slots (which end at -128).
FKEY, TQ, FPTR, LEN, INDEX = -184, -192, -200, -208, -216


@dataclass
class FoldMaps:
    """The maps the programs fold with: descriptors, closed by whoever owns the capture."""

    pending: int
    scratch: int  # one fold's worth of bytes per CPU: where a question or answer is read to
    control: int  # which of the two fold maps is current
    folds: tuple[int, int]

    @classmethod
    def create(cls, fds: list[int]) -> FoldMaps:
        """New maps, each appended to `fds` as soon as it exists (so a failure leaks none)."""

        def made(kind: int, key: int, value: int, count: int, name: str) -> int:
            fd = create_map(kind, key, value, count, name)
            fds.append(fd)
            return fd

        pending = made(MAP_ARRAY, 4, SLOT_SIZE, 1 << SLOT_BITS, "depdrill_held")
        scratch = made(MAP_PERCPU_ARRAY, 4, FOLD_VALUE, 1, "depdrill_scratch")
        control = made(MAP_ARRAY, 4, 4, 1, "depdrill_epoch")
        first = made(MAP_HASH, FOLD_KEY.size, FOLD_VALUE, FOLD_ENTRIES, "depdrill_folds0")
        second = made(MAP_HASH, FOLD_KEY.size, FOLD_VALUE, FOLD_ENTRIES, "depdrill_folds1")
        return cls(pending, scratch, control, (first, second))


class Repeat(NamedTuple):
    """`times` more exchanges like this question and answer (IP packets, client port and ID
    zero: a fold spans them), the last of them asked at `question_time`."""

    question: bytes
    answer: bytes
    times: int
    question_time: float
    answer_time: float


# -- the programs' side ---------------------------------------------------------------------


Header = Callable[[int, int | None, int, int, int, str], None]


def emit(
    a: Asm, maps: FoldMaps, ring: int, drops: int, version: int, ingress: bool, header: Header
) -> None:
    """The fold code for one IP version and direction, at label "fold<version>".

    On entry r6 is the skb, r7 the UDP header's offset, r8 the IP header (in the packet or
    copied to the stack). It ends at "keep" (the packet goes to the ring as any other) or
    "next" (held or counted). `header` is the program's in-place-or-copied read
    (discover/ebpf.py); the stack's KEY slot takes the pending key, ZERO a zero index.
    """
    from depdrill.discover.ebpf import KEY, L4

    v = str(version)
    a.label("fold" + v)
    header(R9, R7, 0, L4, 10, "keep")  # the UDP header and the DNS ID (else: as before)
    if ingress:  # an answer too long to fold may still be a held question's: LEN 0
        _length(a, FOLD_A, "unfit" + v)
        a.jump("fit" + v)
        a.label("unfit" + v)
        a.store_imm(FP, LEN, 8, 0)
        a.label("fit" + v)
    else:
        _length(a, FOLD_Q, "keep")

    # The pending key: the client is the question's sender (the answer's receiver).
    for offset in range(0, PENDING_KEY.size, 8):
        a.store_imm(FP, KEY + offset, 8, 0)
    client, resolver = (16, 0) if ingress else (0, 16)  # where the source, destination go
    if version == 4:
        a.load(R0, R8, 12, 4)
        a.store(FP, KEY + client, 4, R0)
        a.load(R0, R8, 16, 4)
        a.store(FP, KEY + resolver, 4, R0)
    else:
        for offset in (0, 8):
            a.load(R0, R8, 8 + offset, 8)
            a.store(FP, KEY + client + offset, 8, R0)
            a.load(R0, R8, 24 + offset, 8)
            a.store(FP, KEY + resolver + offset, 8, R0)
    a.load(R0, R9, 2 if ingress else 0, 2)
    a.store(FP, KEY + 32, 2, R0)  # the client's port
    a.load(R0, R9, 0 if ingress else 2, 2)
    a.store(FP, KEY + 34, 2, R0)  # the resolver's
    a.load(R0, R9, 8, 2)
    a.store(FP, KEY + 36, 2, R0)  # the ID
    a.store_imm(FP, KEY + 38, 1, version)

    # The question's slot: a multiplicative hash of the key's words.
    a.load(R1, FP, KEY, 8)
    for offset in (8, 16, 24, 32):
        a.load(R0, FP, KEY + offset, 8)
        a.alu(R1, "^=", R0, reg=True)
    a.load_imm64(R0, GOLDEN)
    a.alu(R1, "*=", R0, reg=True)
    a.alu(R1, ">>=", 64 - SLOT_BITS)
    a.store(FP, INDEX, 4, R1)
    a.load_map(R1, maps.pending)
    a.alu(R2, "=", FP, reg=True)
    a.alu(R2, "+=", INDEX)
    a.call(HELPER_MAP_LOOKUP)  # an array: the verifier inlines it
    a.jump("keep", R0, "==", 0)
    if ingress:
        _answer(a, maps, ring, drops, version)
    else:
        _question(a, ring, drops, version)


def _question(a: Asm, ring: int, drops: int, version: int) -> None:
    """Hold the question in its slot (r0), unless the slot is taken: then it goes as before."""
    from depdrill.discover.ebpf import KEY

    v = str(version)
    a.alu(R8, "=", R0, reg=True)
    a.alu(R0, "=", FREE)
    a.alu(R1, "=", BUSY)
    a.compare_exchange(R8, ST, R1)
    a.jump("claimed" + v, R0, "==", FREE)
    a.jump("keep", R0, "!=", HELD)
    # Held by a question unanswered for PENDING_AGE_S: it goes to the reader, the slot is ours.
    a.call(HELPER_KTIME_NS)
    a.load(R1, R8, SP + PV_TQ, 8)
    a.alu(R0, "-=", R1, reg=True)
    a.load_imm64(R1, int(PENDING_AGE_S * 1e9))
    a.jump("keep", R0, "<", R1, reg=True)
    a.alu(R0, "=", HELD)
    a.alu(R1, "=", BUSY)
    a.compare_exchange(R8, ST, R1)
    a.jump("keep", R0, "!=", HELD)
    _held_record(a, ring, drops, R8)
    a.label("claimed" + v)
    for offset in range(0, PENDING_KEY.size, 8):
        a.load(R0, FP, KEY + offset, 8)
        a.store(R8, SKEY + offset, 8, R0)
    _load_message(a, R8, SP + PV_Q, "unclaim" + v)
    _hash(a, R8, SP + PV_Q, FOLD_Q)  # r1
    a.store(R8, SP + PV_QHASH, 8, R1)
    a.load(R0, FP, LEN, 8)
    a.store(R8, SP + PV_QLEN, 4, R0)
    a.call(HELPER_KTIME_NS)
    a.store(R8, SP + PV_TQ, 8, R0)
    a.alu(R1, "=", HELD)
    a.exchange(R8, ST, R1)  # published: what was written is seen first
    a.jump("next")
    a.label("unclaim" + v)
    _release(a, R8)
    a.jump("keep")


def _answer(a: Asm, maps: FoldMaps, ring: int, drops: int, version: int) -> None:
    """Find the held question (slot r0), count the exchange or begin a fold; as before else."""
    from depdrill.discover.ebpf import KEY

    v = str(version)
    a.alu(R9, "=", R0, reg=True)
    a.load(R0, R9, ST, 8)
    a.jump("keep", R0, "!=", HELD)  # no question held for it: as before
    for offset in range(0, PENDING_KEY.size, 8):
        a.load(R0, R9, SKEY + offset, 8)
        a.load(R1, FP, KEY + offset, 8)
        a.jump("keep", R0, "!=", R1, reg=True)  # another's question
    a.alu(R0, "=", HELD)
    a.alu(R1, "=", BUSY)
    a.compare_exchange(R9, ST, R1)
    a.jump("keep", R0, "!=", HELD)
    for offset in range(0, PENDING_KEY.size, 8):  # still that question, now it cannot change
        a.load(R0, R9, SKEY + offset, 8)
        a.load(R1, FP, KEY + offset, 8)
        a.jump("other" + v, R0, "!=", R1, reg=True)
    # The question is this program's now: every way out below hands it on or counts it,
    # and frees its slot. An answer it cannot fold (too long, say) goes with its question.
    a.load(R0, FP, LEN, 8)
    a.jump("alone" + v, R0, "==", 0)
    _first(a, maps.scratch)
    a.jump("alone" + v, R0, "==", 0)
    a.alu(R8, "=", R0, reg=True)
    _load_message(a, R8, FV_A, "alone" + v)
    _hash(a, R8, FV_A, FOLD_A)  # r1
    a.store(FP, FKEY + 48, 8, R1)
    a.load(R0, FP, LEN, 8)
    a.store(R8, FV_ALEN, 4, R0)

    # The fold's key: client, resolver, the resolver's port, version, both hashes.
    for offset in (0, 8, 16, 24):
        a.load(R0, FP, KEY + offset, 8)
        a.store(FP, FKEY + offset, 8, R0)
    a.store_imm(FP, FKEY + 32, 8, 0)
    a.load(R0, FP, KEY + 34, 2)
    a.store(FP, FKEY + 32, 2, R0)
    a.store_imm(FP, FKEY + 34, 1, version)
    a.load(R0, R9, SP + PV_QHASH, 8)
    a.store(FP, FKEY + 40, 8, R0)

    # The current epoch's fold map (r7: 0 or 1, kept across calls).
    a.alu(R7, "=", 0)
    _first(a, maps.control)
    a.jump("unfold" + v, R0, "==", 0)
    a.load(R7, R0, 0, 4)
    _fold_map(a, maps, "lookup" + v)
    a.alu(R2, "=", FP, reg=True)
    a.alu(R2, "+=", FKEY)
    a.call(HELPER_MAP_LOOKUP)
    a.jump("unfold" + v, R0, "==", 0)
    a.store(FP, FPTR, 8, R0)

    # The same exchange only if both messages are the same, byte for byte.
    a.load(R1, R0, FV_P + PV_QLEN, 4)
    a.load(R5, R9, SP + PV_QLEN, 4)
    a.jump("unfold" + v, R1, "!=", R5, reg=True)
    _same(a, R0, FV_P + PV_Q, R9, SP + PV_Q, FOLD_Q, "unfold" + v)
    a.load(R0, FP, FPTR, 8)
    a.load(R1, R0, FV_ALEN, 4)
    a.load(R5, FP, LEN, 8)
    a.jump("unfold" + v, R1, "!=", R5, reg=True)
    _same(a, R0, FV_A, R8, FV_A, FOLD_A, "unfold" + v)

    # Counted: nothing copied.
    a.load(R0, R9, SP + PV_TQ, 8)
    a.store(FP, TQ, 8, R0)
    _release(a, R9)
    a.call(HELPER_KTIME_NS)
    a.load(R1, FP, FPTR, 8)
    a.store(R1, FV_LAST_A, 8, R0)
    a.load(R0, FP, TQ, 8)
    a.store(R1, FV_LAST_Q, 8, R0)
    a.alu(R2, "=", 1)
    a.atomic_add(R1, FV_COUNT, R2)
    a.jump("next")

    # Not (yet) a fold: the question to the ring as it was held, a fold begun.
    a.label("unfold" + v)
    for offset in (PV_TQ, PV_QHASH, PV_QLEN):
        a.load(R0, R9, SP + offset, 8)
        a.store(R8, FV_P + offset, 8, R0)
    a.load(R5, R9, SP + PV_QLEN, 4)
    _copy(a, R8, FV_P + PV_Q, R9, SP + PV_Q, FOLD_Q)
    _held_record(a, ring, drops, R9)
    _release(a, R9)
    a.store_imm(R8, FV_COUNT, 8, 0)
    a.load(R0, R8, FV_P + PV_TQ, 8)
    a.store(R8, FV_LAST_Q, 8, R0)
    a.call(HELPER_KTIME_NS)
    a.store(R8, FV_LAST_A, 8, R0)
    _fold_map(a, maps, "begin" + v)
    a.alu(R2, "=", FP, reg=True)
    a.alu(R2, "+=", FKEY)
    a.alu(R3, "=", R8, reg=True)
    a.alu(R4, "=", NOEXIST)
    a.call(HELPER_MAP_UPDATE)  # full: the next one like it goes in full again
    a.jump("keep")

    a.label("alone" + v)  # the question to the ring, no fold begun
    _held_record(a, ring, drops, R9)
    _release(a, R9)
    a.jump("keep")

    # Another question took the slot between the look and the claim: it stays held.
    a.label("other" + v)
    a.alu(R1, "=", HELD)
    a.exchange(R9, ST, R1)
    a.jump("keep")


def _length(a: Asm, most: int, otherwise: str) -> None:
    """Stack LEN = the DNS message's length (from the UDP header at r9), when it is 12 to
    `most` bytes and all in the packet; else to `otherwise`."""
    from depdrill.discover.ebpf import SKB_LEN

    a.load(R0, R9, 4, 2)
    a.swap16(R0)
    a.jump(otherwise, R0, "<", 8 + 12)
    a.jump(otherwise, R0, ">", 8 + most)
    a.alu(R0, "-=", 8)
    a.store(FP, LEN, 8, R0)
    a.alu(R1, "=", R7, reg=True)
    a.alu(R1, "+=", 8)
    a.alu(R1, "+=", R0, reg=True)
    a.load(R2, R6, SKB_LEN, 4)
    a.jump(otherwise, R1, ">", R2, reg=True)


def _load_message(a: Asm, base: int, at: int, failed: str) -> None:
    """The DNS message (stack LEN bytes) into base + at, ID zeroed, the word where it ends
    zeroed first (so the last word compares and hashes the same whatever was there)."""
    a.load(R1, FP, LEN, 8)
    a.alu(R1, "&=", -8)
    a.alu(R1, "+=", base, reg=True)
    a.store_imm(R1, at, 8, 0)
    a.alu(R1, "=", R6, reg=True)
    a.alu(R2, "=", R7, reg=True)
    a.alu(R2, "+=", 8)
    a.alu(R3, "=", base, reg=True)
    a.alu(R3, "+=", at)
    a.load(R4, FP, LEN, 8)
    a.call(HELPER_SKB_LOAD_BYTES)
    a.jump(failed, R0, "!=", 0)
    a.store_imm(base, at, 2, 0)


def _release(a: Asm, slot: int) -> None:
    """The slot is free again (an exchange: what was read from it is read before)."""
    a.alu(R1, "=", FREE)
    a.exchange(slot, ST, R1)


def _held_record(a: Asm, ring: int, drops: int, slot: int) -> None:
    """The question held in `slot` to the ring, in a record of its own (HELD_MARK): the
    reader rebuilds its packet (held_packet). No room: counted as a drop, as any packet."""

    lost, done = f"lost{len(a)}", f"written{len(a)}"
    a.load_map(R1, ring)
    a.alu(R2, "=", QUESTION_RECORD)
    a.alu(R3, "=", 0)
    a.call(HELPER_RINGBUF_RESERVE)
    a.jump(lost, R0, "==", 0)
    a.alu(R4, "=", R0, reg=True)
    a.load(R0, slot, SP + PV_TQ, 8)
    a.store(R4, 0, 8, R0)
    a.store_imm(R4, 8, 4, HELD_BODY)
    a.store_imm(R4, 12, 4, -1)  # HELD_MARK
    for offset in range(0, PENDING_KEY.size + PV_Q, 8):  # the key, then when, hash, length
        a.load(R0, slot, SKEY + offset, 8)
        a.store(R4, RECORD_HEAD + offset, 8, R0)
    a.load(R5, slot, SP + PV_QLEN, 4)
    _copy(a, R4, RECORD_HEAD + PENDING_KEY.size + PV_Q, slot, SP + PV_Q, FOLD_Q)
    a.alu(R1, "=", R4, reg=True)
    a.alu(R2, "=", RB_NO_WAKEUP)
    a.call(HELPER_RINGBUF_SUBMIT)
    a.jump(done)
    a.label(lost)
    _first(a, drops)
    a.jump(done, R0, "==", 0)
    a.alu(R1, "=", 1)
    a.atomic_add(R0, 0, R1)
    a.label(done)


def _first(a: Asm, map_fd: int) -> None:
    """r0 = the array's first entry (null only to the verifier)."""
    from depdrill.discover.ebpf import ZERO

    a.store_imm(FP, ZERO, 4, 0)
    a.load_map(R1, map_fd)
    a.alu(R2, "=", FP, reg=True)
    a.alu(R2, "+=", ZERO)
    a.call(HELPER_MAP_LOOKUP)


def _fold_map(a: Asm, maps: FoldMaps, label: str) -> None:
    """r1 = the fold map of epoch r7."""
    a.load_map(R1, maps.folds[0])
    a.jump(label, R7, "==", 0)
    a.load_map(R1, maps.folds[1])
    a.label(label)


def _words(a: Asm, most: int, body: Callable[[int], None], done: str) -> None:
    """`body(offset)` for each 8-byte word of a message r5 bytes long (at most `most`):
    unrolled, so the verifier sees constant offsets and no loop."""
    for index in range((most + 7) // 8):
        a.jump(done, R5, "<=", index * 8)
        body(index * 8)
    a.label(done)


def _hash(a: Asm, base: int, offset: int, most: int) -> None:
    """r1 = FNV-1a over the words of the message at base + offset, its length (stack LEN)
    mixed in first. Only a map key: equality is always checked byte by byte."""
    a.load(R5, FP, LEN, 8)
    a.load_imm64(R1, FNV_OFFSET)
    a.alu(R1, "^=", R5, reg=True)
    a.load_imm64(R4, FNV_PRIME)
    a.alu(R1, "*=", R4, reg=True)

    def word(at: int) -> None:
        a.load(R0, base, offset + at, 8)
        a.alu(R1, "^=", R0, reg=True)
        a.alu(R1, "*=", R4, reg=True)

    _words(a, most, word, f"hashed{len(a)}")


def _same(
    a: Asm, left: int, left_at: int, right: int, right_at: int, most: int, differ: str
) -> None:
    """Jump to `differ` unless the r5 bytes (words, zero-padded) at both places are equal."""

    def word(at: int) -> None:
        a.load(R1, left, left_at + at, 8)
        a.load(R2, right, right_at + at, 8)
        a.jump(differ, R1, "!=", R2, reg=True)

    _words(a, most, word, f"same{len(a)}")


def _copy(a: Asm, into: int, into_at: int, source: int, source_at: int, most: int) -> None:
    """The r5 bytes (words, zero-padded) at source + source_at to into + into_at."""

    def word(at: int) -> None:
        a.load(R0, source, source_at + at, 8)
        a.store(into, into_at + at, 8, R0)

    _words(a, most, word, f"copied{len(a)}")


# -- the reader's side ----------------------------------------------------------------------


def question_packet(
    version: int, client: bytes, resolver: bytes, ports: bytes, ident: bytes, message: bytes
) -> bytes:
    """A question as the IP packet the service sent: `ports` the client's then the
    resolver's (2 bytes each, as on the wire), `message` the DNS message with its ID zeroed."""
    return _packet(version, client, resolver, ports, ident + message[2:])


def answer_packet(
    version: int, client: bytes, resolver: bytes, ports: bytes, ident: bytes, message: bytes
) -> bytes:
    """An answer as the IP packet the service received (`ports` as in question_packet)."""
    return _packet(version, resolver, client, ports[2:] + ports[:2], ident + message[2:])


def _packet(version: int, source: bytes, destination: bytes, ports: bytes, dns: bytes) -> bytes:
    udp = ports + struct.pack("!HH", 8 + len(dns), 0) + dns
    if version == 4:
        head = struct.pack("!BBHIBBH", 0x45, 0, 20 + len(udp), 0, 64, 17, 0)
        return head + source[:4] + destination[:4] + udp
    head = struct.pack("!IHBB", 0x60 << 24, len(udp), 17, 64)
    return head + source + destination + udp


@dataclass
class Folds:
    """The reader's side of the folding: held questions and fold counts, read each round."""

    maps: FoldMaps
    epoch: int = 0
    folded: int = 0  # exchanges counted in the kernel and given to the reader so far
    _retiring: int | None = None  # the fold map switched away from, read once more
    _switched: float = 0.0
    _size: int = 0  # exchanges in the current fold map at the last look
    _seen: dict[tuple[int, bytes], int] = field(default_factory=dict)  # counts given so far

    def collect(self, final: bool = False) -> tuple[list[tuple[float, bytes]], list[Repeat]]:
        """The exchanges the folds counted since the last call; and when `final` (the
        programs detached), (time, IP packet) for each question still held."""
        epoch_offset = time.time() - time.monotonic()
        repeats: list[Repeat] = []
        if self._retiring is not None and (final or time.monotonic() - self._switched >= RETIRE_S):
            repeats += self._counts(self._retiring, epoch_offset, empty=True)
            self._retiring = None
        repeats += self._counts(self.epoch, epoch_offset, empty=False)
        if not final and self._retiring is None and self._size >= FLIP_AT:
            # The programs count into the other map from now on; this one is read once
            # more, and emptied, when none can still be writing to it.
            update(self.maps.control, b"\0\0\0\0", struct.pack("=I", 1 - self.epoch))
            self._retiring, self.epoch = self.epoch, 1 - self.epoch
            self._switched = time.monotonic()
        return (self._still_held(epoch_offset) if final else []), repeats

    def _counts(self, which: int, epoch_offset: float, empty: bool) -> list[Repeat]:
        fd = self.maps.folds[which]
        found = entries(fd, FOLD_KEY.size, FOLD_VALUE)
        if not empty:
            self._size = len(found)
        repeats = []
        for key, value in found:
            count = int.from_bytes(value[FV_COUNT : FV_COUNT + 8], "little")
            before = self._seen.get((which, key), 0)
            if empty:
                delete(fd, key)
                self._seen.pop((which, key), None)
            elif count != before:
                self._seen[which, key] = count
            if count > before:
                repeats.append(_repeat(key, value, count - before, epoch_offset))
        self.folded += sum(repeat.times for repeat in repeats)
        return repeats

    def _still_held(self, epoch_offset: float) -> list[tuple[float, bytes]]:
        """The questions held when the programs were detached, never answered."""
        packets = []
        for _, slot in entries(self.maps.pending, 4, SLOT_SIZE):
            if int.from_bytes(slot[ST : ST + 8], "little") == HELD:
                packets.append(held_packet(slot, SKEY, epoch_offset))
        packets.sort()
        return packets


def held_packet(data: bytes | mmap.mmap, at: int, epoch_offset: float) -> tuple[float, bytes]:
    """(time, IP packet) of the question held as a slot's key and question at `at` (in the
    pending array, or in a ring record after its head)."""
    key = bytes(data[at : at + PENDING_KEY.size])
    client, resolver, client_port, resolver_port, ident, version = PENDING_KEY.unpack(key)
    sent, _, length = HELD_HEAD.unpack_from(data, at + PENDING_KEY.size)
    start = at + PENDING_KEY.size + PV_Q
    message = bytes(data[start : start + min(length, FOLD_Q)])
    packet = question_packet(version, client, resolver, client_port + resolver_port, ident, message)
    return sent * 1e-9 + epoch_offset, packet


def _repeat(key: bytes, value: bytes, count: int, epoch_offset: float) -> Repeat:
    """A fold's new `count` exchanges, as the reader is given them."""
    client, resolver, resolver_port, version, _, _ = FOLD_KEY.unpack(key)
    _, last_q, last_a, answer_length = FOLD_HEAD.unpack_from(value)
    _, _, question_length = HELD_HEAD.unpack_from(value, FV_P)
    question = value[FV_P + PV_Q : FV_P + PV_Q + min(question_length, FOLD_Q)]
    answer = value[FV_A : FV_A + min(answer_length, FOLD_A)]
    ports = b"\0\0" + resolver_port
    return Repeat(
        question_packet(version, client, resolver, ports, b"\0\0", question),
        answer_packet(version, client, resolver, ports, b"\0\0", answer),
        count,
        last_q * 1e-9 + epoch_offset,
        last_a * 1e-9 + epoch_offset,
    )
