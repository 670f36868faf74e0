"""`zimage-pipeline`: the one command-line entry point."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from zimage_pipeline.cli_audit import register as _register_audit_commands
from zimage_pipeline.cli_plugins import register as _register_plugin_commands
from zimage_pipeline.cli_quota import register as _register_quota_commands
from zimage_pipeline.cli_templates import parse_variables
from zimage_pipeline.cli_templates import register as _register_template_commands
from zimage_pipeline.engine.tiny import DEFAULT_SEED as TINY_MODEL_SEED
from zimage_pipeline.errors import EXIT_CONFIG, ConfigError
from zimage_pipeline.settings import Settings, load_settings

app = typer.Typer(
    help="Z-Image-Turbo generation worker for enterprise content pipelines.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Ledger schema (Alembic).", no_args_is_help=True)
quota_app = typer.Typer(help="Quotas: show, set and grant.", no_args_is_help=True)
users_app = typer.Typer(help="Users as the worker sees them.", no_args_is_help=True)
audit_app = typer.Typer(help="Compliance queries over the audit trail.", no_args_is_help=True)
model_app = typer.Typer(help="Model utilities.", no_args_is_help=True)
plugins_app = typer.Typer(help="Plugins: installed, enabled, settings.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(quota_app, name="quota")
app.add_typer(users_app, name="users")
app.add_typer(audit_app, name="audit")
app.add_typer(model_app, name="model")
templates_app = typer.Typer(
    help="Templates (brand presets): list, show, render, validate.", no_args_is_help=True
)
app.add_typer(plugins_app, name="plugins")
app.add_typer(templates_app, name="templates")

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="TOML config file (default: $ZIMAGE_CONFIG or config/zimage.toml)."
    ),
]


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None


def _require_gpu_stack(command: str) -> None:
    from zimage_pipeline.extras import require_gpu_stack

    try:
        require_gpu_stack(command)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None


@app.command()
def check(config: ConfigOption = None) -> None:
    """Validate the configuration and reach every dependency; non-zero exit if any fails.

    A WARN line (e.g. C2PA signing off) is worth acting on but does not fail the check."""
    from zimage_pipeline.checks import run_checks

    settings = _settings(config)
    typer.echo("PASS config: valid")
    results = run_checks(settings)
    width = max(len(r.name) for r in results)
    for result in results:
        mark = "FAIL" if not result.ok else "WARN" if result.warning else "PASS"
        typer.echo(f"{mark} {result.name + ':':<{width + 1}} {result.detail}")
    warned = [r.name for r in results if r.ok and r.warning]
    if warned:
        typer.echo(f"{len(warned)} warning(s), not failures: {', '.join(warned)}", err=True)
    failed = [r.name for r in results if not r.ok]
    if failed:
        typer.echo(
            f"{len(failed)} of {len(results)} dependencies failed: {', '.join(failed)}", err=True
        )
        raise typer.Exit(1)


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
    config: ConfigOption = None,
) -> None:
    """Migrate the ledger schema up to REVISION (default: head)."""
    from zimage_pipeline.ledger import migrate
    from zimage_pipeline.ledger.db import create_ledger_engine, database_url

    settings = _settings(config)
    engine = create_ledger_engine(settings.database)
    try:
        migrate.upgrade(engine, revision)
        where = database_url(settings.database).render_as_string(hide_password=True)
        typer.echo(f"ledger at {migrate.current_revision(engine)} ({where})")
    finally:
        engine.dispose()


@db_app.command("downgrade")
def db_downgrade(
    revision: Annotated[str, typer.Argument(help="Target revision, e.g. base or -1.")],
    config: ConfigOption = None,
) -> None:
    """Migrate the ledger schema down to REVISION."""
    from zimage_pipeline.ledger import migrate
    from zimage_pipeline.ledger.db import create_ledger_engine

    engine = create_ledger_engine(_settings(config).database)
    try:
        migrate.downgrade(engine, revision)
        typer.echo(f"ledger at {migrate.current_revision(engine) or 'base'}")
    finally:
        engine.dispose()


@db_app.command("current")
def db_current(config: ConfigOption = None) -> None:
    """Print the ledger's schema revision and the newest one this version knows."""
    from zimage_pipeline.ledger import migrate
    from zimage_pipeline.ledger.db import create_ledger_engine

    engine = create_ledger_engine(_settings(config).database)
    try:
        typer.echo(f"current: {migrate.current_revision(engine) or 'base'}")
        typer.echo(f"head:    {migrate.head_revision()}")
    finally:
        engine.dispose()


@app.command()
def worker(
    config: ConfigOption = None,
    devices: Annotated[
        str | None,
        typer.Option(
            help="GPU indexes, e.g. 0,1: one worker process per GPU, each pinned to it "
            "(CUDA_VISIBLE_DEVICES), on port worker.http_port + index, with worker id "
            "<host>-gpu<index>; a worker that exits is restarted alone."
        ),
    ] = None,
) -> None:
    """Consume generation requests from RabbitMQ until SIGTERM (exit 0 after draining)."""
    from zimage_pipeline.cli_worker import run_supervisor_command, run_worker_command

    settings = _settings(config)
    _require_gpu_stack("zimage-pipeline worker")
    if devices is None:
        run_worker_command(settings)
        return
    run_supervisor_command(settings, devices, config=config)


@app.command()
def submit(
    prompt: Annotated[str | None, typer.Option(help="The prompt (Chinese or English).")] = None,
    file: Annotated[Path | None, typer.Option(help="A JSON request; flags override it.")] = None,
    request_id: Annotated[
        str | None, typer.Option(help="Idempotency key (default: random).")
    ] = None,
    on_behalf_of: Annotated[str | None, typer.Option(help="End user (default: yourself).")] = None,
    width: Annotated[int | None, typer.Option()] = None,
    height: Annotated[int | None, typer.Option()] = None,
    steps: Annotated[int | None, typer.Option()] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    num_images: Annotated[int | None, typer.Option()] = None,
    image_format: Annotated[str | None, typer.Option("--format", help="png|webp|jpeg")] = None,
    priority: Annotated[str | None, typer.Option(help="interactive|standard|bulk")] = None,
    label: Annotated[list[str] | None, typer.Option(help="KEY=VALUE, repeatable.")] = None,
    template: Annotated[
        str | None, typer.Option(help="A template of the catalogue: ID or ID@VERSION.")
    ] = None,
    var: Annotated[
        list[str] | None, typer.Option(help="A template slot's NAME=VALUE, repeatable.")
    ] = None,
    wait: Annotated[bool, typer.Option(help="Wait for and print the result.")] = True,
    config: ConfigOption = None,
) -> None:
    """Publish a generation request as client.username and (by default) wait for the result."""
    from zimage_pipeline.cli_worker import build_request_document, submit_command

    settings = _settings(config)
    fields: dict[str, Any] = {
        "prompt": prompt,
        "request_id": request_id,
        "on_behalf_of": on_behalf_of,
        "width": width,
        "height": height,
        "steps": steps,
        "seed": seed,
        "num_images": num_images,
        "format": image_format,
        "priority": priority,
    }
    if template is not None:
        template_id, _, version = template.partition("@")
        ref: dict[str, object] = {"id": template_id}
        if version:
            ref["version"] = int(version) if version.isdigit() else version
        fields["template"] = ref
    if var:
        fields["variables"] = parse_variables(var)
    document = build_request_document(
        file=file, fields=fields, labels=label or [], username=settings.client.username
    )
    submit_command(settings, document, wait=wait)


@app.command()
def cancel(request_id: str, config: ConfigOption = None) -> None:
    """Cancel a request that has not started yet (it ends `cancelled`, nothing charged)."""
    from zimage_pipeline.cli_worker import cancel_command

    cancel_command(_settings(config), request_id)


# quota show|set|grant and users show: zimage_pipeline/cli_quota.py (issue #4).
_register_quota_commands(quota_app, users_app, _settings)


_register_audit_commands(audit_app, app)
_register_plugin_commands(plugins_app, _settings)
_register_template_commands(templates_app, _settings)


@model_app.command("make-tiny")
def model_make_tiny(
    directory: Path,
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = TINY_MODEL_SEED,
    force: Annotated[bool, typer.Option(help="Replace a non-empty DIRECTORY.")] = False,
) -> None:
    """Build a tiny random-weight Z-Image pipeline in diffusers layout in DIRECTORY."""
    from zimage_pipeline.engine.commands import make_tiny_command

    _require_gpu_stack("zimage-pipeline model make-tiny")
    make_tiny_command(directory, seed=seed, force=force)


def main() -> None:
    from sqlalchemy.exc import OperationalError

    try:
        app()
    except OperationalError as exc:
        # The ledger is down or unreachable (a command's own errors are handled where
        # they arise): one line naming the cause, not a driver's traceback. The URL is
        # not shown: it is in the settings, and may name a user.
        cause = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        typer.echo(f"error: the ledger cannot be reached: {cause}", err=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
