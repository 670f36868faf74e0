"""`check`'s provenance line: signing off warns, a usable chain passes and is verified
against the trust anchors, a chain that cannot sign fails."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from tests.c2pa_test_certs import make_chain, write_chain
from zimage_pipeline import checks
from zimage_pipeline.checks import check_provenance
from zimage_pipeline.settings import ProvenanceSettings, Settings


def settings_with(provenance: ProvenanceSettings) -> Settings:
    return cast(Settings, SimpleNamespace(provenance=provenance))


@pytest.fixture
def chain_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    return write_chain(make_chain(), tmp_path)


def test_signing_off_passes_with_a_warning_that_says_why_and_how() -> None:
    result = check_provenance(settings_with(ProvenanceSettings()))
    assert result.ok and result.warning
    assert result.name == "provenance"
    assert "C2PA signing is off" in result.detail
    assert "verify" in result.detail  # why it matters
    assert "c2pa_enabled = true" in result.detail  # how to turn it on
    assert "scripts/services.sh" in result.detail


def test_signing_on_with_a_chain_its_anchors_trust_passes(
    chain_files: tuple[Path, Path, Path],
) -> None:
    chain_file, key_file, root_file = chain_files
    result = check_provenance(
        settings_with(
            ProvenanceSettings(
                c2pa_enabled=True,
                c2pa_cert_chain_file=chain_file,
                c2pa_private_key_file=key_file,
                c2pa_trust_anchors_file=root_file,
            )
        )
    )
    assert result.ok and not result.warning, result
    assert "zimage-pipeline test signer" in result.detail
    assert f"trusted by {root_file}" in result.detail


def test_signing_on_without_anchors_passes_and_says_so(
    chain_files: tuple[Path, Path, Path],
) -> None:
    chain_file, key_file, _ = chain_files
    result = check_provenance(
        settings_with(
            ProvenanceSettings(
                c2pa_enabled=True, c2pa_cert_chain_file=chain_file, c2pa_private_key_file=key_file
            )
        )
    )
    assert result.ok and not result.warning, result
    assert "no c2pa_trust_anchors_file" in result.detail


def test_a_signer_the_anchors_do_not_trust_is_a_warning(
    chain_files: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    chain_file, key_file, _ = chain_files
    other_root = tmp_path / "other-root.pem"
    other_root.write_text(make_chain().root_pem)
    result = check_provenance(
        settings_with(
            ProvenanceSettings(
                c2pa_enabled=True,
                c2pa_cert_chain_file=chain_file,
                c2pa_private_key_file=key_file,
                c2pa_trust_anchors_file=other_root,
            )
        )
    )
    assert result.ok and result.warning, result
    assert "does not chain to c2pa_trust_anchors_file" in result.detail


def test_a_chain_that_cannot_sign_fails_without_echoing_the_key(
    chain_files: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A root alone is no signer: run_checks turns the ConfigError into a failing line."""
    _, key_file, root_file = chain_files
    settings = settings_with(
        ProvenanceSettings(
            c2pa_enabled=True, c2pa_cert_chain_file=root_file, c2pa_private_key_file=key_file
        )
    )
    monkeypatch.setattr(checks, "ALL_CHECKS", (checks.check_provenance,))
    (result,) = checks.run_checks(settings)
    assert not result.ok and result.name == "provenance", result
    assert "not usable" in result.detail
    assert "BEGIN" not in result.detail
