"""Exports: Chaos Mesh manifests and a Chaos Toolkit experiment, each checked by that
engine's own schema or validator, and a pytest module that runs the suite through depdrill."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from depdrill.discover.model import Graph
from depdrill.errors import InputError
from depdrill.generate import planner, suitefile
from depdrill.generate.chaos_mesh import export_chaos_mesh
from depdrill.generate.chaos_toolkit import export_chaos_toolkit
from depdrill.generate.model import CommandProbe, DnsProbe, Suite, TcpProbe
from depdrill.generate.planner import GenerateOptions
from depdrill.generate.pytest_export import export_pytest

# Chaos Mesh's own CRDs, vendored unchanged (see data/chaos-mesh/SOURCE).
VENDOR = Path(__file__).parent / "data" / "chaos-mesh"
SELECTOR = "shop/app.kubernetes.io/name=shop"


@pytest.fixture
def suite(graph: Graph, options: GenerateOptions) -> Suite:
    base = planner.run(graph, options)
    # One test a person skipped: no export may run it.
    tests = [
        t.model_copy(update={"skip": True, "note": "known: no fallback yet"})
        if t.id == "latency-1000ms:v6.lab.test"
        else t
        for t in base.tests
    ]
    return base.model_copy(update={"tests": tests})


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields refused (the API server would prune them
    silently, hiding a typo'd field)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            out.get("type") == "object"
            and "properties" in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _crd_validator(file: str) -> jsonschema.Draft7Validator:
    crd = yaml.safe_load((VENDOR / file).read_text())
    schema = _strict(copy.deepcopy(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]))
    # The API server fills metadata; the CRD leaves it as a bare object.
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


# ---------------------------------------------------------------- Chaos Mesh


def test_chaos_mesh_golden(suite: Suite, golden: Callable[[str, str], None]) -> None:
    golden("chaos_mesh.golden.yaml", export_chaos_mesh(suite, SELECTOR))


def test_chaos_mesh_manifests_pass_the_crd_schemas_and_webhook_rule(suite: Suite) -> None:
    # Given the manifests for the shop suite
    docs = [d for d in yaml.safe_load_all(export_chaos_mesh(suite, SELECTOR)) if d is not None]
    validators = {
        "NetworkChaos": _crd_validator("chaos-mesh.org_networkchaos.yaml"),
        "DNSChaos": _crd_validator("chaos-mesh.org_dnschaos.yaml"),
    }
    # Then each validates against Chaos Mesh's own CRD schema
    for doc in docs:
        errors = list(validators[doc["kind"]].iter_errors(doc))
        assert errors == [], f"{doc['metadata']['name']}: {errors[0].message}"
        # And the webhook's rule holds: external targets only with direction "to"
        if doc["spec"].get("externalTargets"):
            assert doc["spec"]["direction"] == "to"
        assert len(doc["metadata"]["name"]) <= 63
    # And there is one manifest per fault test that is not skipped, none for cert checks
    wanted = {t.id for t in suite.tests if t.fault is not None and not t.skip}
    assert {d["metadata"]["annotations"]["depdrill.io/test-id"] for d in docs} == wanted
    assert len({d["metadata"]["name"] for d in docs}) == len(docs)
    kinds = {d["metadata"]["annotations"]["depdrill.io/test-id"]: d for d in docs}
    assert kinds["dns:resolver"]["kind"] == "DNSChaos"
    assert kinds["blackhole:cache.lab.test"]["spec"]["action"] == "partition"
    assert kinds["blackhole:cache.lab.test"]["spec"]["externalTargets"] == [
        "cache.lab.test",
        "198.18.0.20",
    ]
    assert kinds["latency-100ms:cache.lab.test"]["spec"]["delay"]["latency"] == "100ms"


def test_the_schema_check_would_catch_a_bad_manifest(suite: Suite) -> None:
    # Given a manifest with a typo'd field and a bad direction
    doc = next(d for d in yaml.safe_load_all(export_chaos_mesh(suite, SELECTOR)) if d)
    doc["spec"]["direction"] = "sideways"
    doc["spec"]["externalTarget"] = ["x"]
    # Then the CRD validator refuses it (the check above can fail)
    assert len(list(_crd_validator("chaos-mesh.org_networkchaos.yaml").iter_errors(doc))) == 2


@pytest.mark.parametrize(
    "selector", ["shop", "shop/app", "Shop/app=x", "shop/=x", "shop/app=bad value", "/app=x"]
)
def test_a_bad_pod_selector_is_refused(suite: Suite, selector: str) -> None:
    with pytest.raises(InputError, match="pod selector"):
        export_chaos_mesh(suite, selector)


# ---------------------------------------------------------------- Chaos Toolkit


@pytest.fixture
def depdrill_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # chaostoolkit checks that a process provider's executable is on PATH.
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "depdrill").exists()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")


def test_chaos_toolkit_golden(suite: Suite, golden: Callable[[str, str], None]) -> None:
    golden("chaos_toolkit.golden.json", export_chaos_toolkit(suite))


def test_chaos_toolkit_experiment_passes_chaoslib_validation(
    suite: Suite, depdrill_on_path: None
) -> None:
    from chaoslib.experiment import ensure_experiment_is_valid

    # Given the experiment, with TCP and DNS probes besides the HTTP one
    probes = [
        *suite.service.probes,
        TcpProbe(host="198.18.0.100", port=8080),
        DnsProbe(server="198.18.0.2", name="api.payments.lab.test"),
    ]
    richer = suite.model_copy(
        update={"service": suite.service.model_copy(update={"probes": probes})}
    )
    experiment = json.loads(export_chaos_toolkit(richer, "suite.yaml"))
    # Then chaostoolkit's own validator accepts it
    ensure_experiment_is_valid(experiment)
    # And the method runs each test that is not skipped through depdrill, then cleans up
    names = [a["name"] for a in experiment["method"]]
    assert names == [t.id for t in suite.tests if not t.skip]
    assert experiment["rollbacks"][0]["provider"]["arguments"] == ["cleanup"]


def test_chaoslib_refuses_a_probe_whose_program_is_missing(
    suite: Suite, depdrill_on_path: None
) -> None:
    from chaoslib.exceptions import InvalidActivity
    from chaoslib.experiment import ensure_experiment_is_valid

    # Given a command probe whose program does not exist
    probes = [CommandProbe(argv=["/nonexistent/ddt-health", "--quick"])]
    odd = suite.model_copy(update={"service": suite.service.model_copy(update={"probes": probes})})
    # Then the validator refuses the experiment (the check above can fail)
    with pytest.raises(InvalidActivity, match="cannot be found"):
        ensure_experiment_is_valid(json.loads(export_chaos_toolkit(odd)))


# ---------------------------------------------------------------- pytest module

FAKE_DEPDRILL = """
import json, sys
from pathlib import Path
args = sys.argv[1:]
test_id = args[args.index("--only") + 1]
out = Path(args[args.index("-o") + 1])
verdicts = json.loads(Path(sys.argv[0]).with_name("verdicts.json").read_text())
Path(sys.argv[0]).with_name("calls.txt").open("a").write(test_id + "\\n")
if test_id in verdicts:
    out.write_text(json.dumps({"tests": [{"id": test_id, "verdict": verdicts[test_id],
                                          "rule": "from the fake"}]}))
    sys.exit(0 if verdicts[test_id] == "tolerant" else 1)
sys.stderr.write("depdrill: error: boom\\n")
sys.exit(2)
"""


def test_pytest_module_golden(suite: Suite, golden: Callable[[str, str], None]) -> None:
    golden("pytest_module.golden.txt", export_pytest(suite, "suite.yaml"))


def test_pytest_module_runs_each_test_and_judges_by_verdict(suite: Suite, tmp_path: Path) -> None:
    # Given the generated module next to its suite, and a stand-in for the `depdrill`
    # executable that answers with fixed verdicts (the module's contract is the CLI)
    (tmp_path / "suite.yaml").write_text(suitefile.dump_suite(suite))
    (tmp_path / "test_shop_suite.py").write_text(export_pytest(suite, "suite.yaml"))
    fake = tmp_path / "fake_depdrill.py"
    fake.write_text(FAKE_DEPDRILL)
    verdicts = {t.id: "tolerant" for t in suite.tests}
    verdicts["blackhole:api.payments.lab.test"] = "failed"
    verdicts["latency-1000ms:cache.lab.test"] = "degraded"
    verdicts["dns:resolver"] = "no-recovery"
    del verdicts["cert:api.payments.lab.test:443"]  # the run errors out: no results
    (tmp_path / "verdicts.json").write_text(json.dumps(verdicts))
    # When pytest runs the module
    env = {**os.environ, "DEPDRILL": f"{sys.executable} {fake}"}
    done = subprocess.run(
        [
            sys.executable,
            "-P",
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--junitxml",
            str(tmp_path / "junit.xml"),
            str(tmp_path / "test_shop_suite.py"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    # Then failed / no-recovery / error fail, tolerant and degraded pass, skipped skip
    outcomes = {}
    for case in ET.parse(tmp_path / "junit.xml").iter("testcase"):
        kids = {child.tag for child in case}
        outcomes[case.get("name")] = (
            "failed" if "failure" in kids else "skipped" if "skipped" in kids else "passed"
        )
    assert outcomes == {
        "test_blackhole_api_payments_lab_test": "failed",
        "test_blackhole_cache_lab_test": "passed",
        "test_blackhole_statsd_lab_test": "passed",
        "test_blackhole_v6_lab_test": "passed",
        "test_cert_api_payments_lab_test_443": "failed",
        "test_dns_resolver": "failed",
        "test_latency_100ms_api_payments_lab_test": "passed",
        "test_latency_100ms_cache_lab_test": "passed",
        "test_latency_100ms_v6_lab_test": "passed",
        "test_latency_1000ms_api_payments_lab_test": "passed",
        "test_latency_1000ms_cache_lab_test": "passed",
        "test_latency_1000ms_v6_lab_test": "skipped",
    }, done.stdout[-3000:]
    # And the skipped test never reached depdrill
    calls = (tmp_path / "calls.txt").read_text().split()
    assert "latency-1000ms:v6.lab.test" not in calls and len(calls) == 11


def test_pytest_module_is_safe_against_hostile_text(suite: Suite) -> None:
    # Given a service name and a note written to break out of strings and comments
    hostile = 'x"""\nimport os; os.system("id")\n#\\'
    odd = suite.model_copy(
        update={
            "service": suite.service.model_copy(update={"name": hostile}),
            "tests": [t.model_copy(update={"skip": True, "note": hostile}) for t in suite.tests],
        }
    )
    source = export_pytest(odd, 'suite".yaml')
    # Then the module still compiles, and the text only appears inside literals
    compile(source, "generated.py", "exec")
    assert "\nimport os; os.system" not in source


def test_pytest_module_is_lint_clean(suite: Suite, tmp_path: Path) -> None:
    # Given the generated module, as a team would commit it
    module = tmp_path / "test_shop_suite.py"
    module.write_text(export_pytest(suite, "suite.yaml"))
    ruff = Path(sys.executable).parent / "ruff"
    common = ["--isolated", "--line-length", "100"]
    # Then ruff finds nothing to format or flag
    for argv in (["format", "--check", *common], ["check", *common, "--select", "E,F,W,I,B,UP"]):
        done = subprocess.run(
            [str(ruff), *argv, str(module)], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr


def test_the_export_table_names_every_format(suite: Suite) -> None:
    from depdrill.generate.export import EXPORTERS, ExportRequest, export

    # Given each format in the table
    assert set(EXPORTERS) == {"chaos-mesh", "chaos-toolkit", "pytest"}
    request = ExportRequest(suite_path="ci/suite.yaml", selector=SELECTOR)
    # Then each gives what its own exporter gives
    assert export(suite, "chaos-mesh", request) == export_chaos_mesh(suite, SELECTOR)
    assert export(suite, "chaos-toolkit", request) == export_chaos_toolkit(suite, "ci/suite.yaml")
    assert export(suite, "pytest", request) == export_pytest(suite, "ci/suite.yaml")
    # And a missing selector or an unknown format is one clear line
    with pytest.raises(InputError, match="needs a pod selector"):
        export(suite, "chaos-mesh")
    with pytest.raises(InputError, match="unknown export format 'litmus'"):
        export(suite, "litmus")
