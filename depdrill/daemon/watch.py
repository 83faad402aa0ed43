"""Continuous discovery for one service: rolling capture windows merged into its graph."""

from __future__ import annotations

import logging
import os
import threading
import time

from depdrill.audit import drive_traffic
from depdrill.daemon.config import DaemonSettings, ServiceConfig
from depdrill.discover import run as discover_run
from depdrill.discover.model import Graph
from depdrill.errors import DepdrillError, TargetError
from depdrill.netns import Target

log = logging.getLogger("depdrill.daemon")


class Watch:
    """A thread that captures in windows and folds each into the graph of the current period.

    A scan takes the graph with `snapshot()`: the window in progress is closed early so the
    snapshot holds everything up to now, and the next period starts empty, so a dependency
    the service stopped calling shows up as gone in the next scan. With `pause=True` no
    window opens again until `resume()`: a scan's faults are not the service's everyday
    footprint, and an nflog capture must not end while a latency fault's queue holds
    packets in the namespace (the kernel drops them when a netfilter hook goes).
    """

    def __init__(self, service: ServiceConfig, settings: DaemonSettings) -> None:
        self.service = service
        self.settings = settings
        self.period_started = time.monotonic()
        self.kernel_drops = 0  # over the daemon's life, for the metrics
        self.windows = 0
        self.target: Target | None = None
        self._pending: Graph | None = None
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._window_stop = threading.Event()
        self._cut = False
        self._paused = False
        self._ready = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"watch-{service.name}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def halt(self) -> None:
        """Ask the thread to end (the window in progress closes within a poll)."""
        self._stop.set()
        self._window_stop.set()
        with self._changed:
            self._changed.notify_all()

    def stop(self, timeout_s: float = 5.0) -> None:
        self.halt()
        self._thread.join(timeout_s)

    def warm(self, stop: threading.Event) -> bool:
        """Wait (real time) until this period has been watched for the warm-up at least, so
        no scan works from a graph of a few seconds; False if stopped meanwhile."""
        left = self.period_started + self.settings.warmup_s - time.monotonic()
        return not stop.wait(left) if left > 0 else not stop.is_set()

    def snapshot(self, timeout_s: float = 10.0, pause: bool = False) -> Graph | None:
        """Close the window in progress and take the period's graph (None: nothing captured);
        `pause`: and open no other until `resume()`."""
        with self._changed:
            before = self.windows
            self._paused = self._paused or pause
            self._cut = True
            self._window_stop.set()
            self._changed.wait_for(
                lambda: self.windows > before or self._lost or not self._thread.is_alive(),
                timeout_s,
            )
            self._cut = False
            graph, self._pending = self._pending, None
            self.period_started = time.monotonic()
        return graph

    def resume(self) -> None:
        """Capture again after a pausing snapshot; the next period starts now."""
        with self._changed:
            self._paused = False
            self.period_started = time.monotonic()
            self._changed.notify_all()

    @property
    def _lost(self) -> bool:
        return self.target is None

    def _loop(self) -> None:
        name = self.service.name
        problem: str | None = None  # its kind: logged once when it starts, once when it ends

        def trouble(kind: str, detail: str, level: int = logging.WARNING) -> None:
            nonlocal problem
            if kind != problem:
                log.log(level, "service %s: %s: %s", name, kind, detail)
            problem = kind
            self._stop.wait(self.settings.retry_s)

        while not self._stop.is_set():
            with self._changed:
                self._changed.wait_for(lambda: not self._paused or self._stop.is_set())
            if self._stop.is_set():
                break
            try:
                target = self.service.target.resolve()
                self._set_target(target)
                graph = self._window(target)
            except TargetError as exc:  # gone before or during the window: find it again
                self._set_target(None)
                trouble("target lost", f"{exc}; looking for it again")
                continue
            except (DepdrillError, OSError) as exc:
                self._set_target(None)
                trouble("capture stopped", str(exc))
                continue
            except Exception as exc:  # a bug must not end discovery for the daemon's life
                trouble("capture crashed", f"{type(exc).__name__}: {exc}", logging.ERROR)
                continue
            if problem is not None:
                log.warning("service %s: recovered (%s): %s", name, problem, target.describe())
                problem = None
            with self._changed:
                self.kernel_drops += graph.capture.kernel_drops
                if self._pending is None:
                    self._pending = graph
                else:
                    self._pending = discover_run.merge(self._pending, graph)
                self.windows += 1
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def _set_target(self, target: Target | None) -> None:
        with self._changed:
            self.target = target
            self._changed.notify_all()

    @property
    def capturing(self) -> bool:
        """True while a capture window is open and filtering packets."""
        return self._ready.is_set()

    def _window(self, target: Target) -> Graph:
        with self._changed:
            self._window_stop = threading.Event()
            # A snapshot asked between two windows: close this one at once.
            if self._stop.is_set() or self._cut:
                self._window_stop.set()
            window_stop = self._window_stop
            self._ready = threading.Event()
            ready = self._ready
        options = discover_run.DiscoverOptions(
            target=target, duration_s=self.settings.discovery_window_s, label=self.service.name
        )
        helpers = [threading.Thread(target=self._guard, args=(target, window_stop), daemon=True)]
        if self.service.drive:
            helpers.append(
                threading.Thread(
                    target=drive_traffic,
                    args=(self.service.probes[0], window_stop, ready),
                    daemon=True,
                )
            )
        for helper in helpers:
            helper.start()
        try:
            return discover_run.run(options, stop=window_stop, ready=ready)
        finally:
            ready.clear()
            window_stop.set()
            for helper in helpers:
                helper.join()

    def _guard(self, target: Target, window_stop: threading.Event) -> None:
        """Close the window once the namespace is gone or replaced (a container restart):
        a capture socket in a dead namespace would otherwise wait out the whole window."""
        try:
            inode = os.stat(target.path).st_ino
        except OSError:
            window_stop.set()
            return
        while not window_stop.wait(self.settings.retry_s):
            try:
                same = os.stat(target.path).st_ino == inode
            except OSError:
                same = False
            if not same:
                window_stop.set()
