"""The systemd unit and the DaemonSet grant exactly the three capabilities depdrill needs."""

from __future__ import annotations

import configparser
import tomllib
from pathlib import Path
from typing import Any

import yaml

from depdrill.daemon.config import load_config, parse_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
NEEDED = {"NET_ADMIN", "NET_RAW", "SYS_ADMIN"}


def _unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    unit.read_string((DEPLOY / "depdrill.service").read_text())
    return unit


def test_systemd_unit_has_only_the_needed_capabilities_and_reloads_with_hup() -> None:
    # Given the unit file
    service = _unit()["Service"]
    # Then the bounding and ambient sets are exactly the three capabilities
    for key in ("CapabilityBoundingSet", "AmbientCapabilities"):
        assert {c.removeprefix("CAP_") for c in service[key].split()} == NEEDED
    # And it cannot gain more, reloads with SIGHUP, stops with SIGTERM, validates first
    assert service["NoNewPrivileges"] == "yes"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["KillSignal"] == "SIGTERM"
    assert service["ExecStartPre"].endswith("--check")
    assert service["ExecStart"].split()[1:3] == ["daemon", "--config"]
    assert "AF_PACKET" in service["RestrictAddressFamilies"]  # the capture's socket


def _documents() -> dict[str, dict[str, Any]]:
    docs = list(yaml.safe_load_all((DEPLOY / "daemonset.yaml").read_text()))
    return {doc["kind"]: doc for doc in docs}


def test_daemonset_uses_host_pids_the_same_capabilities_and_a_valid_config() -> None:
    # Given the manifest
    docs = _documents()
    pod = docs["DaemonSet"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # Then it sees the node's processes and network, with only the three capabilities
    assert pod["hostPID"] is True and pod["hostNetwork"] is True
    capabilities = container["securityContext"]["capabilities"]
    assert capabilities["drop"] == ["ALL"]
    assert set(capabilities["add"]) == NEEDED
    assert container["securityContext"]["privileged"] is False
    # And the config it mounts from the ConfigMap passes the daemon's own validation
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    config_path = Path(container["args"][container["args"].index("--config") + 1])
    assert config_path.parent == Path(mounts["config"])
    text = docs["ConfigMap"]["data"][config_path.name]
    config = parse_config(tomllib.loads(text), "configmap")
    assert config.daemon.metrics_address == ("0.0.0.0", container["ports"][0]["containerPort"])
    assert pod["terminationGracePeriodSeconds"] > 10  # the daemon's own stop takes up to 10 s


def test_the_example_config_is_valid_and_is_where_the_unit_reads_it() -> None:
    config = load_config(DEPLOY / "depdrill.toml")
    assert config.service("checkout").target.systemd_unit == "checkout.service"
    assert "/etc/depdrill/depdrill.toml" in _unit()["Service"]["ExecStart"]
