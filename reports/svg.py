"""Geometry of the inline SVG drawings: the layered dependency graph and each test's probe
timeline. Only numbers and class names are computed here; every text reaches the page
through the autoescaping template."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from depdrill.execute.model import Phase, Sample
from depdrill.reports.model import DependencyRow
from depdrill.reports.text import duration, visible

ROW_H = 26
BOX_H = 20
GAP = 44
MAX_ENDPOINTS_SHOWN = 4
MAX_CNAMES_SHOWN = 2
CHAR_W = 7.2  # a generous average advance of the 11 px label font: labels stay inside boxes


@dataclass(frozen=True)
class Box:
    x: float
    y: float
    w: float
    label: str
    title: str
    cls: str
    href: str | None = None  # "#anchor", built from anchors made of [a-z0-9-] only

    @property
    def h(self) -> int:
        return BOX_H

    @property
    def text_x(self) -> float:
        return self.x + 6

    @property
    def text_y(self) -> float:
        return self.y + 14


@dataclass(frozen=True)
class Edge:
    d: str
    cls: str


@dataclass(frozen=True)
class GraphDrawing:
    width: float
    height: float
    boxes: list[Box] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)


def _fit(text: str, width: float) -> str:
    return visible(text, max(int((width - 12) / CHAR_W), 4))


def _curve(x1: float, y1: float, x2: float, y2: float) -> str:
    mid = (x1 + x2) / 2
    return f"M{x1:.1f} {y1:.1f}C{mid:.1f} {y1:.1f} {mid:.1f} {y2:.1f} {x2:.1f} {y2:.1f}"


def graph_layout(rows: Sequence[DependencyRow], service: str) -> GraphDrawing:
    """Layers left to right: service, names (and the resolver), CNAME chain, endpoints; each
    dependency gets its own lane, so 50 dependencies stack into 50 readable lanes."""
    chain_cols = min(max((len(r.cnames) for r in rows), default=0), MAX_CNAMES_SHOWN)
    service_w, name_w, cname_w, end_w = 150.0, 240.0, 200.0, 180.0
    x_name = 10 + service_w + GAP
    x_cnames = [x_name + name_w + GAP + i * (cname_w + GAP) for i in range(chain_cols)]
    x_end = x_name + name_w + GAP + chain_cols * (cname_w + GAP)
    width = x_end + end_w + 10
    boxes: list[Box] = []
    edges: list[Edge] = []
    y = 10.0
    lane_mids: list[tuple[float, str]] = []
    ordered = sorted(rows, key=lambda r: (r.kind != "resolver", r.name))
    for row in ordered:
        targets = row.endpoints or row.addresses
        shown = targets[:MAX_ENDPOINTS_SHOWN]
        more = len(targets) - len(shown)
        lines = max(1, len(shown) + (1 if more else 0))
        lane_h = lines * ROW_H
        mid = y + lane_h / 2
        verdict = f"v-{row.worst}"
        name_box = Box(
            x=x_name,
            y=mid - BOX_H / 2,
            w=name_w,
            label=_fit(row.name, name_w),
            title=visible(row.name),
            cls=f"n-{row.kind} {verdict}",
            href=f"#{row.anchor}",
        )
        boxes.append(name_box)
        lane_mids.append((mid, verdict))
        last_x, last_y = x_name + name_w, mid
        chain = row.cnames
        for i, x_col in enumerate(x_cnames[: len(chain)]):
            is_last_col = i == MAX_CNAMES_SHOWN - 1
            hidden = len(chain) - MAX_CNAMES_SHOWN
            label = f"… +{hidden} → {chain[-1]}" if is_last_col and hidden > 0 else chain[i]
            boxes.append(
                Box(
                    x=x_col,
                    y=mid - BOX_H / 2,
                    w=cname_w,
                    label=_fit(label, cname_w),
                    title="CNAME " + " → ".join(visible(c) for c in chain),
                    cls="n-cname",
                )
            )
            edges.append(Edge(d=_curve(last_x, last_y, x_col, mid), cls="e-cname"))
            last_x, last_y = x_col + cname_w, mid
        for j, target in enumerate(shown):
            ty = y + j * ROW_H + (ROW_H - BOX_H) / 2
            boxes.append(
                Box(
                    x=x_end,
                    y=ty,
                    w=end_w,
                    label=_fit(target, end_w),
                    title=visible(target),
                    cls="n-endpoint" if row.endpoints else "n-address",
                )
            )
            edges.append(Edge(d=_curve(last_x, last_y, x_end, ty + BOX_H / 2), cls="e-link"))
        if more:
            ty = y + len(shown) * ROW_H + (ROW_H - BOX_H) / 2
            boxes.append(
                Box(
                    x=x_end,
                    y=ty,
                    w=end_w,
                    label=f"+{more} more",
                    title=f"{more} more",
                    cls="n-more",
                )
            )
        y += lane_h + 6
    height = max(y + 4, 60.0)
    service_y = height / 2 - BOX_H / 2
    boxes.insert(
        0,
        Box(
            x=10,
            y=service_y,
            w=service_w,
            label=_fit(service, service_w),
            title=visible(service),
            cls="n-service",
        ),
    )
    for mid, verdict in lane_mids:
        edges.insert(
            0, Edge(d=_curve(10 + service_w, height / 2, x_name, mid), cls=f"e-dep {verdict}")
        )
    return GraphDrawing(width=width, height=height, boxes=boxes, edges=edges)


@dataclass(frozen=True)
class Tick:
    at: float
    label: str


@dataclass(frozen=True)
class Span:
    x: float
    w: float
    label: str
    cls: str
    label_x: float = 0.0
    label_anchor: str = "start"  # "end" when the label would run past the plot's right edge


def _label_placed(span: Span, right_edge: float) -> Span:
    """The label inside the drawing: a short last phase (a recovery of three samples) has
    its label end at the right edge instead of running off it."""
    if span.x + 4 + len(span.label) * CHAR_W <= right_edge:
        return replace(span, label_x=span.x + 4)
    return replace(span, label_x=right_edge - 2, label_anchor="end")


@dataclass(frozen=True)
class Timeline:
    width: float
    height: float
    left: float
    top: float
    plot_w: float
    plot_h: float
    fail_y: float  # the strip above the plot where failed probes are marked
    spans: list[Span]
    x_ticks: list[Tick]
    y_ticks: list[Tick]
    dots: dict[str, str]  # phase -> path of zero-length round-capped strokes (one per sample)
    line: str
    failures: str
    budget_y: float | None
    clipped: str  # path of markers for latencies above the plotted range
    ok_count: int
    fail_count: int


def _nice_ceiling(value: float) -> float:
    if value <= 0:
        return 1.0
    magnitude: float = 10.0 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * magnitude >= value:
            return step * magnitude
    return 10 * magnitude


def timeline(
    samples: Sequence[Sample], phases: Sequence[Phase], budget_ms: float
) -> Timeline | None:
    """Latency over time (dots and a line), failures marked above, the fault window shaded,
    baseline and recovery labelled, the p95 budget drawn as a dashed line."""
    if not samples:
        return None
    width, height = 720.0, 230.0
    left, top, right, bottom = 56.0, 42.0, 14.0, 30.0
    plot_w, plot_h = width - left - right, height - top - bottom
    t_end = max([s.t for s in samples] + [p.ended for p in phases] + [1.0])
    ok_latencies = sorted(s.latency_ms for s in samples if s.ok and s.latency_ms is not None)
    # Scale to the 99th percentile so one outlier does not flatten the rest; mark the clipped.
    tail = (
        ok_latencies[min(len(ok_latencies) - 1, int(len(ok_latencies) * 0.99))]
        if ok_latencies
        else 0
    )
    y_max = _nice_ceiling(max(tail, budget_ms * 1.25, 1.0))

    def x_of(t: float) -> float:
        return left + plot_w * max(0.0, min(t, t_end)) / t_end

    def y_of(ms: float) -> float:
        return top + plot_h - plot_h * min(ms, y_max) / y_max

    spans = [_label_placed(span, width - 2) for span in _spans(phases, x_of)]
    dots: dict[str, list[str]] = {}
    line: list[str] = []
    failures: list[str] = []
    clipped: list[str] = []
    pen_down = False
    fail_y = top - 16
    for s in sorted(samples, key=lambda s: s.t):
        x = x_of(s.t)
        if not s.ok or s.latency_ms is None:
            failures.append(f"M{x - 3:.1f} {fail_y - 3:.1f}l6 6m0-6l-6 6")
            pen_down = False
            continue
        y = y_of(s.latency_ms)
        dots.setdefault(s.phase, []).append(f"M{x:.1f} {y:.1f}h0")
        line.append(f"{'L' if pen_down else 'M'}{x:.1f} {y:.1f}")
        pen_down = True
        if s.latency_ms > y_max:
            clipped.append(f"M{x - 3:.1f} {top + 5:.1f}l3-5l3 5")
    step = _nice_ceiling(t_end / 8)
    x_ticks = [Tick(x_of(i * step), f"{i * step:g} s") for i in range(int(t_end / step) + 1)]
    y_ticks = [Tick(y_of(y_max * i / 4), duration(y_max * i / 4)) for i in range(5)]
    return Timeline(
        width=width,
        height=height,
        left=left,
        top=top,
        plot_w=plot_w,
        plot_h=plot_h,
        fail_y=fail_y,
        spans=spans,
        x_ticks=x_ticks,
        y_ticks=y_ticks,
        dots={phase: "".join(parts) for phase, parts in sorted(dots.items())},
        line="".join(line),
        failures="".join(failures),
        budget_y=y_of(budget_ms) if budget_ms <= y_max else None,
        clipped="".join(clipped),
        ok_count=sum(1 for s in samples if s.ok),
        fail_count=sum(1 for s in samples if not s.ok),
    )


def _spans(phases: Sequence[Phase], x_of: Callable[[float], float]) -> list[Span]:
    by_name = {p.name: p for p in phases}
    out = []
    baseline = by_name.get("baseline")
    if baseline is not None:
        x0, x1 = x_of(baseline.started), x_of(baseline.ended)
        out.append(Span(x0, max(x1 - x0, 1), "baseline", "s-baseline"))
    # The fault is on from apply until revert has finished.
    faulted = [by_name[n] for n in ("apply", "verify", "observe", "revert") if n in by_name]
    if faulted:
        x0 = x_of(min(p.started for p in faulted))
        x1 = x_of(max(p.ended for p in faulted))
        out.append(Span(x0, max(x1 - x0, 1), "fault on", "s-fault"))
    recovery = by_name.get("recovery")
    if recovery is not None:
        x0, x1 = x_of(recovery.started), x_of(recovery.ended)
        out.append(Span(x0, max(x1 - x0, 1), "recovery", "s-recovery"))
    return out
