"""`zimage-pipeline check` against the real local services."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT, require_env
from zimage_pipeline.engine.loader import COMPONENTS

pytestmark = pytest.mark.integration


def run_check(env_overrides: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **env_overrides}
    return subprocess.run(
        [sys.executable, "-m", "zimage_pipeline.cli", "check"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def ready_env(tmp_path: Path) -> dict[str, str]:
    """Settings for the local stack with a migrated SQLite ledger and a model directory."""
    require_env("ZIMAGE_DIRECTORY__BIND_PASSWORD_FILE")
    db_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text('{"_class_name": "ZImagePipeline"}', encoding="utf-8")
    for component in COMPONENTS:  # the layout the worker checks before loading weights
        (model / component).mkdir()
    env = {"ZIMAGE_DATABASE__URL": db_url, "ZIMAGE_ENGINE__MODEL_PATH": str(model)}
    subprocess.run(
        [sys.executable, "-m", "zimage_pipeline.cli", "db", "upgrade"],
        cwd=PROJECT_ROOT,
        env={**os.environ, **env},
        check=True,
        capture_output=True,
        timeout=120,
    )
    return env


def test_all_dependencies_pass(ready_env: dict[str, str], tmp_path: Path) -> None:
    result = run_check(ready_env, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for name in ("config", "broker", "database", "directory", "object store", "model"):
        assert any(line.startswith(f"PASS {name}:") for line in lines), (name, result.stdout)
    assert "certificate verified" in result.stdout


@pytest.mark.parametrize(
    ("name", "overrides", "expected"),
    [
        ("broker", {"ZIMAGE_BROKER__PORT": "1"}, "127.0.0.1:1"),
        (
            "database",
            {"ZIMAGE_DATABASE__URL": "postgresql+psycopg://postgres@127.0.0.1:1/x"},
            "127.0.0.1:1/x",
        ),
        ("directory", {"ZIMAGE_DIRECTORY__URL": "ldap://127.0.0.1:1"}, "127.0.0.1:1"),
        ("object store", {"ZIMAGE_STORAGE__ENDPOINT_URL": "http://127.0.0.1:1"}, "127.0.0.1:1"),
        ("model", {"ZIMAGE_ENGINE__MODEL_PATH": "/nonexistent/model"}, "not found"),
    ],
)
def test_unreachable_dependency_is_named_and_fails(
    ready_env: dict[str, str], tmp_path: Path, name: str, overrides: dict[str, str], expected: str
) -> None:
    result = run_check({**ready_env, **overrides}, tmp_path)
    assert result.returncode == 1, result.stdout
    failing = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failing) == 1, result.stdout
    assert failing[0].startswith(f"FAIL {name}:")
    assert expected in failing[0]
    assert name in result.stderr


def test_a_granted_input_bucket_is_reached_too(ready_env: dict[str, str], tmp_path: Path) -> None:
    shipped = (PROJECT_ROOT / "config" / "policy.toml").read_text(encoding="utf-8")
    assert '"cms-publisher" = ["zimage-inputs/cms/"]' in shipped
    passing = run_check(ready_env, tmp_path)
    assert "image inputs from zimage-inputs" in passing.stdout, passing.stdout
    policy = tmp_path / "policy.toml"
    policy.write_text(
        shipped.replace('"zimage-inputs/cms/"', '"zimage-no-such-bucket/cms/"'), encoding="utf-8"
    )
    result = run_check({**ready_env, "ZIMAGE_POLICY__FILE": str(policy)}, tmp_path)
    assert result.returncode == 1, result.stdout
    failing = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failing) == 1 and failing[0].startswith("FAIL object store:"), result.stdout
    assert "zimage-no-such-bucket" in failing[0]


def test_wrong_credentials_fail_without_leaking_them(
    ready_env: dict[str, str], tmp_path: Path
) -> None:
    overrides = {
        "ZIMAGE_DIRECTORY__BIND_PASSWORD": "wrong-ldap-pw-123",
        "ZIMAGE_STORAGE__SECRET_ACCESS_KEY": "wrong-s3-key-456",
        "ZIMAGE_BROKER__PASSWORD": "wrong-amqp-pw-789",
    }
    result = run_check({**ready_env, **overrides}, tmp_path)
    assert result.returncode == 1
    failing = {line.split(":")[0] for line in result.stdout.splitlines() if line.startswith("FAIL")}
    assert failing == {"FAIL broker", "FAIL directory", "FAIL object store"}, result.stdout
    for secret in overrides.values():
        assert secret not in result.stdout + result.stderr


def test_unverifiable_directory_certificate_fails(
    ready_env: dict[str, str], tmp_path: Path
) -> None:
    """TLS verification is on by default: without the local CA the directory check fails."""
    result = run_check(
        {**ready_env, "ZIMAGE_DIRECTORY__CA_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt"},
        tmp_path,
    )
    assert result.returncode == 1
    assert any(line.startswith("FAIL directory:") for line in result.stdout.splitlines()), (
        result.stdout
    )


def test_schema_behind_head_is_reported(tmp_path: Path, ready_env: dict[str, str]) -> None:
    empty_db = f"sqlite:///{tmp_path / 'empty.db'}"
    result = run_check({**ready_env, "ZIMAGE_DATABASE__URL": empty_db}, tmp_path)
    assert result.returncode == 1
    assert "zimage-pipeline db upgrade" in result.stdout


def test_c2pa_signing_off_is_a_warning_not_a_failure(
    ready_env: dict[str, str], tmp_path: Path
) -> None:
    result = run_check({**ready_env, "ZIMAGE_PROVENANCE__C2PA_ENABLED": "false"}, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert not [line for line in lines if line.startswith("FAIL")], result.stdout
    (warning,) = [line for line in lines if line.startswith("WARN")]
    assert warning.startswith("WARN provenance:"), warning
    # It says what is off, why that matters and how to turn it on.
    assert "C2PA signing is off" in warning
    assert "verify" in warning
    assert "c2pa_enabled = true" in warning and "c2pa_cert_chain_file" in warning
    assert "provenance" in result.stderr


def test_local_stack_signs_with_a_chain_its_root_trusts(
    ready_env: dict[str, str], tmp_path: Path
) -> None:
    """scripts/services.sh up generates a C2PA chain and turns signing on: `check` signs a
    sample with it and verifies it against the local root."""
    anchors = require_env("ZIMAGE_PROVENANCE__C2PA_TRUST_ANCHORS_FILE")
    result = run_check(ready_env, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    (line,) = [line for line in result.stdout.splitlines() if " provenance:" in line]
    assert line.startswith("PASS provenance: "), line
    assert "C2PA signing on (es256)" in line and f"trusted by {anchors}" in line, line


def test_c2pa_chain_that_cannot_sign_fails(ready_env: dict[str, str], tmp_path: Path) -> None:
    """A root alone is no signer (C2PA refuses self-signed and CA certificates)."""
    anchors = require_env("ZIMAGE_PROVENANCE__C2PA_TRUST_ANCHORS_FILE")
    result = run_check({**ready_env, "ZIMAGE_PROVENANCE__C2PA_CERT_CHAIN_FILE": anchors}, tmp_path)
    assert result.returncode == 1, result.stdout
    failing = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failing) == 1 and failing[0].startswith("FAIL provenance:"), result.stdout
    assert "not usable" in failing[0]
