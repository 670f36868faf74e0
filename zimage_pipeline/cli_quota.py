"""`zimage-pipeline quota show|set|grant` and `users show`: quotas as the worker sees them.

Subjects: a username (`alice`, or `user:alice`), or a group DN (`cn=design-team,...`, or
`team:<DN>`) for a team's pooled budget. `set` and `grant` are recorded in the ledger as
entries naming the actor (default: the operating-system user running the command).
"""

from __future__ import annotations

import getpass
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from zimage_pipeline.errors import ZImageError
from zimage_pipeline.settings import Settings

if TYPE_CHECKING:
    from zimage_pipeline.ledger.quota import QuotaLedger
    from zimage_pipeline.ledger.quota_types import QuotaStatus
    from zimage_pipeline.policy import EffectivePolicy, QuotaLimits
    from zimage_pipeline.wiring.quota_admin import AuditedQuotaAdmin

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="TOML config file (default: $ZIMAGE_CONFIG or config/zimage.toml)."
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
ActorOption = Annotated[
    str | None, typer.Option("--actor", help="Who makes the change (default: the OS user).")
]
NoteOption = Annotated[str | None, typer.Option("--note", help="Why (kept with the entry).")]

EXIT_FAILED = 1


def register(
    quota_app: typer.Typer, users_app: typer.Typer, load: Callable[[Path | None], Settings]
) -> None:
    """Attach the commands; `load` is cli.py's settings loader (exit 2 on a bad config)."""

    @quota_app.command("show")
    def quota_show(subject: str, config: ConfigOption = None, as_json: JsonOption = False) -> None:
        """Show the quota, usage and remaining budget of a USER or GROUP (DN)."""
        settings = load(config)
        with _ledger(settings) as ledger:
            key, limits, note = _subject_limits(settings, subject)
            status = ledger.usage(key, limits=limits)
        _emit(as_json, _status_json(status), lambda: _print_status(status, note))

    @quota_app.command("set")
    def quota_set(
        subject: str,
        day: Annotated[int | None, typer.Option("--day", min=0, help="Images per UTC day.")] = None,
        month: Annotated[
            int | None, typer.Option("--month", min=0, help="Images per UTC month.")
        ] = None,
        clear: Annotated[bool, typer.Option("--clear", help="Back to the policy's.")] = False,
        actor: ActorOption = None,
        note: NoteOption = None,
        config: ConfigOption = None,
    ) -> None:
        """Override a USER's or GROUP's limits (unset windows keep the policy's)."""
        if clear == (day is not None or month is not None):
            _fail("give --day and/or --month, or --clear alone")
        settings = load(config)
        key = _subject_key(subject)
        with _admin(settings) as admin:
            admin.set_limit(
                key, images_per_day=day, images_per_month=month, actor=_actor(actor), note=note
            )
        typer.echo(f"{key}: " + ("override removed" if clear else f"day={day} month={month}"))

    @quota_app.command("grant")
    def quota_grant(
        subject: str,
        images: Annotated[int, typer.Argument(min=1, help="Images to add.")],
        window: Annotated[str, typer.Option("--window", help="day | month")] = "day",
        grant_id: Annotated[
            str | None, typer.Option("--id", help="Idempotency key: a repeat is a no-op.")
        ] = None,
        actor: ActorOption = None,
        note: NoteOption = None,
        config: ConfigOption = None,
    ) -> None:
        """Grant a one-off top-up to the current day or month (a ledger entry and an audit
        event)."""
        from zimage_pipeline.ledger.quota_types import Window

        if window not in {w.value for w in Window}:
            _fail("--window must be day or month")
        settings = load(config)
        key = _subject_key(subject)
        with _admin(settings) as admin:
            done = admin.grant(
                key,
                images,
                window=Window(window),
                actor=_actor(actor),
                note=note,
                grant_id=grant_id,
            )
        typer.echo(f"{key}: +{images} this {window}" if done else f"{key}: grant already made")

    @users_app.command("show")
    def users_show(user: str, config: ConfigOption = None, as_json: JsonOption = False) -> None:
        """Show a user's groups, roles, limits, usage and remaining quota."""
        from zimage_pipeline.ledger.quota_types import team_subject, user_subject

        settings = load(config)
        effective, identity = _resolve(settings, user)
        with _ledger(settings) as ledger:
            statuses = [ledger.usage(user_subject(effective.username), limits=effective.user_quota)]
            statuses += [
                ledger.usage(team_subject(t.group), limits=t.limits) for t in effective.teams
            ]
            left = ledger.remaining(
                user=effective.username, teams=effective.teams, user_limits=effective.user_quota
            )
        document = {
            "user": effective.username,
            "dn": identity.dn,
            "groups": sorted(identity.groups),
            "policy": effective.to_snapshot(),
            "usage": [_status_json(s) for s in statuses],
            "remaining": {"day": left.day, "month": left.month},
        }
        _emit(as_json, document, lambda: _print_user(document, effective, statuses))


# -- helpers ------------------------------------------------------------------------------


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(EXIT_FAILED)


def _actor(actor: str | None) -> str:
    return actor or getpass.getuser()


@contextmanager
def _ledger(settings: Settings) -> Iterator[QuotaLedger]:
    with _admin(settings) as admin:
        yield admin.quota


@contextmanager
def _admin(settings: Settings) -> Iterator[AuditedQuotaAdmin]:
    """The quota ledger with the audit chain: changes are written with their event."""
    from zimage_pipeline.ledger import migrate
    from zimage_pipeline.ledger.db import create_ledger_engine
    from zimage_pipeline.wiring.quota_admin import AuditedQuotaAdmin

    engine = create_ledger_engine(settings.database)
    try:
        try:
            current, head = migrate.current_revision(engine), migrate.head_revision()
        except Exception as exc:  # the message may name the server, never a password
            _fail(f"ledger unreachable: {type(exc).__name__}")
        if current != head:
            _fail(
                f"ledger schema at {current or 'empty'}, need {head}: run `zimage-pipeline db upgrade`"
            )
        yield AuditedQuotaAdmin(engine, settings.audit)
    except ZImageError as exc:
        _fail(f"{exc.reason}: {exc}")
    finally:
        engine.dispose()


def _subject_key(subject: str) -> str:
    from zimage_pipeline.ledger.quota_types import (
        TEAM_PREFIX,
        USER_PREFIX,
        team_subject,
        user_subject,
    )

    if subject.startswith(TEAM_PREFIX):
        return team_subject(subject.removeprefix(TEAM_PREFIX))
    if subject.startswith(USER_PREFIX):
        return subject
    return team_subject(subject) if "=" in subject else user_subject(subject)


def _subject_limits(settings: Settings, subject: str) -> tuple[str, QuotaLimits, str | None]:
    """The subject's ledger key and its policy limits (overrides are applied by usage)."""
    from zimage_pipeline.ledger.quota_types import TEAM_PREFIX, USER_PREFIX
    from zimage_pipeline.policy import QuotaLimits, load_rules

    key = _subject_key(subject)
    if key.startswith(TEAM_PREFIX):
        from zimage_pipeline.ledger.quota_types import team_subject

        for group, budget in _rules(settings, load_rules).teams.items():
            if team_subject(group) == key:
                return key, QuotaLimits(budget.images_per_day, budget.images_per_month), None
        return key, QuotaLimits(), "no team budget in the policy for this group"
    try:
        effective, _identity = _resolve(
            settings, key.removeprefix(USER_PREFIX), exit_on_error=False
        )
    except ZImageError as exc:
        return key, QuotaLimits(), f"policy limits unknown ({exc.reason}): showing overrides only"
    return key, effective.user_quota, None


def _rules(settings: Settings, load_rules: Callable[..., Any]) -> Any:
    try:
        return load_rules(settings.policy)
    except ZImageError as exc:
        _fail(str(exc))


def _resolve(
    settings: Settings, user: str, *, exit_on_error: bool = True
) -> tuple[EffectivePolicy, Any]:
    from zimage_pipeline.directory import LdapDirectory
    from zimage_pipeline.policy import load_rules, resolve_policy

    rules = _rules(settings, load_rules)
    try:
        with LdapDirectory(settings.directory, pool_size=1) as directory:
            identity = directory.lookup(user)
    except ZImageError as exc:
        if not exit_on_error:
            raise
        _fail(f"{exc.reason}: {exc}")
    return resolve_policy(identity, rules), identity


def _status_json(status: QuotaStatus) -> dict[str, Any]:
    return {
        "subject": status.subject,
        "windows": [
            {
                "window": w.window.value,
                "period": w.period,
                "used": w.used,
                "reserved": w.reserved,
                "granted": w.granted,
                "limit": w.limit,
                "remaining": w.remaining,
            }
            for w in status.windows
        ],
    }


def _emit(as_json: bool, document: dict[str, Any], table: Callable[[], None]) -> None:
    if as_json:
        typer.echo(json.dumps(document, indent=2, ensure_ascii=False))
    else:
        table()


def _cell(value: int | None) -> str:
    return "-" if value is None else str(value)


def _print_status(status: QuotaStatus, note: str | None = None) -> None:
    typer.echo(status.subject)
    typer.echo(
        f"  {'window':<7}{'period':<12}{'used':>7}{'reserved':>10}{'granted':>9}{'limit':>8}{'remaining':>11}"
    )
    for w in status.windows:
        typer.echo(
            f"  {w.window.value:<7}{w.period:<12}{w.used:>7}{w.reserved:>10}{w.granted:>9}"
            f"{_cell(w.limit):>8}{_cell(w.remaining):>11}"
        )
    if note:
        typer.echo(f"  note: {note}")


def _names(allowed: frozenset[str]) -> str:
    """A role rule's names for people: `any` for `*`, `none` for nothing."""
    if "*" in allowed:
        return "any"
    return ", ".join(sorted(allowed)) or "none"


def _print_user(
    document: dict[str, Any], effective: EffectivePolicy, statuses: list[QuotaStatus]
) -> None:
    typer.echo(f"user      {document['user']} ({document['dn']})")
    for i, group in enumerate(document["groups"]):
        typer.echo(f"{'groups' if i == 0 else '':<10}{group}")
    typer.echo(f"roles     {', '.join(effective.roles) or '(none: every request is denied)'}")
    typer.echo(
        f"limits    max_pixels {effective.max_pixels}, max_side {effective.max_side}, "
        f"max_images {effective.max_images}, max_steps {effective.max_steps}"
    )
    typer.echo(f"formats   {', '.join(sorted(effective.allowed_formats)) or '-'}")
    typer.echo(f"priority  {effective.priority.value if effective.roles else '-'}")
    typer.echo(
        f"generate  {'yes' if effective.generate else 'no'}; delegate {'yes' if effective.delegate else 'no'}"
    )
    # What a request of this user may name (README: templates, LoRA style adapters).
    typer.echo(
        f"templates {_names(effective.templates)}; free prompts {'yes' if effective.free_prompt else 'no'}"
    )
    typer.echo(f"adapters  {_names(effective.adapters)}")
    for status in statuses:
        _print_status(status)
    left = document["remaining"]
    typer.echo(
        f"remaining day {_cell(left['day'])}, month {_cell(left['month'])} (tightest budget)"
    )
