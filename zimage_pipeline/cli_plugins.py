"""`zimage-pipeline plugins list`: what is installed, what is enabled, with what settings."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from zimage_pipeline.settings import Settings

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file.")]


def plugin_rows(settings: Settings) -> list[dict[str, Any]]:
    """One row per installed plugin, plus one per configured name nothing provides."""
    from zimage_pipeline.plugins.registry import installed, is_enabled, masked

    tables = settings.plugins.tables()
    rows: list[dict[str, Any]] = []
    for plugin in installed():
        table = tables.get(plugin.name, {})
        rows.append(
            {
                "name": plugin.name,
                "group": plugin.group.value,
                "distribution": plugin.distribution,
                "version": plugin.version,
                "enabled": is_enabled(table),
                "settings": masked({k: v for k, v in table.items() if k != "enabled"}),
            }
        )
    known = {row["name"] for row in rows}
    for name, table in tables.items():
        if name not in known:
            rows.append(
                {
                    "name": name,
                    "group": None,
                    "distribution": None,
                    "version": None,
                    "enabled": is_enabled(table),
                    "settings": masked({k: v for k, v in table.items() if k != "enabled"}),
                    "problem": "configured, but no plugin of this name is installed",
                }
            )
    return rows


def register(plugins_app: typer.Typer, settings_of: Callable[[Path | None], Settings]) -> None:
    @plugins_app.command("list")
    def plugins_list(
        config: ConfigOption = None,
        as_json: Annotated[bool, typer.Option("--json", help="One JSON document.")] = False,
    ) -> None:
        """Installed plugins: group, version, enabled or not, settings (secrets masked)."""
        rows = plugin_rows(settings_of(config))
        if as_json:
            typer.echo(json.dumps(rows, indent=2, default=str))
            return
        for row in rows:
            state = "enabled" if row["enabled"] else "disabled"
            origin = f"{row['distribution']} {row['version']}" if row["distribution"] else "-"
            typer.echo(f"{row['name']:<16} {state:<9} {row['group'] or '-':<32} {origin}")
            if row.get("problem"):
                typer.echo(f"  problem: {row['problem']}")
            if row["settings"]:
                typer.echo(f"  settings: {json.dumps(row['settings'], default=str)}")
