"""Scan history in SQLite: one row per scan, with its graph, suite, results and findings."""

from __future__ import annotations

import json
import sqlite3
import threading
from datetime import datetime
from enum import StrEnum
from pathlib import Path

from depdrill.artifact import Artifact, Frozen
from depdrill.discover.model import Graph
from depdrill.errors import InputError
from depdrill.execute.model import Results

SCHEMA = """
CREATE TABLE IF NOT EXISTS scans (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    service TEXT NOT NULL,
    started TEXT NOT NULL,
    ended TEXT NOT NULL,
    outcome TEXT NOT NULL,
    score INTEGER,
    detail TEXT,
    report_dir TEXT,
    dependencies INTEGER,
    verdicts TEXT NOT NULL DEFAULT '{}',
    graph TEXT,
    suite TEXT,
    results TEXT,
    findings TEXT,
    drift TEXT
);
CREATE INDEX IF NOT EXISTS scans_by_service ON scans (service, id);
"""
_SUMMARY = "id, service, started, ended, outcome, score, detail, report_dir, dependencies, verdicts"


class Outcome(StrEnum):
    COMPLETED = "completed"  # every selected test ran
    HALTED = "halted"  # the run stopped early (a signal, a fault that would not revert)
    FAILED = "failed"  # no run: the target was gone, the probe never healthy, ...


class ScanSummary(Frozen):
    """One row of `depdrill history`."""

    id: int
    service: str
    started: datetime
    ended: datetime
    outcome: Outcome
    score: int | None = None
    detail: str | None = None
    report_dir: str | None = None
    dependencies: int | None = None
    verdicts: dict[str, int] = {}  # verdict -> how many tests

    def line(self) -> str:
        counts = ", ".join(f"{n} {v}" for v, n in sorted(self.verdicts.items())) or "no tests"
        score = "-" if self.score is None else str(self.score)
        deps = "-" if self.dependencies is None else str(self.dependencies)
        tail = f"  ({self.detail})" if self.detail else ""
        return (
            f"{self.id:>5}  {self.started:%Y-%m-%d %H:%M:%S}  {self.outcome.value:<9}  "
            f"score {score:>3}  {deps:>3} deps  {counts}{tail}"
        )


class StoredScan(Frozen):
    """A scan with its artifacts, as the daemon records it."""

    summary: ScanSummary
    graph: Graph | None = None
    results: Results | None = None
    findings: list[dict[str, object]] = []
    drift: dict[str, object] | None = None


class History:
    """The history database; safe to share between threads (one connection, one lock)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise InputError(f"history {path}: cannot open ({exc})") from None
        self._lock = threading.Lock()
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise InputError(f"history {path}: not a usable SQLite database ({exc})") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def record(
        self,
        *,
        service: str,
        started: datetime,
        ended: datetime,
        outcome: Outcome,
        detail: str | None = None,
        score: int | None = None,
        report_dir: Path | None = None,
        graph: Graph | None = None,
        results: Results | None = None,
        findings: list[dict[str, object]] | None = None,
        drift: dict[str, object] | None = None,
    ) -> int:
        """Store one scan; its id. sqlite3.OperationalError (a full disk) goes to the caller."""
        verdicts: dict[str, int] = {}
        for test in results.tests if results is not None else []:
            verdicts[test.verdict.value] = verdicts.get(test.verdict.value, 0) + 1
        row = (
            service,
            started.isoformat(),
            ended.isoformat(),
            outcome.value,
            score,
            detail,
            str(report_dir) if report_dir is not None else None,
            len(graph.dependencies()) if graph is not None else None,
            json.dumps(verdicts, sort_keys=True),
            _blob(graph),
            _blob(results.suite if results is not None else None),
            _blob(results),
            json.dumps(findings) if findings is not None else None,
            json.dumps(drift) if drift is not None else None,
        )
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO scans (service, started, ended, outcome, score, detail, report_dir,"
                " dependencies, verdicts, graph, suite, results, findings, drift)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
            assert cursor.lastrowid is not None
            return cursor.lastrowid

    def scans(self, service: str) -> list[ScanSummary]:
        """The service's scans, oldest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_SUMMARY} FROM scans WHERE service = ? ORDER BY id", (service,)
            ).fetchall()
        return [_summary(row) for row in rows]

    def services(self) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT DISTINCT service FROM scans ORDER BY 1").fetchall()
        return [str(r[0]) for r in rows]

    def load(self, scan_id: int) -> StoredScan:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_SUMMARY}, graph, results, findings, drift FROM scans WHERE id = ?",
                (scan_id,),
            ).fetchone()
        if row is None:
            raise InputError(f"history {self.path}: no scan {scan_id}")
        source = f"{self.path} scan {scan_id}"
        graph_text, results_text, findings_text, drift_text = row[10:]
        return StoredScan(
            summary=_summary(row[:10]),
            graph=Graph.from_raw(json.loads(graph_text), source) if graph_text else None,
            results=Results.from_raw(json.loads(results_text), source) if results_text else None,
            findings=json.loads(findings_text) if findings_text else [],
            drift=json.loads(drift_text) if drift_text else None,
        )

    def latest(self, service: str, *, with_results: bool = True) -> StoredScan | None:
        """The service's newest scan (that has results, by default)."""
        where = " AND results IS NOT NULL" if with_results else ""
        with self._lock:
            row = self._db.execute(
                f"SELECT id FROM scans WHERE service = ?{where} ORDER BY id DESC LIMIT 1",
                (service,),
            ).fetchone()
        return self.load(int(row[0])) if row is not None else None

    def prune(self, service: str, keep: int) -> list[ScanSummary]:
        """Delete all but the newest `keep` scans of the service; the ones deleted."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_SUMMARY} FROM scans WHERE service = ?"
                " ORDER BY id DESC LIMIT -1 OFFSET ?",
                (service, keep),
            ).fetchall()
            self._db.executemany("DELETE FROM scans WHERE id = ?", [(r[0],) for r in rows])
        return [_summary(row) for row in rows]


def _summary(row: tuple[object, ...]) -> ScanSummary:
    keys = _SUMMARY.split(", ")
    fields = dict(zip(keys, row, strict=True))
    fields["verdicts"] = json.loads(str(fields["verdicts"]))
    return ScanSummary.model_validate(fields)


def _blob(artifact: Artifact | None) -> str | None:
    """The artifact as JSON with its nulls: a required field that may be null (a chain
    checked without SNI) must survive the round trip, which `to_json` does not promise."""
    return artifact.model_dump_json(by_alias=True) if artifact is not None else None
