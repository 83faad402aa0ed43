"""One scheduled scan of a service: graph -> TLS walk -> suite -> run -> report -> history."""

from __future__ import annotations

import logging
import shutil
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from depdrill.artifact import atomic_write, to_json, utcnow
from depdrill.audit import wait_healthy
from depdrill.daemon.config import ServiceConfig
from depdrill.daemon.drift import Drift, drift_between
from depdrill.daemon.history import History, Outcome, ScanSummary, StoredScan
from depdrill.discover.model import Graph
from depdrill.discover.tls import check as tls_check
from depdrill.errors import DepdrillError
from depdrill.execute import runner
from depdrill.execute.junit import to_junit
from depdrill.execute.model import ErrorReason, Results
from depdrill.generate import planner, suitefile
from depdrill.generate.model import HttpProbe, Suite
from depdrill.netns import Target
from depdrill.reports.run import ReportOptions
from depdrill.reports.run import run as render_report

log = logging.getLogger("depdrill.daemon")

SUITE_FILE = "suite.yaml"  # in the service's output_dir: the suite a person may edit
SCANS_DIR = "scans"


@dataclass(frozen=True)
class ScanDone:
    """What a scan produced; kept in memory too, so a full history disk loses nothing live."""

    stored: StoredScan
    duration_s: float
    interrupted: bool  # a signal stopped the run: the daemon is stopping
    drift: Drift | None = None


def scan(
    service: ServiceConfig,
    graph: Graph | None,
    target: Target | None,
    history: History,
    previous: StoredScan | None,
    stop: threading.Event | None = None,
) -> ScanDone:
    """Run one scan and record it; a failure is a scan with outcome `failed`, never raised.

    `stop` set before the tests start (a SIGTERM during the TLS walk) skips the run; once
    they run, the runner's own signal handling reverts the fault in flight.
    """
    started = utcnow()
    out = service.output_dir / SCANS_DIR / started.strftime("%Y%m%dT%H%M%SZ")
    results: Results | None = None
    detail: str | None = None
    score: int | None = None
    findings: list[dict[str, object]] = []
    try:
        if target is None:
            raise DepdrillError(f"target not found ({service.target.describe()})")
        if graph is None:
            raise DepdrillError("discovery has captured nothing yet")
        wait_healthy(HttpProbe(url=service.probes[0], timeout_s=5.0))
        graph = tls_check.check_graph(
            graph,
            ca_bundle=service.ca_bundle,
            warn_days=service.warn_days,
            timeout_s=5.0,
            target=target,
        )
        suite = _suite(service, graph, target)
        if stop is not None and stop.is_set():
            raise DepdrillError("the daemon is stopping: no tests were run")
        results = runner.run(
            suite,
            runner.RunOptions(
                check_chain=tls_check.check_endpoint,
                progress=lambda event: log.info("service %s: %s", service.name, event.message),
            ),
        )
        out.mkdir(parents=True, exist_ok=True)
        previous_results = previous.results if previous is not None else None
        rendered = render_report(
            results, graph, ReportOptions(previous=previous_results, junit=to_junit)
        )
        atomic_write(out / "graph.json", to_json(graph))
        atomic_write(out / "results.json", to_json(results))
        atomic_write(out / "report.json", rendered.json)
        atomic_write(out / "report.html", rendered.html)
        if rendered.junit is not None:
            atomic_write(out / "junit.xml", rendered.junit)
        score = rendered.model.score.value
        findings = [f.model_dump(mode="json") for f in rendered.model.findings]
        outcome = Outcome.HALTED if results.halted else Outcome.COMPLETED
        detail = results.halted
    except DepdrillError as exc:
        outcome, detail = Outcome.FAILED, str(exc)
    except OSError as exc:  # the output directory: full, read-only, gone
        if results is None:
            outcome, detail = Outcome.FAILED, f"cannot write the suite: {exc}"
        else:  # the tests ran: their verdicts still count, in history and metrics
            outcome = Outcome.HALTED if results.halted else Outcome.COMPLETED
            detail = f"report not written: {exc}"
    ended = utcnow()
    summary = ScanSummary(
        id=0,
        service=service.name,
        started=started,
        ended=ended,
        outcome=outcome,
        score=score,
        detail=detail,
        report_dir=str(out) if results is not None else None,
        dependencies=len(graph.dependencies()) if graph is not None else None,
        verdicts=_verdict_counts(results),
    )
    stored = StoredScan(summary=summary, graph=graph, results=results, findings=findings)
    drift = drift_between(previous, stored) if previous is not None and results else None
    if drift is not None and results is not None:
        _write_drift(out, drift)
    stored = _record(history, stored, drift)
    if drift is not None:
        drift = drift.model_copy(update={"scan_b": stored.summary.id})
    _prune(history, service)
    # A signal during the last test leaves no test marked, only the run's `halted` line.
    interrupted = results is not None and (
        any(t.reason == ErrorReason.INTERRUPTED for t in results.tests)
        or (results.halted or "").startswith("interrupted by")
    )
    return ScanDone(
        stored=stored,
        duration_s=(ended - started).total_seconds(),
        interrupted=interrupted,
        drift=drift,
    )


def _suite(service: ServiceConfig, graph: Graph, target: Target) -> Suite:
    """Regenerate from the graph, keeping a person's edits to the suite in the output dir."""
    path = service.output_dir / SUITE_FILE
    old = suitefile.load_suite(path, allow_commands=True) if path.exists() else None
    options = planner.options_from_cli(
        probes=service.probes,
        service_name=service.name,
        latency=service.latency,
        include=service.tests.include,
        exclude=service.tests.exclude,
        ca_bundle=str(service.ca_bundle) if service.ca_bundle else None,
        warn_days=service.warn_days,
        target=target,
        slo=service.slo,
        timing=service.timing,
        previous=old,
    )
    suite = planner.regenerate(graph, old, options) if old else planner.run(graph, options)
    service.output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, suitefile.dump_suite(suite))
    return suite


def _verdict_counts(results: Results | None) -> dict[str, int]:
    counts: dict[str, int] = {}
    for test in results.tests if results is not None else []:
        counts[test.verdict.value] = counts.get(test.verdict.value, 0) + 1
    return counts


def _write_drift(out: Path, drift: Drift) -> None:
    try:
        atomic_write(out / "drift.json", drift.model_dump_json(indent=2) + "\n")
        atomic_write(out / "drift.txt", "".join(f"{line}\n" for line in drift.lines()))
    except OSError as exc:
        log.warning("service %s: cannot write the drift: %s", drift.service, exc)


def _record(history: History, stored: StoredScan, drift: Drift | None) -> StoredScan:
    summary = stored.summary
    try:
        scan_id = history.record(
            service=summary.service,
            started=summary.started,
            ended=summary.ended,
            outcome=summary.outcome,
            detail=summary.detail,
            score=summary.score,
            report_dir=Path(summary.report_dir) if summary.report_dir else None,
            graph=stored.graph,
            results=stored.results,
            findings=stored.findings,
            drift=drift.model_dump(mode="json") if drift is not None else None,
        )
    except sqlite3.Error as exc:
        log.warning("history %s: scan of %s not stored: %s", history.path, summary.service, exc)
        return stored
    return stored.model_copy(update={"summary": summary.model_copy(update={"id": scan_id})})


def _prune(history: History, service: ServiceConfig) -> None:
    """Keep the newest `retention` scans, in the history and on disk."""
    try:
        gone = history.prune(service.name, service.retention)
    except sqlite3.Error as exc:
        log.warning("history %s: cannot prune %s: %s", history.path, service.name, exc)
        return
    scans_root = (service.output_dir / SCANS_DIR).resolve()
    for old in gone:
        if old.report_dir is None:
            continue
        folder = Path(old.report_dir).resolve()
        if folder.parent == scans_root:  # never delete outside the service's scans folder
            shutil.rmtree(folder, ignore_errors=True)
