"""`zimage-pipeline templates list|show|render|validate`: the catalogue as the worker sees
it. `validate DIR` runs the worker's own checks offline (for the brand team's CI);
`render` prints the exact prompt a request would run with."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from zimage_pipeline.errors import ZImageError
from zimage_pipeline.settings import Settings

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file.")]
DirOption = Annotated[
    Path | None, typer.Option("--dir", help="A catalogue directory (default: templates.dir).")
]
EXIT_INVALID = 1


def parse_variables(pairs: list[str]) -> dict[str, str]:
    variables = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise typer.BadParameter(f"--var {pair!r}: expected NAME=VALUE")
        if name in variables:
            raise typer.BadParameter(f"--var {name}: given twice")
        variables[name] = value
    return variables


def register(templates_app: typer.Typer, settings_of: Callable[[Path | None], Settings]) -> None:
    from zimage_pipeline.templates.catalogue import Catalogue, load_catalogue

    def catalogue_of(directory: Path | None, config: Path | None) -> Catalogue:
        if directory is None:
            directory = settings_of(config).templates.dir
        if directory is None:
            typer.echo("error: no templates directory (templates.dir)", err=True)
            raise typer.Exit(EXIT_INVALID)
        try:
            return load_catalogue(directory)
        except ZImageError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(EXIT_INVALID) from None

    @templates_app.command("validate")
    def templates_validate(directory: Path) -> None:
        """Check a catalogue directory as the worker would load it: exit 1 naming the
        file and line of the first problem."""
        catalogue = catalogue_of(directory, None)
        typer.echo(f"ok: {len(catalogue)} templates in {directory}")

    @templates_app.command("list")
    def templates_list(
        directory: DirOption = None,
        config: ConfigOption = None,
        as_json: Annotated[bool, typer.Option("--json", help="One JSON document.")] = False,
    ) -> None:
        """Every template (newest version): id, version, tags, slots, description."""
        rows: list[dict[str, Any]] = [
            {
                "id": e.template.id,
                "version": e.template.version,
                "tags": list(e.template.tags),
                "slots": sorted(e.template.slots),
                "free_prompt": e.template.takes_prompt,
                "file": e.file,
                "sha256": e.sha256,
                "description": e.template.description,
            }
            for e in catalogue_of(directory, config).latest()
        ]
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
            return
        for row in rows:
            tags = ",".join(row["tags"]) or "-"
            typer.echo(f"{row['id']:<24} v{row['version']:<4} {tags:<28} {row['description']}")

    @templates_app.command("show")
    def templates_show(
        template_id: str,
        version: Annotated[int | None, typer.Option(help="A version (default: newest).")] = None,
        directory: DirOption = None,
        config: ConfigOption = None,
    ) -> None:
        """One template as loaded, with its file and SHA-256 (JSON)."""
        from pydantic import ValidationError

        from zimage_pipeline.decoding import describe_validation_error
        from zimage_pipeline.messages import TemplateRef

        catalogue = catalogue_of(directory, config)
        try:
            entry = catalogue.resolve(TemplateRef(id=template_id, version=version))
        except ValidationError as exc:
            typer.echo(f"error: template: {describe_validation_error(exc)}", err=True)
            raise typer.Exit(EXIT_INVALID) from None
        except ZImageError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(EXIT_INVALID) from None
        shown = {"file": entry.file, "sha256": entry.sha256, **entry.template.model_dump()}
        typer.echo(json.dumps(shown, indent=2, default=str))

    @templates_app.command("render")
    def templates_render(
        template_id: str,
        var: Annotated[list[str] | None, typer.Option(help="NAME=VALUE, repeatable.")] = None,
        prompt: Annotated[str | None, typer.Option(help="For a template's {prompt}.")] = None,
        version: Annotated[int | None, typer.Option()] = None,
        directory: DirOption = None,
        config: ConfigOption = None,
    ) -> None:
        """The request a template and these values would run, prompts included (JSON)."""
        from zimage_pipeline.decoding import decode_request
        from zimage_pipeline.templates.render import render_request

        catalogue = catalogue_of(directory, config)
        document = {
            "request_id": "render-preview",
            "on_behalf_of": "preview",
            "template": {"id": template_id, **({} if version is None else {"version": version})},
            "variables": parse_variables(var or []),
            **({"prompt": prompt} if prompt else {}),
        }
        try:
            request = decode_request(json.dumps(document).encode())
            rendered = render_request(catalogue, request)
        except ZImageError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(EXIT_INVALID) from None
        shown = rendered.model_dump(
            mode="json", by_alias=True, exclude={"request_id", "on_behalf_of", "schema_"}
        )
        typer.echo(json.dumps(shown, indent=2, ensure_ascii=False))
