"""`quota show|set|grant` and `users show` against the real slapd and a SQLite ledger."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import require_env, require_port
from zimage_pipeline.cli import app
from zimage_pipeline.ledger.db import create_ledger_engine
from zimage_pipeline.ledger.quota import QuotaLedger
from zimage_pipeline.policy import QuotaLimits
from zimage_pipeline.settings import DatabaseSettings

pytestmark = pytest.mark.integration

DESIGN = "cn=design-team,ou=groups,dc=example,dc=org"


@pytest.fixture
def cli(sqlite_url: str) -> tuple[CliRunner, dict[str, str]]:
    require_env("ZIMAGE_DIRECTORY__BIND_PASSWORD_FILE")
    require_port("slapd", 3389)
    env = {"ZIMAGE_DATABASE__URL": sqlite_url}
    runner = CliRunner()
    upgraded = runner.invoke(app, ["db", "upgrade"], env=env)
    assert upgraded.exit_code == 0, upgraded.output
    return runner, env


def run(cli: tuple[CliRunner, dict[str, str]], *args: str) -> tuple[int, str]:
    runner, env = cli
    result = runner.invoke(app, list(args), env=env)
    return result.exit_code, result.output


def test_users_show_prints_roles_usage_and_remaining(
    cli: tuple[CliRunner, dict[str, str]], sqlite_url: str
) -> None:
    engine = create_ledger_engine(DatabaseSettings(url=sqlite_url))
    QuotaLedger(engine).reserve(
        request_id="r1", user="bob", teams=(), images=3, user_limits=QuotaLimits(), lease_s=60
    )
    engine.dispose()
    code, output = run(cli, "users", "show", "bob", "--json")
    assert code == 0, output
    shown = json.loads(output)
    assert shown["policy"]["roles"] == ["generator"]
    assert DESIGN in shown["groups"]
    user_usage = shown["usage"][0]
    assert user_usage["subject"] == "user:bob"
    assert user_usage["windows"][0]["reserved"] == 3
    assert shown["remaining"]["day"] == 50 - 3  # the shipped generator role: 50 a day

    code, table = run(cli, "users", "show", "jurgen")
    assert code == 0 and "roles     editor, generator" in table
    assert "templates any; free prompts yes" in table and "adapters  any" in table
    code, table = run(cli, "users", "show", "mia")  # marketing: presets only
    assert code == 0 and "templates tag:marketing; free prompts no" in table


def test_denied_users_exit_non_zero_with_the_reason(cli: tuple[CliRunner, dict[str, str]]) -> None:
    assert run(cli, "users", "show", "dave") == (
        1,
        "error: ACCOUNT_DISABLED: the directory account 'dave' is disabled\n",
    )
    code, output = run(cli, "users", "show", "*)(uid=*")
    assert code == 1 and "UNKNOWN_USER" in output


def test_set_and_grant_change_what_show_reports(cli: tuple[CliRunner, dict[str, str]]) -> None:
    assert run(cli, "quota", "set", DESIGN, "--day", "7", "--actor", "ops")[0] == 0
    code, output = run(cli, "quota", "grant", f"team:{DESIGN}", "3", "--id", "t1", "--note", "x")
    assert code == 0 and "+3 this day" in output
    assert "already" in run(cli, "quota", "grant", DESIGN, "3", "--id", "t1")[1]
    code, output = run(cli, "quota", "show", DESIGN, "--json")
    day = json.loads(output)["windows"][0]
    assert (day["limit"], day["granted"], day["remaining"]) == (7, 3, 10)
    assert run(cli, "quota", "set", DESIGN, "--clear")[0] == 0
    code, output = run(cli, "quota", "show", DESIGN, "--json")
    assert json.loads(output)["windows"][0]["limit"] == 200  # back to the policy file's

    # Each change is in the audit chain with its actor, found by the group it concerns;
    # the repeated grant (same --id) added nothing.
    code, output = run(cli, "audit", "query", "--group", DESIGN, "--format", "jsonl")
    assert code == 0, output
    changes = [json.loads(line) for line in output.splitlines()]
    assert sorted(c["status"] for c in changes) == ["quota_granted", *["quota_limit_set"] * 2]
    assert "grant:t1" in {c["request_id"] for c in changes}
    assert {c["principal"] for c in changes} >= {"ops"}
    # The chain of this test's own ledger; the shared store's anchors are other ledgers'.
    assert run(cli, "audit", "verify", "--no-anchors")[0] == 0


def test_quota_change_for_a_user_is_audited_under_the_user(
    cli: tuple[CliRunner, dict[str, str]],
) -> None:
    assert run(cli, "quota", "grant", "bob", "5", "--actor", "ops", "--note", "launch")[0] == 0
    code, output = run(cli, "audit", "query", "--user", "bob", "--format", "jsonl")
    assert code == 0, output
    (change,) = [json.loads(line) for line in output.splitlines()]
    assert (change["status"], change["principal"]) == ("quota_granted", "ops")


def test_bad_arguments_and_an_unmigrated_ledger_are_refused(
    cli: tuple[CliRunner, dict[str, str]], tmp_path: Path
) -> None:
    assert run(cli, "quota", "set", "alice")[0] == 1
    assert run(cli, "quota", "grant", "alice", "2", "--window", "year")[0] == 1
    runner, _env = cli
    empty = {"ZIMAGE_DATABASE__URL": f"sqlite:///{tmp_path / 'empty.db'}"}
    result = runner.invoke(app, ["quota", "show", "alice"], env=empty)
    assert result.exit_code == 1 and "db upgrade" in result.output
