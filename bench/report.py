"""Report render time for a 50-dependency synthetic run, next to jinja2 rendering an empty
page in the same run (the floor any template pays), and the page's size (must be < 2 MB)."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import jinja2

from depdrill.reports.render import render_html
from depdrill.reports.synthetic import many, synthetic_run

ROUNDS = 5
LIMIT_S = 1.0
LIMIT_BYTES = 2_000_000


def _best(func: Callable[[], object], rounds: int = ROUNDS) -> float:
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        func()
        times.append(time.perf_counter() - began)
    return min(times)


def main() -> int:
    results, graph = synthetic_run(many(50))
    empty = jinja2.Environment(autoescape=True).from_string(
        "<!DOCTYPE html><html><head><title>{{ t }}</title></head><body></body></html>"
    )
    empty_s = _best(lambda: empty.render(t="empty"), rounds=200)
    first_s = _best(lambda: render_html(results, graph), rounds=1)  # template compile included
    report_s = _best(lambda: render_html(results, graph))
    html = render_html(results, graph)
    size = len(html.encode())
    tests = len(results.tests)
    samples = statistics.fsum(len(t.samples) for t in results.tests)
    print(f"50 dependencies, {tests} tests, {samples:.0f} probe samples")
    print(f"report render, best of {ROUNDS}: {report_s * 1000:.1f} ms")
    print(f"report render, first (compiles): {first_s * 1000:.1f} ms")
    print(f"jinja2 empty page:            {empty_s * 1e6:.1f} µs")
    print(f"ratio report / empty page:    {report_s / empty_s:,.0f}x")
    print(f"HTML size: {size / 1e6:.2f} MB (limit {LIMIT_BYTES / 1e6:.0f} MB)")
    ok = report_s < LIMIT_S and size < LIMIT_BYTES
    print("ok" if ok else f"TOO SLOW OR TOO BIG (limits {LIMIT_S} s, {LIMIT_BYTES} bytes)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
