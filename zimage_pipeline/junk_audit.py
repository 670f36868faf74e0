"""How much unidentified junk reaches the audit chain: a bounded amount per publisher.

A message that is not a request of the ledger (unreadable, invalid, no publisher) is
answered and dead-lettered, and its refusal is audited under `unidentified-<digest>`.
Written one event per message, a junk stream would grow the hash chain (and every
worker's chain lock) without bound. So each publisher has a budget per window: the first
`per_window` refusals are audited one by one (with their digests, for forensics); the
rest are counted, and one `denied_summary` event per publisher and window records how
many there were and why. The DLQ still holds every message.

Pure bookkeeping, no I/O; each worker process keeps its own (with N workers the chain
gets at most N times the budget).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

UNIDENTIFIED_PREFIX = "unidentified-"
SUMMARY_EVENT = "denied_summary"


@dataclass(slots=True)
class _Window:
    started_at: float
    written: int = 0
    suppressed: Counter[str] = field(default_factory=Counter)  # reason -> messages


@dataclass(frozen=True, slots=True)
class JunkSummary:
    publisher: str
    started_at: float  # epoch seconds
    window_s: float
    suppressed: dict[str, int]

    @property
    def request_id(self) -> str:
        """One trail per publisher and window, e.g. `unidentified-summary-…`."""
        stamp = datetime.fromtimestamp(self.started_at, UTC).strftime("%Y%m%dT%H%M%S")
        who = hashlib.sha256(self.publisher.encode()).hexdigest()[:12]
        return f"{UNIDENTIFIED_PREFIX}summary-{stamp}-{who}"

    def payload(self) -> dict[str, object]:
        return {
            "principal": self.publisher,
            "suppressed": sum(self.suppressed.values()),
            "reasons": dict(sorted(self.suppressed.items())),
            "window_start": datetime.fromtimestamp(self.started_at, UTC).isoformat(),
            "window_s": self.window_s,
        }


class JunkAuditBudget:
    def __init__(self, *, per_window: int = 20, window_s: float = 60.0) -> None:
        self.per_window = per_window
        self.window_s = window_s
        self._windows: dict[str, _Window] = {}

    def admit(self, publisher: str, reason: str, *, now: float) -> bool:
        """True: audit this refusal on its own. False: it is counted for the summary."""
        window = self._windows.get(publisher)
        if window is None or now - window.started_at >= self.window_s:
            if window is not None and window.suppressed:
                return self._admit_after_unflushed(publisher, reason, now=now)
            window = self._windows[publisher] = _Window(started_at=now)
        if window.written < self.per_window:
            window.written += 1
            return True
        window.suppressed[reason] += 1
        return False

    def _admit_after_unflushed(self, publisher: str, reason: str, *, now: float) -> bool:
        # A closed window with a count not yet written: keep counting in it until the
        # summaries are taken, rather than lose the count by starting a new window.
        self._windows[publisher].suppressed[reason] += 1
        return False

    def take_summaries(self, *, now: float, all_windows: bool = False) -> list[JunkSummary]:
        """The summaries of closed windows (all windows with `all_windows`, at shutdown)
        that suppressed anything; those windows are forgotten."""
        taken: list[JunkSummary] = []
        for publisher, window in list(self._windows.items()):
            closed = all_windows or now - window.started_at >= self.window_s
            if not closed:
                continue
            del self._windows[publisher]
            if window.suppressed:
                taken.append(
                    JunkSummary(
                        publisher, window.started_at, self.window_s, dict(window.suppressed)
                    )
                )
        return taken
