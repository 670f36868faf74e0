"""The policy's input grants are parsed as the policy loads: a malformed one refuses the
file at startup (naming the file and the publisher) and a reload that breaks one keeps
the last good policy; a loaded grant is a typed object, a folder of a bucket."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT
from zimage_pipeline.errors import ConfigError
from zimage_pipeline.inputs.model import InputGrant, parse_grant, parse_grants
from zimage_pipeline.policy import load_rules, policy_refused
from zimage_pipeline.settings import PolicySettings

GOOD = '[inputs]\n"cms-publisher" = ["zimage-inputs/cms/"]\n'


@pytest.mark.parametrize(
    ("text", "grant"),
    [
        ("zimage-inputs/cms/", InputGrant("zimage-inputs", "cms")),
        ("zimage-inputs/cms", InputGrant("zimage-inputs", "cms")),
        ("zimage-inputs/cms/2026/", InputGrant("zimage-inputs", "cms/2026")),
        ("zimage-inputs", InputGrant("zimage-inputs", "")),
        ("zimage-inputs/", InputGrant("zimage-inputs", "")),
    ],
)
def test_grants_parse_to_a_bucket_and_a_folder(text: str, grant: InputGrant) -> None:
    assert parse_grant(text) == grant


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("Zimage/cms/", "bucket 'Zimage' must be lowercase"),
        ("10.0.0.1/cms/", "must not be an IP address"),
        ("zimage-inputs/../cms/", "'..' segments"),
        ("zimage-inputs/cms/./x/", "'.' segments"),
        ("zimage-inputs//cms/", "empty segments"),
        ("zimage-inputs/cms//", "empty segments"),
        ("zimage-inputs/cms\n/", "control characters"),
    ],
)
def test_malformed_grants_are_refused_naming_the_problem(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_grant(text)


def test_a_grant_that_is_not_a_list_names_the_publisher() -> None:
    with pytest.raises(ValueError, match="publisher 'cms-publisher': a list"):
        parse_grants({"cms-publisher": "zimage-inputs/cms/"})


def test_the_shipped_policy_loads_typed_grants() -> None:
    rules = load_rules(PolicySettings(file=PROJECT_ROOT / "config" / "policy.toml"))
    assert rules.inputs["cms-publisher"] == (InputGrant("zimage-inputs", "cms"),)
    assert str(rules.inputs["cms-publisher"][0]) == "zimage-inputs/cms/"


def test_a_malformed_grant_stops_startup_naming_the_file_and_the_publisher(
    tmp_path: Path,
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[inputs]\n"cms-publisher" = ["zimage-inputs/cms/../secrets/"]\n')
    with pytest.raises(ConfigError) as refused:
        load_rules(PolicySettings(file=policy))
    message = str(refused.value)
    assert str(policy) in message
    assert "'cms-publisher'" in message and "'..' segments" in message


def test_an_inline_grant_is_checked_like_the_files(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(GOOD)
    settings = PolicySettings(file=policy, inputs={"pim-sync": ("zimage-inputs//pim",)})
    with pytest.raises(ConfigError, match=r"'pim-sync'.*empty segments"):
        load_rules(settings)


def test_a_reload_that_breaks_a_grant_keeps_the_last_good_policy(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(GOOD)
    settings = PolicySettings(file=policy)
    good = load_rules(settings)
    policy.write_text('[inputs]\n"cms-publisher" = ["xn--inputs/cms/"]\n')
    os.utime(policy, ns=(1, 1))  # another mtime, as an edit would give it
    assert load_rules(settings) is good
    refused = policy_refused(settings)
    assert refused is not None and "'cms-publisher'" in refused and "'xn--'" in refused
    policy.write_text(GOOD.replace("cms/", "cms2/"))
    os.utime(policy, ns=(2, 2))
    assert load_rules(settings).inputs["cms-publisher"] == (InputGrant("zimage-inputs", "cms2"),)
    assert policy_refused(settings) is None
