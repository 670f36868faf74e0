"""Finding, enabling and loading plugins: Python entry points, configured by name.

Discovery is the packaging ecosystem's: every installed distribution's entry points in
the groups of `api.Group` (the built-in plugins are registered the same way, in this
project's pyproject.toml). Enabling is the operator's: `[plugins.<name>] enabled = true`.
A plugin's factory gets its own table only, without `enabled`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from zimage_pipeline.errors import ConfigError
from zimage_pipeline.plugins.api import Group, PostProcessor, PromptFilter, ResultSink

# Setting names whose values `plugins list` never shows (a `*_file` names a path).
_SECRET_KEY = re.compile(r"(secret|password|passwd|token|api_?key|private_?key|credential)", re.I)


@dataclass(frozen=True, slots=True)
class InstalledPlugin:
    name: str
    group: Group
    target: str  # module:attribute of the factory
    distribution: str | None
    version: str | None


@dataclass(slots=True)
class LoadedPlugins:
    """The enabled plugins, each group in the configuration's order."""

    prompt_filters: list[tuple[str, PromptFilter]] = field(default_factory=list)
    postprocessors: list[tuple[str, PostProcessor]] = field(default_factory=list)
    result_sinks: dict[str, ResultSink] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [
            *(n for n, _ in self.prompt_filters),
            *(n for n, _ in self.postprocessors),
            *self.result_sinks,
        ]


def _installed_entry(group: Group, ep: EntryPoint) -> InstalledPlugin:
    dist = ep.dist
    return InstalledPlugin(
        name=ep.name,
        group=group,
        target=ep.value,
        distribution=dist.metadata["Name"] if dist is not None else None,
        version=dist.version if dist is not None else None,
    )


def installed() -> list[InstalledPlugin]:
    """Every plugin installed in this environment, by group then name."""
    found: dict[tuple[Group, str], InstalledPlugin] = {}
    for group in Group:
        for ep in entry_points(group=group.value):
            # The same distribution can be seen twice (an editable install and its
            # metadata); one entry per group and name.
            found.setdefault((group, ep.name), _installed_entry(group, ep))
    return sorted(found.values(), key=lambda p: (list(Group).index(p.group), p.name))


def is_enabled(table: Mapping[str, Any]) -> bool:
    value = table.get("enabled", False)
    if isinstance(value, str):  # from an environment variable
        return value.strip().lower() in {"1", "true", "yes", "on"}
    return bool(value)


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(key)) and not key.endswith("_file")


def masked(table: Mapping[str, Any]) -> dict[str, Any]:
    """The table as `plugins list` shows it: secret-looking values replaced."""
    shown: dict[str, Any] = {}
    for key, value in table.items():
        if is_secret_key(key):
            shown[key] = "********"
        elif isinstance(value, Mapping):
            shown[key] = masked(value)
        else:
            shown[key] = value
    return shown


def _find(name: str, plugins: list[InstalledPlugin]) -> InstalledPlugin:
    matches = [p for p in plugins if p.name == name]
    if not matches:
        known = ", ".join(sorted({p.name for p in plugins})) or "none"
        raise ConfigError(
            f"plugins.{name}: enabled, but no plugin of that name is installed (installed: {known})"
        )
    if len(matches) > 1:
        groups = ", ".join(p.group.value for p in matches)
        raise ConfigError(f"plugins.{name}: the name is ambiguous, installed in {groups}")
    return matches[0]


def _create(plugin: InstalledPlugin, table: Mapping[str, Any]) -> Any:
    config = {k: v for k, v in table.items() if k != "enabled"}
    ep = EntryPoint(name=plugin.name, value=plugin.target, group=plugin.group.value)
    try:
        factory = ep.load()
        return factory(config)
    except ConfigError as exc:
        raise ConfigError(f"plugin {plugin.name!r} cannot load: {exc}") from exc
    except Exception as exc:  # anything a third party's import or factory raises
        raise ConfigError(
            f"plugin {plugin.name!r} cannot load: {type(exc).__name__}: {exc}"
        ) from exc


_METHOD = {
    Group.PROMPT_FILTERS: "check",
    Group.POSTPROCESSORS: "process",
    Group.RESULT_SINKS: "deliver",
}


def load_enabled(tables: Mapping[str, Mapping[str, Any]]) -> LoadedPlugins:
    """Load every enabled plugin; ConfigError naming the first one that cannot load."""
    plugins = installed()
    loaded = LoadedPlugins()
    for name, table in tables.items():
        if not is_enabled(table):
            continue
        plugin = _find(name, plugins)
        instance = _create(plugin, table)
        method = _METHOD[plugin.group]
        if not callable(getattr(instance, method, None)):
            raise ConfigError(
                f"plugin {name!r} cannot load: its factory returned an object without "
                f"{method}() (group {plugin.group.value})"
            )
        if plugin.group is Group.PROMPT_FILTERS:
            loaded.prompt_filters.append((name, instance))
        elif plugin.group is Group.POSTPROCESSORS:
            loaded.postprocessors.append((name, instance))
        else:
            loaded.result_sinks[name] = instance
    return loaded
