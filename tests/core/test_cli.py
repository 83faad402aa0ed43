"""Bad input at the command line: one clear line, the right exit code, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from depdrill.artifact import atomic_write, to_json
from depdrill.generate.model import HttpProbe, ServiceSpec, Suite
from depdrill.netns import Target


def depdrill(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-P", "-m", "depdrill.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(done: subprocess.CompletedProcess[str], code: int, words: str) -> None:
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert any(words in line for line in lines), done.stderr
    assert len([line for line in lines if "error" in line.lower()]) == 1, done.stderr


def test_a_missing_namespace_is_one_line_and_exit_2(tmp_path: Path) -> None:
    done = depdrill(
        "discover", "--netns", "ddt-no-such-ns", "--duration", "1", "-o", str(tmp_path / "g.json")
    )
    assert_one_line_error(done, 2, "no network namespace named ddt-no-such-ns")
    assert not (tmp_path / "g.json").exists()


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("{not json", "not valid JSON"),
        ('{"schema": "depdrill.graph/v9"}', "upgrade depdrill"),
        ('{"schema": "depdrill.suite/v1"}', "expected graph"),
    ],
)
def test_a_malformed_graph_is_one_line_and_exit_2(tmp_path: Path, content: str, words: str) -> None:
    graph = tmp_path / "graph.json"
    graph.write_text(content)
    done = depdrill(
        "generate", str(graph), "--probe", "http://198.18.0.20/", "-o", str(tmp_path / "s.yaml")
    )
    assert_one_line_error(done, 2, words)
    assert graph.read_text() == content  # loses nothing


def test_an_unreadable_suite_is_one_line_and_exit_2(tmp_path: Path) -> None:
    done = depdrill("run", str(tmp_path / "absent.yaml"))
    assert_one_line_error(done, 2, "no such file")
    (tmp_path / "bad.yaml").write_text("schema: depdrill.suite/v1\ntests: [\n")
    done = depdrill("run", str(tmp_path / "bad.yaml"))
    assert_one_line_error(done, 2, "bad.yaml")


def test_a_suite_whose_namespace_is_gone_is_refused_before_any_fault(tmp_path: Path) -> None:
    suite = Suite(
        service=ServiceSpec(
            name="gone",
            target=Target(netns="ddt-gone-ns"),
            probes=[HttpProbe(url="http://198.19.254.20:8080/health", timeout_s=1)],
        ),
        tests=[],
    )
    path = tmp_path / "suite.yaml"
    atomic_write(path, to_json(suite))  # JSON is YAML
    done = depdrill("run", str(path), "-o", str(tmp_path / "r.json"))
    assert_one_line_error(done, 2, "ddt-gone-ns")


def test_a_probe_that_never_answers_is_one_line(scratch_net) -> None:  # type: ignore[no-untyped-def]
    # Given a namespace where nothing listens on the probe's port
    ns = scratch_net.add("svc", 20)
    url = f"http://{scratch_net.address(20)}:8080/health"
    # When an audit is asked to use it
    done = depdrill("audit", "--netns", ns, "--probe", url, "-o", "/tmp/ddt-never", timeout=120)
    # Then it says the probe never answered, without a traceback
    assert_one_line_error(done, 2, "never answered healthy")


def test_usage_errors_exit_2() -> None:
    done = depdrill("discover")
    assert done.returncode == 2
    assert "give one of --netns, --pid, --pcap or -- COMMAND" in done.stderr
    assert depdrill("audit", "--probe", "http://198.18.0.20/").returncode == 2


def test_help_everywhere() -> None:
    for command in [
        "lab",
        "discover",
        "certs",
        "generate",
        "run",
        "report",
        "audit",
        "doctor",
        "cleanup",
        "diff",
        "schema",
        "graph",
        "daemon",
        "history",
    ]:
        done = depdrill(command, "--help")
        assert done.returncode == 0 and "Usage:" in done.stdout, command


def test_discover_a_command_from_its_first_packet(tmp_path: Path) -> None:
    # Given a command that looks a name up as soon as it starts
    out = tmp_path / "graph.json"
    before = set(_namespaces())
    # When depdrill starts it in a fresh namespace and captures
    done = depdrill(
        "discover", "--duration", "5", "-o", str(out), "--", "getent", "hosts", "first.example.test"
    )
    # Then the very first lookup is in the graph, and the namespace is gone again
    assert done.returncode == 0, done.stderr
    graph = json.loads(out.read_text())
    names = {n.get("name") for n in graph["nodes"] if n["kind"] == "name"}
    assert "first.example.test" in names
    assert set(_namespaces()) - before == set()


def _namespaces() -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in listing.splitlines() if line.strip()]
