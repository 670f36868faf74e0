"""The closed list of reason codes a client can see in a result.

A result's `reason` is one of these or absent (succeeded). Every error the product raises
names a reason (errors.py); those not listed here are internal (a ledger state, a
timeout the worker handles by exiting, a retry signal) and reach a client only as
INTERNAL_ERROR (`errors.client_facing`). The README's table is generated from this
module (`python -m zimage_pipeline.reasons`) and a test keeps the two equal.
"""

from __future__ import annotations

import sys
from enum import StrEnum


class Reason(StrEnum):
    INVALID_REQUEST = "INVALID_REQUEST"
    UNAUTHENTICATED_PUBLISHER = "UNAUTHENTICATED_PUBLISHER"
    REQUEST_ID_CONFLICT = "REQUEST_ID_CONFLICT"
    UNKNOWN_USER = "UNKNOWN_USER"
    ACCOUNT_DISABLED = "ACCOUNT_DISABLED"
    DELEGATION_NOT_ALLOWED = "DELEGATION_NOT_ALLOWED"
    NOT_AUTHORIZED = "NOT_AUTHORIZED"
    POLICY_VIOLATION = "POLICY_VIOLATION"
    QUOTA_EXCEEDED = "QUOTA_EXCEEDED"
    PROMPT_REFUSED = "PROMPT_REFUSED"
    EXPIRED = "EXPIRED"
    CANCELLED = "CANCELLED"
    INVALID_GENERATION_PARAMETERS = "INVALID_GENERATION_PARAMETERS"
    GPU_OUT_OF_MEMORY = "GPU_OUT_OF_MEMORY"
    GENERATION_FAILED = "GENERATION_FAILED"
    PROVENANCE_FAILED = "PROVENANCE_FAILED"
    STORAGE_FAILED = "STORAGE_FAILED"
    OBJECT_CONFLICT = "OBJECT_CONFLICT"
    DIRECTORY_UNAVAILABLE = "DIRECTORY_UNAVAILABLE"
    LEDGER_UNAVAILABLE = "LEDGER_UNAVAILABLE"
    DEPENDENCY_UNAVAILABLE = "DEPENDENCY_UNAVAILABLE"
    ATTEMPTS_EXHAUSTED = "ATTEMPTS_EXHAUSTED"
    PLUGIN_FAILED = "PLUGIN_FAILED"
    INTERNAL_ERROR = "INTERNAL_ERROR"


# status, dead-lettered?, what it means: one line each, for the README's table.
DESCRIPTIONS: dict[Reason, tuple[str, bool, str]] = {
    Reason.INVALID_REQUEST: (
        "rejected",
        True,
        "not a valid request (JSON, UTF-8, size, nesting, a field); the message names it",
    ),
    Reason.UNAUTHENTICATED_PUBLISHER: (
        "rejected",
        True,
        "the message carries no AMQP `user_id`; answered without a request id",
    ),
    Reason.REQUEST_ID_CONFLICT: (
        "rejected",
        True,
        "you already used the id for a different request (ids are per publisher)",
    ),
    Reason.UNKNOWN_USER: ("rejected", False, "the directory does not know the user"),
    Reason.ACCOUNT_DISABLED: ("rejected", False, "the user's account is disabled"),
    Reason.DELEGATION_NOT_ALLOWED: (
        "rejected",
        False,
        "`on_behalf_of` another user without a role that has `delegate = true`",
    ),
    Reason.NOT_AUTHORIZED: (
        "rejected",
        False,
        "no role allows generating, or this template, free prompts, adapter or input",
    ),
    Reason.POLICY_VIOLATION: (
        "rejected",
        False,
        "over a role limit: size, steps, images, format, priority",
    ),
    Reason.QUOTA_EXCEEDED: ("rejected", False, "the user's or a team's budget is spent"),
    Reason.PROMPT_REFUSED: (
        "rejected",
        False,
        "a prompt filter refused the prompt; the message names the rule; nothing charged",
    ),
    Reason.EXPIRED: ("expired", False, "`expires_at` passed before it ran; nothing charged"),
    Reason.CANCELLED: ("cancelled", False, "cancelled before it started; nothing charged"),
    Reason.INVALID_GENERATION_PARAMETERS: (
        "failed",
        False,
        "the engine cannot take these parameters; nothing charged",
    ),
    Reason.GPU_OUT_OF_MEMORY: ("failed", False, "one image does not fit in GPU memory"),
    Reason.GENERATION_FAILED: ("failed", False, "the engine failed on this request"),
    Reason.PROVENANCE_FAILED: ("failed", False, "the image could not be marked or signed"),
    Reason.STORAGE_FAILED: ("failed", False, "the object store failed past the retry budget"),
    Reason.OBJECT_CONFLICT: ("failed", False, "a key already holds different bytes"),
    Reason.DIRECTORY_UNAVAILABLE: (
        "failed",
        False,
        "the directory was unreachable past the retry budget",
    ),
    Reason.LEDGER_UNAVAILABLE: ("failed", False, "the ledger was unreachable past the retries"),
    Reason.DEPENDENCY_UNAVAILABLE: ("failed", False, "a service was unreachable past the retries"),
    Reason.ATTEMPTS_EXHAUSTED: (
        "failed",
        True,
        "started more than `max_job_attempts` times (it kills workers); not run again",
    ),
    Reason.PLUGIN_FAILED: (
        "failed",
        False,
        "a plugin raised or timed out; the message names it; nothing charged",
    ),
    Reason.INTERNAL_ERROR: (
        "failed",
        False,
        "a defect of ours; operators find the cause in the log and the audit trail",
    ),
}


def is_client_reason(code: str) -> bool:
    return code in Reason.__members__


def markdown_table() -> str:
    rows = ["| reason | status | dead-lettered | meaning |", "|---|---|---|---|"]
    for reason in Reason:
        status, dead_lettered, meaning = DESCRIPTIONS[reason]
        rows.append(
            f"| `{reason.value}` | `{status}` | {'yes' if dead_lettered else 'no'} | {meaning} |"
        )
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown_table())
