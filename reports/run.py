"""The report stage's entry: results (+ graph, + an earlier run) -> HTML, JSON and JUnit."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from depdrill.discover.model import Graph
from depdrill.execute.model import Results
from depdrill.reports.build import build
from depdrill.reports.model import ReportModel
from depdrill.reports.render import render_model


@dataclass(frozen=True)
class ReportOptions:
    previous: Results | None = None  # an earlier run, to show what changed
    # The JUnit writer (depdrill.execute.junit.to_junit): passed in by the shell, because a
    # stage imports only the models of the stages before it.
    junit: Callable[[Results], str] | None = None
    created: datetime | None = None  # when the report was written (default: now)


@dataclass(frozen=True)
class RenderedReport:
    html: str
    json: str
    junit: str | None
    model: ReportModel


def run(
    results: Results, graph: Graph | None, options: ReportOptions | None = None
) -> RenderedReport:
    """Build the view once and draw it as HTML and JSON (and JUnit when a writer is given)."""
    options = options or ReportOptions()
    model = build(results, graph, options.previous, created=options.created)
    return RenderedReport(
        html=render_model(model, results),
        json=json.dumps(model.dump(), indent=2, sort_keys=True, ensure_ascii=False) + "\n",
        junit=options.junit(results) if options.junit is not None else None,
        model=model,
    )
