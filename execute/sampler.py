"""Probe sampling at a steady cadence: a slow probe in flight never delays the next one.

Each sample runs every probe of the service (healthy means all of them answered healthy)
on a worker thread of the host's namespace. A window submits its planned samples at
`interval_s` and settles them in submission order; a stop predicate sees the settled
prefix after each change, so a decision never skips an earlier sample still in flight.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from depdrill.execute.model import PhaseName, Sample
from depdrill.execute.probes.base import Observation, Probe

POLL_S = 0.01
MAX_WORKERS = 64


def workers_for(interval_s: float, longest_timeout_s: float) -> int:
    """Threads needed so that probes waiting on their timeout never hold up the cadence."""
    return min(MAX_WORKERS, int(longest_timeout_s / interval_s) + 2)


class Sampler:
    def __init__(
        self,
        probes: Sequence[tuple[Probe, float]],  # (probe, its timeout in seconds)
        interval_s: float,
        interrupted: threading.Event,
    ) -> None:
        self.probes = list(probes)
        self.interval_s = interval_s
        self.interrupted = interrupted
        longest = max(timeout for _, timeout in self.probes)
        self._pool = ThreadPoolExecutor(
            max_workers=workers_for(interval_s, longest), thread_name_prefix="depdrill-probe"
        )

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check(self) -> Observation:
        """Run every probe once; healthy only when all are."""
        results = []
        for probe, timeout in self.probes:
            try:
                results.append(probe.run(time.monotonic() + timeout))
            except Exception as exc:  # a probe bug must read as a failed sample, not a crash
                results.append(Observation(False, None, f"probe crashed: {exc!r}"))
        failed = next((r for r in results if not r.ok), None)
        latencies = [r.latency_ms for r in results]
        latency = None if any(x is None for x in latencies) else max(x or 0.0 for x in latencies)
        if failed is not None:
            return Observation(False, latency, failed.error)
        return Observation(True, latency)

    def window(
        self,
        phase: PhaseName,
        duration_s: float,
        epoch: float,
        stop: Callable[[list[Sample]], bool] | None = None,
    ) -> list[Sample]:
        """Sample for `duration_s`; returns the samples settled when done or stopped.

        `epoch` is the test's start (time.monotonic()); Sample.t counts from it. When
        `stop` says the phase is decided, or the run is interrupted, samples still in flight
        are abandoned; otherwise the window waits for them (each ends by its timeout).
        """
        planned = planned_samples(duration_s, self.interval_s)
        start = time.monotonic()
        pending: list[tuple[float, Future[Observation]]] = []
        settled: list[Sample] = []

        def settle() -> bool:
            changed = False
            while pending and pending[0][1].done():
                t, future = pending.pop(0)
                obs = future.result()
                latency = None if obs.latency_ms is None else round(obs.latency_ms, 3)
                settled.append(
                    Sample(t=t, phase=phase, ok=obs.ok, latency_ms=latency, error=obs.error)
                )
                changed = True
            return changed

        def decided() -> bool:
            return (settle() and stop is not None and stop(settled)) or self.interrupted.is_set()

        for k in range(planned):
            due = start + k * self.interval_s
            while (now := time.monotonic()) < due:
                if decided():
                    return self._abandon(pending, settled)
                time.sleep(min(POLL_S, due - now))
            if decided():
                return self._abandon(pending, settled)
            pending.append((round(time.monotonic() - epoch, 4), self._pool.submit(self.check)))
        while pending:
            if decided():
                return self._abandon(pending, settled)
            time.sleep(POLL_S)
        return settled

    @staticmethod
    def _abandon(
        pending: list[tuple[float, Future[Observation]]], settled: list[Sample]
    ) -> list[Sample]:
        for _, future in pending:
            future.cancel()  # queued ones never run; running ones finish unrecorded
        return settled


def planned_samples(duration_s: float, interval_s: float) -> int:
    return max(1, round(duration_s / interval_s))
