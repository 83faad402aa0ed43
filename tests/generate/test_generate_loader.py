"""The strict loader: a suite from a repository is untrusted input that root will run.

Each refusal is one line, `FILE:LINE: reason`, at the line a person would fix.
"""

from __future__ import annotations

import copy
import random
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from depdrill.discover.model import Graph
from depdrill.errors import InputError
from depdrill.generate import planner, suitefile
from depdrill.generate.model import CommandProbe, Suite
from depdrill.generate.planner import GenerateOptions


@pytest.fixture
def text(graph: Graph, options: GenerateOptions) -> str:
    return suitefile.dump_suite(planner.run(graph, options))


def _line_of(text: str, needle: str, nth: int = 1) -> int:
    """1-based line of the nth line that starts (after indentation) with needle."""
    hits = [i + 1 for i, line in enumerate(text.splitlines()) if line.strip().startswith(needle)]
    return hits[nth - 1]


def _refused(tmp_path: Path, text: str, **kwargs: Any) -> str:
    path = tmp_path / "suite.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError) as caught:
        suitefile.load_suite(path, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:"), message
    return message


def test_unknown_key_in_a_test(tmp_path: Path, text: str) -> None:
    # Given a typo'd key inside the third test
    lines = text.splitlines(keepends=True)
    line = _line_of(text, "- id: ", 3) + 1
    bad = "".join([*lines[: line - 1], "  skpi: true\n", *lines[line - 1 :]])
    # Then the loader names the file, the line of the key, the test and the key
    message = _refused(tmp_path, bad)
    assert re.search(rf":{line}: tests\[2\]: unknown key 'skpi'$", message), message


def test_unknown_key_at_top_level(tmp_path: Path, text: str) -> None:
    bad = text.replace("inputs: {}\n", "inputs: {}\nowner: team-a\n")
    message = _refused(tmp_path, bad)
    assert message.endswith(f":{_line_of(bad, 'owner:')}: unknown key 'owner'"), message


def test_wrong_type_quoted_port(tmp_path: Path, text: str) -> None:
    # Given a port written as a string (strict: "443" is not a number)
    bad = text.replace("    port: 443\n", "    port: '443'\n")
    message = _refused(tmp_path, bad)
    assert re.search(rf":{_line_of(bad, 'port:')}: tests\[4\]\.check\.port: ", message), message


def test_wrong_type_delay(tmp_path: Path, text: str) -> None:
    bad = text.replace("    delay_ms: 100\n", "    delay_ms: fast\n", 1)
    message = _refused(tmp_path, bad)
    assert re.search(rf":{_line_of(bad, 'delay_ms: fast')}: tests\[6\]\.fault\.delay_ms: ", message)


def test_bad_address(tmp_path: Path, text: str) -> None:
    # Given a blackhole address that is not an IP address
    bad = text.replace("    - 198.18.0.20\n", "    - 198.18.0.999\n", 1)
    message = _refused(tmp_path, bad)
    line = _line_of(bad, "- 198.18.0.999")
    assert message.endswith(
        f":{line}: tests[1].fault.addresses[0]: not an IP address: '198.18.0.999'"
    ), message


def test_duplicate_test_id(tmp_path: Path, text: str) -> None:
    # Given the second test renamed to the first one's id
    bad = text.replace("- id: blackhole:cache.lab.test", "- id: blackhole:api.payments.lab.test")
    message = _refused(tmp_path, bad)
    first = _line_of(bad, "- id: blackhole:api.payments.lab.test")
    second = _line_of(bad, "- id: blackhole:api.payments.lab.test", 2)
    assert message.endswith(
        f":{second}: duplicate test id 'blackhole:api.payments.lab.test' (first on line {first})"
    ), message


def test_duplicate_key(tmp_path: Path, text: str) -> None:
    # Given two `skip` keys in one test (yaml.safe_load would keep the last silently)
    bad = text.replace("  skip: false\n", "  skip: false\n  skip: true\n", 1)
    message = _refused(tmp_path, bad)
    assert re.search(
        rf":{_line_of(bad, 'skip: true')}: duplicate key 'skip' \(first on line", message
    )


def test_command_probe_needs_allow_commands(tmp_path: Path, text: str) -> None:
    # Given a suite whose probe runs a command
    raw = yaml.safe_load(text)
    raw["service"]["probes"].append({"kind": "command", "argv": ["/bin/true"]})
    bad = yaml.safe_dump(raw, sort_keys=False)
    # Then it is refused without --allow-commands, at the probe's line
    message = _refused(tmp_path, bad)
    assert re.search(
        rf":{_line_of(bad, '- kind: command')}: service\.probes\[1\]: a command probe runs a "
        "program as root; refused without --allow-commands$",
        message,
    ), message
    # And loads with it
    path = tmp_path / "suite.yaml"
    suite = suitefile.load_suite(path, allow_commands=True)
    assert isinstance(suite.service.probes[1], CommandProbe)


def test_newer_schema_is_refused_before_anything_else(tmp_path: Path, text: str) -> None:
    # Given a suite from a newer depdrill, with a key this one does not know
    bad = text.replace("schema: depdrill.suite/v1", "schema: depdrill.suite/v2").replace(
        "inputs: {}\n", "inputs: {}\nfuture: 1\n"
    )
    message = _refused(tmp_path, bad)
    # Then it says to upgrade, at the schema line
    assert f":{_line_of(bad, 'schema:')}: written by a newer depdrill" in message
    assert message.endswith("upgrade depdrill")


def test_another_kind_of_file(tmp_path: Path, text: str) -> None:
    message = _refused(tmp_path, text.replace("depdrill.suite/v1", "depdrill.graph/v1"))
    assert "is a depdrill graph file, expected suite" in message


def test_not_yaml(tmp_path: Path, text: str) -> None:
    bad = text + "tests: [\n  - oops: {\n"
    message = _refused(tmp_path, bad)
    assert re.search(r":\d+: not valid YAML: ", message), message


@pytest.mark.parametrize("content", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    message = _refused(tmp_path, content)
    assert message.endswith(":1: empty file; expected a depdrill suite"), message


def test_top_level_list(tmp_path: Path) -> None:
    assert _refused(tmp_path, "- a\n- b\n").endswith(
        ":1: not a depdrill suite (top level is not a mapping)"
    )


def test_anchors_and_aliases_are_refused(tmp_path: Path) -> None:
    # Given a billion-laughs style document
    bomb = "a: &a [x, x]\nb: &b [*a, *a]\nc: [*b, *b]\n"
    assert "anchors and aliases are not allowed" in _refused(tmp_path, bomb)


def test_non_string_key(tmp_path: Path, text: str) -> None:
    bad = text.replace("inputs: {}\n", "inputs: {}\n? [1, 2]\n: x\n")
    assert "a key must be a plain string" in _refused(tmp_path, bad)


def test_a_test_with_both_fault_and_check(tmp_path: Path, text: str) -> None:
    raw = yaml.safe_load(text)
    raw["tests"][0]["check"] = copy.deepcopy(raw["tests"][4]["check"])
    bad = yaml.safe_dump(raw, sort_keys=False)
    message = _refused(tmp_path, bad)
    assert "tests[0]: a test has exactly one of 'fault' or 'check'" in message


def test_deep_nesting(tmp_path: Path) -> None:
    assert "not valid YAML" in _refused(tmp_path, "a: " + "[" * 5000 + "]" * 5000 + "\n")


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        suitefile.load_suite(tmp_path / "nope.yaml")
    with pytest.raises(InputError, match="is a directory"):
        suitefile.load_suite(tmp_path)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(InputError, match="not UTF-8"):
        suitefile.load_suite(binary)


# ---------------------------------------------------------------- fuzzing

_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1,
    65536,
    10**30,
    0.5,
    -0.0,
    1e308,
    float("nan"),
    float("inf"),
    "",
    " ",
    "x",
    "\n",
    "198.18.0.1",
    "::1",
    "999.1.1.1",
    "a" * 400,
    "blackhole",
    "latency",
    "dns-blackhole",
    "cert",
    "command",
    "http://x",
    [],
    [None],
    [1, "a"],
    {},
    {"kind": "command"},
    {"kind": "blackhole", "addresses": []},
    ["tcp", "sctp"],
    "2026-11-27T03:00:00Z",
]


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out.extend(_paths(value, (*prefix, key)))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            out.extend(_paths(value, (*prefix, index)))
    return out


def _mutate_structure(raw: Any, rng: random.Random) -> Any:
    doc = copy.deepcopy(raw)
    for _ in range(rng.randint(1, 3)):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            return doc
        path = rng.choice(paths)
        parent = doc
        for part in path[:-1]:
            parent = parent[part]
        last = path[-1]
        action = rng.randrange(4)
        if action == 0:
            parent[last] = copy.deepcopy(rng.choice(_VALUES))
        elif action == 1:
            del parent[last]
        elif action == 2 and isinstance(parent, dict):
            parent[rng.choice(["kind", "id", "port", "x", "schema", "argv"])] = parent.pop(last)
        elif isinstance(parent, list):
            parent.append(copy.deepcopy(parent[last]))
    return doc


def _mutate_text(text: str, rng: random.Random) -> str:
    lines = text.splitlines(keepends=True)
    for _ in range(rng.randint(1, 4)):
        if not lines:
            break
        i = rng.randrange(len(lines))
        action = rng.randrange(6)
        if action == 0:
            del lines[i]
        elif action == 1:
            lines.insert(i, lines[rng.randrange(len(lines))])
        elif action == 2:
            line = lines[i]
            j = rng.randrange(len(line) + 1)
            lines[i] = (
                line[:j]
                + rng.choice(
                    [
                        "'",
                        '"',
                        ":",
                        "-",
                        "{",
                        "[",
                        "&a ",
                        "*a",
                        "\t",
                        "!!python/object:os.system ",
                        "\x00",
                        " ",
                        "\ud800",
                        "\u2028",
                        "\x85",
                        "\ufeff",
                    ]
                )
                + line[j:]
            )
        elif action == 3:
            lines = lines[:i]
        elif action == 4:
            lines[i] = " " * rng.randrange(8) + lines[i].lstrip()
        else:
            line = lines[i]
            j = rng.randrange(len(line) + 1)
            lines[i] = line[:j] + line[j + 1 :]
    return "".join(lines)


def test_a_thousand_mutated_suites_never_crash_the_loader(text: str) -> None:
    # Given 1200 mutations of a good suite, half on its structure and half on its text
    rng = random.Random(20261127)
    raw = yaml.safe_load(text)
    corpus = [yaml.safe_dump(_mutate_structure(raw, rng), sort_keys=False) for _ in range(600)]
    corpus += [_mutate_text(text, rng) for _ in range(600)]
    # When each is loaded
    outcomes = {"loaded": 0, "refused": 0}
    for index, mutant in enumerate(corpus):
        try:
            suite = suitefile.parse_suite(mutant, f"mutant{index}.yaml")
        except InputError as exc:
            # Then a refusal is one line that says where
            message = str(exc)
            assert "\n" not in message and message.startswith(f"mutant{index}.yaml"), message
            outcomes["refused"] += 1
        else:
            # Or the suite is a fully valid model with no command probe in it
            assert isinstance(suite, Suite)
            assert not any(isinstance(p, CommandProbe) for p in suite.service.probes)
            outcomes["loaded"] += 1
    # And both outcomes happen (the corpus is neither all-valid nor all-garbage)
    assert outcomes["loaded"] > 50 and outcomes["refused"] > 500, outcomes


def test_an_id_that_hides_what_the_test_does(tmp_path: Path, text: str) -> None:
    # Given a test whose id says "cache" while its fault drops the payments API
    raw = yaml.safe_load(text)
    raw["tests"][0]["id"] = "blackhole:cache-old.lab.test"
    bad = yaml.safe_dump(raw, sort_keys=False)
    # Then the loader refuses it at the id's line
    message = _refused(tmp_path, bad)
    assert re.search(
        rf":{_line_of(bad, '- id: blackhole:cache-old')}: tests\[0\]\.id: 'blackhole:cache-old"
        r"\.lab\.test' does not say what the test does; its blackhole on "
        r"'api\.payments\.lab\.test' is 'blackhole:api\.payments\.lab\.test'$",
        message,
    ), message


def test_refusals_stay_on_one_line_whatever_the_file_says(tmp_path: Path, text: str) -> None:
    # Given keys, kinds and schemas carrying newlines
    raw = yaml.safe_load(text)
    raw["tests"][0]["fault"]["kind"] = "\n"
    kind = yaml.safe_dump(raw, sort_keys=False)
    key = text.replace("inputs: {}\n", 'inputs: {}\n"evil\\nkey": 1\n')
    schema = text.replace("schema: depdrill.suite/v1", 'schema: "depdrill.su\\nite/v1"')
    # Then each refusal is a single line (checked by _refused)
    assert "does not match any of the expected tags" in _refused(tmp_path, kind)
    assert "unknown key 'evil\\nkey'" in _refused(tmp_path, key)
    assert "su\\nite" in _refused(tmp_path, schema)
