"""`lab down` leaves nothing behind: after a clean build, and after a build that crashed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from depdrill.lab import world
from depdrill.lab.model import Layout
from depdrill.lab.testing import free_subnet_index, run_prefix

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")


def leftovers(prefix: str, subnet_index: int) -> list[str]:
    """Every namespace, interface, file and live process that still belongs to the lab."""
    layout = Layout.of(prefix, subnet_index)
    found: list[str] = []
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [f"namespace {n}" for n in layout.namespaces if n in namespaces.split()]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    link_names = {line.split(":")[1].strip().split("@")[0] for line in links.splitlines()}
    found += [
        f"interface {n}" for n in link_names if n == layout.bridge or n.startswith(f"{prefix}-")
    ]
    found += [f"file {p}" for p in (layout.state_dir, layout.netns_etc) if p.exists()]
    marker = f"198.18.{subnet_index}.".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            zombie = (proc / "stat").read_text().split(") ", 1)[1].startswith("Z")
        except (OSError, IndexError):
            continue
        if not zombie and (marker in cmdline or str(layout.state_dir).encode() in cmdline):
            shown = cmdline.replace(b"\0", b" ")[:80]
            found.append(f"process {proc.name} {shown!r}")
    return found


def test_down_removes_everything_up_built() -> None:
    # Given a lab that is up
    prefix, index = run_prefix(), free_subnet_index()
    try:
        started = time.monotonic()
        state = world.up(prefix=prefix, subnet_index=index)
        took_up = time.monotonic() - started
        assert len(state.pids) == 6 and leftovers(prefix, index)
        # When it is taken down
        started = time.monotonic()
        removed = world.down(prefix)
        took_down = time.monotonic() - started
        # Then no namespace, interface, process or file of it is left
        assert leftovers(prefix, index) == []
        assert f"namespace {prefix}-svc" in removed and f"interface {prefix}br" in removed
        assert sum(item.startswith("process") for item in removed) == 6
        assert world.status(prefix) is None
        # And both were quick
        assert took_up < 10 and took_down < 5, (took_up, took_down)
        # And a second down has nothing left to do
        assert world.down(prefix) == []
    finally:
        world.down(prefix)


# A build killed (SIGKILL-like, no cleanup) at each step: after the certificates, after the
# network (namespaces recorded, no servers), after the servers started (pids recorded).
CRASH_POINTS = ["wiring", "starting", "waiting"]


@pytest.mark.parametrize("crash_at", CRASH_POINTS)
def test_down_cleans_up_after_a_crashed_up(crash_at: str) -> None:
    # Given `lab up` in another process that dies abruptly in the middle of the build
    prefix, index = run_prefix(), free_subnet_index()
    script = textwrap.dedent(
        f"""
        import os
        from depdrill.lab import world

        def progress(line):
            if {crash_at!r} in line:
                os._exit(9)

        world.up(prefix={prefix!r}, subnet_index={index}, progress=progress)
        """
    )
    try:
        crashed = subprocess.run(
            [sys.executable, "-P", "-c", script], capture_output=True, timeout=30
        )
        assert crashed.returncode == 9, crashed.stderr
        assert leftovers(prefix, index)  # the crash left things behind
        state = world.status(prefix)
        assert state is not None and not state.state.ready
        # When down runs from this process, which started none of it
        world.down(prefix)
        # Then nothing of the lab is left
        assert leftovers(prefix, index) == []
    finally:
        world.down(prefix)


def test_up_over_the_leftovers_of_a_crashed_build_succeeds() -> None:
    # Given a build that crashed after starting its servers
    prefix, index = run_prefix(), free_subnet_index()
    script = (
        "import os\nfrom depdrill.lab import world\n"
        f"world.up(prefix={prefix!r}, subnet_index={index},"
        " progress=lambda line: 'waiting' in line and os._exit(9))\n"
    )
    try:
        subprocess.run([sys.executable, "-P", "-c", script], capture_output=True, timeout=30)
        assert leftovers(prefix, index)
        # When the lab is built again with the same prefix
        messages: list[str] = []
        state = world.up(prefix=prefix, subnet_index=index, progress=messages.append)
        # Then the leftovers were removed first and the new lab is ready
        assert any("leftovers" in m for m in messages)
        lab_status = world.status(prefix)
        assert state.ready and lab_status is not None and lab_status.healthy
    finally:
        world.down(prefix)
    assert leftovers(prefix, index) == []
