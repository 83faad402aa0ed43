"""The daemon: a discovery thread per service, scans on each service's schedule, signals."""

from __future__ import annotations

import logging
import signal
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from types import FrameType

from depdrill.daemon.clock import Clock, WallClock
from depdrill.daemon.config import DaemonConfig, ServiceConfig, load_config
from depdrill.daemon.history import History, Outcome, StoredScan
from depdrill.daemon.metrics import MetricsServer, ServiceView
from depdrill.daemon.scan import ScanDone, scan
from depdrill.daemon.watch import Watch
from depdrill.errors import DepdrillError

log = logging.getLogger("depdrill.daemon")


class Daemon:
    """Runs until `request_stop()` (SIGTERM, SIGINT) or, for tests, `max_scans` scans.

    Scans run one at a time on the thread that calls `run()`: on the main thread the
    runner's own SIGTERM handling reverts the fault in flight, then the daemon stops.
    """

    def __init__(
        self,
        config: DaemonConfig,
        *,
        config_path: Path | None = None,
        clock: Clock | None = None,
        max_scans: int | None = None,
        on_snapshot: Callable[[str], None] | None = None,
        on_scan: Callable[[str, ScanDone], None] | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.clock: Clock = clock or WallClock()
        self.max_scans = max_scans
        self.on_snapshot = on_snapshot
        self.on_scan = on_scan
        self.scans_done = 0
        self.metrics: MetricsServer | None = None
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._wake = threading.Event()
        self._watches: dict[str, Watch] = {}
        self._views: dict[str, ServiceView] = {}
        self._last: dict[str, StoredScan] = {}
        self._due: dict[str, datetime] = {}
        self._lock = threading.Lock()

    # -- control, safe from a signal handler or another thread ----------------------------

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def request_reload(self) -> None:
        self._reload.set()
        self._wake.set()

    @contextmanager
    def signals(self) -> Iterator[None]:
        """SIGTERM/SIGINT stop, SIGHUP reloads (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def stop(signum: int, frame: FrameType | None) -> None:
            log.info("%s: stopping", signal.Signals(signum).name)
            self.request_stop()

        def reload(signum: int, frame: FrameType | None) -> None:
            self.request_reload()

        handlers = {signal.SIGTERM: stop, signal.SIGINT: stop, signal.SIGHUP: reload}
        previous = {s: signal.signal(s, h) for s, h in handlers.items()}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> int:
        settings = self.config.daemon
        with History(settings.history) as history:
            address = settings.metrics_address
            if address is not None:
                try:
                    self.metrics = MetricsServer(address, self.views)
                except OSError as exc:
                    raise DepdrillError(
                        f"metrics {settings.metrics_listen}: cannot listen ({exc.strerror})"
                    ) from None
            try:
                self._start_services(self.config.services)
                log.info(
                    "watching %s; metrics %s",
                    ", ".join(s.name for s in self.config.services),
                    f"on {self.metrics.url}" if self.metrics is not None else "off",
                )
                self._schedule(history)
            finally:
                for watch in self._watches.values():
                    watch.halt()  # all at once: each join below is then short
                for watch in self._watches.values():
                    watch.stop()
                if self.metrics is not None:
                    self.metrics.close()
        log.info("stopped")
        return 0

    def _schedule(self, history: History) -> None:
        while True:
            self._wake.clear()
            if self._stop.is_set():
                return
            if self._reload.is_set():
                self._reload.clear()
                self._reload_config()
                continue
            name, due = min(self._due.items(), key=lambda item: (item[1], item[0]))
            self.clock.sleep_until(due, self._wake)
            if self._wake.is_set():
                continue
            service = self.config.service(name)
            self._scan(service, history)
            self._due[name] = service.schedule.next_after(max(due, self.clock.now()))
            if self.max_scans is not None and self.scans_done >= self.max_scans:
                return

    def _scan(self, service: ServiceConfig, history: History) -> None:
        watch = self._watches[service.name]
        if not watch.warm(self._stop):
            return
        # What the service does while faults are on, and the scan's own probes and proofs,
        # are not its everyday footprint: no capture runs during the scan (and an nflog
        # capture must not end while a fault's queue holds packets), the next period starts
        # after it.
        graph = watch.snapshot(pause=True)
        try:
            if self.on_snapshot is not None:
                self.on_snapshot(service.name)
            previous = self._last.get(service.name) or _latest(history, service.name)
            done = scan(service, graph, watch.target, history, previous, self._stop)
        except Exception as exc:  # a daemon outlives a bug in one scan; the line says where
            log.error("service %s: scan crashed: %s: %s", service.name, type(exc).__name__, exc)
            return
        finally:
            watch.resume()
        self.scans_done += 1
        summary = done.stored.summary
        if done.stored.results is not None:
            self._last[service.name] = done.stored
        with self._lock:
            view = self._views[service.name]
            view.last = done
            view.scans[summary.outcome] = view.scans.get(summary.outcome, 0) + 1
            view.history_errors += 1 if summary.id == 0 else 0  # id 0: not stored
        log.info("service %s: scan %s", service.name, summary.line().strip())
        if done.drift is not None and done.drift.changed:
            log.info("service %s: drift: %s", service.name, "; ".join(done.drift.lines()))
        if summary.outcome == Outcome.FAILED:
            log.warning("service %s: scan failed: %s", service.name, summary.detail)
        if done.interrupted:
            self.request_stop()
        if self.on_scan is not None:
            self.on_scan(service.name, done)

    def views(self) -> list[ServiceView]:
        """The metrics' view of every service (called from the metrics thread)."""
        with self._lock:
            for name, view in self._views.items():
                watch = self._watches.get(name)
                if watch is not None:
                    view.target_up = watch.target is not None
                    view.kernel_drops = watch.kernel_drops
                    view.windows = watch.windows
            return list(self._views.values())

    # -- services and reloads -------------------------------------------------------------

    def _start_services(self, services: list[ServiceConfig]) -> None:
        now = self.clock.now()
        for service in services:
            watch = Watch(service, self.config.daemon)
            watch.start()
            with self._lock:
                self._watches[service.name] = watch
                self._views.setdefault(service.name, ServiceView(name=service.name))
            self._due[service.name] = _first_due(service, now)

    def _reload_config(self) -> None:
        if self.config_path is None:
            return
        try:
            fresh = load_config(self.config_path)
        except DepdrillError as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            return
        if fresh.daemon.history != self.config.daemon.history or (
            fresh.daemon.metrics_listen != self.config.daemon.metrics_listen
        ):
            log.warning("reload: history and metrics_listen change only with a restart")
        old = {s.name: s for s in self.config.services}
        same_settings = fresh.daemon == self.config.daemon
        stopping = [
            name
            for name, service in old.items()
            if not same_settings or _watch_changed(service, fresh, name)
        ]
        for name in stopping:
            self._watches[name].stop()
            with self._lock:
                del self._watches[name]
                if name not in {s.name for s in fresh.services}:
                    del self._views[name]
            self._due.pop(name, None)
        self.config = fresh
        starting = [s for s in fresh.services if s.name not in self._watches]
        self._start_services(starting)
        for service in fresh.services:
            if service.schedule != old.get(service.name, service).schedule:
                self._due[service.name] = _first_due(service, self.clock.now())
        log.info(
            "config reloaded: %d services (%d restarted or new)",
            len(fresh.services),
            len(starting),
        )


def _first_due(service: ServiceConfig, now: datetime) -> datetime:
    return now if service.schedule.at_start else service.schedule.next_after(now)


def _watch_changed(service: ServiceConfig, fresh: DaemonConfig, name: str) -> bool:
    """True when discovery must restart: the service is gone or watched differently."""
    for candidate in fresh.services:
        if candidate.name == name:
            return (candidate.target, candidate.probes, candidate.drive) != (
                service.target,
                service.probes,
                service.drive,
            )
    return True


def _latest(history: History, service: str) -> StoredScan | None:
    try:
        return history.latest(service)
    except (DepdrillError, sqlite3.Error) as exc:
        log.warning("history: cannot read the last scan of %s: %s", service, exc)
        return None
