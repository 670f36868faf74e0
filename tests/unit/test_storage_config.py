"""The storage adapter's botocore configuration is accepted by the installed botocore
(request_checksum_calculation needs botocore 1.36: the floor test runs this at the
lowest allowed versions) and signs with SigV4, without a network round trip."""

from __future__ import annotations

from pydantic import SecretStr

from zimage_pipeline.settings import StorageSettings
from zimage_pipeline.storage.client import make_s3_client


def test_the_s3_client_builds_with_explicit_checksums_and_sigv4() -> None:
    settings = StorageSettings(
        endpoint_url="http://127.0.0.1:9",  # never contacted
        access_key_id=SecretStr("AKIDEXAMPLE"),
        secret_access_key=SecretStr("not-a-real-secret"),
    )
    client = make_s3_client(settings, max_attempts=1)
    config = client.meta.config
    assert config.request_checksum_calculation == "when_required"
    assert config.response_checksum_validation == "when_required"
    assert config.retries["mode"] == "standard"
    url = client.generate_presigned_url(
        "get_object", Params={"Bucket": "zimage-images", "Key": "a/b.png"}, ExpiresIn=60
    )
    assert url.startswith("http://127.0.0.1:9/zimage-images/a/b.png?")
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in url
