"""Model identity for the audit trail: where the weights came from and their SHA-256.

Hashing 20 GB takes a minute, so it happens once at load and the digests are cached in a
file beside the model, keyed on each file's size and mtime; a changed file is hashed
again. A read-only model directory is hashed on every start (with a warning) instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_NAME = ".zimage-identity.json"
_CACHE_VERSION = 1
_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ModelIdentity:
    """``name``: repo id or directory name; ``weights_sha256``: one digest over every file
    of the pipeline (weights, configs, tokenizer), so any change to what shapes an image
    changes it; ``files``: the per-file SHA-256 behind it."""

    name: str
    revision: str | None
    weights_sha256: str
    source: str  # "local" | "hub" | "memory"
    files: dict[str, str] = field(default_factory=dict)

    def as_audit(self) -> dict[str, object]:
        return {
            "name": self.name,
            "revision": self.revision,
            "weights_sha256": self.weights_sha256,
            "source": self.source,
        }


def _model_files(root: Path) -> list[Path]:
    # Hidden files (our cache, .gitattributes, HF's .cache) say nothing about the model.
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _load_cache(path: Path) -> dict[str, dict[str, object]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION:
        return {}
    files = data.get("files")
    return files if isinstance(files, dict) else {}


def file_digests(root: Path) -> dict[str, str]:
    """SHA-256 of every model file under root, reusing cached digests of unchanged files."""
    cache_path = root / CACHE_NAME
    cached = _load_cache(cache_path)
    digests: dict[str, str] = {}
    entries: dict[str, dict[str, object]] = {}
    changed = False
    for path in _model_files(root):
        rel = path.relative_to(root).as_posix()
        stat = path.stat()  # follows HF-cache symlinks to the blobs
        key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        entry = cached.get(rel)
        if isinstance(entry, dict) and all(entry.get(k) == v for k, v in key.items()):
            sha = str(entry["sha256"])
        else:
            log.info("hashing model file %s (%d bytes)", rel, stat.st_size)
            sha = _sha256(path)
            changed = True
        digests[rel] = sha
        entries[rel] = {**key, "sha256": sha}
    if changed or set(entries) != set(cached):
        _write_cache(cache_path, entries)
    return digests


def _write_cache(path: Path, entries: dict[str, dict[str, object]]) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(
            json.dumps({"version": _CACHE_VERSION, "files": entries}, indent=1, sort_keys=True),
            encoding="utf-8",
        )
        tmp.replace(path)  # atomic: two workers starting together never read half a file
    except OSError as exc:
        log.warning(
            "cannot cache model digests in %s (%s); they are recomputed at each start",
            path,
            exc.strerror,
        )
        tmp.unlink(missing_ok=True)


def combined_digest(digests: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for rel in sorted(digests):
        digest.update(f"{rel}\0{digests[rel]}\n".encode())
    return digest.hexdigest()


def identify(root: Path, *, name: str, revision: str | None, source: str) -> ModelIdentity:
    digests = file_digests(root)
    return ModelIdentity(
        name=name,
        revision=revision,
        weights_sha256=combined_digest(digests),
        source=source,
        files=digests,
    )
