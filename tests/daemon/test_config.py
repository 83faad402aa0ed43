"""The daemon config: a valid file loads; each mistake is one line naming file, key and reason."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from depdrill.daemon.config import load_config
from depdrill.errors import InputError, TargetError

VALID = """
[daemon]
history = "{tmp}/history.sqlite"
metrics_listen = "127.0.0.1:9464"

[[services]]
name = "checkout"
probes = ["http://198.19.0.20:8080/health"]
output_dir = "{tmp}/checkout"
retention = 5
latency = "100ms"
[services.target]
netns = "checkout-ns"
[services.slo]
p95_ms = 500
[services.tests]
include = ["payments*"]
[services.schedule]
cron = "0 2 * * *"
timezone = "Europe/Berlin"
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "depdrill.toml"
    path.write_text(text.replace("{tmp}", str(tmp_path)))
    return path


def test_a_valid_config_loads_with_its_schedule(tmp_path: Path) -> None:
    # Given a config with one service
    config = load_config(_write(tmp_path, VALID))
    # Then its fields are typed and the schedule is usable
    service = config.service("checkout")
    assert service.slo.p95_ms == 500
    assert service.tests.include == ["payments*"]
    assert service.target.describe() == "netns checkout-ns"
    after = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
    assert service.schedule.next_after(after) == datetime(2026, 6, 2, 0, 0, tzinfo=UTC)
    assert config.daemon.metrics_address == ("127.0.0.1", 9464)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("retention = 5", "retention = 0", "services.0.retention: Input should be greater"),
        ('cron = "0 2 * * *"', 'cron = "0 25 * * *"', "services.0.schedule.cron: cron '0 25"),
        ('"Europe/Berlin"', '"Mars/Olympus"', "schedule.timezone: unknown timezone 'Mars/Olympus'"),
        ('netns = "checkout-ns"', 'netns = "a"\npid = 4', "services.0.target: give exactly one"),
        ('netns = "checkout-ns"', 'netns = "../etc"', "services.0.target: not a namespace name"),
        ("retention = 5", 'retention = 5\ncolour = "red"', "services.0.colour: unknown key"),
        ('latency = "100ms"', 'latency = "fast"', "services.0.latency: latency step 'fast'"),
        ('"127.0.0.1:9464"', '"localhost"', "daemon.metrics_listen: 'localhost': write it as"),
        ('probes = ["http://198.19.0.20:8080/health"]', "probes = []", "services.0.probes: List"),
        ('name = "checkout"\n', "", "services.0.name: missing (required)"),
    ],
)
def test_each_mistake_names_file_key_and_reason(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    # Given a config with one mistake
    assert old in VALID
    path = _write(tmp_path, VALID.replace(old, new, 1))
    # When it is loaded
    with pytest.raises(InputError) as caught:
        load_config(path)
    # Then the error is one line: the file, the key path, the reason
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: ")
    assert message in text


def test_broken_toml_and_duplicate_names(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not valid TOML"):
        load_config(_write(tmp_path, VALID + "\n[[services]\n"))
    twice = VALID + VALID[VALID.index("[[services]]") :]
    with pytest.raises(InputError, match="service names must be unique: checkout"):
        load_config(_write(tmp_path, twice))


def test_targets_are_found_again_by_their_selector(tmp_path: Path) -> None:
    # Given a pid file selector pointing at this process, then at nothing
    pid_file = tmp_path / "svc.pid"
    text = VALID.replace('netns = "checkout-ns"', f'pid_file = "{pid_file}"')
    service = load_config(_write(tmp_path, text)).service("checkout")
    pid_file.write_text("\n")
    with pytest.raises(TargetError, match="no running process"):
        service.target.resolve()
    # When the file names a live process, the target is that process's namespace
    pid_file.write_text(f"{os.getpid()}\n")
    assert service.target.resolve().pid == os.getpid()


def test_check_exits_0_when_valid_and_2_with_one_line_when_not(tmp_path: Path) -> None:
    def check(path: Path) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-P", "-m", "depdrill.daemon", "daemon", "--config", str(path)]
        return subprocess.run([*argv, "--check"], capture_output=True, text=True, timeout=60)

    good = check(_write(tmp_path, VALID))
    assert good.returncode == 0, good.stderr
    assert "valid (1 services: checkout)" in good.stdout
    bad = check(_write(tmp_path, VALID.replace("retention = 5", "retention = -1")))
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0
    assert "services.0.retention" in bad.stderr
