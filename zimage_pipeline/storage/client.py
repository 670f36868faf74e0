"""A boto3 S3 client built from settings; any S3-compatible store by configuration alone."""

from __future__ import annotations

from typing import TYPE_CHECKING

import boto3
from botocore.config import Config

from zimage_pipeline.settings import StorageSettings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


def make_s3_client(settings: StorageSettings, *, max_attempts: int = 3) -> S3Client:
    """`max_attempts` is botocore's own retry count; ObjectStore passes 1 and retries
    itself, so that its configured budget is the only one in force."""
    credentials = settings.resolved_credentials()
    verify: bool | str = settings.verify_tls
    if settings.verify_tls and settings.ca_bundle is not None:
        verify = str(settings.ca_bundle)
    config = Config(
        region_name=settings.region,
        signature_version="s3v4",  # presigned URLs too (boto may pick SigV2 for them)
        s3={"addressing_style": settings.addressing_style.value},
        connect_timeout=settings.connect_timeout_s,
        read_timeout=settings.read_timeout_s,
        retries={"mode": "standard", "max_attempts": max_attempts},
        # Checksums are sent explicitly (SHA-256) on every upload; no implicit CRC32.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.client(
        "s3",
        endpoint_url=settings.endpoint_url,
        aws_access_key_id=credentials[0].get_secret_value() if credentials else None,
        aws_secret_access_key=credentials[1].get_secret_value() if credentials else None,
        verify=verify,
        config=config,
    )
