"""LoRA style adapters: the catalogue a request chooses from, and the check of a request's
choice against it.

A request (or its template) names adapters by catalogue name only, never by path: the
catalogue (`[adapters.<name>]` in the config) is the one place a file is named, with the
SHA-256 its bytes must have. Plain dataclasses, no I/O: the engine (which loads the files,
engine/adapters.py) and the request service share them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from zimage_pipeline.errors import InvalidRequestError

NAME_PATTERN = r"^[a-z0-9][a-z0-9-]*$"
NAME_MAX_LENGTH = 64
# The request's bound; the engine's `adapter_slots` may allow fewer at once.
MAX_ADAPTERS_PER_REQUEST = 4
MIN_WEIGHT = -2.0
MAX_WEIGHT = 2.0


@dataclass(frozen=True, slots=True)
class AdapterEntry:
    """One adapter of the catalogue: its weights file and the hash those bytes must have."""

    name: str
    path: str  # a .safetensors file (settings resolve a directory to its one file)
    sha256: str
    weight: float = 1.0  # used when a request names the adapter without a weight
    description: str = ""


@dataclass(frozen=True, slots=True)
class AdapterUse:
    """An adapter as one request runs it: what the model identity records."""

    name: str
    sha256: str
    weight: float


@dataclass(frozen=True, slots=True)
class AdapterCatalogue:
    """What a request may name: the configured adapters, and how many the engine runs
    at once (its slots)."""

    entries: Mapping[str, AdapterEntry]
    max_active: int = MAX_ADAPTERS_PER_REQUEST

    @classmethod
    def of(cls, entries: Sequence[AdapterEntry], *, max_active: int) -> AdapterCatalogue:
        return cls({entry.name: entry for entry in entries}, max_active)

    def uses(self, request: Any) -> tuple[AdapterUse, ...]:
        """A resolved request's adapters (explicit weights) with their catalogue hashes."""
        return tuple(
            AdapterUse(a.name, self.entries[a.name].sha256, a.weight)
            for a in request.adapters
            if a.name in self.entries
        )

    def resolve(self, request: Any) -> Any:
        """`request` with its adapters checked and their weights filled in (the
        catalogue's default where it left one out); unchanged without adapters."""
        if not request.adapters:
            return request
        uses = resolve_adapters(request.adapters, self.entries, max_active=self.max_active)
        resolved = [
            type(item)(name=use.name, weight=use.weight)
            for item, use in zip(request.adapters, uses, strict=True)
        ]
        return request.model_copy(update={"adapters": resolved})


NO_ADAPTERS = AdapterCatalogue({}, 0)
Catalogue = Mapping[str, AdapterEntry]


def valid_name(name: str) -> bool:
    return len(name) <= NAME_MAX_LENGTH and re.fullmatch(NAME_PATTERN, name) is not None


def resolve_adapters(
    requested: Sequence[Any], catalogue: Catalogue, *, max_active: int
) -> tuple[AdapterUse, ...]:
    """The request's adapters (items with `name` and an optional `weight`) resolved against
    the catalogue, in the request's order. Unknown names, a name given twice and more
    adapters than the engine runs at once are INVALID_REQUEST naming the problem (an
    unknown name first: it is the client's likelier mistake)."""
    uses: list[AdapterUse] = []
    for index, item in enumerate(requested):
        entry = catalogue.get(item.name)
        if entry is None:
            known = ", ".join(sorted(catalogue)) or "none configured"
            raise InvalidRequestError(
                f"adapters[{index}].name: unknown adapter {item.name!r} (known: {known})"
            )
        if any(use.name == item.name for use in uses):
            raise InvalidRequestError(f"adapters[{index}].name: {item.name!r} is named twice")
        weight = entry.weight if item.weight is None else float(item.weight)
        if not (math.isfinite(weight) and MIN_WEIGHT <= weight <= MAX_WEIGHT):
            raise InvalidRequestError(
                f"adapters[{index}].weight: must be in [{MIN_WEIGHT}, {MAX_WEIGHT}], got {weight}"
            )
        uses.append(AdapterUse(name=entry.name, sha256=entry.sha256, weight=weight))
    if len(uses) > max_active:
        raise InvalidRequestError(
            f"adapters: at most {max_active} at once on this worker, got {len(uses)}"
        )
    return tuple(uses)


def catalogue_of(settings: Any) -> tuple[AdapterEntry, ...]:
    """The `[adapters.<name>]` tables of a Settings as entries (paths already resolved
    against the config file's directory by settings.py)."""
    return tuple(
        AdapterEntry(
            name=name,
            path=str(table.path),
            sha256=table.sha256,
            weight=table.weight,
            description=table.description,
        )
        for name, table in settings.adapters.items()
    )


def adapters_label(uses: Sequence[AdapterUse]) -> str:
    """`+lora:name@sha256-prefix*weight` per adapter: what the provenance's model names."""
    return "".join(f"+lora:{u.name}@{u.sha256[:12]}*{u.weight:g}" for u in uses)
