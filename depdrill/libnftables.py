"""libnftables through ctypes: a context whose netlink socket lives as long as the object.

The `nft` CLI exits after each command, so a table it creates with the owner flag is gone
at once. A context kept open here holds the socket that owns the table: the kernel removes
the table when the socket closes, which includes this process dying by SIGKILL. The socket
belongs to the network namespace of the thread that created the context.
"""

from __future__ import annotations

import ctypes
import threading

from depdrill.errors import CapabilityError

LIBRARY = "libnftables.so.1"

_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()


class NftError(Exception):
    """A command libnftables rejected, with its own error text."""


def library() -> ctypes.CDLL:
    global _lib
    with _lib_lock:
        if _lib is None:
            try:
                lib = ctypes.CDLL(LIBRARY)
            except OSError as exc:
                raise CapabilityError(
                    f"cannot load {LIBRARY} (apt install libnftables1): {exc}"
                ) from None
            lib.nft_ctx_new.restype = ctypes.c_void_p
            lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
            lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
            lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
            lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
            _lib = lib
        return _lib


class NftContext:
    """One libnftables context; thread-safe; create it inside the namespace it acts on."""

    def __init__(self) -> None:
        self._lib = library()
        handle = self._lib.nft_ctx_new(0)
        if not handle:
            raise CapabilityError("libnftables could not open a netlink socket")
        self._ctx: int | None = handle
        self._lock = threading.Lock()
        self._lib.nft_ctx_buffer_output(handle)
        self._lib.nft_ctx_buffer_error(handle)

    def run(self, commands: str) -> str:
        """Run one batch (a transaction: all of it applies or none); return its text output.

        Text, never JSON: libnftables 1.0.6 sometimes ends its JSON for an owner table at
        `"flags": ` (seen in CI), while the text listing stays whole."""
        with self._lock:
            if self._ctx is None:
                raise NftError("the nftables context is closed")
            status = self._lib.nft_run_cmd_from_buffer(self._ctx, commands.encode())
            output = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode()
            error = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode()
        if status != 0:
            raise NftError(" ".join(error.split()) or f"nft failed with status {status}")
        return output

    def close(self) -> None:
        """Free the context: its socket closes, and owner tables it created go with it."""
        with self._lock:
            if self._ctx is not None:
                self._lib.nft_ctx_free(self._ctx)
                self._ctx = None

    @property
    def closed(self) -> bool:
        return self._ctx is None

    def __enter__(self) -> NftContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
