#!/usr/bin/env bash
# Build the container image without a container daemon and run it against the local stack.
#
# What it proves: the repository's Dockerfile builds (both stages, unmodified, with only build
# arguments chosen here), the image's configuration is what deployments rely on (numeric
# non-root USER, `tini -- zimage-pipeline` as entrypoint, the HEALTHCHECK kept), and the
# installed package works inside it: `--help`, `model make-tiny` (torch and diffusers import),
# `db upgrade` (the migrations are packaged) and `check` against the local RabbitMQ,
# PostgreSQL, LDAP and S3 services, with the secrets and the model mounted read-only.
# What it does not prove: the CUDA base image and a GPU torch build. The base here is a CPU
# stand-in made with debootstrap (Debian minbase: no Python, like the CUDA runtime images;
# the Dockerfile installs Python with apt) and torch is a CPU wheel.
#
# Steps:
#   1. base: `debootstrap --variant=minbase $DEBIAN_SUITE` from $DEBIAN_MIRROR, imported into
#      buildah's storage as $BASE_IMAGE (skipped when that image exists, unless REBUILD_BASE=1).
#   2. build: `buildah bud --format docker --isolation chroot` of ./Dockerfile with
#      BASE_IMAGE, TORCH_SPEC and TORCH_INDEX_URL as build arguments, tagged $IMAGE.
#   3. inspect: USER numeric and not 0, ENTRYPOINT ends in zimage-pipeline, HEALTHCHECK set,
#      the revision and created labels those of this build.
#   4. run (buildah run, chroot isolation: the host's network, no PID namespace):
#      the entrypoint with --help; make-tiny into a scratch model directory; a scratch
#      PostgreSQL database created, migrated with `db upgrade` and dropped at the end;
#      `check` with the model at the image's model path and every *_FILE of $ZIMAGE_ENV
#      copied (owned by the image's user, mode 0400) and mounted read-only under
#      /run/secrets/zimage. Any failing step exits non-zero.
#
# Needs: root (vfs storage and chroot isolation need no daemon, no user namespace and no
# overlay support), buildah, debootstrap, git, a reachable Debian mirror, an index that
# serves TORCH_SPEC (the build's pip sees only PIP_CONF and the default index), the local
# stack up (scripts/services.sh), and several GB free under $WORK_DIR (vfs copies layers).
#
# Environment (everything machine-specific comes from here, nothing is baked into the image):
#   DEBIAN_MIRROR     required: the Debian archive URL for debootstrap (and for the build's
#                     apt-get, through the base's sources.list)
#   DEBIAN_SUITE      default bookworm (Python 3.11, the version deploy/constraints.txt pins for)
#   TORCH_SPEC        default "torch==2.13.0+cpu"; TORCH_INDEX_URL default "" (the Dockerfile's)
#   PIP_CONF          a pip configuration file mounted at /etc/pip.conf during the build only
#                     (e.g. find-links to a local wheel directory, a proxy's CA bundle)
#   BUILD_VOLUMES     extra `buildah bud -v` specs for the build, whitespace-separated
#                     (e.g. the wheel directory PIP_CONF names, mounted :ro)
#   ZIMAGE_ENV        the local stack's settings (default .local/zimage.env, which
#                     scripts/services.sh writes); ZIMAGE_TEST_POSTGRES_URL in it (or in the
#                     environment) names the PostgreSQL server the scratch database goes on
#   WORK_DIR          default ${TMPDIR:-/tmp}/zimage-image-build: rootfs, buildah storage
#                     (root/ and runroot/), scratch files; reruns reuse its layer cache.
#                     About 12 GB after one build; remove it with rm -rf (as root).
#   BASE_IMAGE        default localhost/zimage-base-cpu:$DEBIAN_SUITE
#   IMAGE             default localhost/zimage-pipeline:<git short revision>
#
# Usage: DEBIAN_MIRROR=http://<mirror>/debian PIP_CONF=... BUILD_VOLUMES=... scripts/build_image.sh
# Not part of scripts/test.sh: it takes minutes and GBs (see docs/deploy.md, "Building the image").
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

: "${DEBIAN_MIRROR:?set DEBIAN_MIRROR to a Debian archive URL (for debootstrap)}"
DEBIAN_SUITE="${DEBIAN_SUITE:-bookworm}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0+cpu}"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-}"
PIP_CONF="${PIP_CONF:-}"
BUILD_VOLUMES="${BUILD_VOLUMES:-}"
ZIMAGE_ENV="${ZIMAGE_ENV:-$ROOT/.local/zimage.env}"
WORK_DIR="${WORK_DIR:-${TMPDIR:-/tmp}/zimage-image-build}"
BASE_IMAGE="${BASE_IMAGE:-localhost/zimage-base-cpu:$DEBIAN_SUITE}"
IMAGE="${IMAGE:-localhost/zimage-pipeline:$(git rev-parse --short HEAD)}"
REBUILD_BASE="${REBUILD_BASE:-0}"

STEP_START=$SECONDS
log() { printf '[build_image %4ds] %s\n' "$((SECONDS - STEP_START))" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

for tool in buildah debootstrap git tar; do
    command -v "$tool" >/dev/null || die "$tool is missing"
done
[[ $EUID -eq 0 ]] || die "run as root (vfs storage with chroot isolation)"
[[ -f "$ZIMAGE_ENV" ]] || die "no settings file $ZIMAGE_ENV (scripts/services.sh up writes it)"
[[ -z "$PIP_CONF" || -f "$PIP_CONF" ]] || die "PIP_CONF $PIP_CONF is not a file"

mkdir -p "$WORK_DIR"
bah=(buildah --root "$WORK_DIR/root" --runroot "$WORK_DIR/runroot" --storage-driver vfs)
SCRATCH="$(mktemp -d "$WORK_DIR/run.XXXXXX")"
CONTAINER=""
DROP_DB=""

cleanup() {
    local rc=$?
    if [[ -n "$DROP_DB" && -n "$CONTAINER" ]]; then
        in_image python3 -c "$DROP_DB" || log "could not drop the scratch database"
    fi
    [[ -n "$CONTAINER" ]] && "${bah[@]}" rm "$CONTAINER" >/dev/null 2>&1
    rm -rf "$SCRATCH"
    exit "$rc"
}
trap cleanup EXIT

# --- 1. the base: Debian minbase, imported into buildah's storage --------------------------
if [[ "$REBUILD_BASE" == 1 ]] || ! "${bah[@]}" inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
    log "base: debootstrap --variant=minbase $DEBIAN_SUITE"
    rootfs="$WORK_DIR/rootfs"
    rm -rf "$rootfs"
    debootstrap --variant=minbase "$DEBIAN_SUITE" "$rootfs" "$DEBIAN_MIRROR" \
        > "$WORK_DIR/debootstrap.log" 2>&1 || die "debootstrap (see $WORK_DIR/debootstrap.log)"
    # What a published base image leaves out: package lists, the build host's resolver and name.
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
    mkdir -p "$rootfs/var/lib/apt/lists/partial"
    : > "$rootfs/etc/resolv.conf"
    : > "$rootfs/etc/hostname"
    tar --numeric-owner -C "$rootfs" -cf "$WORK_DIR/rootfs.tar" .
    base_ctr="$("${bah[@]}" from scratch)"
    "${bah[@]}" add "$base_ctr" "$WORK_DIR/rootfs.tar" / >/dev/null
    "${bah[@]}" config --cmd /bin/bash \
        --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$base_ctr"
    "${bah[@]}" commit --rm --quiet "$base_ctr" "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs" "$WORK_DIR/rootfs.tar"
    log "base: $BASE_IMAGE committed"
else
    log "base: $BASE_IMAGE exists (REBUILD_BASE=1 makes it again)"
fi

# --- 2. the build ---------------------------------------------------------------------------
build_opts=(--format docker --isolation chroot --layers --pull=never)
if [[ -n "$PIP_CONF" ]]; then
    build_opts+=(-v "$(realpath "$PIP_CONF"):/etc/pip.conf:ro")
fi
for spec in $BUILD_VOLUMES; do
    build_opts+=(-v "$spec")
done
revision="$(git rev-parse HEAD)"
created="$(date -u +%FT%TZ)"
# buildah's layer cache ignores a changed build argument that only a LABEL uses (buildah
# issue 5501): a cached rebuild would keep the previous REVISION and CREATED. --label sets
# them on the committed image whatever the cache holds; step 3 checks them.
build_opts+=(--label "org.opencontainers.image.revision=$revision"
             --label "org.opencontainers.image.created=$created")
log "build: $IMAGE from $BASE_IMAGE with $TORCH_SPEC"
"${bah[@]}" bud "${build_opts[@]}" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" \
    --build-arg TORCH_SPEC="$TORCH_SPEC" \
    --build-arg TORCH_INDEX_URL="$TORCH_INDEX_URL" \
    --build-arg REVISION="$revision" \
    --build-arg CREATED="$created" \
    -t "$IMAGE" -f Dockerfile . > "$WORK_DIR/build.log" 2>&1 \
    || { tail -30 "$WORK_DIR/build.log" >&2; die "buildah bud (see $WORK_DIR/build.log)"; }
grep -E '^torch [^ ]+ cuda' "$WORK_DIR/build.log" | sed 's/^/  /' >&2 || true
log "build: done, $("${bah[@]}" images --format '{{.Size}}' "$IMAGE") ($IMAGE)"

# --- 3. the image's configuration -------------------------------------------------------------
user="$("${bah[@]}" inspect --type image --format '{{.Docker.Config.User}}' "$IMAGE")"
mapfile -t entrypoint < <("${bah[@]}" inspect --type image \
    --format '{{range .Docker.Config.Entrypoint}}{{println .}}{{end}}' "$IMAGE")
healthcheck="$("${bah[@]}" inspect --type image --format '{{.Docker.Config.Healthcheck}}' "$IMAGE")"
uid="${user%%:*}"
[[ "$uid" =~ ^[0-9]+$ && "$uid" != 0 ]] || die "USER is '$user', not a numeric non-root uid"
[[ "${entrypoint[-1]:-}" == zimage-pipeline ]] || die "ENTRYPOINT is '${entrypoint[*]}'"
[[ -n "$healthcheck" && "$healthcheck" != "<nil>" ]] || die "the HEALTHCHECK was dropped"
label() {
    "${bah[@]}" inspect --type image \
        --format "{{index .Docker.Config.Labels \"org.opencontainers.image.$1\"}}" "$IMAGE"
}
[[ "$(label revision)" == "$revision" ]] || die "revision label $(label revision), not $revision"
[[ "$(label created)" == "$created" ]] || die "created label $(label created), not $created"
log "image: USER $user, ENTRYPOINT ${entrypoint[*]}, HEALTHCHECK kept, labels of this build"

# --- 4. run it ------------------------------------------------------------------------------
CONTAINER="$("${bah[@]}" from --pull=never --quiet "$IMAGE")"
model_path="$("${bah[@]}" inspect --type image --format '{{range .Docker.Config.Env}}{{println .}}{{end}}' \
    "$IMAGE" | sed -n 's/^ZIMAGE_ENGINE__MODEL_PATH=//p')"
[[ -n "$model_path" ]] || die "the image sets no ZIMAGE_ENGINE__MODEL_PATH"

# Under chroot isolation there is no PID namespace: tini is not PID 1 and says so unless it
# registers as a subreaper.
run_env=(-e TINI_SUBREAPER=1)
run_mounts=()
in_image() {
    "${bah[@]}" run --isolation chroot --network host "${run_env[@]}" "${run_mounts[@]}" \
        "$CONTAINER" -- "$@"
}

log "run: ${entrypoint[*]} --help"
in_image "${entrypoint[@]}" --help > "$SCRATCH/help.txt" || die "--help"
grep -q 'check' "$SCRATCH/help.txt" || die "--help lists no check command"
log "run: --help ok; id in the container: $(in_image id)"

# The model: made by the image itself into a directory its user owns, then mounted read-only.
mkdir -p "$SCRATCH/model"
chown "$user" "$SCRATCH/model"
run_mounts=(-v "$SCRATCH/model:/var/tmp/model")
in_image "${entrypoint[@]}" model make-tiny /var/tmp/model/tiny > "$SCRATCH/tiny.txt" 2>&1 \
    || { cat "$SCRATCH/tiny.txt" >&2; die "model make-tiny"; }
log "run: $(tail -1 "$SCRATCH/tiny.txt")"
run_mounts=(-v "$SCRATCH/model/tiny:$model_path:ro")

# The local stack's settings; each *_FILE is copied for the image's user and mounted read-only.
declare -A settings=()
# shellcheck disable=SC2016  # $1 expands in the inner shell
while IFS='=' read -r name value; do
    settings[$name]="$value"
done < <(env -i bash -c 'set -a; . "$1"; env' _ "$ZIMAGE_ENV" | grep -E '^ZIMAGE_[A-Z0-9_]+=')
mkdir -p "$SCRATCH/secrets"
for name in "${!settings[@]}"; do
    value="${settings[$name]}"
    case "$name" in
        ZIMAGE_TEST_* | ZIMAGE_ENGINE__MODEL_PATH | ZIMAGE_DATABASE__URL | ZIMAGE_CONFIG) continue ;;
        *_FILE)
            [[ -f "$value" ]] || die "$name names $value, which is not a file"
            target="/run/secrets/zimage/${name,,}"
            install -m 0400 -o "${user%%:*}" "$value" "$SCRATCH/secrets/${name,,}"
            run_mounts+=(-v "$SCRATCH/secrets/${name,,}:$target:ro")
            run_env+=(-e "$name=$target")
            ;;
        *) run_env+=(-e "$name=$value") ;;
    esac
done

# A scratch database on the stack's PostgreSQL, created and dropped from inside the image.
pg_url="${ZIMAGE_TEST_POSTGRES_URL:-${settings[ZIMAGE_TEST_POSTGRES_URL]:-}}"
[[ -n "$pg_url" ]] || die "no ZIMAGE_TEST_POSTGRES_URL in $ZIMAGE_ENV or the environment"
db="zimage_image_$(date +%s)_$$"
admin_sql() {
    printf 'import sqlalchemy as sa\nu = sa.make_url(%s).set(database="postgres")\n' "'$pg_url'"
    printf 'e = sa.create_engine(u, isolation_level="AUTOCOMMIT")\n'
    printf 'with e.connect() as c: c.execute(sa.text(%s))\n' "'$1'"
}
in_image python3 -c "$(admin_sql "CREATE DATABASE \"$db\"")" || die "could not create database $db"
DROP_DB="$(admin_sql "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)")"
db_url="$(in_image python3 -c "import sqlalchemy as sa; \
print(sa.make_url('$pg_url').set(database='$db').render_as_string(hide_password=False))")"
run_env+=(-e "ZIMAGE_DATABASE__URL=$db_url")
log "run: db upgrade on scratch database $db"
in_image "${entrypoint[@]}" db upgrade >&2 || die "db upgrade"

log "run: ${entrypoint[*]} check (model at $model_path, $((${#run_mounts[@]} / 2)) read-only mounts)"
in_image "${entrypoint[@]}" check || die "check"
log "all steps passed: $IMAGE"
