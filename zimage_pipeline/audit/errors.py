"""Errors of the audit trail."""

from __future__ import annotations

from zimage_pipeline.errors import Disposition, ZImageError


class AuditError(ZImageError):
    """An event that cannot be recorded as given (unknown type, unserialisable payload)."""

    disposition = Disposition.FAIL
    reason = "AUDIT_FAILED"


class ExportError(ZImageError):
    """An export that cannot be written (target not empty, unreadable key)."""

    disposition = Disposition.FAIL
    reason = "AUDIT_EXPORT_FAILED"


class AnchorConflictError(AuditError):
    """An anchor this ledger may not write: another chain's anchor stands at its key, or
    the ledger is not the chain `audit.chain_id` pins. Anchors are locked once written,
    so the write is refused rather than attempted."""

    reason = "AUDIT_ANCHOR_CONFLICT"
