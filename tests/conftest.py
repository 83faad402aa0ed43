"""Shared fixtures: throwaway network namespaces on a per-run bridge in 198.19.0.0/16."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest

from depdrill.testing import RUN, ScratchNet, free_subnet, sh

__all__ = ["RUN", "ScratchNet", "sh"]
_fixtures = itertools.count(1)


@pytest.fixture
def scratch_net() -> Iterator[ScratchNet]:
    """Given a fresh bridge with room for namespaces; removed afterwards, pass or fail."""
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    index = next(_fixtures)
    net = ScratchNet(index=index, bridge=f"ddt{RUN}b{index}", subnet=free_subnet())
    try:
        sh("ip", "link", "add", net.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{net.host_address}/24", "dev", net.bridge)
        sh("ip", "link", "set", net.bridge, "up")
        yield net
    finally:
        net.teardown()
