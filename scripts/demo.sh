#!/usr/bin/env bash
# The main job, end to end on the local services: install, start services, migrate the
# ledger, build the tiny test model, and check that every dependency answers.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

step "install (scripts/bootstrap.sh)"
./scripts/bootstrap.sh
step "start local services (scripts/services.sh up)"
./scripts/services.sh up
set -a
# shellcheck source=/dev/null
source .local/zimage.env
set +a
zp=.venv/bin/zimage-pipeline

step "migrate the ledger"
$zp db upgrade
step "build the tiny random-weight model"
if [[ -f "$ZIMAGE_ENGINE__MODEL_PATH/model_index.json" ]]; then
    echo "model already at $ZIMAGE_ENGINE__MODEL_PATH"
else
    $zp model make-tiny "$ZIMAGE_ENGINE__MODEL_PATH"
fi
step "check every dependency"
$zp check
