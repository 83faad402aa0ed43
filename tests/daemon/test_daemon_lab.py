"""The daemon against a real lab: scheduled scans, drift in history, report and /metrics,
a person's suite edit kept, a broken reload refused, and SIGTERM mid-fault leaves nothing."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from depdrill.daemon.clock import ManualClock
from depdrill.daemon.config import load_config
from depdrill.daemon.drift import diff_scans
from depdrill.daemon.history import History, Outcome
from depdrill.daemon.loop import Daemon
from depdrill.daemon.scan import SUITE_FILE, ScanDone
from depdrill.execute.model import Verdict
from depdrill.generate import suitefile
from depdrill.lab.model import LAB_DOMAIN, LabState
from depdrill.lab.testing import lab_session

GONE = f"gone-later.{LAB_DOMAIN}"
ADDED = f"added-later.{LAB_DOMAIN}"


@pytest.fixture(scope="module")
def lab() -> Iterator[LabState]:
    with lab_session() as state:
        yield state


def _config(
    lab: LabState,
    tmp: Path,
    *,
    include: str,
    observe_s: float,
    at_start: bool = False,
    extra: str = "",
) -> str:
    return f"""
[daemon]
history = "{tmp}/history.sqlite"
metrics_listen = "127.0.0.1:0"
discovery_window_s = 30
warmup_s = 2
retry_s = 0.5

[[services]]
name = "lab"
probes = ["{lab.service_url}"]
output_dir = "{tmp}/out"
retention = 10
latency = "100ms"
ca_bundle = "{lab.ca_bundle}"
drive = true
{extra}
[services.target]
netns = "{lab.service_netns}"
[services.tests]
include = ["{include}"]
[services.timing]
interval_s = 0.1
baseline_s = 0.5
observe_s = {observe_s}
recovery_s = 1
max_fault_s = 20
[services.schedule]
cron = "0 2 * * *"
at_start = {str(at_start).lower()}
"""


class Lookups:
    """Looks a name up from inside the service's namespace, as a new dependency would."""

    def __init__(self, lab: LabState, name: str) -> None:
        self.argv = ["ip", "netns", "exec", lab.service_netns, "dig", "+tries=1", "+time=1"]
        self.argv += [f"@{lab.resolver}", name]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            subprocess.run(self.argv, capture_output=True, timeout=10)
            self._stop.wait(0.3)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _leftover_faults(lab: LabState) -> list[str]:
    """depdrill's nft tables and iptables rules, on the host and in the service's namespace."""
    found: list[str] = []
    for prefix in ([], ["ip", "netns", "exec", lab.service_netns]):
        for argv in (["nft", "list", "tables"], ["iptables-legacy-save"]):
            out = subprocess.run([*prefix, *argv], capture_output=True, text=True).stdout
            found += [line for line in out.splitlines() if "depdrill" in line]
    return found


def test_two_scheduled_scans_record_drift_everywhere(lab: LabState, tmp_path: Path) -> None:
    # Given a daemon on a manual clock (02:00 comes at once), watching the lab, and the
    # service looking up a name it will stop using
    path = tmp_path / "depdrill.toml"
    path.write_text(_config(lab, tmp_path, include="cache*", observe_s=1))
    config = load_config(path)
    lookups = {"now": Lookups(lab, GONE)}
    scraped: list[str] = []

    def before_second_period(name: str) -> None:
        lookups["now"].stop()  # this period's lookups end with its snapshot
        time.sleep(0.3)

    def between_scans(name: str, done: ScanDone) -> None:
        if done.stored.summary.id == 1:
            # Then the service uses a new name instead, and a person skips the resolver test
            lookups["now"] = Lookups(lab, ADDED)
            suite_path = tmp_path / "out" / SUITE_FILE
            suite = suitefile.load_suite(suite_path)
            edited = [t.model_copy(update={"skip": t.id == "dns:resolver"}) for t in suite.tests]
            suite_path.write_text(suitefile.dump_suite(suite.model_copy(update={"tests": edited})))
        else:
            assert daemon.metrics is not None
            url = f"http://127.0.0.1:{daemon.metrics.port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as answer:
                scraped.append(answer.read().decode())

    daemon = Daemon(
        config,
        clock=ManualClock(datetime(2026, 11, 27, 1, 59, tzinfo=UTC)),
        max_scans=2,
        on_snapshot=before_second_period,
        on_scan=between_scans,
    )
    # When it runs two scans
    try:
        assert daemon.run() == 0
    finally:
        lookups["now"].stop()

    # Then history holds both, completed, at their scheduled times
    with History(tmp_path / "history.sqlite") as history:
        scans = history.scans("lab")
        assert [s.outcome for s in scans] == [Outcome.COMPLETED, Outcome.COMPLETED]
        assert scans[0].verdicts == {"tolerant": 2, "failed": 1}  # cache x2, the resolver
        drift = diff_scans(history, scans[0].id, scans[1].id)
    # And the drift names the new and the gone dependency, and the verdict a person changed
    assert drift.graph.added == [ADDED]
    assert drift.graph.removed == [GONE]
    assert [(v.test, v.before, v.after) for v in drift.verdicts] == [
        ("dns:resolver", Verdict.FAILED, Verdict.SKIPPED)
    ]
    # And the second scan's folder holds the drift and a report that compares with the first
    second = Path(str(scans[1].report_dir))
    assert f"+ {ADDED}" in (second / "drift.txt").read_text()
    assert '"kind": "verdict"' in (second / "report.json").read_text()
    # And /metrics served the drift, the verdicts and the certificates' expiry
    text = scraped[0]
    assert 'depdrill_drift_changes{kind="dependency-added",service="lab"} 1.0' in text
    assert 'depdrill_drift_changes{kind="dependency-removed",service="lab"} 1.0' in text
    assert (
        'depdrill_test_verdict{dependency="",service="lab",test="dns:resolver",verdict="skipped"}'
        " 1.0" in text
    )
    assert f'dependency="recommend.{LAB_DOMAIN}"' in text
    assert 'certificate="earliest-in-chain"' in text
    assert 'depdrill_scan_outcome{outcome="completed",service="lab"} 1.0' in text
    assert "depdrill_scan_duration_seconds{" in text
    assert 'depdrill_target_up{service="lab"} 1.0' in text
    assert 'depdrill_history_write_errors_total{service="lab"} 0.0' in text
    assert 'depdrill_scans_total{outcome="completed",service="lab"} 2.0' in text
    assert _leftover_faults(lab) == []


def _wait_for(path: Path, text: str, proc: subprocess.Popen[bytes], within_s: float) -> str:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        log = path.read_text()
        if text in log:
            return log
        assert proc.poll() is None, f"daemon exited {proc.returncode}:\n{log[-3000:]}"
        time.sleep(0.1)
    raise AssertionError(f"no {text!r} in the daemon's log:\n{path.read_text()[-3000:]}")


def test_broken_reload_is_refused_and_sigterm_mid_fault_reverts(
    lab: LabState, tmp_path: Path
) -> None:
    # Given the daemon running as a process, with nothing due for hours
    path = tmp_path / "depdrill.toml"
    good = _config(lab, tmp_path, include="payments*", observe_s=8)
    path.write_text(good)
    log_path = tmp_path / "daemon.log"
    argv = [sys.executable, "-P", "-m", "depdrill.daemon", "daemon", "--config", str(path)]
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        _wait_for(log_path, "watching lab", proc, 30)
        # When the config is broken and reloaded
        path.write_text(good.replace("retention = 10", 'retention = "ten"'))
        proc.send_signal(signal.SIGHUP)
        log = _wait_for(log_path, "reload refused", proc, 10)
        # Then one line says why, and the daemon keeps running on the old config
        refused = [line for line in log.splitlines() if "reload refused" in line]
        assert len(refused) == 1 and "services.0.retention" in refused[0]
        # When a valid config asking for a scan at once is reloaded
        path.write_text(good.replace("at_start = false", "at_start = true"))
        proc.send_signal(signal.SIGHUP)
        _wait_for(log_path, "config reloaded", proc, 10)
        # And SIGTERM arrives while the blackhole is on
        _wait_for(log_path, "blackhole:payments.lab.test: observe", proc, 60)
        assert _leftover_faults(lab) != []
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=15)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Then it exits 0 within 10 s, the fault reverted, the halted scan in history
    log = log_path.read_text()
    assert code == 0, log[-3000:]
    assert took < 10
    assert _leftover_faults(lab) == []
    with History(tmp_path / "history.sqlite") as history:
        scans = history.scans("lab")
    assert [s.outcome for s in scans] == [Outcome.HALTED]
    assert "Traceback" not in log


def test_a_silent_resolver_fails_one_scan_in_one_line_and_the_next_recovers(
    lab: LabState, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a daemon on a manual clock, and the lab's DNS server frozen before the first scan
    path = tmp_path / "depdrill.toml"
    path.write_text(_config(lab, tmp_path, include="no-such-dependency", observe_s=1))
    dns_pid = lab.pids["dns"]
    frozen: list[bool] = []

    def freeze_once(name: str) -> None:
        if not frozen:
            os.kill(dns_pid, signal.SIGSTOP)
            frozen.append(True)

    def thaw(name: str, done: ScanDone) -> None:
        os.kill(dns_pid, signal.SIGCONT)

    daemon = Daemon(
        load_config(path),
        clock=ManualClock(datetime(2026, 11, 27, 1, 59, tzinfo=UTC)),
        max_scans=2,
        on_snapshot=freeze_once,
        on_scan=thaw,
    )
    # When it runs two scans
    try:
        with caplog.at_level(logging.INFO, logger="depdrill.daemon"):
            daemon.run()
    finally:
        os.kill(dns_pid, signal.SIGCONT)
    # Then the first failed with one line naming the unhealthy probe, the second completed
    with History(tmp_path / "history.sqlite") as history:
        scans = history.scans("lab")
    assert [s.outcome for s in scans] == [Outcome.FAILED, Outcome.COMPLETED]
    assert "never answered healthy" in str(scans[0].detail)
    failed = [r.getMessage() for r in caplog.records if "scan failed" in r.getMessage()]
    assert len(failed) == 1 and "\n" not in failed[0]
    assert scans[1].verdicts == {"failed": 1}  # dns:resolver, the only test selected
