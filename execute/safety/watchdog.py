"""The watchdog: a process apart from the runner that reverts the run's faults if it dies.

Started by FaultSession before the first fault, in its own session (a Ctrl-C or a kill of
the runner's process group does not reach it). It waits on a pidfd of the runner: when the
runner exits, even by SIGKILL, it undoes everything the run's journal still lists and
exits. Meanwhile it enforces deadlines: an entry past its deadline is undone on the spot.
SIGTERM (the runner's normal goodbye) ends it without touching anything.

    python -P -m depdrill.execute.safety.watchdog --run-id ID --pid PID --journal-dir DIR
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import sys
from pathlib import Path
from types import FrameType

from depdrill.artifact import utcnow
from depdrill.execute.safety import journal
from depdrill.execute.safety.cleanup import cleanup, undo

POLL_S = 0.05
READY = "ready"


def watch(run_id: str, pid: int, journal_dir: Path, poll_s: float = POLL_S) -> int:
    path = journal.path_for(journal_dir, run_id)
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        cleanup(journal_dir, run_id=run_id)
        return 0
    print(READY, flush=True)
    # Nobody reads further; a closed pipe must never be what kills the watchdog.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    expired: set[int] = set()
    seen_mtime = 0.0
    state: journal.State | None = None
    try:
        while True:
            ready, _, _ = select.select([pidfd], [], [], poll_s)
            if ready:
                cleanup(journal_dir, run_id=run_id)
                return 0
            try:
                mtime = path.stat().st_mtime
            except FileNotFoundError:
                continue  # nothing journaled yet, or the session is ending
            if mtime != seen_mtime:
                state, seen_mtime = journal.read(path), mtime
            if state is not None:
                _enforce_deadlines(path, state, expired)
    finally:
        os.close(pidfd)


def _enforce_deadlines(path: Path, state: journal.State, expired: set[int]) -> None:
    now = utcnow()
    for entry in state.open.values():
        if entry.entry in expired or entry.deadline > now:
            continue
        # Owner-flagged nft tables cannot be removed by another process; their set elements
        # time out at this same deadline in the kernel. Everything else goes now.
        _, failures = undo(entry, kinds=("iptables-rule", "qdisc"))
        if failures == 0:
            expired.add(entry.entry)
            journal.append(path, {"event": "expired", "entry": entry.entry, "at": now.isoformat()})


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="depdrill-watchdog")
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--journal-dir", type=Path, default=journal.DEFAULT_DIR)
    parser.add_argument("--poll-ms", type=float, default=POLL_S * 1000)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return watch(args.run_id, args.pid, args.journal_dir, args.poll_ms / 1000)


if __name__ == "__main__":
    sys.exit(main())
