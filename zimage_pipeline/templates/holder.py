"""The live catalogue of a worker: loaded at startup (a broken catalogue stops it, by file
and line), then reloaded when the directory changes or on SIGHUP. A broken new version is
refused as a whole: the last good catalogue stays, the error is logged once, counted, and
shown on /readyz, so a bad edit never takes the fleet down. A delivery takes the
catalogue once (`current`), so a request admitted under one version finishes under it."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from zimage_pipeline.templates.catalogue import (
    Catalogue,
    CatalogueError,
    fingerprint,
    load_catalogue,
)

log = logging.getLogger(__name__)
EMPTY = Catalogue()


class CatalogueHolder:
    def __init__(
        self,
        directory: Path | None,
        *,
        on_result: Callable[[bool], None] = lambda ok: None,
    ) -> None:
        """`on_result(ok)` after every reload attempt (metrics)."""
        self.directory = directory
        self.on_result = on_result
        self._lock = threading.Lock()
        self._current = EMPTY
        if directory is not None and directory.is_dir():
            self._current = load_catalogue(directory)  # broken at startup: ConfigError
        elif directory is not None:
            log.warning("templates: %s is not a directory; no templates until it is", directory)
        self._forced = False
        # The error of the newest files, while they are refused; and their fingerprint,
        # so the same broken files are not re-read and re-logged every poll.
        self.error: str | None = None
        self._refused: tuple[tuple[str, int, int], ...] | None = None

    def current(self) -> Catalogue:
        return self._current

    def request_reload(self) -> None:
        """Reload at the next `poll` even if no file looks changed (SIGHUP)."""
        self._forced = True

    def poll(self) -> bool:
        """Reload if the directory changed (or a reload was requested); True when a new
        catalogue is live."""
        if self.directory is None:
            return False
        with self._lock:
            forced, self._forced = self._forced, False
            stamp = fingerprint(self.directory)
            if not forced and stamp == self._current.fingerprint and self.error is not None:
                # The refused files were put back as they are in use: nothing to refuse.
                self.error, self._refused = None, None
                self.on_result(True)
            if not forced and stamp in (self._current.fingerprint, self._refused):
                return False
            return self._reload(stamp)

    def _reload(self, stamp: tuple[tuple[str, int, int], ...]) -> bool:
        assert self.directory is not None
        try:
            loaded = load_catalogue(self.directory)
        except CatalogueError as exc:
            self.error, self._refused = str(exc), stamp
            log.error("templates: the new catalogue is refused, keeping the last good one: %s", exc)
            self.on_result(False)
            return False
        self._current, self.error, self._refused = loaded, None, None
        log.info("templates: catalogue reloaded (%d templates)", len(loaded))
        self.on_result(True)
        return True
