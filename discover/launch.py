"""`-- COMMAND ARGS...`: run a command in a fresh namespace and capture from its first packet.

depdrill creates the namespace, a veth pair to the host (a free /30 in 198.19.0.0/16), a
default route to the host side, and /etc/netns/<ns>/resolv.conf naming the resolver the caller
gives (the host side by default). No NAT: the command reaches the host, and other networks
only when the caller asks for forwarding; the internet never answers a 198.19.x source.
Capture is filtering before the command's first instruction runs, so nothing hides behind a
warm cache. Namespace, veth and /etc/netns/<ns> are removed on every exit path.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shlex
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pydantic import Field

from depdrill.artifact import Frozen
from depdrill.discover.model import Graph
from depdrill.discover.run import DiscoverOptions, TapChoice, run
from depdrill.errors import CapabilityError, InputError, TargetError
from depdrill.netns import Target

NETNS_ETC: Final = Path("/etc/netns")
LAUNCH_RANGE: Final = ipaddress.ip_network("198.19.0.0/16")
TERM_GRACE_S: Final = 3.0
# After the command exits its last answers may still be on the way to the ring.
LINGER_S: Final = 0.3
FOREVER_S: Final = 365 * 24 * 3600.0
MAX_PREFIX: Final = 8  # prefix + 6 hex + 1 must fit IFNAMSIZ (15)


@dataclass(frozen=True)
class LaunchNet:
    """A namespace depdrill made for a command: its name, addresses and resolver."""

    namespace: str
    host_link: str
    host_address: str
    address: str
    resolver: str

    @property
    def target(self) -> Target:
        return Target(netns=self.namespace)

    def popen(self, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start argv in the namespace (with its resolv.conf bound over /etc/resolv.conf)."""
        return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
            ["ip", "netns", "exec", self.namespace, *argv], **kwargs
        )


class CommandOptions(Frozen):
    """How to run and watch a command; `duration_s` None means until the command exits."""

    resolver: str | None = None
    duration_s: float | None = Field(default=None, gt=0)
    label: str | None = None
    max_names: int = Field(default=10_000, ge=1)
    forward: bool = False
    prefix: str = "dd"
    tap: TapChoice = "auto"


def _ip(*argv: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *argv], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        error = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"
        if "Operation not permitted" in error or "Permission denied" in error:
            raise CapabilityError(f"ip {argv[0]}: {error} (run as root, see `depdrill doctor`)")
        raise TargetError(f"ip {' '.join(argv)}: {error}")
    return done


def free_link_network() -> ipaddress.IPv4Network:
    """A /30 in a 198.19.x.0/24 that no address or route on the host touches yet."""
    used = _ip("-4", "route", "show", "table", "all").stdout + _ip("-4", "addr", "show").stdout
    for _ in range(400):
        third = secrets.randbelow(254) + 1
        if f"198.19.{third}." in used:
            continue
        quad = secrets.randbelow(63) * 4
        return ipaddress.ip_network(f"198.19.{third}.{quad}/30")  # type: ignore[return-value]
    raise TargetError("no free /30 left in 198.19.0.0/16 for the command's namespace")


def _check_argv(argv: Sequence[str]) -> None:
    if not argv:
        raise InputError("no command given after `--`")
    program = argv[0]
    if "/" in program:
        path = Path(program)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise InputError(f"command not found or not executable: {program}")
    elif shutil.which(program) is None:
        raise InputError(f"command not found: {program}")


def _check_resolver(resolver: str) -> str:
    try:
        return ipaddress.ip_address(resolver).compressed
    except ValueError:
        raise InputError(f"resolver is not an IP address: {resolver!r}") from None


def _check_prefix(prefix: str) -> None:
    if not (1 <= len(prefix) <= MAX_PREFIX and prefix.isascii() and prefix.isalnum()):
        raise InputError(f"namespace prefix must be 1-{MAX_PREFIX} letters or digits: {prefix!r}")


@contextmanager
def launch_namespace(
    resolver: str | None = None, *, forward: bool = False, prefix: str = "dd"
) -> Iterator[LaunchNet]:
    """A fresh namespace wired to the host, removed afterwards with everything left in it.

    `forward` lets packets from the namespace be routed on by the host (its veth only:
    net.ipv4.conf.<veth>.forwarding), still without NAT.
    """
    _check_prefix(prefix)
    if resolver is not None:
        resolver = _check_resolver(resolver)
    token = secrets.token_hex(3)
    namespace = f"{prefix}-launch-{token}"
    host_link, inner_link = f"{prefix}{token}h", f"{prefix}{token}n"
    network = free_link_network()
    host_ip, ns_ip = (str(a) for a in network.hosts())
    net = LaunchNet(namespace, host_link, host_ip, ns_ip, resolver or host_ip)
    etc = NETNS_ETC / namespace
    try:
        _ip("netns", "add", namespace)
        _ip("link", "add", host_link, "type", "veth", "peer", "name", inner_link)
        _ip("link", "set", inner_link, "netns", namespace)
        _ip("-n", namespace, "link", "set", inner_link, "name", "eth0")
        _ip("addr", "add", f"{host_ip}/30", "dev", host_link)
        _ip("-n", namespace, "addr", "add", f"{ns_ip}/30", "dev", "eth0")
        _ip("link", "set", host_link, "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        _ip("-n", namespace, "route", "add", "default", "via", host_ip)
        if forward:
            Path(f"/proc/sys/net/ipv4/conf/{host_link}/forwarding").write_text("1\n")
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(f"nameserver {net.resolver}\n")
        yield net
    finally:
        _kill_everything_in(namespace)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", host_link], capture_output=True, check=False)
        shutil.rmtree(etc, ignore_errors=True)


def _kill_everything_in(namespace: str) -> None:
    """The command and anything it left behind: every process in the namespace we made."""
    listed = subprocess.run(
        ["ip", "netns", "pids", namespace], capture_output=True, text=True, check=False
    )
    for pid in listed.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)


def _stop_command(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(TERM_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def launched(
    argv: Sequence[str],
    resolver: str | None = None,
    *,
    forward: bool = False,
    prefix: str = "dd",
    before_start: Callable[[Target], None] | None = None,
    **popen: object,
) -> Iterator[tuple[Target, subprocess.Popen[bytes]]]:
    """Start argv in a fresh namespace; (its Target, the process). Stopped and removed after.

    `before_start` runs once the namespace exists and before the command does: the place to
    start a capture (or anything else that must see the first packet) and wait for it.
    `popen` goes to subprocess.Popen (stdout=, env=, ...).
    """
    _check_argv(argv)
    with launch_namespace(resolver, forward=forward, prefix=prefix) as net:
        if before_start is not None:
            before_start(net.target)
        proc = net.popen(argv, **popen)
        try:
            yield net.target, proc
        finally:
            _stop_command(proc)


def run_command(
    argv: Sequence[str],
    options: CommandOptions | None = None,
    stop: threading.Event | None = None,
) -> Graph:
    """Run argv in a fresh namespace, capturing from before its first packet until it exits,
    the duration passes or `stop` is set (then the command is stopped); the graph."""
    options = options or CommandOptions()
    _check_argv(argv)
    stop = stop or threading.Event()
    with launch_namespace(options.resolver, forward=options.forward, prefix=options.prefix) as net:
        discover = DiscoverOptions(
            target=net.target,
            duration_s=options.duration_s or FOREVER_S,
            label=options.label or Path(argv[0]).name,
            max_names=options.max_names,
            tap=options.tap,
        )
        ready = threading.Event()
        result: dict[str, Graph | BaseException] = {}

        def capture() -> None:
            try:
                result["graph"] = run(discover, stop, ready)
            except BaseException as exc:  # handed to the caller's thread below
                result["error"] = exc
                ready.set()

        thread = threading.Thread(target=capture, name="depdrill-launch-capture", daemon=True)
        thread.start()
        proc: subprocess.Popen[bytes] | None = None
        try:
            ready.wait()
            if "error" not in result:
                proc = net.popen(argv)
                _watch(proc, thread, stop)
        finally:
            if proc is not None:
                _stop_command(proc)
            stop.set()
            thread.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    graph = result["graph"]
    assert isinstance(graph, Graph)
    return graph.model_copy(update={"target": f"command {shlex.join(argv)}", "target_spec": None})


def _watch(proc: subprocess.Popen[bytes], capture: threading.Thread, stop: threading.Event) -> None:
    """Until the command exits (then a short linger), the capture ends, or `stop` is set."""
    while capture.is_alive() and not stop.is_set():
        if proc.poll() is not None:
            stop.wait(LINGER_S)
            return
        stop.wait(0.05)
