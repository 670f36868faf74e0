"""The most generous combination of a user's roles, and the roles snapshot."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from zimage_pipeline.directory import Identity
from zimage_pipeline.errors import ConfigError
from zimage_pipeline.policy import EffectivePolicy, QuotaLimits, TeamBudget, resolve_policy
from zimage_pipeline.settings import (
    PolicyRules,
    PolicySettings,
    PriorityClass,
    RoleSettings,
    TeamBudgetSettings,
)

GENERATORS = "cn=zimage-generators,ou=groups,dc=example,dc=org"
EDITORS = "cn=editors,ou=groups,dc=example,dc=org"
NEWSROOM = "cn=Rédaction Zürich (Nachrichten),ou=groups,dc=example,dc=org"
DESIGN = "cn=design-team,ou=groups,dc=example,dc=org"
AUDITORS = "cn=zimage-auditors,ou=groups,dc=example,dc=org"

RULES = PolicyRules(
    groups={
        GENERATORS: ("generator",),
        # The server answers with the UTF-8 spelling; the file may use hex escapes.
        "CN=R\\C3\\A9daction Z\\C3\\BCrich \\28Nachrichten\\29,OU=groups,DC=example,DC=org": (
            "newsroom",
        ),
        AUDITORS: ("auditor",),
    },
    roles={
        "generator": RoleSettings(
            max_pixels=1_048_576,
            max_side=1024,
            max_images=4,
            max_steps=12,
            allowed_formats=("png",),
            priority=PriorityClass.STANDARD,
            generate=True,
            images_per_day=50,
            images_per_month=500,
        ),
        "newsroom": RoleSettings(
            max_pixels=2_359_296,
            max_images=2,  # smaller than generator's 4: the larger one wins
            allowed_formats=("jpeg",),
            priority=PriorityClass.INTERACTIVE,
            images_per_day=100,  # sets no monthly quota: generator's 500 stays
        ),
        "auditor": RoleSettings(max_side=4096, delegate=True),
    },
    teams={
        DESIGN: TeamBudgetSettings(images_per_day=200),
        EDITORS.upper(): TeamBudgetSettings(images_per_month=3000),
    },
)


def identity(*groups: str) -> Identity:
    return Identity("jurgen", "uid=jurgen,ou=people,dc=example,dc=org", frozenset(groups), False)


def test_the_most_generous_combination_wins() -> None:
    policy = resolve_policy(identity(NEWSROOM, EDITORS, GENERATORS, AUDITORS), RULES)
    assert policy.roles == ("auditor", "generator", "newsroom")
    assert (policy.max_pixels, policy.max_side, policy.max_images, policy.max_steps) == (
        2_359_296,
        4096,
        4,
        12,
    )
    assert policy.allowed_formats == {"png", "jpeg"}
    assert policy.priority is PriorityClass.INTERACTIVE
    assert policy.allowed_priorities == set(PriorityClass)
    assert policy.generate and policy.delegate
    assert policy.user_quota == QuotaLimits(images_per_day=100, images_per_month=500)
    assert policy.teams == (TeamBudget(EDITORS.upper(), None, 3000),)


def test_no_role_means_nothing_is_allowed() -> None:
    policy = resolve_policy(identity("cn=staff,ou=groups,dc=example,dc=org"), RULES)
    assert policy.roles == ()
    assert not policy.generate and not policy.delegate
    assert policy.allowed_priorities == frozenset()
    assert policy.allowed_formats == frozenset()
    assert policy.user_quota == QuotaLimits(None, None)


def test_team_budgets_follow_membership() -> None:
    policy = resolve_policy(identity(GENERATORS, DESIGN), RULES)
    assert policy.teams == (TeamBudget(DESIGN, 200, None),)
    assert policy.priority is PriorityClass.STANDARD
    assert policy.allowed_priorities == {PriorityClass.BULK, PriorityClass.STANDARD}


def test_snapshot_is_json_and_round_trips() -> None:
    policy = resolve_policy(identity(NEWSROOM, EDITORS, GENERATORS), RULES)
    snapshot = json.loads(json.dumps(policy.to_snapshot()))
    assert snapshot["roles"] == ["generator", "newsroom"]
    assert EffectivePolicy.from_snapshot(snapshot) == policy


def test_adapter_rules_are_the_union_of_the_roles_and_kept_in_the_snapshot() -> None:
    rules = PolicyRules(
        groups={GENERATORS: ("brand-a",), DESIGN: ("brand-b",), EDITORS: ("plain",)},
        roles={
            "brand-a": RoleSettings(generate=True, adapters=("brand-a-style",)),
            "brand-b": RoleSettings(generate=True, adapters=("brand-b-style", "ink")),
            "plain": RoleSettings(generate=True),  # what every role allowed before: any
        },
    )
    both = resolve_policy(identity(GENERATORS, DESIGN), rules)
    assert both.adapters == {"brand-a-style", "brand-b-style", "ink"}
    assert resolve_policy(identity(EDITORS), rules).adapters == {"*"}
    snapshot = json.loads(json.dumps(both.to_snapshot()))
    assert snapshot["adapters"] == ["brand-a-style", "brand-b-style", "ink"]
    assert EffectivePolicy.from_snapshot(snapshot) == both
    del snapshot["adapters"]  # a job recorded before adapter rules existed
    assert EffectivePolicy.from_snapshot(snapshot).adapters == {"*"}
    with pytest.raises(ValueError, match="adapters"):
        RoleSettings(adapters=("../etc/passwd",))


def test_policy_file_and_inline_tables_merge(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(
        f"""
[groups]
"{GENERATORS}" = ["generator"]
[roles.generator]
generate = true
images_per_day = 5
""",
        encoding="utf-8",
    )
    settings = PolicySettings(
        file=path,
        groups={AUDITORS: ("auditor",)},
        roles={"auditor": RoleSettings()},
    )
    rules = settings.load_rules()
    assert set(rules.groups) == {GENERATORS, AUDITORS}
    policy = resolve_policy(identity(GENERATORS), settings)
    assert policy.generate and policy.user_quota.images_per_day == 5


def test_policy_errors_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"No such file"):
        PolicySettings(file=tmp_path / "missing.toml").load_rules()
    bad = tmp_path / "bad.toml"
    bad.write_text('[groups]\n"cn=x" = ["ghost"]\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="undefined roles"):
        PolicySettings(file=bad).load_rules()
    bad.write_text('[roles.r]\nallowed_formats = ["gif"]\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown image formats"):
        PolicySettings(file=bad).load_rules()


def test_shipped_policy_file_is_valid() -> None:
    root = Path(__file__).resolve().parents[2]
    rules = PolicySettings(file=root / "config" / "policy.toml").load_rules()
    assert "generator" in rules.roles and rules.teams


def test_the_shipped_policy_shows_the_three_people_of_the_templates_example() -> None:
    root = Path(__file__).resolve().parents[2]
    rules = PolicySettings(file=root / "config" / "policy.toml").load_rules()
    group = "cn={},ou=groups,dc=example,dc=org".format
    director = resolve_policy(identity(group("design-directors")), rules)
    intern = resolve_policy(identity(group("interns")), rules)
    marketing = resolve_policy(identity(group("marketing")), rules)
    assert director.free_prompt and director.templates == {"*"}
    assert director.user_quota.images_per_day is None
    assert intern.free_prompt and intern.user_quota.images_per_day == 50
    assert not marketing.free_prompt and marketing.templates == {"tag:marketing"}


def test_a_broken_policy_edit_keeps_the_last_good_rules(tmp_path: Path) -> None:
    from zimage_pipeline.policy import load_rules, policy_refused

    path = tmp_path / "policy.toml"
    path.write_text(f'[groups]\n"{GENERATORS}" = ["g"]\n[roles.g]\ngenerate = true\n')
    settings = PolicySettings(file=path)
    good = load_rules(settings)
    assert policy_refused(settings) is None
    path.write_text('[groups]\n"cn=x" = ["ghost"]\n')
    os.utime(path, ns=(1, 1))  # a new modification time, however fast the test runs
    assert load_rules(settings) is good
    refused = policy_refused(settings)
    assert refused is not None and "undefined roles" in refused
    path.write_text(f'[groups]\n"{GENERATORS}" = ["g"]\n[roles.g]\ngenerate = false\n')
    os.utime(path, ns=(2, 2))
    assert not load_rules(settings).roles["g"].generate and policy_refused(settings) is None


def test_a_broken_policy_at_startup_is_an_error(tmp_path: Path) -> None:
    from zimage_pipeline.policy import load_rules

    with pytest.raises(ConfigError, match="No such file"):
        load_rules(PolicySettings(file=tmp_path / "policy.toml"))


def test_paths_in_a_config_file_are_relative_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zimage_pipeline.settings import load_settings

    for name in list(os.environ):
        if name.startswith("ZIMAGE_"):
            monkeypatch.delenv(name)
    config = tmp_path / "etc" / "zimage.toml"
    config.parent.mkdir()
    config.write_text('[policy]\nfile = "rules/policy.toml"\n')
    monkeypatch.chdir(tmp_path)  # not the config file's directory
    settings = load_settings(config)
    assert settings.policy.file == tmp_path / "etc" / "rules" / "policy.toml"
    assert settings.templates.dir == tmp_path / "etc" / "templates"  # the default, too
    monkeypatch.setenv("ZIMAGE_POLICY__FILE", "here.toml")  # the environment's own path
    assert load_settings(config).policy.file == Path("here.toml")


def test_every_path_a_config_file_sets_is_relative_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not only the policy and the templates: a CA bundle, a C2PA chain, and a plugin's
    `*_file` keys (nested ones too) that the file names are its neighbours; absolute
    paths, unset defaults and paths from the environment stay as given."""
    from zimage_pipeline.settings import load_settings

    for name in list(os.environ):
        if name.startswith("ZIMAGE_"):
            monkeypatch.delenv(name)
    config = tmp_path / "etc" / "zimage.toml"
    config.parent.mkdir()
    config.write_text(
        '[broker]\nca_cert_file = "tls/ca.pem"\n'
        '[provenance]\nc2pa_cert_chain_file = "/abs/chain.pem"\n'
        "[plugins.webhook]\n"
        'secret_file = "secrets/shared"\nurls = ["https://cms.example/hook"]\n'
        '[plugins.webhook.publishers.alice]\nsecret_file = "secrets/alice"\n'
    )
    monkeypatch.chdir(tmp_path)
    settings = load_settings(config)
    etc = tmp_path / "etc"
    assert settings.broker.ca_cert_file == etc / "tls" / "ca.pem"
    assert settings.provenance.c2pa_cert_chain_file == Path("/abs/chain.pem")
    assert settings.directory.ca_cert_file is None
    webhook = settings.plugins.tables()["webhook"]
    assert webhook["secret_file"] == str(etc / "secrets" / "shared")
    assert webhook["publishers"]["alice"]["secret_file"] == str(etc / "secrets" / "alice")
    assert webhook["urls"] == ["https://cms.example/hook"]  # not a path: untouched

    monkeypatch.setenv("ZIMAGE_BROKER__CA_CERT_FILE", "mine.pem")
    monkeypatch.setenv("ZIMAGE_PLUGINS__WEBHOOK__SECRET_FILE", "env-secret")
    from_env = load_settings(config)
    assert from_env.broker.ca_cert_file == Path("mine.pem")
    assert from_env.plugins.tables()["webhook"]["secret_file"] == "env-secret"
