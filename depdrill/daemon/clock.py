"""The daemon's sense of time: the wall clock, or a manual one that tests move forward."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime: ...

    def sleep_until(self, moment: datetime, wake: threading.Event) -> None:
        """Return at `moment`, or earlier once `wake` is set."""


class WallClock:
    # Waking at least every minute keeps the schedule right across a suspend or a clock step.
    MAX_NAP_S = 60.0

    def now(self) -> datetime:
        return datetime.now(UTC)

    def sleep_until(self, moment: datetime, wake: threading.Event) -> None:
        while not wake.is_set():
            left = (moment - self.now()).total_seconds()
            if left <= 0:
                return
            wake.wait(min(left, self.MAX_NAP_S))


class ManualClock:
    """Jumps straight to whatever time the daemon sleeps until: scheduled scans come back to
    back, without waiting for wall-clock minutes."""

    def __init__(self, start: datetime) -> None:
        self._now = start

    def now(self) -> datetime:
        return self._now

    def sleep_until(self, moment: datetime, wake: threading.Event) -> None:
        if not wake.is_set() and moment > self._now:
            self._now = moment
