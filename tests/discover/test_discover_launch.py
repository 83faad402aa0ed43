"""`-- COMMAND`: a command run in a namespace depdrill makes, and names reached by SNI alone."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
from discover_world import World, client_hello
from discover_world import world_fixture as world_fixture  # the `world` fixture
from test_discover_correlate import SVC, Traffic

from depdrill.discover.launch import CommandOptions, launched, run_command
from depdrill.discover.model import ResolverNode, resolver_id
from depdrill.discover.packets import TCP_ACK, Segment
from depdrill.errors import InputError
from depdrill.netns import Target
from depdrill.testing import RUN

PREFIX = f"ddt{RUN}"

# Resolves through /etc/resolv.conf (dig without @), then reaches what it resolved, then a
# hard-coded address over TLS whose ClientHello names a host nobody looked up.
COMMAND = """
dig +time=1 +tries=1 +short api.x.test A
python3 - {api} {quiet} <<'EOF'
import socket, ssl, sys
api, quiet = sys.argv[1], sys.argv[2]
socket.create_connection((api, 8080), timeout=2).close()
ctx = ssl.create_default_context()
raw = socket.create_connection((quiet, 443), timeout=2)
try:
    ctx.wrap_socket(raw, server_hostname="pinned.x.test").close()
except OSError:
    pass
finally:
    raw.close()
print("client done")
EOF
"""


def _leftovers() -> list[str]:
    """This run's launch namespaces, veths (prefix, 6 hex, h or n) and /etc/netns entries."""
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    spaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    left = re.findall(rf"\b{PREFIX}[0-9a-f]{{6}}[hn]\b", links)
    left += re.findall(rf"\b{PREFIX}-launch-[0-9a-f]{{6}}\b", spaces)
    return left + [str(p) for p in Path("/etc/netns").glob(f"{PREFIX}-launch-*")]


def test_a_launched_command_is_seen_from_its_first_packet(world: World) -> None:
    # Given the scratch bridge routing for the command's namespace (forwarding on it only)
    Path(f"/proc/sys/net/ipv4/conf/{world.net.bridge}/forwarding").write_text("1\n")
    script = COMMAND.format(api=world.api_address, quiet=world.quiet_address)
    options = CommandOptions(resolver=world.resolver, forward=True, prefix=PREFIX, label="job")
    # When depdrill runs the command in a namespace of its own
    started = time.monotonic()
    graph = run_command(["sh", "-c", script], options)
    # Then it returned when the command ended, not at some duration
    assert time.monotonic() - started < 10
    assert graph.target.startswith("command sh -c") and graph.target_spec is None
    # And the resolver from its resolv.conf is a dependency, asked from the first query
    resolver = graph.node(resolver_id(world.resolver))
    assert isinstance(resolver, ResolverNode)
    deps = {d.name: d for d in graph.dependencies()}
    api = deps["api.x.test"]
    assert api.queries == 1 and api.addresses == [world.api_address] and api.ports == [8080]
    # And the hard-coded TLS endpoint is a dependency by its SNI, with no lookup behind it
    pinned = deps["pinned.x.test"]
    assert pinned.queries == 0 and pinned.rcodes == {}
    assert [(e.address, e.port) for e in pinned.endpoints] == [(world.quiet_address, 443)]
    # And nothing of the namespace, its veth or its /etc/netns directory is left
    assert _leftovers() == []


def test_a_long_command_is_stopped_at_the_duration_and_cleaned_up() -> None:
    # Given a command that would run for a minute and a half-second capture
    options = CommandOptions(duration_s=0.5, prefix=PREFIX)
    started = time.monotonic()
    # When it runs
    graph = run_command(["sleep", "60"], options)
    # Then the command is stopped when the capture ends and everything is removed
    assert time.monotonic() - started < 5
    assert graph.capture.packets == 0
    assert _leftovers() == []


def test_launched_yields_the_namespace_and_process_and_gives_the_resolver() -> None:
    # Given a command launched with a resolver of the caller's choice, and a hook that must
    # run before the command does
    seen_before: list[bool] = []

    def before_start(target: Target) -> None:
        target.check()  # the namespace exists already
        seen_before.append(True)

    argv = ["cat", "/etc/resolv.conf"]
    with launched(
        argv, "198.19.255.53", prefix=PREFIX, before_start=before_start, stdout=subprocess.PIPE
    ) as (target, proc):
        # When it runs, Then it lives in its own namespace and reads that resolver
        assert seen_before == [True]
        assert target.netns is not None and target.netns.startswith(f"{PREFIX}-launch-")
        out, _ = proc.communicate(timeout=5)
        assert out == b"nameserver 198.19.255.53\n"
    assert _leftovers() == []


@pytest.mark.parametrize(
    ("argv", "resolver", "message"),
    [
        ([], None, "no command given"),
        (["ddt-no-such-command"], None, "command not found: ddt-no-such-command"),
        (["true"], "resolver.example", "resolver is not an IP address"),
    ],
)
def test_bad_commands_are_one_clear_error(
    argv: list[str], resolver: str | None, message: str
) -> None:
    # Given a missing command or a resolver that is not an address
    # When run, Then one InputError says what is wrong and nothing was created
    with pytest.raises(InputError, match=message):
        run_command(argv, CommandOptions(resolver=resolver, prefix=PREFIX))
    assert _leftovers() == []


def test_sni_names_of_looked_up_names_are_not_counted_twice() -> None:
    # Given one TLS endpoint reached through a lookup and another by a hard-coded address
    traffic = Traffic()
    traffic.lookup("api.x.test", "198.19.1.20")
    for address, name in (("198.19.1.20", "api.x.test"), ("198.19.1.30", "pinned.x.test")):
        traffic.connect(address, 443)
        hello = client_hello(name)
        traffic.send(Segment(SVC, address, traffic.port, 443, "tcp", hello, TCP_ACK, 2))
    # When the dependencies are listed
    deps = {d.name: d for d in traffic.graph().dependencies()}
    # Then the looked-up name has its lookup, and the pinned one appears with none
    assert set(deps) == {"api.x.test", "pinned.x.test"}
    assert deps["api.x.test"].queries == 1 and deps["pinned.x.test"].queries == 0
    assert deps["pinned.x.test"].addresses == [] and deps["pinned.x.test"].ports == [443]
    assert deps["pinned.x.test"].canonical == "pinned.x.test"
