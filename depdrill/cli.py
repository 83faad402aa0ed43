"""The command line: parse, load, call a stage's run(), write. No logic of its own."""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from depdrill import __version__
from depdrill.artifact import Artifact, atomic_write, load_json, read_text, to_json
from depdrill.console import Console
from depdrill.errors import DepdrillError, InputError
from depdrill.netns import Target

if TYPE_CHECKING:
    from depdrill.discover.run import TapChoice

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CAPABILITY = 0, 1, 2, 3


def _console(as_json: bool = False) -> Console:
    return Console(quiet=False, plain=True if as_json else None)


def _target(netns: str | None, pid: int | None) -> Target | None:
    if netns is not None and pid is not None:
        raise click.UsageError("give --netns or --pid, not both")
    if netns is None and pid is None:
        return None
    try:
        return Target(netns=netns, pid=pid)
    except ValueError as exc:
        raise InputError(str(exc).splitlines()[-1].strip()) from None


def _write(path: Path, artifact: Artifact | str) -> None:
    atomic_write(path, artifact if isinstance(artifact, str) else to_json(artifact))


def _echo_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False, default=str))


def target_options(func: F) -> F:
    func = click.option("--pid", type=int, help="Target the network namespace of this process.")(
        func
    )
    func = click.option("--netns", help="Target this `ip netns` namespace.")(func)
    return func


class _Commands(click.Group):
    """The command group; the daemon's commands load only when asked for (they import every
    stage and prometheus-client: `depdrill report` should not pay for that)."""

    LAZY: dict[str, tuple[str, str]] = {
        "daemon": ("depdrill.daemon.commands", "daemon_command"),
        "history": ("depdrill.daemon.commands", "history_command"),
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.LAZY])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.LAZY:
            module, attribute = self.LAZY[cmd_name]
            command: click.Command = getattr(importlib.import_module(module), attribute)
            return command
        return super().get_command(ctx, cmd_name)


@click.group(
    cls=_Commands,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="depdrill")
def cli() -> None:
    """Find what a service depends on, break each dependency on purpose, report how it copes.

    Stages: discover -> generate -> run -> report; `audit` chains them (with no target, against
    the built-in lab). Exit codes: 0 all tolerant, 1 some test failed, 2 usage or input error,
    3 missing capability or privilege.
    """


# ---------------------------------------------------------------- lab


@cli.group()
def lab() -> None:
    """The embedded lab: namespaces with real DNS, HTTPS, redis, UDP servers and a demo service."""


@lab.command("up")
@click.option("--prefix", default="ddl", show_default=True, help="Name prefix of everything built.")
@click.option(
    "--subnet",
    "subnet_index",
    type=click.IntRange(0, 255),
    default=0,
    show_default=True,
    help="Use 198.18.N.0/24.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the lab's state as JSON.")
def lab_up(prefix: str, subnet_index: int, as_json: bool) -> None:
    """Build the lab and wait until every server answers."""
    from depdrill.lab import world

    console = _console(as_json)
    with console.step(f"building lab {prefix}"):
        state = world.up(prefix=prefix, subnet_index=subnet_index, progress=console.info)
    if as_json:
        _echo_json(state.model_dump(mode="json"))
    else:
        click.echo(f"lab {state.prefix} is up: probe {state.service_url}")
        click.echo(f"  service namespace: {state.service_netns}; CA bundle: {state.ca_bundle}")


@lab.command("down")
@click.option("--prefix", default="ddl", show_default=True)
def lab_down(prefix: str) -> None:
    """Remove every namespace, interface, process and file the lab created."""
    from depdrill.lab import world

    removed = world.down(prefix=prefix)
    click.echo(
        f"lab {prefix}: removed {len(removed)} item(s)"
        if removed
        else f"lab {prefix}: nothing to remove"
    )


@lab.command("status")
@click.option("--prefix", default="ddl", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def lab_status(prefix: str, as_json: bool) -> None:
    """Say whether the lab is up and whether each of its servers answers."""
    from depdrill.lab import world

    status = world.status(prefix)
    if as_json:
        _echo_json(None if status is None else status.model_dump(mode="json"))
        return
    if status is None:
        click.echo(f"lab {prefix} is down")
        return
    click.echo(world.describe_status(status))


# ---------------------------------------------------------------- stages


@cli.command(context_settings={"allow_interspersed_args": False})
@target_options
@click.option(
    "--pcap", type=click.Path(path_type=Path), help="Discover from a capture file (pcap, pcapng)."
)
@click.option(
    "--duration",
    type=click.FloatRange(0.1, 86400),
    help="Seconds to capture (SIGINT ends early and still writes the graph)  [default: 30; "
    "with a COMMAND: until it exits]",
)
@click.option(
    "--resolver",
    help="With a COMMAND: the DNS server its namespace uses (default: the host side of its veth).",
)
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), default=Path("graph.json"), show_default=True
)
@click.option("--append", is_flag=True, help="Merge into the graph already at --output.")
@click.option(
    "--tap",
    type=click.Choice(["auto", "ebpf", "nflog", "packet"]),
    default="auto",
    show_default=True,
    help="How packets reach depdrill: an eBPF program on each device keeping only what "
    "discovery reads (ebpf: Linux 6.6+), nft rules logging it (nflog), or a packet socket "
    "with a BPF filter (packet: every packet pays the tap); auto: the first that can be used "
    "there.",
)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def discover(
    netns: str | None,
    pid: int | None,
    pcap: Path | None,
    duration: float | None,
    resolver: str | None,
    output: Path,
    append: bool,
    tap: TapChoice,
    command: tuple[str, ...],
) -> None:
    """Sniff a service's DNS and connections; write its dependency graph.

    The service is a namespace (--netns, --pid), a capture file (--pcap), or
    `-- COMMAND ARGS...`: depdrill starts the command in a fresh namespace wired to the host
    and captures from its first packet, so no warm cache hides a lookup.
    """
    from depdrill.discover import run as discover_run
    from depdrill.discover.model import Graph

    target = _target(netns, pid)
    given = sum(x is not None for x in (target, pcap)) + bool(command)
    if given != 1:
        raise click.UsageError("give one of --netns, --pid, --pcap or -- COMMAND")
    console = _console()
    if command:
        from depdrill.discover import launch

        options = launch.CommandOptions(resolver=resolver, duration_s=duration, tap=tap)
        with console.step(f"running and capturing {' '.join(command)!r}"):
            graph = _until_interrupted(lambda stop: launch.run_command(command, options, stop))
    else:
        live = discover_run.DiscoverOptions(
            target=target,
            pcap=pcap,
            duration_s=duration if duration is not None else 30,
            tap=tap,
        )
        with console.step(f"capturing from {target.describe() if target else pcap}"):
            graph = _until_interrupted(lambda stop: discover_run.run(live, stop))
    if append and output.exists():
        graph = discover_run.merge(load_json(output, Graph), graph)
    _write(output, graph)
    deps = graph.dependencies()
    click.echo(f"{output}: {len(deps)} dependencies, {graph.capture.dns_messages} DNS messages")


@cli.command("graph")
@click.argument("graph_path", metavar="GRAPH", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["graphml", "dot", "json"]),
    default="dot",
    show_default=True,
)
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), help="Write here (default: stdout)."
)
def graph_cmd(graph_path: Path, fmt: str, output: Path | None) -> None:
    """Export a dependency graph for other tools: GraphML, Graphviz DOT, or node-link JSON."""
    from depdrill.discover.export import FORMATS, export
    from depdrill.discover.model import Graph

    chosen = next(f for f in FORMATS if f == fmt)  # click.Choice already refused the rest
    text = export(load_json(graph_path, Graph), chosen)
    if output is None:
        click.echo(text, nl=False)
    else:
        atomic_write(output, text)


@cli.command()
@click.argument("targets", nargs=-1)
@click.option(
    "--graph",
    "graph_path",
    type=click.Path(path_type=Path),
    help="Walk every TLS endpoint of this graph and write the findings back into it.",
)
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), help="With --graph: write here instead."
)
@click.option("--sni", help="Server name to send (default: the host given).")
@click.option(
    "--ca-bundle",
    type=click.Path(path_type=Path),
    help="Trust these roots instead of the system's.",
)
@click.option("--warn-days", type=click.IntRange(0, 3650), default=30, show_default=True)
@click.option("--timeout", type=click.FloatRange(0.1, 120), default=5.0, show_default=True)
@target_options
@click.option("--json", "as_json", is_flag=True)
def certs(
    targets: tuple[str, ...],
    graph_path: Path | None,
    output: Path | None,
    sni: str | None,
    ca_bundle: Path | None,
    warn_days: int,
    timeout: float,
    netns: str | None,
    pid: int | None,
    as_json: bool,
) -> None:
    """Check the TLS chains of HOST[:PORT] targets, or of every TLS endpoint in a graph.

    Exit 0 when no finding is a failure, 1 otherwise.
    """
    from depdrill.discover.model import EndpointNode, Graph
    from depdrill.discover.tls import check

    target = _target(netns, pid)
    if graph_path is not None:
        if targets:
            raise click.UsageError("give TARGETs or --graph, not both")
        graph = load_json(graph_path, Graph)
        if target is None:
            target = graph.target_spec
        walked = check.check_graph(
            graph, ca_bundle=ca_bundle, warn_days=warn_days, timeout_s=timeout, target=target
        )
        _write(output or graph_path, walked)
        reports = [n.tls for n in walked.nodes if isinstance(n, EndpointNode) and n.tls]
    else:
        if not targets:
            raise click.UsageError("give at least one HOST[:PORT], or --graph FILE")
        parsed = [check.parse_target(t) for t in targets]
        reports = [
            check.check_endpoint(
                host,
                port,
                sni or host,
                ca_bundle=ca_bundle,
                warn_days=warn_days,
                timeout_s=timeout,
                target=target,
            )
            for host, port in parsed
        ]
    failing = any(f.severity == "fail" for r in reports if r for f in r.findings)
    if as_json:
        _echo_json([r.model_dump(mode="json") for r in reports if r])
    else:
        for report in reports:
            if report is None:
                continue
            click.echo(_describe_chain(report))
    sys.exit(EXIT_FAILED if failing else EXIT_OK)


@cli.command()
@click.argument("graph_path", metavar="GRAPH", type=click.Path(path_type=Path))
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), default=Path("suite.yaml"), show_default=True
)
@click.option(
    "--probe",
    "probes",
    multiple=True,
    help="HTTP(S) URL that answers when the service is healthy (repeatable).",
)
@click.option("--service", "service_name", help="Service name (default: from the graph).")
@click.option("--latency", help="Latency ladder, e.g. 100ms,1s  [default: 100ms,1000ms]")
@click.option("--jitter", "jitter_ms", type=click.IntRange(0, 60000), help="Jitter in ms.")
@click.option("--include", multiple=True, help="Only dependencies matching this glob.")
@click.option("--exclude", multiple=True, help="Leave out dependencies matching this glob.")
@click.option("--p95-ms", type=click.FloatRange(1, 600000), help="SLO: p95 latency budget.")
@click.option(
    "--success-ratio", type=click.FloatRange(0, 1), help="SLO: share of probes that must succeed."
)
@click.option(
    "--observe", "observe_s", type=click.FloatRange(1, 3600), help="Seconds to observe each fault."
)
@click.option("--warn-days", type=click.IntRange(0, 3650), help="Certificate expiry warning.")
@click.option("--ca-bundle", type=click.Path(path_type=Path))
@click.option(
    "--from",
    "previous",
    type=click.Path(path_type=Path),
    help="Regenerate from this suite, keeping what a person edited.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["suite", "chaos-mesh", "chaos-toolkit", "pytest"]),
    default="suite",
    show_default=True,
    help="Write the suite, or an export of it.",
)
@click.option("--selector", help="chaos-mesh: the pods, as NAMESPACE/LABELKEY=VALUE.")
@click.option(
    "--suite-path",
    default="suite.yaml",
    show_default=True,
    help="Exports: where the suite sits, as the export should name it.",
)
def generate(
    graph_path: Path,
    output: Path,
    probes: tuple[str, ...],
    service_name: str | None,
    latency: str | None,
    jitter_ms: int | None,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    p95_ms: float | None,
    success_ratio: float | None,
    observe_s: float | None,
    warn_days: int | None,
    ca_bundle: Path | None,
    previous: Path | None,
    fmt: str,
    selector: str | None,
    suite_path: str,
) -> None:
    """Write a suite of fault tests for every dependency in a graph (or an export of it)."""
    from depdrill.discover.model import Graph
    from depdrill.generate import export, planner, suitefile

    graph = load_json(graph_path, Graph)
    old = suitefile.load_suite(previous) if previous is not None else None
    options = planner.options_from_cli(
        probes=list(probes),
        service_name=service_name,
        latency=latency,
        jitter_ms=jitter_ms,
        include=list(include),
        exclude=list(exclude),
        p95_ms=p95_ms,
        success_ratio=success_ratio,
        observe_s=observe_s,
        warn_days=warn_days,
        ca_bundle=str(ca_bundle) if ca_bundle else None,
        previous=old,
    )
    suite = planner.run(graph, options) if old is None else planner.regenerate(graph, old, options)
    if fmt == "suite":
        _write(output, suitefile.dump_suite(suite))
        click.echo(f"{output}: {len(suite.tests)} tests")
    else:
        text = export.export(
            suite, fmt, export.ExportRequest(suite_path=suite_path, selector=selector)
        )
        _write(output, text)
        click.echo(f"{output}: {fmt} export of {len(suite.tests)} tests")


@cli.command()
@click.argument("old", type=click.Path(path_type=Path), required=False)
@click.argument("new", type=click.Path(path_type=Path), required=False)
@click.option(
    "--scan",
    "scans",
    type=int,
    multiple=True,
    help="Compare two scans from the daemon's history instead (give it twice).",
)
@click.option("--db", type=click.Path(path_type=Path), help="With --scan: the history database.")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    help="With --scan: read the history database's path from this daemon config.",
)
@click.option("--json", "as_json", is_flag=True)
def diff(
    old: Path | None,
    new: Path | None,
    scans: tuple[int, ...],
    db: Path | None,
    config_path: Path | None,
    as_json: bool,
) -> None:
    """Compare two graphs or two suites (or two daemon scans): dependencies added, gone,
    moved; certificates nearer expiry; verdicts changed. Exit 1 when anything changed."""
    found: Any
    if scans:
        from depdrill.daemon.config import load_config
        from depdrill.daemon.drift import diff_scans

        if len(scans) != 2 or old is not None or new is not None:
            raise click.UsageError("give --scan A --scan B (and no files), or OLD NEW")
        if (db is None) == (config_path is None):
            raise click.UsageError("with --scan, give --db FILE or --config FILE")
        database = db if db is not None else load_config(config_path).daemon.history  # type: ignore[arg-type]
        found = diff_scans(database, scans[0], scans[1])
    else:
        from depdrill.generate.diff import diff_files

        if old is None or new is None:
            raise click.UsageError("give OLD NEW (two graphs or two suites), or --scan A --scan B")
        found = diff_files(old, new)
    if as_json:
        _echo_json(json.loads(found.model_dump_json()))
    else:
        for line in found.lines() or ["no change"]:
            click.echo(line)
    sys.exit(EXIT_FAILED if found.changed else EXIT_OK)


@cli.command("run")
@click.argument("suite_path", metavar="SUITE", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=Path("results.json"),
    show_default=True,
)
@click.option("--junit", type=click.Path(path_type=Path), help="Also write JUnit XML here.")
@click.option("--only", multiple=True, help="Run only tests whose id matches (glob).")
@click.option(
    "--dry-run", is_flag=True, help="Print the exact rules each fault would install; touch nothing."
)
@click.option(
    "--allow-commands", is_flag=True, help="Allow command probes from the suite (they run as root)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
def run_cmd(
    suite_path: Path,
    output: Path,
    junit: Path | None,
    only: tuple[str, ...],
    dry_run: bool,
    allow_commands: bool,
    as_json: bool,
) -> None:
    """Run a suite against the live service: inject each fault, observe, revert, judge."""
    from depdrill.execute import runner
    from depdrill.execute.junit import to_junit
    from depdrill.execute.vouch import Voucher
    from depdrill.generate import suitefile

    text, source = read_text(suite_path), str(suite_path)
    suite = suitefile.parse_suite(text, source, allow_commands=allow_commands)
    # A suite from a repository is untrusted: every fault it would apply must aim at what its
    # dependency resolves to from the service's namespace, checked before anything runs.
    suite.service.target.check()
    to_run = [t.id for t in runner.select(suite.tests, list(only)) if not (t.skip or t.removed)]
    suitefile.refuse_unvouched(text, source, suite, Voucher(suite.service.target), to_run)
    console = _console(as_json)
    results = runner.run(
        suite,
        runner.RunOptions(
            dry_run=dry_run,
            allow_commands=allow_commands,
            only=list(only),
            progress=_progress(console),
        ),
    )
    if dry_run:
        for test in results.tests:
            click.echo(f"# {test.id}")
            for rule in test.fault.rules if test.fault else []:
                click.echo(rule)
        return
    _write(output, results)
    if junit is not None:
        atomic_write(junit, to_junit(results))
    if as_json:
        click.echo(to_json(results), nl=False)
    sys.exit(_exit_for(results))


@cli.command()
@click.argument("results_path", metavar="RESULTS", type=click.Path(path_type=Path))
@click.option(
    "--graph", "graph_path", type=click.Path(path_type=Path), help="The graph the suite came from."
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=Path("report.html"),
    show_default=True,
)
@click.option(
    "--json", "json_path", type=click.Path(path_type=Path), help="Also write the report as JSON."
)
@click.option("--junit", type=click.Path(path_type=Path), help="Also write JUnit XML.")
@click.option(
    "--previous", type=click.Path(path_type=Path), help="Earlier results, to show what changed."
)
def report(
    results_path: Path,
    graph_path: Path | None,
    output: Path,
    json_path: Path | None,
    junit: Path | None,
    previous: Path | None,
) -> None:
    """Write the self-contained HTML report of a run."""
    from depdrill.discover.model import Graph
    from depdrill.execute.junit import to_junit
    from depdrill.execute.model import Results
    from depdrill.reports.run import ReportOptions
    from depdrill.reports.run import run as render_report

    results = load_json(results_path, Results)
    graph = load_json(graph_path, Graph) if graph_path else None
    before = load_json(previous, Results) if previous else None
    rendered = render_report(results, graph, ReportOptions(previous=before, junit=to_junit))
    atomic_write(output, rendered.html)
    if json_path is not None:
        atomic_write(json_path, rendered.json)
    if junit is not None and rendered.junit is not None:
        atomic_write(junit, rendered.junit)
    click.echo(str(output))


@cli.command()
@target_options
@click.option(
    "--probe", help="URL that answers when the service is healthy (required with a target)."
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=Path("depdrill-report"),
    show_default=True,
    help="Folder for graph.json, suite.yaml, results.json, report.html, junit.xml.",
)
@click.option(
    "--duration",
    type=click.FloatRange(1, 3600),
    default=8,
    show_default=True,
    help="Seconds of discovery (the probe drives traffic meanwhile).",
)
@click.option("--ca-bundle", type=click.Path(path_type=Path))
@click.option("--latency", default="100ms,1000ms", show_default=True)
@click.option(
    "--lab-prefix",
    default="ddl",
    show_default=True,
    help="With no target: the lab to audit (built, then removed, unless already up).",
)
@click.option(
    "--lab-subnet",
    type=click.IntRange(0, 255),
    default=0,
    show_default=True,
    help="With no target: the lab's subnet, 198.18.N.0/24.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
def audit(
    netns: str | None,
    pid: int | None,
    probe: str | None,
    output: Path,
    duration: float,
    ca_bundle: Path | None,
    latency: str,
    lab_prefix: str,
    lab_subnet: int,
    as_json: bool,
) -> None:
    """Discover, generate, run and report in one go. With no target: audit the built-in lab."""
    from depdrill import audit as audit_mod

    target = _target(netns, pid)
    if target is not None and probe is None:
        raise click.UsageError("with --netns/--pid, give --probe URL (what healthy means)")
    if target is None and probe is not None:
        raise click.UsageError("--probe goes with --netns or --pid")
    console = _console(as_json)
    outcome = audit_mod.audit(
        audit_mod.AuditOptions(
            target=target,
            probe=probe,
            output=output,
            duration_s=duration,
            ca_bundle=ca_bundle,
            latency=latency,
            lab_prefix=lab_prefix,
            lab_subnet=lab_subnet,
        ),
        console=console,
        progress=_progress(console),
    )
    if as_json:
        click.echo(to_json(outcome.results), nl=False)
    click.echo(f"report: {outcome.report_path.resolve()}")
    sys.exit(_exit_for(outcome.results))


@cli.command()
@click.option("--json", "as_json", is_flag=True)
def doctor(as_json: bool) -> None:
    """Say which injectors and capture paths this machine supports, and why not."""
    from depdrill.execute import doctor as doctor_mod

    checks = doctor_mod.doctor()
    if as_json:
        _echo_json(
            [c.model_dump(mode="json") if hasattr(c, "model_dump") else vars(c) for c in checks]
        )
    else:
        for check in checks:
            mark = "ok " if check.ok else "NO "
            click.echo(f"{mark} {check.name:<28} {check.detail}")
    sys.exit(
        EXIT_OK
        if all(c.ok for c in checks if not getattr(c, "optional", False))
        else EXIT_CAPABILITY
    )


@cli.command()
@click.option("--journal-dir", type=click.Path(path_type=Path), help="Where fault journals live.")
def cleanup(journal_dir: Path | None) -> None:
    """Remove any fault a crashed run left behind (from its journal)."""
    from depdrill.execute.safety import cleanup as cleanup_mod

    removed = cleanup_mod.cleanup(journal_dir) if journal_dir else cleanup_mod.cleanup()
    for item in removed:
        click.echo(f"removed {item}")
    if not removed:
        click.echo("nothing left behind")


@cli.command()
@click.argument("kind", type=click.Choice(["graph", "suite", "results"]))
def schema(kind: str) -> None:
    """Print the JSON Schema of a file depdrill reads or writes."""
    from depdrill.discover.model import Graph
    from depdrill.execute.model import Results
    from depdrill.generate.suitefile import suite_json_schema

    if kind == "suite":
        _echo_json(suite_json_schema())
    else:
        model: type[Graph] | type[Results] = Graph if kind == "graph" else Results
        _echo_json(model.model_json_schema(by_alias=True))


# ---------------------------------------------------------------- helpers


def _progress(console: Console) -> Callable[[Any], None]:
    def show(event: Any) -> None:
        verdict = getattr(event, "verdict", None)
        if verdict is not None:
            console.result(
                str(getattr(event, "test_id", "")), str(verdict), str(getattr(event, "rule", ""))
            )
        else:
            console.info(str(getattr(event, "message", event)))

    return show


def _until_interrupted(work: Callable[[threading.Event], T]) -> T:
    """Run `work(stop)`; SIGINT or SIGTERM sets `stop`, so the work ends cleanly and returns."""
    stop = threading.Event()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda *_: stop.set())
    try:
        return work(stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _describe_chain(report: Any) -> str:
    """A chain report as a few lines for a terminal (names are escaped by repr-like quoting)."""
    where = f"{report.host}:{report.port}" + (f" (SNI {report.sni!r})" if report.sni else "")
    lines = [where]
    if report.served:
        leaf = report.served[0]
        lines.append(
            f"  leaf {leaf.subject!r}, expires {leaf.not_after:%Y-%m-%d} "
            f"({leaf.days_left:.0f} days), {len(report.served)} certificate(s) served, "
            f"{'verified' if report.verified else 'NOT verified'}"
        )
    for finding in report.findings:
        lines.append(f"  {finding.severity.value:<4} {finding.code}: {finding.message}")
    if not report.findings:
        lines.append("  no findings")
    return "\n".join(lines)


def _exit_for(results: Any) -> int:
    verdicts = {str(t.verdict) for t in results.tests}
    return EXIT_OK if verdicts <= {"tolerant", "skipped"} else EXIT_FAILED


def main() -> None:
    try:
        code = cli.main(standalone_mode=False, prog_name="depdrill")
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except click.exceptions.Abort:
        click.echo("depdrill: interrupted", err=True)
        code = 130
    except DepdrillError as exc:
        click.echo(f"depdrill: error: {exc}", err=True)
        code = exc.exit_code
    except KeyboardInterrupt:
        click.echo("depdrill: interrupted", err=True)
        code = 130
    except Exception as exc:  # a bug: one line, the traceback on request
        if os.environ.get("DEPDRILL_DEBUG"):
            traceback.print_exc()
        click.echo(
            f"depdrill: internal error: {type(exc).__name__}: {exc} "
            "(set DEPDRILL_DEBUG=1 for the traceback)",
            err=True,
        )
        code = 4
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
