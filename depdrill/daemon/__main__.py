"""`python -m depdrill.daemon ...`: the depdrill CLI with the daemon's commands registered."""

from __future__ import annotations

from depdrill.cli import cli, main
from depdrill.daemon.commands import daemon_command, history_command

cli.add_command(daemon_command)
cli.add_command(history_command)

if __name__ == "__main__":
    main()
