"""The most generous combination of a user's roles, and the roles snapshot."""

from __future__ import annotations

import json
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
