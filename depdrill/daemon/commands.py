"""The daemon's commands: `depdrill daemon` and `depdrill history` (registered by the CLI)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from depdrill.daemon.config import DaemonSettings, load_config
from depdrill.daemon.history import History
from depdrill.daemon.loop import Daemon
from depdrill.errors import InputError

_FILE = click.Path(path_type=Path, dir_okay=False)


@click.command("daemon")
@click.option("--config", "config_path", type=_FILE, required=True, help="The TOML config.")
@click.option("--check", is_flag=True, help="Only validate the config (exit 0 or 2).")
def daemon_command(config_path: Path, check: bool) -> None:
    """Watch services, scan them on schedule, keep history, serve /metrics."""
    config = load_config(config_path)
    if check:
        names = ", ".join(s.name for s in config.services)
        click.echo(f"{config_path}: valid ({len(config.services)} services: {names})")
        return
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    daemon = Daemon(config, config_path=config_path)
    with daemon.signals():
        daemon.run()


@click.command("history")
@click.argument("service")
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of lines.")
@click.option("--db", type=_FILE, help="The history database (default: the config's, or ours).")
@click.option("--config", "config_path", type=_FILE, help="Take the database from this config.")
def history_command(service: str, as_json: bool, db: Path | None, config_path: Path | None) -> None:
    """List a service's scans, oldest first."""
    if db is None:
        db = load_config(config_path).daemon.history if config_path else DaemonSettings().history
    if not db.exists():
        raise InputError(f"history {db}: no such file")
    with History(db) as history:
        scans = history.scans(service)
        known = history.services()
    if not scans and service not in known:
        raise InputError(
            f"history {db}: no scans of {service!r} (services: {', '.join(known) or 'none'})"
        )
    if as_json:
        click.echo(json.dumps([s.model_dump(mode="json") for s in scans], indent=2))
        return
    for summary in scans:
        click.echo(summary.line())
