"""Progress for people and for logs: rich on a terminal, plain timestamped lines elsewhere."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TextIO

from rich.console import Console as RichConsole
from rich.markup import escape


class Console:
    """Writes progress to stderr, so stdout stays free for data (--json)."""

    def __init__(
        self, *, plain: bool | None = None, quiet: bool = False, stream: TextIO | None = None
    ):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.plain = plain if plain is not None else not self.stream.isatty()
        self._rich = RichConsole(file=self.stream, highlight=False) if not self.plain else None

    def info(self, message: str) -> None:
        """One line of progress. The message may hold attacker text: never markup."""
        if self.quiet:
            return
        if self._rich is not None:
            self._rich.print(f"[dim]•[/dim] {escape(message)}")
        else:
            stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            print(f"{stamp} {message}", file=self.stream, flush=True)

    def result(self, label: str, verdict: str, detail: str = "") -> None:
        if self.quiet:
            return
        colours = {
            "tolerant": "green",
            "degraded": "yellow",
            "failed": "red",
            "no-recovery": "red",
            "error": "magenta",
            "skipped": "dim",
        }
        tail = f" — {detail}" if detail else ""
        if self._rich is not None:
            colour = colours.get(verdict, "white")
            shown = f"[{colour}]{escape(verdict):<11}[/{colour}]"
            self._rich.print(f"  {shown} {escape(label)}[dim]{escape(tail)}[/dim]")
        else:
            self.info(f"{verdict:<11} {label}{tail}")

    @contextmanager
    def step(self, message: str) -> Iterator[None]:
        """A long step: a spinner on a terminal, start and end lines in a log."""
        started = time.monotonic()
        if self.quiet:
            yield
            return
        if self._rich is not None:
            with self._rich.status(escape(message)):
                yield
            took = time.monotonic() - started
            self._rich.print(f"[green]✓[/green] {escape(message)} [dim]({took:.1f} s)[/dim]")
        else:
            self.info(f"{message} ...")
            yield
            self.info(f"{message}: done in {time.monotonic() - started:.1f} s")
