"""Shared fixtures: throwaway network namespaces on a per-run bridge in 198.19.0.0/16."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest

from depdrill.testing import RUN, ScratchNet, scratch_bridge, sh

__all__ = ["RUN", "ScratchNet", "sh"]
_fixtures = itertools.count(1)


@pytest.fixture
def scratch_net() -> Iterator[ScratchNet]:
    """Given a fresh bridge with room for namespaces; removed afterwards, pass or fail."""
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    index = next(_fixtures)
    with scratch_bridge(index, f"ddt{RUN}b{index}") as net:
        yield net
