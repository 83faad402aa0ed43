"""The fault journal: one JSON line per event, written before each apply, closed on revert.

If depdrill dies, whatever an `apply` line lists without a matching `revert` line may still
be in the kernel; the watchdog and `depdrill cleanup` read this file to remove it. Lines are
appended with one write(2) each, so the runner and its watchdog never interleave halves.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from depdrill.artifact import utcnow
from depdrill.errors import InputError
from depdrill.execute.injectors.base import KernelObject, Plan
from depdrill.netns import Target

DEFAULT_DIR = Path("/run/depdrill/journal")


@dataclass(frozen=True)
class Entry:
    """One applied fault as the journal knows it."""

    entry: int
    injector: str
    target: Target
    namespace: str  # the namespace file's path, for an operator
    test_id: str
    deadline: datetime
    objects: list[KernelObject]


@dataclass
class State:
    """A journal read back: who ran, and the faults not yet reverted."""

    run_id: str
    pid: int | None = None
    pid_started: int | None = None  # the runner's start time, in clock ticks after boot
    open: dict[int, Entry] = field(default_factory=dict)
    closed: set[int] = field(default_factory=set)


def path_for(journal_dir: Path, run_id: str) -> Path:
    return journal_dir / f"{run_id}.jsonl"


def process_started(pid: int) -> int | None:
    """A process's start time (clock ticks after boot), to tell it from a later reuse of its pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


class Journal:
    """The writing side, held by the runner's FaultSession."""

    def __init__(self, run_id: str, journal_dir: Path = DEFAULT_DIR) -> None:
        self.run_id = run_id
        self.path = path_for(journal_dir, run_id)
        self._serial = 0
        try:
            journal_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            raise InputError(f"cannot write the fault journal {self.path}: {exc}") from None

    def start(self, pid: int) -> None:
        self._write(
            {
                "event": "start",
                "run_id": self.run_id,
                "pid": pid,
                "pid_started": process_started(pid),
                "at": utcnow().isoformat(),
            }
        )

    def opened(self, plan: Plan) -> int:
        """Record a fault about to be applied; returns its entry number."""
        self._serial += 1
        self._write(
            {
                "event": "apply",
                "entry": self._serial,
                "injector": plan.injector,
                "target": plan.ctx.target.model_dump(mode="json"),
                "namespace": str(plan.ctx.target.path),
                "test_id": plan.ctx.test_id,
                "deadline": plan.ctx.deadline.isoformat(),
                "objects": [asdict(o) for o in plan.objects],
                "rules": plan.rules,
            }
        )
        return self._serial

    def closed(self, entry: int, by: str = "runner") -> None:
        self._write({"event": "revert", "entry": entry, "by": by, "at": utcnow().isoformat()})

    def close(self, remove: bool) -> None:
        os.close(self._fd)
        if remove:
            self.path.unlink(missing_ok=True)

    def _write(self, record: dict[str, Any]) -> None:
        os.write(self._fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())
        os.fsync(self._fd)


def append(path: Path, record: dict[str, Any]) -> None:
    """One line from another process (the watchdog marking an entry it reverted)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())
    finally:
        os.close(fd)


def read(path: Path) -> State:
    """Parse a journal; a torn last line (a crash mid-write) is ignored."""
    state = State(run_id=path.stem)
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict):
            continue
        event = record.get("event")
        if event == "start":
            state.pid = record.get("pid")
            state.pid_started = record.get("pid_started")
        elif event == "apply":
            try:
                entry = Entry(
                    entry=int(record["entry"]),
                    injector=str(record["injector"]),
                    target=Target.model_validate(record["target"]),
                    namespace=str(record["namespace"]),
                    test_id=str(record.get("test_id", "")),
                    deadline=datetime.fromisoformat(record["deadline"]),
                    objects=[KernelObject(**o) for o in record["objects"]],
                )
            except (KeyError, TypeError, ValueError):
                continue
            if entry.entry not in state.closed:
                state.open[entry.entry] = entry
        elif event == "revert":
            number = record.get("entry")
            if isinstance(number, int):
                state.closed.add(number)
                state.open.pop(number, None)
    return state


def runner_alive(state: State) -> bool:
    """The process that wrote the journal still runs (the same one, not a reused pid)."""
    if state.pid is None:
        return False
    started = process_started(state.pid)
    return started is not None and started == state.pid_started


def journals(journal_dir: Path) -> list[Path]:
    try:
        return sorted(journal_dir.glob("*.jsonl"))
    except OSError:
        return []
