"""FaultSession: how the runner applies faults so that none outlives it.

    with FaultSession(run_id, target) as session:
        handle = session.apply(injector, fault, ctx)
        ...
        session.revert(handle)

Entering starts the watchdog (and waits until it watches); each apply is journaled before
anything reaches the kernel; leaving, by any path (an exception, SIGTERM when nobody else
handles it), reverts every fault still on, stops the watchdog and deletes the journal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from depdrill.errors import CapabilityError
from depdrill.execute.injectors.base import FaultContext, Handle, Injector, InjectorError
from depdrill.execute.model import ErrorReason
from depdrill.execute.safety import journal
from depdrill.execute.safety.cleanup import cleanup, undo
from depdrill.execute.safety.journal import DEFAULT_DIR, Journal
from depdrill.generate.model import Fault
from depdrill.netns import Target

WATCHDOG_START_S = 15.0
WATCHDOG_STOP_S = 5.0


@dataclass
class _Applied:
    injector: Injector
    handle: Handle
    entry: int


class FaultSession:
    def __init__(
        self, run_id: str, target: Target, journal_dir: Path = DEFAULT_DIR, watchdog: bool = True
    ) -> None:
        self.run_id = run_id
        self.target = target
        self.journal_dir = Path(journal_dir)
        self.use_watchdog = watchdog
        self.watchdog: subprocess.Popen[str] | None = None
        self._journal: Journal | None = None
        self._applied: dict[int, _Applied] = {}
        self._lock = threading.Lock()
        self._previous_sigterm: Any = None

    def __enter__(self) -> FaultSession:
        self._journal = Journal(self.run_id, self.journal_dir)
        self._journal.start(os.getpid())
        try:
            if self.use_watchdog:
                self.watchdog = _start_watchdog(self.run_id, self.journal_dir)
            self._catch_sigterm()
        except BaseException:
            self._journal.close(remove=True)
            raise
        return self

    def apply(self, injector: Injector, fault: Fault, ctx: FaultContext) -> Handle:
        if self._journal is None:
            raise RuntimeError("FaultSession.apply outside its `with` block")
        plan = injector.plan(fault, ctx)
        entry = self._journal.opened(plan)
        try:
            handle = injector.apply_plan(plan)
        except BaseException:
            # Half an apply may be in the kernel: undo by the journal's names, then close.
            cleanup_entry = journal.read(self._journal.path).open.get(entry)
            if cleanup_entry is not None:
                undo(cleanup_entry)
            self._journal.closed(entry)
            raise
        with self._lock:
            self._applied[id(handle)] = _Applied(injector, handle, entry)
        return handle

    def revert(self, handle: Handle) -> None:
        with self._lock:
            applied = self._applied.get(id(handle))
        if applied is None:
            raise InjectorError(ErrorReason.REVERT_FAILED, "this fault is not on (reverted?)")
        applied.injector.revert(handle)
        with self._lock:
            self._applied.pop(id(handle), None)
        if self._journal is not None:
            self._journal.closed(applied.entry)

    @property
    def faults_on(self) -> int:
        with self._lock:
            return len(self._applied)

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        leftovers = False
        with self._lock:
            applied = list(self._applied.values())
        for item in applied:
            try:
                self.revert(item.handle)
            except Exception:
                leftovers = True
        if leftovers:
            cleanup(self.journal_dir, run_id=self.run_id)
        self._stop_watchdog()
        self._restore_sigterm()
        if self._journal is not None:
            self._journal.close(remove=not leftovers or not self._journal_has_open())
            self._journal = None

    def _journal_has_open(self) -> bool:
        assert self._journal is not None
        try:
            return bool(journal.read(self._journal.path).open)
        except OSError:
            return False

    def _stop_watchdog(self) -> None:
        if self.watchdog is None:
            return
        self.watchdog.terminate()
        try:
            self.watchdog.wait(WATCHDOG_STOP_S)
        except subprocess.TimeoutExpired:
            self.watchdog.kill()
            self.watchdog.wait()
        self.watchdog = None

    def _catch_sigterm(self) -> None:
        # Only when nobody else handles SIGTERM (the runner has its own, which stops the run
        # and lets this block exit normally) and only from the main thread, where Python
        # delivers signals.
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            self._previous_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)

    def _restore_sigterm(self) -> None:
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _start_watchdog(run_id: str, journal_dir: Path) -> subprocess.Popen[str]:
    argv = [
        sys.executable,
        "-P",
        "-m",
        "depdrill.execute.safety.watchdog",
        "--run-id",
        run_id,
        "--pid",
        str(os.getpid()),
        "--journal-dir",
        str(journal_dir),
    ]
    process = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    stdout = process.stdout
    assert stdout is not None
    ready: list[str] = []
    reader = threading.Thread(target=lambda: ready.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(WATCHDOG_START_S)
    if not ready or ready[0].strip() != "ready":
        process.kill()
        process.wait()
        reader.join()
        stdout.close()
        raise CapabilityError("the fault watchdog did not start; refusing to inject faults")
    stdout.close()
    return process
