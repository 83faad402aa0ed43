"""Build, inspect and remove the lab: namespaces on a bridge, real servers, the demo service.

`up` records what it creates in the state file *before* creating it, so `down` can undo a
build that crashed at any point; `down` also finds the lab's namespaces and interfaces by
their prefix. A lab that is up and ready makes `up` refuse; leftovers of a crashed build
are removed first.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError

from depdrill.artifact import atomic_write
from depdrill.errors import CapabilityError, TargetError
from depdrill.lab import ca, checks
from depdrill.lab.model import (
    LEAF_DAYS,
    ROLES,
    SERVICE_PORT,
    LabDependency,
    LabState,
    LabStatus,
    Layout,
    Role,
)

Progress = Callable[[str], None]
READY_WITHIN_S = 20.0
_TOOLS = {"ip": "iproute2", "dnsmasq": "dnsmasq-base", "redis-server": "redis-server"}
# Lab processes started by this Python process: kept so they are reaped (no zombies that
# look alive) and never garbage-collected while running.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class LabExists(TargetError):
    """A lab with this prefix is already up (or being built)."""


class LabBuildError(TargetError):
    """A lab server did not come up; the lab was removed again."""


def _sh(
    *argv: str, stdin: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        problem = (done.stderr or done.stdout).strip().splitlines()
        raise LabBuildError(f"{' '.join(argv[:4])}: {problem[0] if problem else 'failed'}")
    return done


def _preflight() -> None:
    if os.geteuid() != 0:
        raise CapabilityError("the lab needs root (network namespaces, veths, a bridge)")
    for tool, package in _TOOLS.items():
        if shutil.which(tool) is None:
            raise CapabilityError(f"the lab needs `{tool}`: apt-get install {package}")


# ---------------------------------------------------------------- state


def _read_state(layout: Layout) -> LabState | None:
    try:
        return LabState.model_validate_json(layout.state_file.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValidationError, ValueError):
        return None  # unreadable: `down` still finds everything by prefix


def _write_state(state: LabState) -> None:
    atomic_write(state.layout.state_file, state.model_dump_json(indent=2) + "\n")


def _existing_namespaces(layout: Layout) -> list[str]:
    names = {line.split()[0] for line in _sh("ip", "netns", "list").stdout.splitlines() if line}
    return [n for n in layout.namespaces if n in names]


def _existing_links(layout: Layout) -> list[str]:
    listing = _sh("ip", "-o", "link", "show").stdout
    names = {
        line.split(":")[1].strip().split("@")[0] for line in listing.splitlines() if ":" in line
    }
    return [n for n in layout.interfaces if n in names]


def _subnet_in_use(layout: Layout) -> str | None:
    marker = f"198.18.{layout.subnet_index}."
    for line in _sh("ip", "-o", "-4", "addr", "show").stdout.splitlines():
        if marker in line:
            return line.split()[1]
    for line in _sh("ip", "-4", "route", "show").stdout.splitlines():
        if line.startswith(marker):
            return line
    return None


# ---------------------------------------------------------------- up


def up(prefix: str = "ddl", subnet_index: int = 0, progress: Progress | None = None) -> LabState:
    """Build the lab and return once every server answers and /health returns 200."""
    say = progress or (lambda _: None)
    layout = Layout.of(prefix, subnet_index)
    _preflight()
    _clear_way(layout, say)
    started = time.monotonic()
    state = LabState(
        prefix=layout.prefix,
        subnet_index=layout.subnet_index,
        subnet=layout.subnet,
        service_netns=layout.netns("svc"),
        service_url=layout.service_url,
        resolver=layout.address("dns"),
        ca_bundle=str(layout.state_dir / "tls" / "ca.pem"),
        dependencies=layout.dependencies,
        state_dir=str(layout.state_dir),
        files=[str(layout.state_dir), str(layout.netns_etc)],
        started=datetime.now(UTC),
        builder_pid=os.getpid(),
    )
    try:
        layout.state_dir.mkdir(parents=True, exist_ok=True)
        _write_state(state)
        say(f"lab {prefix}: issuing certificates (lab CA)")
        _issue_certificates(layout)
        say(f"lab {prefix}: wiring {len(ROLES)} namespaces on {layout.bridge} ({layout.subnet})")
        state = _build_network(layout, state)
        say(f"lab {prefix}: starting dnsmasq, redis, HTTPS APIs, statsd sink, demo service")
        state = _start_servers(layout, state)
        say(f"lab {prefix}: waiting until every server answers")
        _wait_ready(layout, state)
        state = state.model_copy(update={"ready": True})
        _write_state(state)
    except BaseException:
        down(prefix)
        raise
    say(f"lab {prefix}: up in {time.monotonic() - started:.1f} s; probe {layout.service_url}")
    return state


def _clear_way(layout: Layout, say: Progress) -> None:
    state = _read_state(layout)
    namespaces = _existing_namespaces(layout)
    # Ready and still there: someone may be using it (a fault on it looks like ill health
    # too), so never rebuild it behind their back.
    if state is not None and state.ready and namespaces:
        raise LabExists(
            f"lab {layout.prefix} is already up ({state.service_url}); "
            f"`depdrill lab down --prefix {layout.prefix}` removes it"
        )
    building = state is not None and not state.ready and state.builder_pid != os.getpid()
    if building and state is not None and _alive(state.builder_pid):
        raise LabExists(f"lab {layout.prefix} is being built by process {state.builder_pid}")
    leftovers = (
        namespaces
        or _existing_links(layout)
        or layout.state_dir.exists()
        or layout.netns_etc.exists()
    )
    if leftovers:
        say(f"lab {layout.prefix}: removing leftovers of an earlier build")
        down(layout.prefix)
    used_by = _subnet_in_use(layout)
    if used_by is not None:
        raise LabExists(
            f"subnet {layout.subnet} is already in use ({used_by}); choose another --subnet"
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _issue_certificates(layout: Layout) -> None:
    folder = layout.state_dir / "tls"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    root = ca.make_root()
    intermediate = ca.make_intermediate(root)
    (folder / "ca.pem").write_bytes(ca.pem(root.cert))
    for dep in layout.dependencies:
        if not dep.tls:
            continue
        names = [dep.name] + ([dep.cname] if dep.cname else [])
        leaf, key = ca.make_leaf(intermediate, names, days=LEAF_DAYS[dep.name])
        ca.write_server_files(folder, dep.role, leaf, key, intermediate)


def _build_network(layout: Layout, state: LabState) -> LabState:
    # Recorded first: a crash between here and the end leaves nothing `down` cannot find.
    state = state.model_copy(
        update={"namespaces": layout.namespaces, "interfaces": layout.interfaces}
    )
    _write_state(state)
    gateway = layout.gateway
    for ns in layout.namespaces:
        _sh("ip", "netns", "add", ns)
    host = [
        f"link add {layout.bridge} type bridge",
        f"addr add {gateway}/24 dev {layout.bridge}",
        f"link set {layout.bridge} up",
    ]
    for role in ROLES:
        veth, ns = layout.veth(role), layout.netns(role)
        host += [
            f"link add {veth} type veth peer name eth0 netns {ns}",
            f"link set {veth} master {layout.bridge}",
            f"link set {veth} up",
        ]
    _sh("ip", "-batch", "-", stdin="\n".join(host) + "\n")
    for role in ROLES:
        inside = [
            f"addr add {layout.address(role)}/24 dev eth0",
            "link set lo up",
            "link set eth0 up",
            f"route add default via {gateway}",
        ]
        _sh("ip", "-n", layout.netns(role), "-batch", "-", stdin="\n".join(inside) + "\n")
    # The service resolves through the lab's DNS server only; a dead resolver costs 1 s.
    layout.netns_etc.mkdir(parents=True, exist_ok=True)
    (layout.netns_etc / "resolv.conf").write_text(
        f"nameserver {layout.address('dns')}\noptions timeout:1 attempts:1\n"
    )
    return state


def _start(layout: Layout, role: Role, argv: list[str]) -> int:
    log_path = layout.state_dir / f"{role}.log"
    with log_path.open("ab") as log:
        # A session of their own: the lab outlives the command that built it.
        child = subprocess.Popen(
            ["ip", "netns", "exec", layout.netns(role), *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd="/",
        )
    _CHILDREN[child.pid] = child
    return child.pid


def _server_commands(layout: Layout) -> dict[Role, list[str]]:
    tls = layout.state_dir / "tls"
    python = [sys.executable, "-P", "-m"]
    deps = {d.role: d for d in layout.dependencies}

    def https(role: Role, name: str) -> list[str]:
        dep = deps[role]
        return [
            *python, "depdrill.lab.servers", "https",
            "--bind", dep.address, "--port", str(dep.port), "--name", name,
            "--chain", str(tls / f"{role}.chain.pem"), "--key", str(tls / f"{role}.key.pem"),
        ]  # fmt: skip

    return {
        "dns": [
            "dnsmasq",
            "--no-daemon",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            f"--listen-address={layout.address('dns')}",
            "--port=53",
            "--pid-file=",
            "--user=nobody",
            "--log-facility=-",
            # Authoritative for the lab's domain: other names in it are NXDOMAIN, not REFUSED.
            "--local=/lab.test/",
            *(f"--host-record={d.cname or d.name},{d.address}" for d in deps.values()),
            *(f"--cname={d.name},{d.cname}" for d in deps.values() if d.cname),
        ],
        "pay": https("pay", "payments"),
        "rec": https("rec", "recommend"),
        "cache": [
            "redis-server",
            "--bind",
            deps["cache"].address,
            "--port",
            str(deps["cache"].port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(layout.state_dir),
            "--logfile",
            "",
        ],
        "met": [
            *python,
            "depdrill.lab.servers",
            "statsd",
            "--bind",
            deps["met"].address,
            "--port",
            str(deps["met"].port),
        ],
        "svc": [
            *python,
            "depdrill.lab.service",
            "--listen",
            f"{layout.address('svc')}:{SERVICE_PORT}",
            "--ca-bundle",
            str(tls / "ca.pem"),
            "--payments",
            _endpoint(deps["pay"]),
            "--recommend",
            _endpoint(deps["rec"]),
            "--cache",
            _endpoint(deps["cache"]),
            "--metrics",
            _endpoint(deps["met"]),
        ],
    }


def _endpoint(dep: LabDependency) -> str:
    return f"{dep.name}:{dep.port}"


def _start_servers(layout: Layout, state: LabState) -> LabState:
    for role, argv in _server_commands(layout).items():
        pid = _start(layout, role, argv)
        state = state.model_copy(update={"pids": {**state.pids, role: pid}})
        _write_state(state)
    return state


def _wait_ready(layout: Layout, state: LabState) -> None:
    deadline = time.monotonic() + READY_WITHIN_S
    pending = list(ROLES)
    last: dict[str, str] = {}
    while pending:
        for role in list(pending):
            child = _CHILDREN.get(state.pids[role])
            if child is not None and child.poll() is not None:
                raise LabBuildError(
                    f"lab {layout.prefix}: {role} exited with {child.returncode}: "
                    f"{_log_tail(layout, role)}"
                )
            health = checks.check(role, layout, state)
            if health.ok:
                pending.remove(role)
            last[role] = health.detail
        if not pending:
            return
        if time.monotonic() > deadline:
            role = pending[0]
            raise LabBuildError(
                f"lab {layout.prefix}: {role} not ready within {READY_WITHIN_S:.0f} s "
                f"({last.get(role, 'no answer')}); log: {_log_tail(layout, role)}"
            )
        time.sleep(0.05)


def _log_tail(layout: Layout, role: str) -> str:
    try:
        lines = (layout.state_dir / f"{role}.log").read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    return " | ".join(lines[-3:]) or "empty log"


# ---------------------------------------------------------------- down


def down(prefix: str = "ddl") -> list[str]:
    """Remove every process, interface, namespace and file of the lab; say what went."""
    layout = Layout.of(prefix, 0)
    if os.geteuid() != 0:
        raise CapabilityError("removing the lab needs root")
    state = _read_state(layout)
    namespaces = sorted(set(_existing_namespaces(layout)) | set(state.namespaces if state else []))
    removed = _stop_processes(namespaces, state)
    for link in _existing_links(layout):
        if _sh("ip", "link", "del", link, check=False).returncode == 0:
            removed.append(f"interface {link}")
    for ns in namespaces:
        if _sh("ip", "netns", "del", ns, check=False).returncode == 0:
            removed.append(f"namespace {ns}")
    for folder in (layout.netns_etc, layout.state_dir):
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(f"folder {folder}")
    with contextlib.suppress(OSError):  # other labs live there, or it is gone already
        layout.state_dir.parent.rmdir()
    return removed


def _namespace_pids(namespaces: list[str]) -> set[int]:
    pids: set[int] = set()
    for ns in namespaces:
        listing = _sh("ip", "netns", "pids", ns, check=False).stdout.split()
        pids |= {int(p) for p in listing if p.isdigit()}
    return pids


def _stop_processes(namespaces: list[str], state: LabState | None) -> list[str]:
    """Stop the processes living in the lab's namespaces (and reap the ones we started)."""
    targets = _namespace_pids(namespaces)
    # A recorded pid outside the namespaces is only ours if this process started it.
    if state is not None:
        targets |= {pid for pid in state.pids.values() if pid in _CHILDREN}
    targets.discard(os.getpid())
    names = {pid: _process_name(pid) for pid in targets}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        ends = time.monotonic() + 2.0
        while targets and time.monotonic() < ends:
            targets = {pid for pid in targets if _still_running(pid)}
            if targets:
                time.sleep(0.02)
        if not targets:
            break
    return [f"process {pid} ({names[pid]})" for pid in sorted(names)]


def _still_running(pid: int) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del _CHILDREN[pid]
        return False
    try:
        # A zombie has exited; its parent (not us) reaps it.
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "gone"


# ---------------------------------------------------------------- status


def status(prefix: str = "ddl") -> LabStatus | None:
    """The lab's state and each component's health now; None when no lab has this prefix."""
    layout = Layout.of(prefix, 0)
    state = _read_state(layout)
    if state is None:
        return None
    layout = state.layout
    components = [checks.check(role, layout, state) for role in ROLES]
    healthy = state.ready and all(c.ok for c in components)
    return LabStatus(state=state, components=components, healthy=healthy)


def describe_status(lab: LabStatus) -> str:
    state = lab.state
    head = "up" if lab.healthy else ("unhealthy" if state.ready else "not ready (build unfinished)")
    lines = [f"lab {state.prefix} is {head}: {state.subnet}, probe {state.service_url}"]
    for c in lab.components:
        lines.append(f"  {'ok ' if c.ok else 'BAD'} {c.role:<5} {c.name}: {c.detail}")
    return "\n".join(lines)


def load_state(prefix: str = "ddl") -> LabState:
    """The state of a lab that is up, or a TargetError saying how to build it."""
    state = _read_state(Layout.of(prefix, 0))
    if state is None or not state.ready:
        raise TargetError(f"lab {prefix} is not up; `depdrill lab up --prefix {prefix}` builds it")
    return state
