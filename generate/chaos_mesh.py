"""Export a suite as Chaos Mesh manifests: NetworkChaos (partition, delay) and DNSChaos."""

from __future__ import annotations

import hashlib
import re
import textwrap
from typing import Any

import yaml

from depdrill.errors import InputError
from depdrill.generate.model import (
    BlackholeFault,
    DnsBlackholeFault,
    LatencyFault,
    Suite,
    SuiteTest,
)

API_VERSION = "chaos-mesh.org/v1alpha1"
# Kubernetes: a namespace is a DNS-1123 label; a label key an optional DNS prefix and a
# name; a label value up to 63 characters of the same alphabet (or empty).
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_LABEL_KEY = re.compile(rf"^([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_LABEL_NAME}$")
_LABEL_VALUE = re.compile(rf"^({_LABEL_NAME})?$")
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\.)*[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
)


class PodSelector:
    """`namespace/labelkey=value`: the pods of the service in a cluster."""

    def __init__(self, text: str) -> None:
        namespace, slash, label = text.partition("/")
        key, equals, value = label.partition("=")
        if not slash or not equals:
            raise InputError(f"pod selector {text!r}: write it as NAMESPACE/LABELKEY=VALUE")
        if not _NAMESPACE.match(namespace):
            raise InputError(f"pod selector {text!r}: {namespace!r} is not a namespace name")
        if not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value):
            raise InputError(f"pod selector {text!r}: {label!r} is not a label key=value")
        self.namespace, self.key, self.value = namespace, key, value

    def as_selector(self) -> dict[str, Any]:
        return {"namespaces": [self.namespace], "labelSelectors": {self.key: self.value}}


def export_chaos_mesh(suite: Suite, selector: str) -> str:
    """Multi-document YAML: one manifest per fault test that is not skipped.

    Certificate checks have no Chaos Mesh counterpart and are listed as left out.
    """
    pods = PodSelector(selector)
    documents: list[str] = []
    left_out: list[str] = []
    for test in suite.tests:
        if test.skip or test.removed:
            left_out.append(f"{test.id} (skipped in the suite)")
            continue
        manifest = _manifest(test, suite, pods)
        if manifest is None:
            left_out.append(f"{test.id} (a certificate check: nothing to inject)")
            continue
        comment, body = manifest
        documents.append(
            "---\n"
            + "".join(
                f"# {piece}\n"
                for line in comment
                for piece in textwrap.wrap(line, 96, subsequent_indent="  ")
            )
            + yaml.safe_dump(body, sort_keys=False, default_flow_style=False)
        )
    header = [
        f"# Chaos Mesh manifests for the service {_safe(suite.service.name)}, from its depdrill "
        "suite.",
        f"# Pods: namespace {pods.namespace}, label {pods.key}={pods.value}. Apply with kubectl.",
        "# Chaos Mesh cannot match ports on external targets: each fault covers whole addresses.",
        "# DNSChaos needs Chaos Mesh's DNS server (installed with --set dnsServer.create=true).",
        *(f"# Left out: {_safe(item)}" for item in left_out),
    ]
    return "\n".join(header) + "\n" + "".join(documents)


def _manifest(
    test: SuiteTest, suite: Suite, pods: PodSelector
) -> tuple[list[str], dict[str, Any]] | None:
    fault = test.fault
    duration = _duration(suite.defaults.timing.observe_s)
    spec: dict[str, Any]
    if isinstance(fault, BlackholeFault):
        kind = "NetworkChaos"
        spec = {
            "action": "partition",
            "mode": "all",
            "selector": pods.as_selector(),
            "direction": "to",
            "externalTargets": _targets(test, fault.addresses),
            "duration": duration,
        }
        what = f"drop traffic from the pods to {test.dependency} for {duration}"
    elif isinstance(fault, LatencyFault):
        kind = "NetworkChaos"
        delay = {"latency": f"{fault.delay_ms}ms", "jitter": f"{fault.jitter_ms}ms"}
        spec = {
            "action": "delay",
            "mode": "all",
            "selector": pods.as_selector(),
            "direction": "to",
            "externalTargets": _targets(test, fault.addresses),
            "delay": {**delay, "correlation": "0"},
            "duration": duration,
        }
        # Chaos Mesh delays what the pod sends ("to" is the only direction it allows with
        # external targets); depdrill delays replies. Both add the delay to each round trip.
        what = f"delay packets to {test.dependency} by {fault.delay_ms} ms for {duration}"
    elif isinstance(fault, DnsBlackholeFault):
        kind = "DNSChaos"
        spec = {
            "action": "error",
            "mode": "all",
            "selector": pods.as_selector(),
            "duration": duration,
        }
        what = f"every DNS lookup of the pods fails for {duration}"
    else:
        return None
    body = {
        "apiVersion": API_VERSION,
        "kind": kind,
        "metadata": {
            "name": _object_name(test.id),
            "namespace": pods.namespace,
            "labels": {"app.kubernetes.io/managed-by": "depdrill"},
            "annotations": {"depdrill.io/test-id": test.id},
        },
        "spec": spec,
    }
    comment = [f"{test.id}: {what}."]
    if test.why:
        comment.append(f"why: {test.why}")
    return [_safe(line) for line in comment], body


def _targets(test: SuiteTest, addresses: list[str]) -> list[str]:
    # The name first, so Chaos Mesh follows it if it moves; the addresses seen as well.
    name = test.dependency
    named = [name] if name is not None and _HOSTNAME.match(name) else []
    return [*named, *addresses]


def _duration(seconds: float) -> str:
    return f"{int(seconds)}s" if seconds == int(seconds) else f"{round(seconds * 1000)}ms"


def _object_name(test_id: str) -> str:
    """A Kubernetes object name (DNS-1123 label) for a test id, unique per id."""
    slug = re.sub(r"[^a-z0-9]+", "-", test_id.lower()).strip("-")
    digest = hashlib.sha256(test_id.encode()).hexdigest()[:8]
    return f"depdrill-{slug[:44].rstrip('-')}-{digest}"


def _safe(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
