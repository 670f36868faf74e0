"""Where a 1.5 MB PUT spends its time in the local SeaweedFS: its volume server directly,
its filer, and its S3 gateway (a plain HTTP client with a presigned URL, and boto3).

    python bench/s3_path.py   (needs `scripts/services.sh up` and `.local/zimage.env`)

The control plane's overhead target (bench/NOTES.md) includes one such upload; this says
how much of it is the store's own layering. Ports are the ones scripts/services.sh uses.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import urllib3

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zimage_pipeline.settings import load_settings  # noqa: E402
from zimage_pipeline.storage import ObjectStore  # noqa: E402

MASTER = "http://127.0.0.1:19333"
FILER = "http://127.0.0.1:18888"
PAYLOAD = os.urandom(1_500_000)
ROUNDS = 40


def p50_ms(run: Callable[[int], None]) -> float:
    times = []
    for i in range(ROUNDS):
        started = time.perf_counter()
        run(i)
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1000, 2)


def main() -> None:
    http = urllib3.PoolManager()
    store = ObjectStore(load_settings().storage)
    bucket = store.settings.bucket
    prefix = f"s3-path-{uuid.uuid4().hex[:8]}"

    def volume(_: int) -> None:
        assigned = json.loads(http.request("GET", f"{MASTER}/dir/assign").data)
        url = f"http://{assigned['url']}/{assigned['fid']}"
        response = http.request("PUT", url, fields={"file": ("blob", PAYLOAD)})
        assert response.status in (200, 201), response.data

    def filer(i: int) -> None:
        response = http.request("PUT", f"{FILER}/{prefix}/filer-{i}", body=PAYLOAD)
        assert response.status in (200, 201), response.data

    def gateway_plain(i: int) -> None:
        url = store.client.generate_presigned_url(
            "put_object", Params={"Bucket": bucket, "Key": f"{prefix}/plain-{i}"}, ExpiresIn=60
        )
        response = http.request("PUT", url, body=PAYLOAD)
        assert response.status == 200, response.data

    def gateway_boto3(i: int) -> None:
        store.client.put_object(Bucket=bucket, Key=f"{prefix}/boto3-{i}", Body=PAYLOAD)

    result = {
        "benchmark": "s3_path",
        "payload_bytes": len(PAYLOAD),
        "rounds": ROUNDS,
        "put_ms_p50": {
            "volume_server_direct (assign + PUT)": p50_ms(volume),
            "filer": p50_ms(filer),
            "s3_gateway_presigned_plain_http": p50_ms(gateway_plain),
            "s3_gateway_boto3": p50_ms(gateway_boto3),
        },
    }
    http.request("DELETE", f"{FILER}/{prefix}/?recursive=true")
    for key in list(store.list_keys(prefix + "/")):
        store.delete_object(key)
    out = ROOT / "bench" / "results" / "s3_path.json"
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
