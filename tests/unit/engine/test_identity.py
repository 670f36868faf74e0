from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest

from zimage_pipeline.engine.identity import CACHE_NAME, file_digests, identify


@pytest.fixture
def model(tmp_path: Path) -> Path:
    root = tmp_path / "model"
    (root / "vae").mkdir(parents=True)
    (root / "model_index.json").write_text('{"_class_name": "ZImagePipeline"}')
    (root / "vae" / "weights.safetensors").write_bytes(b"\x01" * 4096)
    return root


def test_digests_are_the_sha256_of_each_file(model: Path) -> None:
    digests = file_digests(model)
    assert digests["vae/weights.safetensors"] == hashlib.sha256(b"\x01" * 4096).hexdigest()
    assert set(digests) == {"model_index.json", "vae/weights.safetensors"}


def test_the_cache_beside_the_model_is_reused_while_size_and_mtime_hold(
    model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = identify(model, name="m", revision=None, source="local")
    cache = json.loads((model / CACHE_NAME).read_text())
    assert cache["files"]["vae/weights.safetensors"]["size"] == 4096

    def must_not_hash(path: Path) -> str:
        raise AssertionError(f"{path} hashed again although unchanged")

    monkeypatch.setattr("zimage_pipeline.engine.identity._sha256", must_not_hash)
    again = identify(model, name="m", revision=None, source="local")
    assert again.weights_sha256 == first.weights_sha256


def test_a_changed_file_is_hashed_again_and_changes_the_identity(model: Path) -> None:
    before = identify(model, name="m", revision=None, source="local")
    weights = model / "vae" / "weights.safetensors"
    weights.write_bytes(b"\x02" * 4096)  # same size
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    after = identify(model, name="m", revision=None, source="local")
    assert after.weights_sha256 != before.weights_sha256
    assert after.files["vae/weights.safetensors"] == hashlib.sha256(b"\x02" * 4096).hexdigest()


def test_a_read_only_model_directory_still_gets_an_identity(
    model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = hashlib.sha256(b"\x01" * 4096).hexdigest()

    def read_only(self: Path, *args: object, **kwargs: object) -> int:
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "write_text", read_only)
    got = identify(model, name="m", revision=None, source="local")
    assert got.files["vae/weights.safetensors"] == expected
    assert not (model / CACHE_NAME).exists()
    assert not list(model.glob(f"{CACHE_NAME}*")), "no temporary file left behind"
