#!/usr/bin/env bash
# The test command: install, start the local services, then lint, type-check and test.
# Any extra arguments go to pytest (e.g. scripts/test.sh tests/unit -k settings).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/bootstrap.sh
./scripts/services.sh up
set -a
# shellcheck source=/dev/null
source .local/zimage.env
set +a

echo "== ruff check"
.venv/bin/ruff check .
echo "== ruff format --check"
.venv/bin/ruff format --check .
echo "== mypy --strict"
.venv/bin/mypy
echo "== pytest"
exec .venv/bin/pytest "$@"
