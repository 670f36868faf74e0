"""The built wheel is deployable on its own: it carries the Alembic migrations, and a
worker installed from it migrates its ledger without a source checkout."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from zimage_pipeline.ledger.migrate import PROJECT_ROOT

pytestmark = pytest.mark.integration

# Run from the unpacked wheel only: the project's directory is nowhere on the path.
MIGRATE = """
import sys
from sqlalchemy import create_engine
import zimage_pipeline
from zimage_pipeline.ledger import migrate
assert zimage_pipeline.__file__.startswith(sys.argv[1]), zimage_pipeline.__file__
engine = create_engine("sqlite:///" + sys.argv[2])
migrate.upgrade(engine)
print(migrate.script_location(), migrate.current_revision(engine), migrate.head_revision())
"""


def test_wheel_ships_the_migrations_and_migrates_without_a_checkout(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(PROJECT_ROOT), "--no-deps",
         "--no-build-isolation", "-q", "-w", str(tmp_path / "dist")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("zimage_pipeline-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(site)
    assert "zimage_pipeline/_migrations/env.py" in names
    assert {n for n in names if n.startswith("zimage_pipeline/_migrations/versions/")} >= {
        f"zimage_pipeline/_migrations/versions/{p.name}"
        for p in (PROJECT_ROOT / "migrations" / "versions").glob("*.py")
    }
    ran = subprocess.run(
        [sys.executable, "-c", MIGRATE, str(site), str(tmp_path / "ledger.db")],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env={"PYTHONPATH": str(site)},
    )
    assert ran.returncode == 0, ran.stderr
    location, current, head = ran.stdout.split()
    assert location == str(site / "zimage_pipeline" / "_migrations")
    assert current == head and head is not None
