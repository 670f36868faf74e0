"""Settings of the shared SeaweedFS for the integration tests (the `prefix` fixture, a
private key prefix, is in conftest.py)."""

from __future__ import annotations

from typing import Any

from tests.conftest import require_env, require_port
from zimage_pipeline.settings import StorageSettings, load_settings


def storage_settings(**overrides: Any) -> StorageSettings:
    require_env("ZIMAGE_STORAGE__ACCESS_KEY_ID_FILE")
    base = load_settings().storage
    require_port("SeaweedFS S3", 8333)
    return base.model_copy(update={"backoff_base_s": 0.01, "backoff_max_s": 0.05, **overrides})
