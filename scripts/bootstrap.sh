#!/usr/bin/env bash
# Creates .venv and installs the project with its dev tools. Idempotent and quick when
# nothing changed (a stamp keyed on pyproject.toml).
#
# torch comes first, on its own: `torch==2.13.0` resolves to the CPU build on the
# development and CI machines, while a bare `torch` requirement would pull several GB of
# CUDA packages. A GPU host installs its CUDA build of torch into the venv before running
# this script (or sets ZIMAGE_TORCH_SPEC); an importable torch is never replaced.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${ZIMAGE_VENV:-.venv}"
TORCH_SPEC="${ZIMAGE_TORCH_SPEC:-torch==2.13.0}"
PYTHON="${PYTHON:-python3}"

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "bootstrap: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    echo "bootstrap: installing $TORCH_SPEC"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check $TORCH_SPEC 2>&1 \
        | grep -v "is ignored: it is neither a file nor a directory" || true
    "$VENV/bin/python" -c "import torch" || { echo "bootstrap: torch install failed" >&2; exit 1; }
fi

stamp="$VENV/.zimage-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]] \
    || ! "$VENV/bin/python" -c "import zimage_pipeline" >/dev/null 2>&1; then
    echo "bootstrap: installing zimage-pipeline and its dependencies"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -e ".[gpu,dev]" 2>&1 \
        | grep -v "is ignored: it is neither a file nor a directory" || true
    "$VENV/bin/python" -c "import zimage_pipeline, torch, diffusers" \
        || { echo "bootstrap: install failed" >&2; exit 1; }
    echo "$want" > "$stamp"
fi
echo "bootstrap: ready ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
