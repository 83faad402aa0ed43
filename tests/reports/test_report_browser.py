"""The page in a real browser (Debian's chromium, headless): nothing hostile runs or loads,
and screenshots at desktop and narrow width (and a print) land in the artifacts folder."""

from __future__ import annotations

import re
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from report_hostile import TEMPLATE_TAGS, hostile_run, parse_page

from depdrill.discover.model import Graph
from depdrill.execute.model import Results
from depdrill.reports.render import render_html
from depdrill.reports.testing import artifacts_dir, chromium, png_size, screenshot

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")


class Canary:
    """A local HTTP server that records every request a page makes to it."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        paths = self.paths

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                paths.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def canary() -> Iterator[Canary]:
    c = Canary()
    c.thread.start()
    try:
        yield c
    finally:
        c.server.shutdown()
        c.server.server_close()
        c.thread.join()


def test_control_page_does_reach_the_canary(tmp_path: Path, canary: Canary) -> None:
    # Given a page that really embeds an image from the canary (the detector's control)
    page = tmp_path / "control.html"
    page.write_text(f'<!DOCTYPE html><body><img src="{canary.base}/control"></body>')
    # When chromium loads it
    chromium(tmp_path, "--virtual-time-budget=3000", "--dump-dom", page.as_uri())
    # Then the canary saw the request: a silent canary below means nothing was asked
    assert "/control" in canary.paths


def test_hostile_report_runs_nothing_and_requests_nothing(tmp_path: Path, canary: Canary) -> None:
    # Given a report whose names, certificate subjects, errors and service name try to load
    # scripts, images, styles and frames from the canary, and to run script that calls it
    base = canary.base
    names = [
        f'<script src="{base}/script-src"></script>.evil.test',
        f'"><img src="{base}/img-src" onerror="fetch(\'{base}/onerror\')">.evil.test',
        f"<link rel=stylesheet href={base}/css-link>.evil.test",
        f"<iframe src={base}/iframe></iframe>.evil.test",
        f"<a href=\"javascript:fetch('{base}/js-url')\">x</a>.evil.test",
        f"<svg><image href={base}/svg-image /></svg>.evil.test",
    ]
    error = f"<script>fetch('{base}/inline-script')</script><img src={base}/img-error>"
    service = f"<style>@import url({base}/import);</style><body onload=fetch('{base}/onload')>"
    results, graph = hostile_run(names=names, error=error, service=service)
    page = tmp_path / "report.html"
    page.write_text(render_html(results, graph), encoding="utf-8")
    # When chromium loads the page and lets it run
    done = chromium(tmp_path, "--virtual-time-budget=3000", "--dump-dom", page.as_uri())
    # Then no request reached the canary, and the live DOM holds only the template's elements
    assert done.returncode == 0, done.stderr[-2000:]
    assert canary.paths == []
    dom = parse_page(done.stdout)
    assert dom.tags, "chromium returned no DOM"
    assert {tag for tag, _ in dom.tags} <= TEMPLATE_TAGS
    assert all(not n.startswith("on") for _, attrs in dom.tags for n in attrs)


@pytest.mark.parametrize(("label", "width"), [("desktop", 1280), ("narrow", 390)])
def test_screenshots_of_the_lab_report(
    tmp_path: Path, lab_run: tuple[Results, Graph], label: str, width: int
) -> None:
    # Given the lab's report on disk
    page = tmp_path / "report.html"
    page.write_text(render_html(*lab_run), encoding="utf-8")
    # When chromium takes a screenshot at this width
    shot = screenshot(page, artifacts_dir() / f"report-lab-{label}.png", width, tmp_path)
    # Then the picture exists at that size, and is not a blank page
    assert png_size(shot)[0] == width


def test_the_report_prints(tmp_path: Path, lab_run: tuple[Results, Graph]) -> None:
    # Given the lab's report on disk
    page = tmp_path / "report.html"
    page.write_text(render_html(*lab_run), encoding="utf-8")
    pdf = artifacts_dir() / "report-lab-print.pdf"
    pdf.unlink(missing_ok=True)
    # When chromium prints it
    chromium(tmp_path, "--no-pdf-header-footer", f"--print-to-pdf={pdf}", page.as_uri())
    # Then a multi-page PDF comes out
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF")
    assert len(re.findall(rb"/Type\s*/Page(?!s)", data)) >= 2
