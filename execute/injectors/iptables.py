"""iptables-legacy inside a target namespace: install and remove rules that carry a tag.

Every rule depdrill installs carries `-m comment --comment depdrill:<run_id>:<n>`, so that
an operator sees whose it is and cleanup can find it after a crash without the journal.
Changes go through `*-restore --noflush`: one process, one atomic commit per table.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from dataclasses import dataclass

from depdrill.netns import Target

TABLE = "mangle"
BINARIES = {4: "iptables-legacy", 6: "ip6tables-legacy"}
TAG_PREFIX = "depdrill:"
TIMEOUT_S = 10.0


class IptablesError(Exception):
    """iptables refused a change, with its own words."""


@dataclass(frozen=True)
class Rule:
    """One rule: the binary (family), the chain, and the spec after `-I CHAIN`.

    Spec words never hold spaces or quotes (addresses, numbers, tags of [a-z0-9:]), so
    they go into *-restore input as they are: it knows double quotes only, not a shell's.
    """

    binary: str
    chain: str
    spec: tuple[str, ...]

    def command(self, action: str = "-I") -> str:
        """As an operator would type it inside the namespace."""
        return shlex.join([self.binary, "-t", TABLE, action, self.chain, *self.spec])

    @property
    def where(self) -> str:
        return f"{self.binary} {TABLE} {self.chain}"


def restore(target: Target, binary: str, lines: list[str]) -> None:
    """Apply `lines` (`-I ...` / `-D ...`) to the mangle table in one commit."""
    script = f"*{TABLE}\n" + "".join(f"{line}\n" for line in lines) + "COMMIT\n"
    _run(target, [f"{binary}-restore", "--noflush", "--wait=5"], script)


def install(target: Target, rules: list[Rule]) -> None:
    for binary in sorted({r.binary for r in rules}):
        mine = [r for r in rules if r.binary == binary]
        restore(target, binary, [" ".join(["-I", r.chain, *r.spec]) for r in mine])


def remove(target: Target, rules: list[Rule]) -> None:
    for binary in sorted({r.binary for r in rules}):
        mine = [r for r in rules if r.binary == binary]
        restore(target, binary, [" ".join(["-D", r.chain, *r.spec]) for r in mine])


def tagged(target: Target, binary: str, prefix: str = TAG_PREFIX) -> list[str]:
    """Rules (as `-A CHAIN spec` lines of *-save) carrying a tag.

    A `prefix` ending in ":" matches every tag under it (a run: `depdrill:<run_id>:`);
    otherwise it is one fault's exact tag (so `depdrill:x:1` never matches `depdrill:x:10`).
    """
    listing = _run(target, [f"{binary}-save", "-t", TABLE], None)
    found = []
    for line in listing.splitlines():
        if not line.startswith("-A "):
            continue
        words = shlex.split(line)
        for i, word in enumerate(words[:-1]):
            if word == "--comment" and _tag_matches(words[i + 1], prefix):
                found.append(line)
    return found


def remove_tagged(target: Target, binary: str, prefix: str) -> list[str]:
    """Remove every rule whose comment starts with `prefix`; returns what was removed."""
    lines = tagged(target, binary, prefix)
    if lines:
        restore(target, binary, ["-D" + line[2:] for line in lines])
    return [f"{binary} -t {TABLE} {line}" for line in lines]


def _dies_with_us() -> list[str]:
    """A prefix that kills the command if depdrill dies first.

    Otherwise a SIGKILLed runner's iptables-restore could finish after the watchdog's
    cleanup, and install a rule that nothing would ever remove.
    """
    return ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []


def _tag_matches(comment: str, prefix: str) -> bool:
    return comment.startswith(prefix) if prefix.endswith(":") else comment == prefix


def _run(target: Target, argv: list[str], stdin: str | None) -> str:
    try:
        done = subprocess.run(
            [*_dies_with_us(), *target.exec_prefix(), *argv],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
        )
    except FileNotFoundError as exc:
        raise IptablesError(f"{argv[0]} is not installed (apt install iptables)") from exc
    except subprocess.TimeoutExpired:
        raise IptablesError(f"{argv[0]} did not finish in {TIMEOUT_S:.0f} s") from None
    if done.returncode != 0:
        raise IptablesError(f"{argv[0]}: {' '.join(done.stderr.split()) or 'failed'}")
    return done.stdout
