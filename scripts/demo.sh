#!/usr/bin/env bash
# The main job, end to end on the local services: install, start services, migrate the
# ledger, build the tiny test model, check that every dependency answers, then start two
# workers and run the scenario of zimage_pipeline/demo.py (a CMS hero image with
# renditions, a batch that runs into its quota, a user without the generation role, a
# refused prompt, a malformed message, every result also sent to a signed webhook), show
# the audit trail of the run and verify the chain. Exits non-zero if any outcome differs.
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

step "turn on the demo's plugins (config/demo-plugins.toml -> .local/demo.toml)"
# The project's config plus the demo's plugin tables: a prompt filter, renditions and a
# webhook to the scenario's own receiver (ZIMAGE_DEMO_WEBHOOK_PORT, default 9479).
WEBHOOK_PORT=${ZIMAGE_DEMO_WEBHOOK_PORT:-9479}
if [[ ! -s .local/secrets/webhook_demo ]]; then
    (umask 077; .venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(32))' \
        >.local/secrets/webhook_demo)
fi
# (.local/demo.toml lives one directory over: its neighbours are named from there.)
{ sed 's|^file = "policy.toml"|file = "../config/policy.toml"|; s|^dir = "templates"|dir = "../config/templates"|' \
    config/zimage.toml; echo; \
  sed "s|@WEBHOOK_URL@|http://127.0.0.1:$WEBHOOK_PORT/hooks/zimage|" config/demo-plugins.toml; } \
    >.local/demo.toml
export ZIMAGE_CONFIG=.local/demo.toml
$zp plugins list

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

# -- the scenario: two workers, real requests, a results table, the audit trail --------
RUN_ID="demo-$(date -u +%Y%m%dT%H%M%S)-$$"
LOGS=.local/logs
mkdir -p "$LOGS"
read -r -a WORKER_PORTS <<<"${ZIMAGE_DEMO_HTTP_PORTS:-9471 9472}"
for port in "${WORKER_PORTS[@]}" "$WEBHOOK_PORT"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "port 127.0.0.1:$port is taken; set ZIMAGE_DEMO_HTTP_PORTS=\"P1 P2\" or ZIMAGE_DEMO_WEBHOOK_PORT" >&2; exit 1
    fi
done
WORKER_PIDS=()

stop_workers() {  # SIGTERM, wait, report; fails if a worker does not exit 0
    local rc=0 i pid code
    for i in "${!WORKER_PIDS[@]}"; do
        pid=${WORKER_PIDS[$i]}
        kill -TERM "$pid" 2>/dev/null || true
    done
    for i in "${!WORKER_PIDS[@]}"; do
        pid=${WORKER_PIDS[$i]}
        code=0; wait "$pid" || code=$?
        echo "worker demo-worker-$((i + 1)) (pid $pid) exited $code"
        [[ $code == 0 ]] || rc=1
    done
    WORKER_PIDS=()
    return $rc
}
on_exit() {
    local rc=$?
    stop_workers || true
    [[ $rc == 0 ]] || echo "demo FAILED (exit $rc); worker logs: $LOGS/demo-worker-*.log" >&2
}
trap on_exit EXIT

ready() {  # ready PORT: the worker's /readyz answers 200 (curl may be missing on a fresh host)
    .venv/bin/python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
        "http://127.0.0.1:$1/readyz" 2>/dev/null
}

step "start two workers (logs in $LOGS/)"
for i in 1 2; do
    ZIMAGE_WORKER__WORKER_ID="demo-worker-$i" ZIMAGE_WORKER__HTTP_PORT="${WORKER_PORTS[$((i - 1))]}" \
        $zp worker >"$LOGS/demo-worker-$i.log" 2>&1 &
    WORKER_PIDS+=($!)
done
for i in 1 2; do
    port=${WORKER_PORTS[$((i - 1))]}
    printf 'waiting for demo-worker-%s (http://127.0.0.1:%s/readyz)' "$i" "$port"
    for _ in $(seq 240); do
        ready "$port" && break
        if ! kill -0 "${WORKER_PIDS[$((i - 1))]}" 2>/dev/null; then
            echo; echo "demo-worker-$i exited; its log:" >&2; tail -20 "$LOGS/demo-worker-$i.log" >&2
            exit 1
        fi
        printf '.'; sleep 0.5
    done
    ready "$port" || {
        echo; echo "demo-worker-$i not ready after 240 tries; see $LOGS/demo-worker-$i.log" >&2; exit 1; }
    echo " ready"
done

step "scenario $RUN_ID"
.venv/bin/python -m zimage_pipeline.demo --run-id "$RUN_ID" --client-secrets-dir .local/secrets

step "audit query for this run"
$zp audit query --label "demo.run=$RUN_ID" --limit 0
step "audit verify"
$zp audit verify

step "stop the workers (SIGTERM)"
stop_workers
echo
echo "demo passed (run $RUN_ID)"
