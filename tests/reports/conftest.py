"""Fixtures of the report tests: a lab-like run and one whose every text is hostile."""

from __future__ import annotations

import pytest
from report_hostile import hostile_run

from depdrill.discover.model import Graph
from depdrill.execute.model import Results
from depdrill.reports.synthetic import synthetic_run


@pytest.fixture
def lab_run() -> tuple[Results, Graph]:
    return synthetic_run()


@pytest.fixture
def hostile() -> tuple[Results, Graph]:
    return hostile_run()
