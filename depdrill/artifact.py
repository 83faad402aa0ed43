"""The envelope of every file between stages: schema, producer, inputs; atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from depdrill import __version__
from depdrill.errors import InputError

PRODUCER = f"depdrill {__version__}"


class Frozen(BaseModel):
    """Base of every model: immutable, strict about unknown keys."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


A = TypeVar("A", bound="Artifact")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Artifact(Frozen):
    """A file handed from one stage to the next.

    `schema` reads `depdrill.<kind>/v<version>`. Subclasses set KIND and VERSION; older
    versions are upgraded by CONVERTERS (version -> function returning the next version's
    raw dict); newer versions are refused.
    """

    KIND: ClassVar[str]
    VERSION: ClassVar[int]
    CONVERTERS: ClassVar[dict[int, Callable[[dict[str, Any]], dict[str, Any]]]] = {}

    schema_: str = Field(alias="schema")
    producer: str = PRODUCER
    created: datetime = Field(default_factory=utcnow)
    inputs: dict[str, str] = Field(
        default_factory=dict, description="file name -> sha256 of each input"
    )

    @classmethod
    def schema_id(cls) -> str:
        return f"depdrill.{cls.KIND}/v{cls.VERSION}"

    @classmethod
    def from_raw(cls, raw: object, source: str = "<data>") -> Self:
        """Validate a parsed document, upgrading older versions; errors are one line."""
        if not isinstance(raw, dict):
            raise InputError(
                f"{source}: not a depdrill {cls.KIND} file (top level is not a mapping)"
            )
        schema = raw.get("schema")
        if not isinstance(schema, str):
            raise InputError(f"{source}: no 'schema' field; not a depdrill {cls.KIND} file")
        kind, version = _parse_schema(schema, source)
        if kind != cls.KIND:
            raise InputError(
                f"{source}: is a depdrill {kind} file, expected {cls.KIND} ({cls.schema_id()})"
            )
        if version > cls.VERSION:
            raise InputError(
                f"{source}: written by a newer depdrill ({schema}); this one reads up to "
                f"{cls.schema_id()} — upgrade depdrill"
            )
        while version < cls.VERSION:
            convert = cls.CONVERTERS.get(version)
            if convert is None:
                raise InputError(f"{source}: {schema} is too old to read")
            raw = convert(dict(raw))
            version += 1
            raw["schema"] = f"depdrill.{cls.KIND}/v{version}"
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise InputError(f"{source}: {describe_validation_error(exc)}") from None

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def _parse_schema(schema: str, source: str) -> tuple[str, int]:
    prefix, _, rest = schema.partition(".")
    kind, _, version = rest.partition("/v")
    if prefix != "depdrill" or not kind or not version.isdigit():
        raise InputError(f"{source}: unknown schema {schema!r}")
    return kind, int(version)


def describe_validation_error(exc: ValidationError) -> str:
    """The first validation problem as `at a.b.0: message` (one line)."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "top level"
    more = exc.error_count() - 1
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"at {where}: {first['msg']}{tail}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 16), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write via a temp file in the same folder and rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o644)  # mkstemp's 0600 would hide reports from CI readers
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_json(artifact: Artifact) -> str:
    return json.dumps(artifact.dump(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def read_text(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, expected a file") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None


def load_json(path: Path, model: type[A]) -> A:
    text = read_text(path)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    return model.from_raw(raw, str(path))


def load_yaml(path: Path, model: type[A]) -> A:
    text = read_text(path)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "malformed YAML"
        raise InputError(f"{path}: not valid YAML{where}: {problem}") from None
    return model.from_raw(raw, str(path))
