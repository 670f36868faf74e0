"""Fixtures shared by the integration tests."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.integration.s3_support import storage_settings
from zimage_pipeline.storage import ObjectStore


@pytest.fixture
def prefix() -> Iterator[str]:
    """A key prefix no other test (or concurrent test run) uses; emptied afterwards."""
    value = f"test-{uuid.uuid4().hex[:12]}"
    yield value
    store = ObjectStore(storage_settings())
    for key in list(store.list_keys(value + "/")):
        store.delete_object(key)
