"""Errors of provenance marking and reading."""

from __future__ import annotations

from zimage_pipeline.errors import Disposition, ZImageError


class ProvenanceError(ZImageError):
    """An image could not be marked (or read): the request fails, nothing is stored."""

    disposition = Disposition.FAIL
    reason = "PROVENANCE_FAILED"
