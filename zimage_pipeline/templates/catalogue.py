"""A directory of template files, loaded and checked as one unit: one broken file and the
whole new catalogue is refused (the holder keeps the last good one), with an error that
names the file and the line."""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from zimage_pipeline.errors import ConfigError, InvalidRequestError
from zimage_pipeline.messages import TemplateRef
from zimage_pipeline.templates.model import Template

SUFFIX = ".toml"
_TOML_LINE = re.compile(r"line (\d+)")


class CatalogueError(ConfigError):
    """A template file that cannot be used, by file and line (1-based; 0: the file)."""

    def __init__(self, file: str, line: int, message: str) -> None:
        super().__init__(f"{file}:{line}: {message}" if line else f"{file}: {message}")
        self.file = file
        self.line = line
        self.problem = message


@dataclass(frozen=True, slots=True)
class Entry:
    template: Template
    file: str  # the file's name in the catalogue directory
    sha256: str  # of the file's bytes: what the trail records


@dataclass(frozen=True, slots=True)
class Catalogue:
    entries: dict[str, dict[int, Entry]] = field(default_factory=dict)
    # Names, sizes and modification times of the files it was loaded from: a change in
    # the directory changes it (the holder's poll compares it).
    fingerprint: tuple[tuple[str, int, int], ...] = ()

    def __len__(self) -> int:
        return sum(len(versions) for versions in self.entries.values())

    def latest(self) -> list[Entry]:
        return [versions[max(versions)] for _, versions in sorted(self.entries.items())]

    def resolve(self, ref: TemplateRef) -> Entry:
        """The entry a request's template reference names, or INVALID_REQUEST saying
        what does not match."""
        versions = self.entries.get(ref.id)
        if not versions:
            raise InvalidRequestError(f"template: {ref.id!r} is not in the catalogue")
        version = ref.version if ref.version is not None else max(versions)
        entry = versions.get(version)
        if entry is None:
            known = ", ".join(str(v) for v in sorted(versions))
            raise InvalidRequestError(
                f"template: {ref.id!r} has no version {version} (versions: {known})"
            )
        if ref.sha256 is not None and ref.sha256 != entry.sha256:
            raise InvalidRequestError(
                f"template: {ref.id!r} version {version} is not the content pinned by "
                f"sha256 {ref.sha256[:12]}... (the catalogue's file is {entry.sha256[:12]}...)"
            )
        return entry


def fingerprint(directory: Path) -> tuple[tuple[str, int, int], ...]:
    stamps = []
    for path in sorted(directory.glob(f"*{SUFFIX}")):
        try:
            stat = path.stat()
        except OSError:
            continue  # removed while listing: the next poll sees the directory settled
        stamps.append((path.name, stat.st_size, stat.st_mtime_ns))
    return tuple(stamps)


def load_catalogue(directory: Path) -> Catalogue:
    """Every `*.toml` file of `directory`: one template per file (top-level keys), or
    several as `[[templates]]`. Raises CatalogueError for the first problem."""
    if not directory.is_dir():
        raise CatalogueError(str(directory), 0, "not a directory")
    stamp = fingerprint(directory)
    entries: dict[str, dict[int, Entry]] = {}
    for name, _, _ in stamp:
        try:
            data = (directory / name).read_bytes()
        except OSError as exc:  # a directory named *.toml, unreadable, or just removed
            raise CatalogueError(name, 0, f"cannot be read: {exc.strerror or exc}") from None
        digest = hashlib.sha256(data).hexdigest()
        for template in _parse(name, data):
            known = entries.setdefault(template.id, {}).get(template.version)
            if known is not None:
                raise CatalogueError(
                    name,
                    0,
                    f"template {template.id!r} version {template.version} is also in {known.file}",
                )
            entries[template.id][template.version] = Entry(template, name, digest)
    return Catalogue(entries, stamp)


def _parse(name: str, data: bytes) -> list[Template]:
    try:
        text = data.decode("utf-8")
        document = tomllib.loads(text)
    except UnicodeDecodeError as exc:
        raise CatalogueError(name, 0, f"not UTF-8: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        match = _TOML_LINE.search(str(exc))
        raise CatalogueError(name, int(match[1]) if match else 0, str(exc)) from None
    tables: list[Any]
    if "templates" in document:
        extra = set(document) - {"templates"}
        if extra or not isinstance(document["templates"], list):
            raise CatalogueError(name, 0, "a catalogue file is [[templates]] tables only")
        tables = document["templates"]
    else:
        tables = [document]
    templates = []
    for index, table in enumerate(tables):
        try:
            templates.append(Template.model_validate(table))
        except ValidationError as exc:
            error = exc.errors(include_input=False)[0]
            where = ".".join(str(p) for p in error["loc"])
            in_array = index if "templates" in document else None
            line = _line_of(text, error["loc"], in_array, error["msg"])
            message = f"{where}: {error['msg']}" if where else error["msg"]
            raise CatalogueError(name, line, message) from None
    return templates


# A check across keys (model_validator) has no location: the key its message is about.
_MESSAGE_KEYS = (("slot", "prompt"), ("size", "sizes"), ("seed", "seed"), ("pattern", "pattern"))


def _keys_named_by(message: str) -> list[str]:
    return [key for word, key in _MESSAGE_KEYS if word in message][:1]


def _line_of(text: str, loc: Sequence[Any], index: int | None, message: str) -> int:
    """The line that most likely holds the problem: the last key of `loc` that a line
    defines (as `key =` or in a table header), within the index-th [[templates]] table.
    0 when nothing matches (the message still names the key)."""
    lines = text.splitlines()
    start = 0
    if index is not None:
        headers = [i for i, line in enumerate(lines) if line.strip() == "[[templates]]"]
        if index < len(headers):
            start = headers[index]
    keys = [str(p) for p in loc if isinstance(p, str)] or _keys_named_by(message)
    for key in reversed(keys):
        found = _find_key(lines, key, start)
        if found:
            return found
    return start + 1 if index is not None else 0


def _find_key(lines: Iterable[str], key: str, start: int) -> int:
    assignment = re.compile(rf"^\s*\"?{re.escape(key)}\"?\s*=")
    header = re.compile(rf"^\s*\[.*\b{re.escape(key)}\b.*\]\s*$")
    for number, line in enumerate(lines, start=1):
        if number > start and (assignment.match(line) or header.match(line)):
            return number
    return 0
