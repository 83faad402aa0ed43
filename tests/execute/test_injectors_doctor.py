"""`depdrill doctor`: every answer comes from a real try, and the tries leave nothing."""

from __future__ import annotations

import subprocess

from depdrill.execute.doctor import doctor
from depdrill.execute.injectors.registry import availability


def _namespaces() -> set[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in listing.splitlines() if line.strip()}


def test_doctor_reports_this_machine_and_cleans_up() -> None:
    # Given this machine (root, nftables with nft_compat; no sch_netem)
    before = _namespaces()
    # When the doctor runs
    checks = {c.name: c for c in doctor()}
    # Then every capability the injectors need is there, each with what was tried
    required = [c for c in checks.values() if not c.optional]
    assert [c.name for c in required if not c.ok] == []
    assert "vanished" in checks["owner-flagged nft tables"].detail
    assert "bypass" in checks["NFQUEUE queue rule (nft_compat)"].detail
    # And discovery's default tap and its first fallback work here, tried for real
    ebpf = checks["eBPF capture (discovery's default tap)"]
    assert ebpf.ok and ebpf.optional and "ddprobe" in ebpf.detail and "detached" in ebpf.detail
    nflog = checks["NFLOG capture (discovery's tap without eBPF)"]
    assert nflog.ok and nflog.optional and "nfnetlink_log" in nflog.detail
    # And sch_netem's answer agrees with the registry's and says why when missing
    netem = checks["sch_netem (tc netem latency)"]
    assert netem.optional
    said = availability()["netem-latency"]
    assert netem.ok == (said == "available")
    if not netem.ok:
        assert "NFQUEUE" in netem.detail and "throwaway namespace" in netem.detail
    # And no throwaway namespace is left
    assert {n for n in _namespaces() - before if n.startswith("depdrill-")} == set()
