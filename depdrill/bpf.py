"""eBPF from Python, without a compiler: an assembler, the bpf(2) calls, and a ring reader.

Layouts and numbers are the kernel's UAPI (linux/bpf.h). Programs are written with the
`Asm` builder below (instruction by instruction, jumps by label) and loaded as they are:
nothing on the host needs clang, libbpf or BTF. Standard library only.

Everything made here is a file descriptor. A program attached through a link (tcx) is
detached when its link's descriptor closes, so a process that dies, SIGKILL included,
leaves nothing attached behind it: the same promise as an owner-flagged nft table.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import platform
import struct
from dataclasses import dataclass, field
from typing import Final

from depdrill.errors import CapabilityError

# bpf(2) commands, map, program and attach types, helpers (linux/bpf.h).
BPF_MAP_CREATE: Final = 0
BPF_MAP_LOOKUP_ELEM: Final = 1
BPF_MAP_UPDATE_ELEM: Final = 2
BPF_MAP_DELETE_ELEM: Final = 3
BPF_PROG_LOAD: Final = 5
BPF_OBJ_GET_INFO_BY_FD: Final = 15
BPF_PROG_QUERY: Final = 16
BPF_MAP_LOOKUP_BATCH: Final = 24
BPF_LINK_CREATE: Final = 28
BPF_ENABLE_STATS: Final = 32
MAP_HASH: Final = 1
MAP_ARRAY: Final = 2
MAP_PERCPU_ARRAY: Final = 6
MAP_LRU_HASH: Final = 9
MAP_RINGBUF: Final = 27
PROG_SCHED_CLS: Final = 3
TCX_INGRESS: Final = 46
TCX_EGRESS: Final = 47
TCX_NEXT: Final = -1  # the verdict that leaves the packet to whatever comes after
F_BEFORE: Final = 1 << 3  # attach ahead of the device's other programs (none named: first)
HELPER_MAP_LOOKUP: Final = 1
HELPER_MAP_UPDATE: Final = 2
HELPER_KTIME_NS: Final = 5  # CLOCK_MONOTONIC
HELPER_SKB_LOAD_BYTES: Final = 26
HELPER_RINGBUF_RESERVE: Final = 131
HELPER_RINGBUF_SUBMIT: Final = 132
HELPER_RINGBUF_DISCARD: Final = 133
NOEXIST: Final = 1  # map update: only where the key is not yet present
RB_NO_WAKEUP: Final = 1  # the reader polls on its own clock: no wakeup on the packet path

# Instruction classes, sizes, modes, operations (linux/bpf_common.h, linux/bpf.h).
_LDX, _ST, _STX, _ALU, _JMP, _ALU64 = 0x01, 0x02, 0x03, 0x04, 0x05, 0x07
SIZES: Final = {1: 0x10, 2: 0x08, 4: 0x00, 8: 0x18}
_MEM, _ATOMIC, _IMM64 = 0x60, 0xC0, 0x18
_X = 0x08  # the source is a register, not the immediate
ALU: Final = {
    "+=": 0x00, "-=": 0x10, "*=": 0x20, "|=": 0x40, "&=": 0x50, "<<=": 0x60, ">>=": 0x70,
    "^=": 0xA0, "=": 0xB0,
}  # fmt: skip
JUMPS: Final = {
    "==": 0x10, ">": 0x20, ">=": 0x30, "&": 0x40, "!=": 0x50, "<": 0xA0, "<=": 0xB0,
    "s<": 0xC0,
}  # fmt: skip
_JA, _CALL, _EXIT, _END_TO_BE = 0x00, 0x80, 0x90, 0xD8
_XCHG, _CMPXCHG = 0xE1, 0xF1  # atomic operations, with BPF_FETCH
_PSEUDO_MAP_FD = 1
_INSN: Final = struct.Struct("<BBhi")
R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, FP = range(11)

# Little-endian machines only: instructions and attributes are packed little-endian.
_SYS_BPF: Final = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "riscv64": 280}
_LOG_SIZE: Final = 1 << 20


class BpfUnavailable(CapabilityError):
    """The kernel (or this process) cannot load or attach the program."""


@dataclass
class Asm:
    """A program under construction: instructions, and jumps that name labels.

    Registers are numbered (R0..R9, FP). Jumps are resolved by `assemble`; a label is
    placed with `label(name)` before the instruction it names.
    """

    _insns: list[tuple[int, int, int, int, str | None]] = field(default_factory=list)
    _labels: dict[str, int] = field(default_factory=dict)

    def _emit(self, code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> None:
        self._insns.append((code, dst | src << 4, off, imm, None))

    def label(self, name: str) -> None:
        if name in self._labels:
            raise ValueError(f"label {name} placed twice")
        self._labels[name] = len(self._insns)

    def alu(self, dst: int, op: str, value: int, reg: bool = False) -> None:
        """dst op= value (a register when `reg`), on all 64 bits."""
        if reg:
            self._emit(_ALU64 | ALU[op] | _X, dst, value)
        else:
            self._emit(_ALU64 | ALU[op], dst, imm=value)

    def swap16(self, dst: int) -> None:
        """A big-endian 16-bit value read from a packet, to the host's order (and back)."""
        self._emit(_ALU | _END_TO_BE, dst, imm=16)

    def load(self, dst: int, base: int, offset: int, size: int) -> None:
        """dst = *(size *)(base + offset), zero-extended."""
        self._emit(_LDX | _MEM | SIZES[size], dst, base, offset)

    def store(self, base: int, offset: int, size: int, src: int) -> None:
        """*(size *)(base + offset) = register src."""
        self._emit(_STX | _MEM | SIZES[size], base, src, offset)

    def store_imm(self, base: int, offset: int, size: int, value: int) -> None:
        self._emit(_ST | _MEM | SIZES[size], base, 0, offset, value)

    def atomic_add(self, base: int, offset: int, src: int) -> None:
        """*(u64 *)(base + offset) += src, atomically (the other CPUs run it too)."""
        self._emit(_STX | _ATOMIC | SIZES[8], base, src, offset, 0)

    def compare_exchange(self, base: int, offset: int, src: int) -> None:
        """If *(u64 *)(base + offset) == r0, store src there; either way r0 = what it held
        (atomically: the claim of a slot that other CPUs may claim too)."""
        self._emit(_STX | _ATOMIC | SIZES[8], base, src, offset, _CMPXCHG)

    def exchange(self, base: int, offset: int, src: int) -> None:
        """*(u64 *)(base + offset) = src, and src = what it held, atomically (a full
        barrier: what was written before is seen before the new value)."""
        self._emit(_STX | _ATOMIC | SIZES[8], base, src, offset, _XCHG)

    def load_map(self, dst: int, map_fd: int) -> None:
        """dst = the map behind `map_fd` (a two-slot instruction the kernel rewrites)."""
        self._emit(_IMM64, dst, _PSEUDO_MAP_FD, 0, map_fd)
        self._emit(0)

    def load_imm64(self, dst: int, value: int) -> None:
        self._emit(_IMM64, dst, 0, 0, ctypes.c_int32(value & 0xFFFFFFFF).value)
        self._emit(0, imm=ctypes.c_int32(value >> 32).value)

    def jump(self, target: str, dst: int | None = None, op: str = "", value: int = 0,
             reg: bool = False) -> None:  # fmt: skip
        """goto target, or when `dst op value` holds (unsigned; `value` a register if `reg`)."""
        if dst is None:
            self._insns.append((_JMP | _JA, 0, 0, 0, target))
        elif reg:
            self._insns.append((_JMP | JUMPS[op] | _X, dst | value << 4, 0, 0, target))
        else:
            self._insns.append((_JMP | JUMPS[op], dst, 0, value, target))

    def call(self, helper: int) -> None:
        self._emit(_JMP | _CALL, imm=helper)

    def exit(self) -> None:
        self._emit(_JMP | _EXIT)

    def __len__(self) -> int:
        return len(self._insns)

    def assemble(self) -> bytes:
        """The program's bytes; every jump's offset counted from the instruction after it."""
        out = bytearray()
        for index, (code, regs, off, imm, target) in enumerate(self._insns):
            if target is not None:
                if target not in self._labels:
                    raise ValueError(f"jump to label {target}, which is never placed")
                off = self._labels[target] - index - 1
            out += _INSN.pack(code, regs, off, imm)
        return bytes(out)


class _Syscall:
    """bpf(2), through libc's syscall(): the attribute union passed as a byte buffer."""

    def __init__(self) -> None:
        number = _SYS_BPF.get(platform.machine())
        if number is None:
            raise BpfUnavailable(f"no bpf(2) number known for {platform.machine()}")
        self._number = number
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.syscall.restype = ctypes.c_long

    def __call__(
        self, command: int, attr: bytes | bytearray, check: bool = True
    ) -> tuple[int, int, ctypes.Array[ctypes.c_char]]:
        """The result, errno (0 when it worked) and the attribute buffer as the kernel left
        it; with `check`, a failure raises OSError instead."""
        buffer = ctypes.create_string_buffer(bytes(attr), max(len(attr), 128))
        result = self._libc.syscall(
            ctypes.c_long(self._number), ctypes.c_int(command), buffer, ctypes.c_uint(len(buffer))
        )
        code = ctypes.get_errno() if result < 0 else 0
        if result < 0 and check:
            raise OSError(code, os.strerror(code))
        return int(result), code, buffer


_bpf: _Syscall | None = None


def _syscall() -> _Syscall:
    global _bpf
    if _bpf is None:
        _bpf = _Syscall()
    return _bpf


def bpf(command: int, attr: bytes | bytearray) -> tuple[int, ctypes.Array[ctypes.c_char]]:
    """One bpf(2) call: its result and the attribute buffer as the kernel left it."""
    result, _, buffer = _syscall()(command, attr)
    return result, buffer


def _name(text: str) -> bytes:
    return text.encode()[:15].ljust(16, b"\0")


def create_map(kind: int, key_size: int, value_size: int, entries: int, name: str) -> int:
    """A new map's descriptor (close-on-exec, as every bpf(2) descriptor)."""
    attr = struct.pack("<IIIIIII", kind, key_size, value_size, entries, 0, 0, 0) + _name(name)
    try:
        fd, _ = bpf(BPF_MAP_CREATE, attr)
    except OSError as exc:
        raise BpfUnavailable(f"cannot create a BPF map ({name}): {exc.strerror}") from None
    return fd


def lookup(map_fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value stored under `key`, or None."""
    key_buffer = ctypes.create_string_buffer(key, len(key))
    value = ctypes.create_string_buffer(value_size)
    attr = struct.pack(
        "<IIQQQ", map_fd, 0, ctypes.addressof(key_buffer), ctypes.addressof(value), 0
    )
    return value.raw if _found(BPF_MAP_LOOKUP_ELEM, attr) else None


def update(map_fd: int, key: bytes, value: bytes, flags: int = 0) -> None:
    """Store `value` under `key` (`flags` NOEXIST: only where nothing is stored yet)."""
    key_buffer = ctypes.create_string_buffer(key, len(key))
    value_buffer = ctypes.create_string_buffer(value, len(value))
    attr = struct.pack(
        "<IIQQQ", map_fd, 0, ctypes.addressof(key_buffer), ctypes.addressof(value_buffer), flags
    )
    bpf(BPF_MAP_UPDATE_ELEM, attr)


def delete(map_fd: int, key: bytes) -> bool:
    """Remove `key`; whether it was there."""
    key_buffer = ctypes.create_string_buffer(key, len(key))
    return _found(BPF_MAP_DELETE_ELEM, struct.pack("<IIQ", map_fd, 0, ctypes.addressof(key_buffer)))


def _found(command: int, attr: bytes) -> bool:
    """Run a map command on one key: False when the key is not there (ENOENT)."""
    result, code, _ = _syscall()(command, attr, check=False)
    if result < 0 and code != errno.ENOENT:
        raise OSError(code, os.strerror(code))
    return result >= 0


def entries(
    map_fd: int, key_size: int, value_size: int, batch: int = 256
) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of a hash map, `batch` at a time (BPF_MAP_LOOKUP_BATCH): a few
    calls for the whole map. An entry added or removed meanwhile may be in it or not."""
    keys = ctypes.create_string_buffer(key_size * batch)
    values = ctypes.create_string_buffer(value_size * batch)
    token = ctypes.create_string_buffer(max(key_size, 8))  # where the walk stands
    found: list[tuple[bytes, bytes]] = []
    first = True
    while True:
        attr = struct.pack(
            "<QQQQIIQQ",
            0 if first else ctypes.addressof(token), ctypes.addressof(token),
            ctypes.addressof(keys), ctypes.addressof(values), batch, map_fd, 0, 0,
        )  # fmt: skip
        result, code, reply = _syscall()(BPF_MAP_LOOKUP_BATCH, attr, check=False)
        if result < 0 and code != errno.ENOENT:
            raise OSError(code, os.strerror(code))
        count = int(struct.unpack_from("<I", reply.raw, 32)[0])
        raw_keys, raw_values = keys.raw, values.raw
        for index in range(count):
            found.append(
                (
                    raw_keys[index * key_size : (index + 1) * key_size],
                    raw_values[index * value_size : (index + 1) * value_size],
                )
            )
        if result < 0:  # ENOENT: the walk is over
            return found
        first = False


def load_program(program: bytes, name: str, license_: str = "Apache-2.0") -> int:
    """A SCHED_CLS program's descriptor, once the verifier has accepted it.

    Loaded without the verifier's log (a log too small for what it would say fails the
    load); refused, it is loaded again with the log, and BpfUnavailable carries the
    verifier's last words (what a user can act on is that the kernel said no; the words
    help whoever reads the report). Only helpers open to any licence are used.
    """
    insns = ctypes.create_string_buffer(program, len(program))
    licence = ctypes.create_string_buffer(license_.encode())
    log = ctypes.create_string_buffer(_LOG_SIZE)

    def attr(log_level: int) -> bytes:
        return struct.pack(
            "<IIQQIIQII",
            PROG_SCHED_CLS, len(program) // 8, ctypes.addressof(insns), ctypes.addressof(licence),
            log_level, _LOG_SIZE if log_level else 0, ctypes.addressof(log) if log_level else 0,
            0, 0,
        ) + _name(name)  # fmt: skip

    try:
        fd, _ = bpf(BPF_PROG_LOAD, attr(0))
    except OSError as exc:
        refused = exc
    else:
        return fd
    with contextlib.suppress(OSError):
        os.close(bpf(BPF_PROG_LOAD, attr(1))[0])  # accepted this time: the words are moot
    words = log.value.decode(errors="replace").strip().splitlines()[-3:]
    said = f" (verifier: {' / '.join(words)})" if words else ""
    raise BpfUnavailable(f"the kernel refused the BPF program: {refused.strerror}{said}")


def attach_tcx(program_fd: int, ifindex: int, ingress: bool) -> int:
    """A tcx link: `program_fd` runs on the device's ingress or egress until the link closes.

    On ingress it runs first and on egress last, after the device's other programs: it
    sees packets as they are on the wire, whatever those programs change or drop.
    """
    kind, flags = (TCX_INGRESS, F_BEFORE) if ingress else (TCX_EGRESS, 0)
    attr = struct.pack("<IIIIIIQ", program_fd, ifindex, kind, flags, 0, 0, 0)
    try:
        fd, _ = bpf(BPF_LINK_CREATE, attr)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            raise BpfUnavailable(
                "this kernel has no tcx links (Linux 6.6 and later have them)"
            ) from None
        raise BpfUnavailable(f"cannot attach to interface {ifindex}: {exc.strerror}") from None
    return fd


def attached(ifindex: int, ingress: bool) -> int:
    """How many programs run on the device's tcx ingress or egress (this thread's namespace)."""
    attr = struct.pack("<IIIIQI", ifindex, TCX_INGRESS if ingress else TCX_EGRESS, 0, 0, 0, 0)
    try:
        _, reply = bpf(BPF_PROG_QUERY, attr)
    except OSError as exc:
        raise BpfUnavailable(
            f"cannot list interface {ifindex}'s programs: {exc.strerror}"
        ) from None
    return int(struct.unpack_from("<I", reply.raw, 24)[0])


def run_statistics() -> int:
    """A descriptor that keeps the kernel timing every BPF program's runs while it is open
    (BPF_ENABLE_STATS: closing it, or the process's death, switches it off again)."""
    try:
        fd, _ = bpf(BPF_ENABLE_STATS, struct.pack("<I", 0))  # BPF_STATS_RUN_TIME
    except OSError as exc:
        raise BpfUnavailable(f"cannot time BPF programs: {exc.strerror}") from None
    return fd


def run_time(program_fd: int) -> tuple[int, int]:
    """(ns spent in it, runs) of a program, counted while run_statistics() was open."""
    info = ctypes.create_string_buffer(_PROG_INFO_SIZE)
    attr = struct.pack("<IIQ", program_fd, _PROG_INFO_SIZE, ctypes.addressof(info))
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    spent, runs = struct.unpack_from("<QQ", info.raw, _PROG_INFO_RUN_TIME)
    return spent, runs


_PROG_INFO_RUN_TIME: Final = 192  # struct bpf_prog_info's run_time_ns, then run_cnt
_PROG_INFO_SIZE: Final = 232


# A ring buffer map's records (kernel/bpf/ringbuf.c): an 8-byte header, its length's top
# bits say "still being written" and "discarded", then the data, padded to 8 bytes.
LENGTH: Final = struct.Struct("=I")
BUSY: Final = 1 << 31
DISCARDED: Final = 1 << 30
_POSITION: Final = struct.Struct("=Q")


class Ring:
    """The reading side of a BPF_MAP_TYPE_RINGBUF: records in the order they were reserved.

    Its records are read by a subclass that knows their layout (discover/ebpf.py's
    PacketRing): from `span`'s start, each one's LENGTH word (BUSY: not yet submitted, stop
    there; DISCARDED: skip it), its data after the 8-byte header, the next one 8-aligned;
    then `release` up to where it stopped.
    """

    def __init__(self, map_fd: int, size: int) -> None:
        page = mmap.PAGESIZE
        self.size = size
        self._mask = size - 1
        # The consumer's page is ours to write; the producer's page and the data (mapped
        # twice in a row, so a record that wraps reads as one piece) are the kernel's.
        self._consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._producer = mmap.mmap(
            map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page
        )
        self._data = page

    def pending(self) -> int:
        """Bytes written and not yet read."""
        (produced,) = _POSITION.unpack_from(self._producer, 0)
        (consumed,) = _POSITION.unpack_from(self._consumer, 0)
        return int(produced - consumed)

    def span(self, limit: int) -> tuple[int, int]:
        """Where reading starts, and where it may go on to (at most `limit` bytes on)."""
        (position,) = _POSITION.unpack_from(self._consumer, 0)
        (produced,) = _POSITION.unpack_from(self._producer, 0)
        return position, min(produced, position + limit)

    def release(self, position: int) -> None:
        """Everything before `position` is read: the kernel may write there again."""
        _POSITION.pack_into(self._consumer, 0, position)

    def close(self) -> None:
        self._consumer.close()
        self._producer.close()
