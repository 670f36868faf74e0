"""The engine's CLI commands (cli.py delegates here so that it stays free of torch)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from zimage_pipeline.errors import ConfigError


def make_tiny_command(directory: Path, *, seed: int, force: bool) -> None:
    from zimage_pipeline.engine.identity import identify
    from zimage_pipeline.engine.tiny import make_tiny_model

    start = time.perf_counter()
    try:
        path = make_tiny_model(directory, seed=seed, force=force)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    identity = identify(path, name=path.name, revision=None, source="local")
    typer.echo(
        f"tiny Z-Image pipeline (seed {seed}) in {path} "
        f"sha256 {identity.weights_sha256[:16]} ({time.perf_counter() - start:.1f}s)"
    )
