"""Render a run as one self-contained HTML page (jinja2, autoescape) or as JSON."""

from __future__ import annotations

import json
from datetime import datetime
from functools import cache

import jinja2

from depdrill.discover.model import Graph
from depdrill.execute.model import Results
from depdrill.reports.build import build
from depdrill.reports.findings import TOP
from depdrill.reports.model import ReportModel
from depdrill.reports.svg import Timeline, graph_layout, timeline
from depdrill.reports.text import duration, unicode_form, visible, visible_lines

# The page runs no script and loads nothing: a viewer's browser enforces it.
CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
    "base-uri 'none'; form-action 'none'"
)

__all__ = ["CSP", "ReportModel", "build", "render_html", "render_model", "report_json"]


def _when(value: datetime | None) -> str:
    return "n/a" if value is None else f"{value:%Y-%m-%d %H:%M:%S} UTC"


def _days(value: float | None) -> str:
    if value is None:
        return "n/a"
    whole = int(value)
    if whole < 0:
        return f"expired {-whole} day{'s' * (whole != -1)} ago"
    return f"{whole} day{'s' * (whole != 1)}"


@cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("depdrill.reports", "templates"),
        autoescape=True,  # every name, certificate field and error is attacker-chosen text
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        visible=visible,
        visible_lines=visible_lines,
        duration=duration,
        when=_when,
        days=_days,
        unicode_form=unicode_form,
    )
    return env


def _timelines(model: ReportModel, results: Results) -> dict[str, Timeline]:
    out = {}
    slo = results.suite.service.slo
    specs = {t.id: t for t in results.suite.tests}
    for test in model.tests:
        spec = specs.get(test.id)
        budget = spec.slo.p95_ms if spec is not None and spec.slo is not None else slo.p95_ms
        drawing = timeline(test.samples, test.phases, budget)
        if drawing is not None:
            out[test.id] = drawing
    return out


def render_model(model: ReportModel, results: Results) -> str:
    drawing = graph_layout(model.dependencies, model.scan.service)
    return (
        environment()
        .get_template("report.html.j2")
        .render(
            r=model,
            csp=CSP,
            top=TOP,
            graph=drawing,
            timelines=_timelines(model, results),
        )
    )


def render_html(results: Results, graph: Graph | None, previous: Results | None = None) -> str:
    return render_model(build(results, graph, previous), results)


def report_json(results: Results, graph: Graph | None, previous: Results | None = None) -> str:
    model = build(results, graph, previous)
    return json.dumps(model.dump(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
