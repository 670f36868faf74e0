"""The tamper-evident audit trail: hash-chained events, anchors in S3, queries, exports."""

from __future__ import annotations

from zimage_pipeline.audit.anchoring import Anchor, AnchorSurvey, ChainAnchorer
from zimage_pipeline.audit.chain import (
    EVENT_TYPES,
    GENESIS_HASH,
    AuditEvent,
    AuditLog,
    canonical,
    event_hash,
)
from zimage_pipeline.audit.errors import AnchorConflictError, AuditError, ExportError
from zimage_pipeline.audit.export import export_bundle, verify_bundle
from zimage_pipeline.audit.index import STATUSES
from zimage_pipeline.audit.queries import (
    AuditFilter,
    RequestSummary,
    query_requests,
    request_story,
)
from zimage_pipeline.audit.retention import apply_prompt_retention
from zimage_pipeline.audit.verify import BrokenEvent, VerifyReport, verify_chain

__all__ = [
    "EVENT_TYPES",
    "GENESIS_HASH",
    "STATUSES",
    "Anchor",
    "AnchorConflictError",
    "AnchorSurvey",
    "AuditError",
    "AuditEvent",
    "AuditFilter",
    "AuditLog",
    "BrokenEvent",
    "ChainAnchorer",
    "ExportError",
    "RequestSummary",
    "VerifyReport",
    "apply_prompt_retention",
    "canonical",
    "event_hash",
    "export_bundle",
    "query_requests",
    "request_story",
    "verify_bundle",
    "verify_chain",
]
