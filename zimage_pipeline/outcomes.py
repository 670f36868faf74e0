"""From an error to what happens to its request and its delivery: the one table.

Every error the product raises names its disposition (errors.py); this module is the only
place that turns a disposition, and the few reasons that name their own status, into the
request's ending and the delivery's fate. The service and the worker ask it; neither
decides on its own.

| disposition | found before the job runs | found while it runs | the delivery |
|-------------|---------------------------|---------------------|--------------|
| REJECT      | `rejected`                | `failed` (reason kept) | answered, acked |
| FAIL        | `failed`                  | `failed`            | answered, acked |
| RETRY       | `failed` once the retry budget is spent | same      | delayed republish, then answered |
| FATAL       | (none: the worker exits)  | same                | requeued for another worker |

Reasons with a status of their own: EXPIRED -> `expired`, CANCELLED -> `cancelled`.
Dead-lettered as well as answered: a message that is no request of the ledger (invalid,
no publisher, an id conflict: nothing of it is recorded under an id) and a request that
ends ATTEMPTS_EXHAUSTED (it keeps killing workers: a person should look at it).
A `running -> rejected` ending does not exist: the ledger's state machine has none
(`rejected` means nothing ran), which is why a refusal found while running is `failed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

from zimage_pipeline.errors import Disposition, ZImageError
from zimage_pipeline.messages import Status


class Handling(StrEnum):
    ANSWER = "answer"  # the request ends now, with a result
    RETRY_LATER = "retry_later"  # the delivery comes back after a delay (the worker's backoff)
    EXIT = "exit"  # the process is unusable: the worker stops, the delivery is redelivered


@dataclass(frozen=True, slots=True)
class _Row:
    handling: Handling
    before_running: Status
    while_running: Status


TABLE = MappingProxyType(
    {
        Disposition.REJECT: _Row(Handling.ANSWER, Status.REJECTED, Status.FAILED),
        Disposition.FAIL: _Row(Handling.ANSWER, Status.FAILED, Status.FAILED),
        Disposition.RETRY: _Row(Handling.RETRY_LATER, Status.FAILED, Status.FAILED),
        Disposition.FATAL: _Row(Handling.EXIT, Status.FAILED, Status.FAILED),
    }
)
STATUS_BY_REASON = MappingProxyType({"EXPIRED": Status.EXPIRED, "CANCELLED": Status.CANCELLED})
DEAD_LETTERED_REASONS = frozenset({"ATTEMPTS_EXHAUSTED"})


def handling(error: ZImageError) -> Handling:
    """What is done with the delivery that raised `error`."""
    return TABLE[error.disposition].handling


def ending_status(error: ZImageError, *, running: bool) -> Status:
    """The status a request ends with for `error`; `running`: it was admitted (its job
    runs, its quota is reserved)."""
    row = TABLE[error.disposition]
    default = row.while_running if running else row.before_running
    return STATUS_BY_REASON.get(error.reason, default)


def dead_letters(error: ZImageError, *, ledger_request: bool = True) -> bool:
    """Whether the delivery also goes to the dead-letter queue, for a person to look at.
    `ledger_request`: the message is a request the ledger records (False for a message
    refused before it had an id: invalid, without a publisher, an id conflict)."""
    return not ledger_request or error.reason in DEAD_LETTERED_REASONS
