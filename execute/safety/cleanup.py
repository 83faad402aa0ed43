"""Remove whatever faults a journal still lists, and depdrill's tagged leftovers beside them.

Used by the watchdog when the runner dies (for that run), at a fault's deadline (for that
fault), and by `depdrill cleanup` (every journal whose runner is gone). nft tables made with
the owner flag vanish with their process; removing them here covers tables some other
tool made without it, and a live owner's refusal (EPERM) is reported, not fought.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from depdrill.errors import DepdrillError
from depdrill.execute.injectors import iptables
from depdrill.execute.injectors.base import KernelObject
from depdrill.execute.safety import journal
from depdrill.execute.safety.journal import DEFAULT_DIR, Entry, State
from depdrill.libnftables import NftContext, NftError
from depdrill.netns import Target, entered

TABLE_PREFIX = "depdrill_"


def cleanup(journal_dir: Path = DEFAULT_DIR, run_id: str | None = None) -> list[str]:
    """Undo every open entry of the selected journals; returns what was removed.

    With `run_id`, that run only, even if its runner looks alive (the watchdog knows it is
    not). Without, every journal whose runner is gone: a live run reverts its own faults.
    A journal whose every entry is undone is deleted.
    """
    removed: list[str] = []
    states = [(path, journal.read(path)) for path in journal.journals(journal_dir)]
    live = {s.run_id for _, s in states if journal.runner_alive(s)}
    for path, state in states:
        if run_id is not None and state.run_id != run_id:
            continue
        if run_id is None and state.run_id in live:
            continue
        failures = 0
        for entry in list(state.open.values()):
            done, failed = undo(entry)
            removed += done
            failures += failed
        for target in _targets(state):
            done, failed = sweep(target, keep_runs=live - {state.run_id})
            removed += done
            failures += failed
        if failures == 0:
            path.unlink(missing_ok=True)
    return removed


def undo(
    entry: Entry, kinds: Iterable[str] = ("nft-table", "iptables-rule", "qdisc")
) -> tuple[list[str], int]:
    """Remove one entry's kernel objects (of the given kinds); returns (removed, failures)."""
    removed: list[str] = []
    failures = 0
    wanted = [o for o in entry.objects if o.kind in kinds]
    try:
        entry.target.check()
    except DepdrillError:
        return [], 0  # the namespace is gone, and everything in it
    tables = [o for o in wanted if o.kind == "nft-table"]
    if tables:
        done, failed = _delete_tables(entry.target, [(o.where, o.name) for o in tables])
        removed += done
        failures += failed
    tags = sorted({(o.where.split()[0], o.name) for o in wanted if o.kind == "iptables-rule"})
    for binary, tag in tags:
        try:
            removed += iptables.remove_tagged(entry.target, binary, tag)
        except iptables.IptablesError:
            failures += 1
    qdiscs = [o for o in wanted if o.kind == "qdisc"]
    if qdiscs:
        done, failed = _remove_qdiscs(entry.target, qdiscs)
        removed += done
        failures += failed
    return [f"{r} ({entry.target.describe()})" for r in removed], failures


def sweep(target: Target, keep_runs: set[str]) -> tuple[list[str], int]:
    """Remove depdrill-named nft tables and depdrill-tagged rules of runs not in `keep_runs`."""
    try:
        target.check()
    except DepdrillError:
        return [], 0
    removed: list[str] = []
    failures = 0
    try:
        with entered(target):
            nft = NftContext()
        with nft:
            listing = nft.run("list tables\n")  # text: see nft_blackhole.counted
    except (NftError, DepdrillError):
        listing = ""
    mine = [
        (family, name)
        for family, name in listed_tables(listing)
        if name.startswith(TABLE_PREFIX) and _run_of_table(name) not in keep_runs
    ]
    if mine:
        done, failed = _delete_tables(target, mine)
        removed += done
        failures += failed
    for binary in iptables.BINARIES.values():
        try:
            for line in iptables.tagged(target, binary):
                tag = _tag_of(line)
                if tag is not None and tag.split(":")[1] not in keep_runs:
                    removed += iptables.remove_tagged(target, binary, tag)
        except iptables.IptablesError:
            failures += 1
    return [f"{r} ({target.describe()})" for r in removed], failures


def listed_tables(listing: str) -> list[tuple[str, str]]:
    """(family, name) of each `table FAMILY NAME` line of `nft list tables`."""
    found = []
    for line in listing.splitlines():
        words = line.split()
        if len(words) >= 3 and words[0] == "table":
            found.append((words[1], words[2]))
    return found


def _delete_tables(target: Target, tables: list[tuple[str, str]]) -> tuple[list[str], int]:
    removed, failures = [], 0
    with entered(target):
        nft = NftContext()
    with nft:
        for family, name in tables:
            try:
                nft.run(f"delete table {family} {name}\n")
                removed.append(f"nft table {family} {name}")
            except NftError as exc:
                # Gone already (its owner died): nothing to do. Owned by a live process: the
                # kernel removes it when that process ends, and nobody else may.
                if "No such file or directory" not in str(exc):
                    failures += 1
    return removed, failures


def _remove_qdiscs(target: Target, qdiscs: list[KernelObject]) -> tuple[list[str], int]:
    from depdrill.execute.injectors.netem_latency import remove_qdiscs

    try:
        return remove_qdiscs(target, [o.where for o in qdiscs]), 0
    except Exception:  # pyroute2 raises errors of its own; the rest of cleanup must go on
        return [], 1


def _targets(state: State) -> list[Target]:
    seen: dict[str, Target] = {}
    for entry in state.open.values():
        seen.setdefault(entry.namespace, entry.target)
    return list(seen.values())


def _run_of_table(name: str) -> str:
    parts = name.split("_")
    return parts[1] if len(parts) >= 3 else ""


def _tag_of(line: str) -> str | None:
    import shlex

    words = shlex.split(line)
    for i, word in enumerate(words[:-1]):
        if word == "--comment":
            return words[i + 1]
    return None
