"""The demo's results table and its comparison with the expected outcomes."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

MISSING = "no outcome (timeout)"


@dataclass(frozen=True, slots=True)
class Outcome:
    """One row: what happened to one published message."""

    kind: str  # the scenario step, the key of the expected table
    who: str  # the publishing account
    request_id: str
    on_behalf_of: str
    status: str
    reason: str
    keys: tuple[str, ...]
    remaining_day: str
    renditions: tuple[str, ...] = ()  # the names of the images' renditions

    @classmethod
    def of(
        cls,
        kind: str,
        who: str,
        request_id: str,
        result: dict[str, Any] | None,
        *,
        on_behalf_of: str = "",
        dlq: bool | None = None,
    ) -> Outcome:
        if result is None:
            return cls(kind, who, request_id, on_behalf_of, MISSING, "", (), "")
        reason = result.get("reason") or ""
        if dlq is not None:
            reason += " (in DLQ)" if dlq else " (NOT in the DLQ)"
        remaining = (result.get("quota_remaining") or {}).get("day")
        return cls(
            kind,
            who,
            request_id,
            on_behalf_of,
            result["status"],
            reason,
            tuple(image["key"] for image in result.get("images") or ()),
            "" if remaining is None else str(remaining),
            tuple(
                sorted(
                    r["name"] for image in result.get("images") or () for r in image["renditions"]
                )
            ),
        )

    @classmethod
    def webhook(cls, request_id: str, attempts: int, signed: bool) -> Outcome:
        """Whether the result of `request_id` reached the demo's webhook receiver."""
        status = "delivered" if attempts else "not delivered"
        reason = ("signature ok" if signed else "BAD SIGNATURE") if attempts else ""
        return cls("webhook", "-", request_id, "", status, reason, (), "")

    def key(self) -> tuple[str, str, str]:
        # A success without stored images is not the success the scenario expects.
        status = self.status if self.status != "succeeded" or self.keys else "succeeded, no images"
        if self.renditions:
            status += " + " + ", ".join(self.renditions)
        return self.kind, status, self.reason


def expected_outcomes(*, bob_allowed: int, bob_batch: int) -> Counter[tuple[str, str, str]]:
    """(step, status, reason) -> how many messages end that way."""
    expected: Counter[tuple[str, str, str]] = Counter()
    # Every image gets the default thumbnail; the hero asked for a social crop too.
    expected["hero", "succeeded + social, thumb", ""] += 1
    expected["bob batch", "succeeded + thumb", ""] += min(bob_allowed, bob_batch)
    if bob_batch > bob_allowed:
        expected["bob batch", "rejected", "QUOTA_EXCEEDED"] += bob_batch - bob_allowed
    expected["carol", "rejected", "NOT_AUTHORIZED"] += 1
    expected["refused prompt", "rejected", "PROMPT_REFUSED"] += 1
    expected["malformed", "rejected", "INVALID_REQUEST (in DLQ)"] += 1
    expected["preset", "succeeded + thumb", ""] += 1
    expected["free prompt", "rejected", "NOT_AUTHORIZED"] += 1
    expected["background", "succeeded + thumb", ""] += 1
    # Each request that reached a decision is POSTed to the webhook; the malformed
    # message is no request of the ledger (its result has no request id).
    expected["webhook", "delivered", "signature ok"] += 1 + bob_batch + 1 + 1 + 2 + 1
    return expected


def _render(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print(line)
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def print_table(rows: list[Outcome], expected: Counter[tuple[str, str, str]]) -> int:
    """Print the outcomes and the expectation; 0 if they match, 1 otherwise."""
    print("\nOutcomes")
    _render(
        ("request id", "who", "for", "status", "reason", "S3 keys", "renditions", "day left"),
        [
            (
                r.request_id,
                r.who,
                r.on_behalf_of,
                r.status,
                r.reason,
                ", ".join(r.keys) or "-",
                ", ".join(r.renditions) or "-",
                r.remaining_day or "-",
            )
            for r in rows
        ],
    )
    actual = Counter(r.key() for r in rows)
    print("\nExpected vs actual")
    _render(
        ("step", "status", "reason", "expected", "actual", ""),
        [
            (
                kind,
                status,
                reason or "-",
                str(expected[k]),
                str(actual[k]),
                _mark(expected, actual, k),
            )
            for k in sorted(expected.keys() | actual.keys())
            for kind, status, reason in [k]
        ],
    )
    if actual != expected:
        print("\nFAIL: the outcomes differ from the scenario's expectation")
        return 1
    print("\nPASS: every outcome is what the scenario expects")
    return 0


def _mark(
    expected: Counter[tuple[str, str, str]],
    actual: Counter[tuple[str, str, str]],
    key: tuple[str, str, str],
) -> str:
    return "ok" if expected[key] == actual[key] else "DIFFERS"
