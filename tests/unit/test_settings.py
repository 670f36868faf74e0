from __future__ import annotations

from pathlib import Path

import pytest

from zimage_pipeline.errors import ConfigError
from zimage_pipeline.settings import Settings, load_settings

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIG = PROJECT_ROOT / "config" / "zimage.toml"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("ZIMAGE_"):
            monkeypatch.delenv(name)


def test_shipped_config_sets_every_key_to_its_default() -> None:
    """config/zimage.toml documents every key with the code's default."""
    import tomllib

    shipped = tomllib.loads(CONFIG.read_text(encoding="utf-8"))
    defaults = Settings.model_construct().model_dump(mode="json")
    for section, fields in defaults.items():
        assert section in shipped, f"[{section}] missing from config/zimage.toml"
        for key, value in fields.items():
            if value is None:  # optional keys (secrets, files) are documented as comments
                assert f"# {key} = " in CONFIG.read_text(encoding="utf-8"), f"{section}.{key}"
                continue
            assert shipped[section].get(key) == value, f"{section}.{key}"


def test_environment_overrides_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZIMAGE_BROKER__HOST", "rabbit.internal")
    monkeypatch.setenv("ZIMAGE_ENGINE__MAX_BATCH", "2")
    settings = load_settings(CONFIG)
    assert settings.broker.host == "rabbit.internal"
    assert settings.engine.max_batch == 2
    assert settings.broker.port == 5672  # untouched keys keep the file's value


def test_secrets_are_masked_in_repr_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZIMAGE_BROKER__PASSWORD", "hunter2-secret")
    settings = load_settings(CONFIG)
    assert settings.broker.resolved_password().get_secret_value() == "hunter2-secret"
    assert "hunter2-secret" not in repr(settings)
    assert "hunter2-secret" not in str(settings.model_dump())

    monkeypatch.setenv("ZIMAGE_BROKER__PORT", "not-a-port")
    with pytest.raises(ConfigError) as excinfo:
        load_settings(CONFIG)
    assert "broker.port" in str(excinfo.value)
    assert "hunter2-secret" not in str(excinfo.value)


def test_secret_file_is_read_without_trailing_newline(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n", encoding="utf-8")
    settings = load_settings(CONFIG, broker={"password_file": secret})
    assert settings.broker.resolved_password().get_secret_value() == "s3cret"


def test_unreadable_secret_file_names_the_setting(tmp_path: Path) -> None:
    settings = load_settings(CONFIG, broker={"password_file": tmp_path / "missing"})
    with pytest.raises(ConfigError, match=r"broker\.password_file"):
        settings.broker.resolved_password()


def test_unknown_key_is_rejected_by_name(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[broker]\nhots = "x"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"broker\.hots"):
        load_settings(bad)


def test_password_in_database_url_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[database]\nurl = "postgresql://u:topsecret@db/x"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as excinfo:
        load_settings(bad)
    assert "must not contain a password" in str(excinfo.value)
    assert "topsecret" not in str(excinfo.value)


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "nope.toml")


def test_job_attempts_must_leave_room_for_the_transient_retries() -> None:
    with pytest.raises(ConfigError, match=r"max_job_attempts \(5\) must exceed"):
        load_settings(worker={"max_attempts": 5, "max_job_attempts": 5})
