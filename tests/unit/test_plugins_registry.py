"""Plugins: discovery through entry points, enabling by name, loading errors, masking."""

from __future__ import annotations

from typing import Any

import pytest

from zimage_pipeline.errors import ConfigError
from zimage_pipeline.messages import GenerationRequest
from zimage_pipeline.plugins import registry
from zimage_pipeline.plugins.api import Group, PromptSubject
from zimage_pipeline.plugins.prompt_filter import create as deny_list
from zimage_pipeline.plugins.prompt_filter import normalise
from zimage_pipeline.settings import load_settings

WHO = PromptSubject("alice", "alice", ("editor",))


def request(prompt: str, negative: str | None = None) -> GenerationRequest:
    return GenerationRequest(
        request_id="r1", on_behalf_of="alice", prompt=prompt, negative_prompt=negative
    )


def test_the_built_in_plugins_are_installed_as_entry_points() -> None:
    found = {(p.name, p.group) for p in registry.installed()}
    assert ("deny_list", Group.PROMPT_FILTERS) in found
    assert ("renditions", Group.POSTPROCESSORS) in found
    assert ("webhook", Group.RESULT_SINKS) in found


def test_an_installed_plugin_without_enabled_true_is_not_loaded() -> None:
    loaded = registry.load_enabled({"deny_list": {"rules": "not even valid"}})
    assert loaded.names == []


def test_an_enabled_plugin_gets_its_own_table_without_enabled() -> None:
    tables = {"deny_list": {"enabled": "true", "rules": [{"id": "x", "words": ["foo"]}]}}
    loaded = registry.load_enabled(tables)
    assert [name for name, _ in loaded.prompt_filters] == ["deny_list"]


def test_a_plugin_that_cannot_load_is_named() -> None:
    with pytest.raises(ConfigError, match=r"plugin 'deny_list' cannot load: rules"):
        registry.load_enabled({"deny_list": {"enabled": True, "rules": []}})


def test_an_enabled_name_nothing_provides_is_named_with_what_is_installed() -> None:
    with pytest.raises(ConfigError, match=r"plugins.nope: enabled, but no plugin.*deny_list"):
        registry.load_enabled({"nope": {"enabled": True}})


def test_secrets_are_masked_but_file_paths_are_not() -> None:
    shown = registry.masked(
        {"secret": "s3cr3t", "secret_file": "/run/x", "api_key": "k", "urls": ["http://a"]}
    )
    assert shown == {
        "secret": "********",
        "secret_file": "/run/x",
        "api_key": "********",
        "urls": ["http://a"],
    }


def test_plugin_tables_come_from_the_environment_too(monkeypatch: Any, tmp_path: Any) -> None:
    config = tmp_path / "zimage.toml"
    config.write_text('[plugins.deny_list]\nrules = [{id = "a", words = ["foo"]}]\n')
    monkeypatch.setenv("ZIMAGE_PLUGINS__DENY_LIST__ENABLED", "true")
    monkeypatch.setenv("ZIMAGE_PLUGINS__STAGE_TIMEOUT_S", "7")
    settings = load_settings(config)
    assert settings.plugins.stage_timeout_s == 7
    table = settings.plugins.tables()["deny_list"]
    assert registry.is_enabled(table) and table["rules"] == [{"id": "a", "words": ["foo"]}]


def test_a_plugin_key_that_is_not_a_table_is_a_config_error(tmp_path: Any) -> None:
    config = tmp_path / "zimage.toml"
    config.write_text("[plugins]\ndeny_list = 3\n")
    with pytest.raises(ConfigError, match=r"plugins.deny_list must be a table"):
        load_settings(config)


@pytest.mark.parametrize(
    "prompt",
    [
        *("foo", "FOO", "\uff46\uff4f\uff4f", "f\u200boo", "f\u00adoo", "a\u2060 foo!", "Foo-bar"),
        # Invisible but not category Cf: grapheme joiner, variation selector, Mongolian
        # free variation selector, Hangul filler (found by a probe: they got through).
        *("f\u034foo", "fo\ufe0fo", "f\u180boo", "f\u3164oo", "f\U000e0020oo"),
    ],
)
def test_normalised_forms_of_a_word_are_refused(prompt: str) -> None:
    rules = deny_list({"rules": [{"id": "house-1", "words": ["foo"]}]})
    refusal = rules.check(request(prompt), WHO)
    assert refusal is not None and refusal.rule_id == "house-1"


@pytest.mark.parametrize("prompt", ["food", "buffoon", "f o o", "a cat"])
def test_other_words_pass(prompt: str) -> None:
    rules = deny_list({"rules": [{"id": "house-1", "words": ["foo"]}]})
    assert rules.check(request(prompt), WHO) is None


def test_patterns_phrases_roles_and_the_negative_prompt() -> None:
    rules = deny_list(
        {
            "rules": [
                {"id": "codes", "patterns": [r"\bsku-\d{4}\b"]},
                {"id": "phrase", "words": ["red  Car"]},
                {"id": "interns", "words": ["logo"], "roles": ["intern"]},
                {"id": "neg", "words": ["blood"], "negative_prompt": True},
            ]
        }
    )
    assert rules.check(request("show SKU-1234 now"), WHO).rule_id == "codes"  # type: ignore[union-attr]
    assert rules.check(request("a RED car"), WHO).rule_id == "phrase"  # type: ignore[union-attr]
    assert rules.check(request("our logo"), WHO) is None  # editors may
    intern = PromptSubject("bob", "bob", ("intern",))
    assert rules.check(request("our logo"), intern).rule_id == "interns"  # type: ignore[union-attr]
    assert rules.check(request("a cat", "blood"), WHO).rule_id == "neg"  # type: ignore[union-attr]


def test_a_bad_rule_is_a_config_error_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"rules.0.patterns"):
        deny_list({"rules": [{"id": "x", "patterns": ["("]}]})
    with pytest.raises(ConfigError, match=r"duplicate ids \['x'\]"):
        deny_list({"rules": [{"id": "x", "words": ["a"]}, {"id": "x", "words": ["b"]}]})


def test_normalise_folds_width_case_and_invisible_characters() -> None:
    assert normalise("  \uff26\uff2f\uff2f\u200b\u200dBAR\u00a0 baz ") == "foobar baz"
