"""One root error; each subclass names its disposition.

The worker decides ack / dead-letter / retry / exit from the exception type alone, in one
table, instead of scattering that decision through the code.
"""

from __future__ import annotations

from enum import StrEnum

from zimage_pipeline.reasons import is_client_reason


class Disposition(StrEnum):
    REJECT = "reject"  # the request itself is wrong: answer `rejected`, dead-letter, never retry
    RETRY = "retry"  # a dependency is down or busy: retry later with backoff
    FAIL = "fail"  # this request cannot succeed: answer `failed`, release its reservation
    FATAL = "fatal"  # the process is unusable (sticky CUDA error): exit non-zero, redeliver


INTERNAL_ERROR = "INTERNAL_ERROR"
INTERNAL_MESSAGE = "the worker failed internally; its operators have the details"


class ZImageError(Exception):
    """Root of every error the product raises on purpose."""

    disposition: Disposition = Disposition.FAIL
    reason: str = INTERNAL_ERROR
    # A defect of ours, not the client's doing nor a dependency's: its reason and text
    # are for operators (the log, the audit trail), never a client's (`client_facing`).
    internal: bool = False

    def audit_details(self) -> dict[str, str]:
        """What the request's ending audit event records besides reason and message."""
        return {}


class InternalStateError(ZImageError):
    """The ledger's state contradicts what the code expected (a job transition the state
    machine forbids, a job that is not there): a defect to fix, not an answer."""

    disposition = Disposition.FAIL
    internal = True


def client_facing(error: ZImageError) -> tuple[str, str]:
    """The (reason, message) a published result may carry for `error`. Internal errors,
    and errors that name no reason of their own (unexpected exceptions), become
    INTERNAL_ERROR with a fixed message: their text may name tables, states or code. So
    do reasons outside the closed list of reasons.py: a result can carry no other."""
    if error.internal or not is_client_reason(error.reason) or error.reason == INTERNAL_ERROR:
        return INTERNAL_ERROR, INTERNAL_MESSAGE
    return error.reason, str(error)


class ConfigError(ZImageError):
    """The configuration is invalid or incomplete; raised at startup, never per request."""

    disposition = Disposition.FATAL
    reason = "CONFIG_ERROR"


# Every command's exit code for a ConfigError; `worker --devices` reads it in a child's
# exit as "the same configuration would fail again: do not restart".
EXIT_CONFIG = 2


class DependencyUnavailable(ZImageError):
    """A service (broker, database, directory, object store) cannot be reached right now."""

    disposition = Disposition.RETRY
    reason = "DEPENDENCY_UNAVAILABLE"


class RequestRejectedError(ZImageError):
    """The request cannot be served as asked; answered `rejected` and never retried."""

    disposition = Disposition.REJECT
    reason = "REJECTED"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class InvalidRequestError(RequestRejectedError):
    """The message is not a valid request: the text names the field(s)."""

    reason = "INVALID_REQUEST"


class JobBusyError(ZImageError):
    """Another worker (or this one) is processing the same request_id right now: the
    delivery comes back later and is then answered from the ledger."""

    disposition = Disposition.RETRY
    reason = "IN_PROGRESS"


class AttemptsExhaustedError(ZImageError):
    """The request was started more often than `worker.max_job_attempts` allows: workers
    keep dying while running it (a poison request) or keep losing it. It ends failed,
    without running again, and its message goes to the DLQ for a person to look at."""

    disposition = Disposition.FAIL
    reason = "ATTEMPTS_EXHAUSTED"


class GenerationTimeoutError(ZImageError):
    """A GPU call ran past its time limit (`worker.generation_timeout_*`). Python cannot
    stop the thread it runs on, so the process is unusable: FATAL, the worker exits and
    the delivery is redelivered to another worker (under `worker.max_job_attempts`)."""

    disposition = Disposition.FATAL
    reason = "GENERATION_TIMEOUT"


class PromptRefusedError(RequestRejectedError):
    """A prompt filter plugin refused the prompt. The result names the rule, never the
    rule list; the audit event names the rule and the plugin."""

    reason = "PROMPT_REFUSED"

    def __init__(self, message: str, *, plugin: str, rule_id: str) -> None:
        super().__init__(f"{message} (rule {rule_id!r})")
        self.plugin = plugin
        self.rule_id = rule_id

    def audit_details(self) -> dict[str, str]:
        return {"plugin": self.plugin, "rule_id": self.rule_id}


class PluginFailedError(ZImageError):
    """A plugin raised, returned something unusable, or ran past the stage's time limit.
    The request ends failed, naming the plugin; its own error is for operators."""

    disposition = Disposition.FAIL
    reason = "PLUGIN_FAILED"

    def __init__(self, plugin: str, stage: str, cause: str) -> None:
        super().__init__(f"PLUGIN_FAILED: {plugin} (the {stage} plugin failed)")
        self.plugin = plugin
        self.stage = stage
        self.cause = cause

    def audit_details(self) -> dict[str, str]:
        return {"plugin": self.plugin, "stage": self.stage, "cause": self.cause}
