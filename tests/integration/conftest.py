"""Fixtures shared by the integration tests."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.integration.s3_support import storage_settings
from zimage_pipeline.storage import ObjectStore


@pytest.fixture
def prefix() -> Iterator[str]:
    """A key prefix no other test (or concurrent test run) uses; emptied afterwards, in
    the image bucket and the audit bucket (anchors live there)."""
    value = f"test-{uuid.uuid4().hex[:12]}"
    yield value
    settings = storage_settings()
    store = ObjectStore(settings)
    for bucket in (settings.bucket, settings.audit_bucket):
        for key in list(store.list_keys(value + "/", bucket=bucket)):
            store.delete_object(key, bucket=bucket)
