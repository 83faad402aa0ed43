"""`depdrill audit`: discover, check certificates, generate, run and report in one go."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from depdrill.artifact import atomic_write, to_json
from depdrill.console import Console
from depdrill.discover.model import Graph
from depdrill.errors import TargetError
from depdrill.execute.model import Results
from depdrill.generate.model import HttpProbe, Slo, Timing
from depdrill.netns import Target

LAB_PREFIX = "ddl"


@dataclass(frozen=True)
class AuditOptions:
    target: Target | None  # None: the built-in lab
    probe: str | None
    output: Path
    duration_s: float = 8.0
    ca_bundle: Path | None = None
    latency: str = "100ms,1000ms"
    lab_prefix: str = LAB_PREFIX  # with no target: which lab to audit (built if not up)
    lab_subnet: int = 0


@dataclass(frozen=True)
class AuditOutcome:
    graph: Graph
    results: Results
    report_path: Path


@dataclass(frozen=True)
class _Subject:
    target: Target
    probe: HttpProbe
    ca_bundle: Path | None
    slo: Slo | None
    timing: Timing | None
    service_name: str | None


@contextmanager
def _subject(options: AuditOptions, console: Console) -> Iterator[_Subject]:
    """The service to audit: the one given, or the lab (built now, torn down after)."""
    if options.target is not None:
        assert options.probe is not None
        options.target.check()
        yield _Subject(
            options.target, HttpProbe(url=options.probe), options.ca_bundle, None, None, None
        )
        return
    from depdrill.lab import world
    from depdrill.lab.truth import TRUTH

    existing = world.status(options.lab_prefix)
    # A half-built lab (a crashed `lab up`) is rebuilt: up() clears the leftovers itself.
    built = existing is None or not existing.state.ready
    if built:
        with console.step("building the lab"):
            state = world.up(
                prefix=options.lab_prefix, subnet_index=options.lab_subnet, progress=console.info
            )
    else:
        assert existing is not None
        state = existing.state
        console.info(f"using the lab that is already up ({state.prefix})")
    try:
        yield _Subject(
            target=Target(netns=state.service_netns),
            probe=TRUTH.probe_for(state),
            ca_bundle=Path(state.ca_bundle),
            slo=TRUTH.slo,
            timing=TRUTH.timing,
            service_name="lab demo service",
        )
    finally:
        if built:
            with console.step("tearing the lab down"):
                world.down(prefix=options.lab_prefix)


def drive_traffic(
    url: str, stop: threading.Event, ready: threading.Event, interval_s: float = 0.2
) -> None:
    """Send the service requests while discovery listens, so it calls its dependencies."""
    ready.wait(timeout=10)
    while not stop.is_set():
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                answer.read()
        except (OSError, urllib.error.URLError):
            pass
        stop.wait(interval_s)


def wait_healthy(probe: HttpProbe, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(probe.url, timeout=probe.timeout_s) as answer:
                if answer.status == probe.expect_status:
                    return
                last = f"HTTP {answer.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (OSError, urllib.error.URLError) as exc:
            last = str(getattr(exc, "reason", exc))
        time.sleep(0.3)
    raise TargetError(f"probe {probe.url} never answered healthy within {within_s:.0f} s ({last})")


def audit(
    options: AuditOptions, *, console: Console, progress: Callable[[Any], None]
) -> AuditOutcome:
    from depdrill.discover import run as discover_run
    from depdrill.discover.tls import check as tls_check
    from depdrill.execute import runner
    from depdrill.execute.junit import to_junit
    from depdrill.generate import planner, suitefile
    from depdrill.reports.run import ReportOptions
    from depdrill.reports.run import run as render_report

    out = options.output
    out.mkdir(parents=True, exist_ok=True)
    with _subject(options, console) as subject:
        wait_healthy(subject.probe)
        with console.step(
            f"discovering for {options.duration_s:.0f} s in {subject.target.describe()}"
        ):
            # Traffic starts once the capture filters packets, so the first lookups are seen.
            stop, ready = threading.Event(), threading.Event()
            driver = threading.Thread(
                target=drive_traffic, args=(subject.probe.url, stop, ready), daemon=True
            )
            driver.start()
            try:
                graph = discover_run.run(
                    discover_run.DiscoverOptions(
                        target=subject.target, duration_s=options.duration_s
                    ),
                    ready=ready,
                )
            finally:
                stop.set()
                driver.join()
        console.info(f"found {len(graph.dependencies())} dependencies")
        with console.step("walking TLS chains"):
            graph = tls_check.check_graph(
                graph,
                ca_bundle=subject.ca_bundle,
                warn_days=30,
                timeout_s=5.0,
                target=subject.target,
            )
        atomic_write(out / "graph.json", to_json(graph))
        gen_options = planner.options_from_cli(
            probes=[subject.probe.url],
            service_name=subject.service_name,
            latency=options.latency,
            ca_bundle=str(subject.ca_bundle) if subject.ca_bundle else None,
            target=subject.target,
            slo=subject.slo,
            timing=subject.timing,
        )
        suite = planner.run(graph, gen_options)
        atomic_write(out / "suite.yaml", suitefile.dump_suite(suite))
        console.info(f"generated {len(suite.tests)} tests")
        results = runner.run(
            suite, runner.RunOptions(progress=progress, check_chain=tls_check.check_endpoint)
        )
    atomic_write(out / "results.json", to_json(results))
    rendered = render_report(results, graph, ReportOptions(junit=to_junit))
    if rendered.junit is not None:
        atomic_write(out / "junit.xml", rendered.junit)
    atomic_write(out / "report.json", rendered.json)
    report_path = out / "report.html"
    atomic_write(report_path, rendered.html)
    return AuditOutcome(graph=graph, results=results, report_path=report_path)
