"""suite.yaml: write it readable and stable, read it back strictly (it is untrusted input)."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable, Collection, Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from depdrill.artifact import read_text
from depdrill.errors import InputError
from depdrill.generate.model import (
    BlackholeFault,
    CommandProbe,
    DnsBlackholeFault,
    LatencyFault,
    Suite,
    SuiteTest,
)

# A suite is a page of text a person reviews; anything this large is not one.
MAX_SUITE_BYTES = 4 << 20
_STR_TAG = "tag:yaml.org,2002:str"

HEADER = """\
# depdrill suite: fault tests for the service {service}, generated from its dependency graph.
# Review it like code. Edit freely: a test's `skip`, `note` and `slo` (thresholds for that
# test only), the service's probes and SLO, and the timings; `depdrill generate --from` keeps
# those edits when it regenerates. Run it with: depdrill run suite.yaml
"""


def dump_suite(suite: Suite) -> str:
    """The suite as commented YAML; the same suite always gives the same bytes."""
    raw = suite.dump()
    parts = [HEADER.format(service=_comment_text(suite.service.name))]
    if suite.notes:
        parts.append("# Left out of this suite:\n")
        for note in suite.notes:
            parts.extend(
                f"#   {piece}\n"
                for piece in textwrap.wrap(
                    _comment_text(note), 94, initial_indent="- ", subsequent_indent="  "
                )
            )
    parts.append("\n")
    parts.append(_yaml({k: raw[k] for k in ("schema", "producer", "created", "inputs")}))
    if suite.notes:
        parts.append(_yaml({"notes": raw["notes"]}))
    parts.append("\n# The service under test and what healthy means.\n")
    parts.append(_yaml({"service": raw["service"]}))
    parts.append(
        "\n# How long each phase of a test lasts; `selection` is how the tests were chosen\n"
        "# (`depdrill generate --from` chooses the same way unless told otherwise).\n"
    )
    parts.append(_yaml({"defaults": raw["defaults"]}))
    if not suite.tests:
        parts.append("\ntests: []\n")
        return "".join(parts)
    parts.append("\ntests:\n")
    for test, data in zip(suite.tests, raw["tests"], strict=True):
        if not test.removed:
            data.pop("removed", None)
        parts.append("\n")
        parts.extend(f"# {line}\n" for line in comment_lines(test))
        parts.append(_yaml([data]))
    return "".join(parts)


def describe_test(test: SuiteTest) -> list[str]:
    """What a test does and why it exists, in plain words (one comment line each)."""
    lines = []
    fault, check = test.fault, test.check
    if isinstance(fault, BlackholeFault):
        lines.append(
            f"{test.id}: drop every packet to and from {test.dependency} "
            f"({_addresses(fault.addresses)}{_ports(fault.ports, fault.protocols)}), silently, "
            "as a dead host would."
        )
    elif isinstance(fault, LatencyFault):
        jitter = f" (+/- {fault.jitter_ms} ms)" if fault.jitter_ms else ""
        lines.append(
            f"{test.id}: hold every packet {'from' if fault.direction == 'receive' else 'to'} "
            f"{test.dependency} for {fault.delay_ms} ms{jitter} "
            f"({_addresses(fault.addresses)}{_ports(fault.ports, fault.protocols)})."
        )
    elif isinstance(fault, DnsBlackholeFault):
        lines.append(
            f"{test.id}: silence the resolvers {', '.join(fault.resolvers)} "
            "(port 53, UDP and TCP): no name resolves."
        )
    elif check is not None:
        lines.append(
            f"{test.id}: check the TLS chain {check.address} serves on port {check.port} "
            f"for SNI {check.sni}."
        )
    if test.why:
        lines.append(f"why: {test.why}")
    if test.removed:
        lines.append("REMOVED: not in the latest graph; kept because a person edited it. Not run.")
    return lines


def comment_lines(test: SuiteTest, width: int = 96) -> list[str]:
    """describe_test as printable lines of at most `width` characters, ready for `# `."""
    return [
        piece
        for line in describe_test(test)
        for piece in textwrap.wrap(_comment_text(line), width, subsequent_indent="  ")
    ]


def _addresses(addresses: list[str]) -> str:
    shown = ", ".join(addresses[:4])
    return shown + (f" and {len(addresses) - 4} more" if len(addresses) > 4 else "")


def _ports(ports: Sequence[int], protocols: Sequence[str]) -> str:
    where = ", ".join(str(p) for p in ports) if ports else "all ports"
    return f"; {'port' if len(ports) == 1 else 'ports'} {where}/{'+'.join(protocols)}"


def _comment_text(text: str) -> str:
    # Names and notes are attacker- or person-chosen: a newline would end the comment and
    # smuggle YAML into the file.
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )


class _SuiteDumper(yaml.SafeDumper):
    """Text with characters a YAML reader folds or drops (NEL, line separators, controls)
    is written double-quoted, where they are escaped and read back exactly."""


def _represent_text(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    style = None if text.isprintable() else '"'
    return dumper.represent_scalar(_STR_TAG, text, style=style)


_SuiteDumper.add_representer(str, _represent_text)


def _yaml(data: object) -> str:
    return yaml.dump(
        data,
        Dumper=_SuiteDumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
        width=100,
    )


def suite_json_schema() -> dict[str, Any]:
    """The JSON Schema of suite.yaml (`depdrill schema suite`), for editors and CI."""
    schema = Suite.model_json_schema(by_alias=True, mode="validation")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://depdrill.invalid/schema/{Suite.schema_id()}.json",
        **schema,
    }


# ---------------------------------------------------------------- loading


def load_suite(path: Path, *, allow_commands: bool = False) -> Suite:
    """Read a suite strictly: any problem is one InputError line `FILE:LINE: reason`."""
    text = read_text(path)
    return parse_suite(text, str(path), allow_commands=allow_commands)


def parse_suite(text: str, source: str, *, allow_commands: bool = False) -> Suite:
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        # Only text that did not come from a file can hold lone surrogates.
        raise InputError(f"{source}: not UTF-8 text (at character {exc.start})") from None
    if size > MAX_SUITE_BYTES:
        raise InputError(f"{source}: larger than {MAX_SUITE_BYTES >> 20} MiB; not a suite")
    if not text.strip():
        raise InputError(f"{source}:1: empty file; expected a depdrill suite")
    root, data = _parse_yaml(text, source)
    if not isinstance(data, dict):
        raise InputError(
            f"{source}:{_line(root)}: not a depdrill suite (top level is not a mapping)"
        )
    schema = data.get("schema")
    if schema != Suite.schema_id():
        # Not the current version: the envelope check refuses it (unknown, newer, another
        # kind) or upgrades it through the model's converters.
        where = _locate(root, ("schema",))
        try:
            suite = Suite.from_raw(data, f"{source}:{_line(where)}")
        except InputError as exc:
            raise InputError(_comment_text(str(exc))) from None
    else:
        _refuse_duplicate_ids(root, source)
        suite = _validate(data, root, source)
    _refuse_misleading_ids(suite, root, source)
    if not allow_commands:
        for index, probe in enumerate(suite.service.probes):
            if isinstance(probe, CommandProbe):
                node = _locate(root, ("service", "probes", index))
                raise InputError(
                    f"{source}:{_line(node)}: service.probes[{index}]: a command probe runs a "
                    "program as root; refused without --allow-commands"
                )
    return suite


def refuse_unvouched(
    text: str,
    source: str,
    suite: Suite,
    addresses_of: Callable[[str], frozenset[str]],
    test_ids: Collection[str],
) -> None:
    """Refuse, FILE:LINE, a fault address its dependency does not resolve to.

    `suite` is parse_suite(text, source); only the tests in `test_ids` (those about to run)
    are checked. `addresses_of(name)` gives what a dependency's name stands for as the
    service sees it, or raises LookupError with a one-line reason. A DNS fault aims at port
    53 of the service's resolvers only and is not checked here.
    """
    root, _ = _parse_yaml(text, source)
    for index, test in enumerate(suite.tests):
        fault = test.fault
        if test.id not in test_ids or fault is None or isinstance(fault, DnsBlackholeFault):
            continue
        if test.dependency is None:
            node = _locate(root, ("tests", index))
            raise InputError(
                _comment_text(
                    f"{source}:{_line(node)}: tests[{index}]: a fault needs the dependency its "
                    "addresses belong to ('dependency: NAME'); refused"
                )
            )
        try:
            known = addresses_of(test.dependency)
        except LookupError as exc:
            node = _locate(root, ("tests", index, "dependency"))
            raise InputError(
                _comment_text(
                    f"{source}:{_line(node)}: tests[{index}].dependency: cannot tell what "
                    f"{test.dependency!r} resolves to from the service's namespace: {exc}; "
                    "its fault is refused"
                )
            ) from None
        for k, address in enumerate(fault.addresses):
            if address in known:
                continue
            node = _locate(root, ("tests", index, "fault", "addresses", k))
            now = ", ".join(sorted(known)) or "nothing"
            raise InputError(
                _comment_text(
                    f"{source}:{_line(node)}: tests[{index}].fault.addresses[{k}]: {address} is "
                    f"not an address of {test.dependency!r} (from the service's namespace it "
                    f"resolves to {now}); regenerate with `depdrill generate --from` or set "
                    "'skip: true'"
                )
            )


def _parse_yaml(text: str, source: str) -> tuple[yaml.Node, Any]:
    # libyaml when present: the fuzzed corpus and large suites parse ~10x faster.
    loader = yaml.CSafeLoader(text) if yaml.__with_libyaml__ else yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None or (isinstance(root, yaml.ScalarNode) and root.tag.endswith(":null")):
            raise InputError(f"{source}:1: empty file; expected a depdrill suite")
        _check_nodes(root, source)
        return root, loader.construct_document(root)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = _comment_text(exc.problem or exc.context or "malformed YAML")
        raise InputError(f"{source}:{line}: not valid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        problem = _comment_text(_first_line(str(exc)))
        raise InputError(f"{source}:1: not valid YAML: {problem}") from None
    except RecursionError:
        raise InputError(f"{source}:1: not valid YAML: nested too deeply") from None
    finally:
        loader.dispose()


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "malformed"


def _check_nodes(root: yaml.Node, source: str) -> None:
    """Refuse what yaml.safe_load would silently accept: duplicate keys (the last one wins),
    keys that are not strings, and anchors/aliases (a few lines can expand to gigabytes)."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            raise InputError(f"{source}:{_line(node)}: YAML anchors and aliases are not allowed")
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: dict[str, yaml.Node] = {}
            for key, value in node.value:
                if not isinstance(key, yaml.ScalarNode) or key.tag != _STR_TAG:
                    raise InputError(f"{source}:{_line(key)}: a key must be a plain string")
                if key.value == "<<":
                    raise InputError(f"{source}:{_line(key)}: YAML merge keys are not allowed")
                if key.value in keys:
                    raise InputError(
                        f"{source}:{_line(key)}: duplicate key {key.value!r} "
                        f"(first on line {_line(keys[key.value])})"
                    )
                keys[key.value] = key
                stack.append(value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def _refuse_duplicate_ids(root: yaml.Node, source: str) -> None:
    tests = _locate(root, ("tests",))
    if not isinstance(tests, yaml.SequenceNode):
        return
    first: dict[str, yaml.Node] = {}
    for item in tests.value:
        node = _child(item, "id")
        if not isinstance(node, yaml.ScalarNode):
            continue
        if node.value in first:
            raise InputError(
                f"{source}:{_line(node)}: duplicate test id {node.value!r} "
                f"(first on line {_line(first[node.value])})"
            )
        first[node.value] = node


def expected_id(test: SuiteTest) -> str | None:
    """The id a test's action implies, when it names a dependency (None: any id will do)."""
    fault, check = test.fault, test.check
    if test.dependency is None:
        return None
    if isinstance(fault, BlackholeFault):
        return f"blackhole:{test.dependency}"
    if isinstance(fault, LatencyFault):
        return f"latency-{fault.delay_ms}ms:{test.dependency}"
    if check is not None:
        return f"cert:{test.dependency}:{check.port}"
    return None


def _refuse_misleading_ids(suite: Suite, root: yaml.Node, source: str) -> None:
    # A reviewer reads the id; the injector reads the fault. They must say the same thing.
    for index, test in enumerate(suite.tests):
        expected = expected_id(test)
        if expected is not None and test.id != expected:
            node = _locate(root, ("tests", index, "id"))
            raise InputError(
                f"{source}:{_line(node)}: tests[{index}].id: {test.id!r} does not say what the "
                f"test does; its {test.kind} on {test.dependency!r} is {expected!r}"
            )


def _validate(data: dict[str, Any], root: yaml.Node, source: str) -> Suite:
    try:
        # Through JSON in strict mode: "443" is not a port and "yes" is not a boolean, while
        # timestamps and whole-number floats still read as a person writes them.
        document = json.dumps(data, default=_json_scalar, allow_nan=True)
        return Suite.model_validate_json(document, strict=True)
    except ValidationError as exc:
        raise InputError(_describe(exc.errors()[0], exc.error_count(), root, source)) from None
    except (TypeError, ValueError) as exc:
        raise InputError(f"{source}:1: cannot read the suite: {_first_line(str(exc))}") from None


def _json_scalar(value: object) -> str:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        raise TypeError("binary values are not allowed")
    raise TypeError(f"a {type(value).__name__} value is not allowed")


def _describe(error: ErrorDetails, count: int, root: yaml.Node, source: str) -> str:
    loc = tuple(error["loc"])
    path, node = _walk(root, loc)
    message = error["msg"].removeprefix("Value error, ")
    kind = error["type"]
    if kind == "extra_forbidden" and path:
        key_node = _key_node(root, path)
        message = f"unknown key {path[-1]!r}"
        node = key_node or node
        path = path[:-1]
    elif kind == "missing":
        message = f"missing key {loc[-1]!r}"
    where = _dotted(path)
    more = f" (and {count - 1} more)" if count > 1 else ""
    # pydantic quotes the input, and keys are the file's text: keep the refusal on one
    # printable line.
    return _comment_text(f"{source}:{_line(node)}: {where + ': ' if where else ''}{message}{more}")


def _walk(root: yaml.Node, loc: tuple[int | str, ...]) -> tuple[list[int | str], yaml.Node]:
    """Follow a pydantic error location through the YAML nodes; parts that are not in the
    document (union tags like `blackhole`) are skipped."""
    node = root
    path: list[int | str] = []
    for part in loc:
        child = _child(node, part)
        if child is not None:
            node = child
            path.append(part)
    return path, node


def _key_node(root: yaml.Node, path: list[int | str]) -> yaml.Node | None:
    _, parent = _walk(root, tuple(path[:-1]))
    if isinstance(parent, yaml.MappingNode):
        for key, _value in parent.value:
            if key.value == path[-1]:
                return key  # type: ignore[no-any-return]
    return None


def _child(node: yaml.Node, part: int | str) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode) and isinstance(part, str):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == part:
                return value  # type: ignore[no-any-return]
    if (
        isinstance(node, yaml.SequenceNode)
        and isinstance(part, int)
        and 0 <= part < len(node.value)
    ):
        return node.value[part]  # type: ignore[no-any-return]
    return None


def _locate(root: yaml.Node, loc: tuple[int | str, ...]) -> yaml.Node:
    return _walk(root, loc)[1]


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _dotted(path: list[int | str]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out
