#!/usr/bin/env bash
# Local services for development, the demo and the tests, all on loopback:
#   RabbitMQ   127.0.0.1:5672   (system service; started or installed if missing)
#   PostgreSQL 127.0.0.1:5432   (system service; started or installed if missing)
#   OpenLDAP   127.0.0.1:3389   (slapd run by this script from .local/ldap, StartTLS; LDAPS on 3636)
#   SeaweedFS  127.0.0.1:8333   (S3 API, `weed server -s3` from .local/s3, access keys required)
#
#   scripts/services.sh up      start what is not running (idempotent), seed, write .local/zimage.env
#   scripts/services.sh down    stop only what this script started
#   scripts/services.sh status  say what runs where
#
# Secrets for the local stack are generated once into .local/secrets (mode 600) and reach
# the application only as *_FILE settings in .local/zimage.env. So does a local C2PA
# signing chain (.local/c2pa): the demo's and the tests' images carry a signed manifest.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
LOCAL="$ROOT/.local"
VENV="${ZIMAGE_VENV:-$ROOT/.venv}"
STARTED="$LOCAL/started"
SECRETS="$LOCAL/secrets"
LDAP_PORT=3389
LDAPS_PORT=3636
S3_PORT=8333
LDAP_BASE="dc=example,dc=org"
LDAP_ADMIN_DN="cn=admin,$LDAP_BASE"
LDAP_BIND_DN="uid=zimage-svc,ou=services,$LDAP_BASE"
PG_DATABASE=zimage
BUCKETS=(zimage-images zimage-audit zimage-inputs)

log() { echo "services: $*"; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") >/dev/null 2>&1; }
wait_port() {  # wait_port PORT NAME [TRIES] [PID]: fails early if PID exits
    local port=$1 name=$2 tries=${3:-120} pid=${4:-}
    for _ in $(seq "$tries"); do
        port_open "$port" && return 0
        if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; then
            log "$name exited while starting (see its log under .local)" >&2; return 1
        fi
        sleep 0.5
    done
    log "$name did not open 127.0.0.1:$port" >&2; return 1
}
apt_install() {
    log "installing Debian packages: $*"
    if [[ ! -f "$LOCAL/.apt-updated" ]]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq && touch "$LOCAL/.apt-updated"
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
secret() {  # secret NAME [VALUE]: create once, print the file path
    local f="$SECRETS/$1"
    if [[ ! -s "$f" ]]; then
        (umask 077; if [[ $# -ge 2 ]]; then printf '%s' "$2" >"$f"; else
            head -c 24 /dev/urandom | base64 | tr -d '/+=\n' >"$f"; fi)
    fi
    echo "$f"
}

rabbitmq_up() {
    if port_open 5672; then log "rabbitmq: running on 127.0.0.1:5672"; return; fi
    command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
    log "rabbitmq: starting"
    rabbitmq-server -detached
    touch "$STARTED/rabbitmq"
    wait_port 5672 rabbitmq 240
}

# A delay-queue copy that expires while its target quorum queue is still recovering from a
# broker restart is kept (at-least-once dead-lettering) and re-sent after this many ms;
# RabbitMQ's default is 180 s, which holds such a retry three minutes. Runtime setting of
# the running node (kept across stop_app/start_app); in production set it in
# advanced.config (docs/deploy.md, "RabbitMQ settings").
DEAD_LETTER_RESEND_MS=10000
rabbitmq_tuning() {
    rabbitmqctl -q eval "application:set_env(rabbit, dead_letter_worker_publisher_confirm_timeout, $DEAD_LETTER_RESEND_MS)." >/dev/null \
        && log "rabbitmq: dead-letter resend interval ${DEAD_LETTER_RESEND_MS} ms"
}

# AMQP accounts: the worker's own, and one per test/demo client. RabbitMQ validates the
# user_id property against the connection's user, which is how the worker knows who
# published a request. Clients may only publish requests, cancels and read results.
AMQP_WORKER=zimage-worker
AMQP_CLIENTS=(alice bob carol dave jurgen cms-publisher pim-sync)
PERMS_WORKER=('^zimage\..*' '^zimage\..*' '^zimage\..*')
# The queues a client may declare, bind, read and delete: randomly named ones (the
# server's amq.gen-*, aio-pika's amq_<uuid4 hex>: 122 random bits, and exclusive ones
# belong to their connection) and named ones under its own account, `<account>.<name>`
# (a CMS's durable `cms-publisher.results`). Never another account's: with one shared
# pattern, bob could read or delete alice's durable results queue by its name. RabbitMQ
# expands no {username} in these, so each account gets its own.
client_queues() {
    printf 'amq\\.gen-.*|amq_[0-9a-f]{32}|%s\\..*' "$(sed 's/[][\\.^$*+?(){}|]/\\&/g' <<<"$1")"
}
# zimage[.<namespace>].requests: a deployment (or a test) may namespace its names.
perms_client() {
    local queues; queues="$(client_queues "$1")"
    printf '%s\n' "^($queues)\$" "^(zimage(\\.[a-z0-9]+)?\\.requests|$queues)\$" \
        "^(zimage(\\.[a-z0-9]+)?\\.results|$queues)\$"
}
# Topic permissions on the results exchange: a client may bind only the routing keys of
# its own results and cancel answers (result|cancel.<its account>.#): no tenant reads
# another's. RabbitMQ expands {username}. They apply to the exchange named here (exactly).
RESULTS_EXCHANGE=zimage.results
TOPIC_PERMS_CLIENT=('^$' '^(result|cancel)\.{username}\.')
rabbitmq_accounts() {
    local existing; existing="$(rabbitmqctl -q list_users 2>/dev/null | awk '{print $1}')"
    local stamp="$LOCAL/rabbitmq-permissions"
    local want; want="$(printf '%s\n' "${PERMS_WORKER[@]}" "$(perms_client '{user}')" \
        "$RESULTS_EXCHANGE" "${TOPIC_PERMS_CLIENT[@]}" | sha256sum | cut -c1-16)"
    local perms_changed=0; [[ "$(cat "$stamp" 2>/dev/null)" == "$want" ]] || perms_changed=1
    local user
    for user in "$AMQP_WORKER" "${AMQP_CLIENTS[@]}"; do
        local fresh=0; [[ -s "$SECRETS/amqp_$user" ]] || fresh=1
        local pw_file; pw_file="$(secret "amqp_$user")"
        if ! grep -qx -- "$user" <<<"$existing"; then
            rabbitmqctl -q add_user "$user" "$(cat "$pw_file")" >/dev/null
            log "rabbitmq: created account $user"
        elif [[ $fresh == 1 ]]; then
            # The account outlived its secret file (.local was wiped): give it the new one.
            rabbitmqctl -q change_password "$user" "$(cat "$pw_file")" >/dev/null
            log "rabbitmq: reset the password of $user"
        fi
        if [[ $perms_changed == 1 ]] || ! grep -qx -- "$user" <<<"$existing"; then
            if [[ "$user" == "$AMQP_WORKER" ]]; then
                rabbitmqctl -q set_permissions -p / "$user" "${PERMS_WORKER[@]}" >/dev/null
            else
                local perms; mapfile -t perms < <(perms_client "$user")
                rabbitmqctl -q set_permissions -p / "$user" "${perms[@]}" >/dev/null
                rabbitmqctl -q set_topic_permissions -p / "$user" "$RESULTS_EXCHANGE" \
                    "${TOPIC_PERMS_CLIENT[@]}" >/dev/null
            fi
        fi
    done
    echo "$want" >"$stamp"
}

postgres_up() {
    if ! port_open 5432; then
        command -v pg_ctlcluster >/dev/null || apt_install postgresql
        log "postgresql: starting"
        local version; version="$(ls /etc/postgresql | sort -V | tail -1)"
        pg_ctlcluster --skip-systemctl-redirect "$version" main start
        touch "$STARTED/postgresql"
        wait_port 5432 postgresql
    fi
    if ! psql -h 127.0.0.1 -U postgres -Atc "select 1 from pg_database where datname='$PG_DATABASE'" \
        | grep -q 1; then
        psql -h 127.0.0.1 -U postgres -qc "create database $PG_DATABASE" >/dev/null
        log "postgresql: created database $PG_DATABASE"
    fi
    log "postgresql: running on 127.0.0.1:5432 (database $PG_DATABASE)"
}

ldap_tls() {
    local dir="$LOCAL/ldap/tls"
    [[ -s "$dir/server.crt" ]] && return
    mkdir -p "$dir"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=zimage-pipeline local CA" \
        -keyout "$dir/ca.key" -out "$dir/ca.crt" >/dev/null 2>&1
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
        -keyout "$dir/server.key" -out "$dir/server.csr" >/dev/null 2>&1
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >"$dir/ext.cnf"
    openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
        -CAcreateserial -days 3650 -extfile "$dir/ext.cnf" -out "$dir/server.crt" >/dev/null 2>&1
    chmod 600 "$dir"/*.key
}

slapd_up() {
    command -v slapd >/dev/null || apt_install slapd ldap-utils
    command -v ldapadd >/dev/null || apt_install ldap-utils
    local dir="$LOCAL/ldap"
    mkdir -p "$dir/data"
    ldap_tls
    local admin_pw; admin_pw="$(cat "$(secret ldap_admin_password)")"
    local bind_pw_file; bind_pw_file="$(secret ldap_bind_password)"
    local user_pw_file; user_pw_file="$(secret ldap_user_password)"
    cat >"$dir/slapd.conf" <<CONF
# Generated by scripts/services.sh; a throwaway directory for development and tests.
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
include /etc/ldap/schema/nis.schema
modulepath /usr/lib/ldap
moduleload back_mdb
moduleload memberof
pidfile $dir/slapd.pid
argsfile $dir/slapd.args
TLSCACertificateFile $dir/tls/ca.crt
TLSCertificateFile $dir/tls/server.crt
TLSCertificateKeyFile $dir/tls/server.key
sizelimit 1000
database mdb
maxsize 104857600
suffix "$LDAP_BASE"
rootdn "$LDAP_ADMIN_DN"
rootpw $(slappasswd -s "$admin_pw")
directory $dir/data
index objectClass,uid,cn,member,memberUid eq
overlay memberof
access to attrs=userPassword by self write by anonymous auth by * none
access to * by users read by * none
CONF
    if [[ -f "$dir/slapd.pid" ]] && kill -0 "$(cat "$dir/slapd.pid")" 2>/dev/null; then
        log "slapd: running on 127.0.0.1:$LDAP_PORT"
    else
        if port_open "$LDAP_PORT"; then
            log "127.0.0.1:$LDAP_PORT is taken by a slapd this checkout did not start (another checkout's services.sh?); stop it first" >&2
            return 1
        fi
        log "slapd: starting"
        slapd -f "$dir/slapd.conf" -h "ldap://127.0.0.1:$LDAP_PORT/ ldaps://127.0.0.1:$LDAPS_PORT/"
        touch "$STARTED/slapd"
        wait_port "$LDAP_PORT" slapd
    fi
    if ! ldapsearch -x -H "ldap://127.0.0.1:$LDAP_PORT" -D "$LDAP_ADMIN_DN" -w "$admin_pw" \
        -b "$LDAP_BASE" -s base dn >/dev/null 2>&1; then
        log "slapd: seeding the test directory from config/ldap/seed.ldif"
        ldapadd -x -H "ldap://127.0.0.1:$LDAP_PORT" -D "$LDAP_ADMIN_DN" -w "$admin_pw" \
            -f "$ROOT/config/ldap/seed.ldif" >/dev/null
        ldappasswd -x -H "ldap://127.0.0.1:$LDAP_PORT" -D "$LDAP_ADMIN_DN" -w "$admin_pw" \
            -T "$bind_pw_file" "$LDAP_BIND_DN"
        for uid in alice bob carol dave jurgen; do
            ldappasswd -x -H "ldap://127.0.0.1:$LDAP_PORT" -D "$LDAP_ADMIN_DN" -w "$admin_pw" \
                -T "$user_pw_file" "uid=$uid,ou=people,$LDAP_BASE"
        done
    fi
}

# A local C2PA signing chain, so the demo's and the tests' images carry a signed manifest:
# a root CA (the trust anchor for `provenance show`) and an end-entity signer with what the
# C2PA certificate profile asks for (ES256 on P-256, CA:FALSE, digitalSignature,
# emailProtection EKU, key identifiers; C2PA refuses a self-signed signer). Generated once
# into .local/c2pa (keys mode 600); the signer is re-issued under the same root when it
# is missing or about to expire, so the trust anchor stays put.
c2pa_chain() {
    local dir="$LOCAL/c2pa" out="$LOCAL/c2pa/openssl.log"
    command -v openssl >/dev/null || apt_install openssl
    mkdir -p "$dir"; chmod 700 "$dir"
    local subject="/O=zimage-pipeline local stack/CN=zimage-pipeline local C2PA"
    if [[ ! -s "$dir/root.key" || ! -s "$dir/root.crt" ]]; then
        printf '%s\n' "basicConstraints=critical,CA:TRUE,pathlen:0" \
            "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
            "subjectKeyIdentifier=hash" >"$dir/root.ext"
        if ! (umask 077 \
            && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dir/root.key.new" \
            && openssl req -new -key "$dir/root.key.new" -subj "$subject root" -out "$dir/root.csr" \
            && openssl x509 -req -in "$dir/root.csr" -signkey "$dir/root.key.new" -sha256 \
                -days 3650 -set_serial "0x$(openssl rand -hex 16)" -extfile "$dir/root.ext" \
                -out "$dir/root.crt.new") >"$out" 2>&1; then
            log "c2pa: openssl failed to make the root CA (see .local/c2pa/openssl.log)" >&2; return 1
        fi
        mv "$dir/root.key.new" "$dir/root.key"; mv "$dir/root.crt.new" "$dir/root.crt"
        rm -f "$dir/root.csr" "$dir/root.ext" "$out" "$dir/signer.crt" "$dir/signer-chain.pem"
        log "c2pa: generated a local root CA (.local/c2pa/root.crt); issuing a signer under it"
    fi
    if [[ -s "$dir/signer.key" && -s "$dir/signer-chain.pem" ]] \
        && openssl x509 -in "$dir/signer.crt" -noout -checkend 86400 >/dev/null 2>&1; then
        log "c2pa: local signing chain in .local/c2pa"
        return
    fi
    printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
        "extendedKeyUsage=emailProtection" "subjectKeyIdentifier=hash" \
        "authorityKeyIdentifier=keyid:always" >"$dir/signer.ext"
    if ! (umask 077 \
        && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dir/signer.key.new" \
        && openssl req -new -key "$dir/signer.key.new" -subj "$subject signer" -out "$dir/signer.csr" \
        && openssl x509 -req -in "$dir/signer.csr" -CA "$dir/root.crt" -CAkey "$dir/root.key" \
            -sha256 -days 825 -set_serial "0x$(openssl rand -hex 16)" -extfile "$dir/signer.ext" \
            -out "$dir/signer.crt.new") >"$out" 2>&1; then
        log "c2pa: openssl failed to issue the signer (see .local/c2pa/openssl.log)" >&2; return 1
    fi
    # The chain setting wants the end-entity certificate first, then its issuers.
    cat "$dir/signer.crt.new" "$dir/root.crt" >"$dir/signer-chain.pem.new"
    mv "$dir/signer.key.new" "$dir/signer.key"; mv "$dir/signer.crt.new" "$dir/signer.crt"
    mv "$dir/signer-chain.pem.new" "$dir/signer-chain.pem"
    rm -f "$dir/signer.csr" "$dir/signer.ext" "$out"
    chmod 600 "$dir"/*.key; chmod 644 "$dir"/*.crt "$dir/signer-chain.pem"
    log "c2pa: issued a local signing certificate (.local/c2pa/signer-chain.pem)"
}

seaweed_up() {
    local weed="$VENV/bin/weed"
    [[ -x "$weed" ]] || weed="$(command -v weed || true)"
    [[ -n "$weed" ]] || { log "weed not found: run scripts/bootstrap.sh first" >&2; return 1; }
    local dir="$LOCAL/s3"
    mkdir -p "$dir/data"
    local access_key_file; access_key_file="$(secret s3_access_key_id "zimage-$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')")"
    local secret_key_file; secret_key_file="$(secret s3_secret_access_key)"
    (umask 077; cat >"$dir/s3.json" <<JSON
{"identities": [{"name": "zimage", "credentials": [{"accessKey": "$(cat "$access_key_file")",
  "secretKey": "$(cat "$secret_key_file")"}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
JSON
)
    if [[ -f "$dir/weed.pid" ]] && kill -0 "$(cat "$dir/weed.pid")" 2>/dev/null; then
        log "seaweedfs: running, S3 on 127.0.0.1:$S3_PORT"
    else
        if port_open "$S3_PORT"; then
            log "127.0.0.1:$S3_PORT is taken by a process this checkout did not start (another checkout's services.sh?); stop it first" >&2
            return 1
        fi
        log "seaweedfs: starting"
        # -volume.max=0: as many volumes as the disk holds. Every bucket is its own
        # collection and grows several volumes; a fixed small cap ran out after a few
        # dozen test buckets ("no free volumes left", HTTP 500 on PUT).
        nohup "$weed" server -dir="$dir/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
            -master.port=19333 -master.volumeSizeLimitMB=64 -volume.port=18080 -volume.max=0 \
            -filer -filer.port=18888 -s3 -s3.port="$S3_PORT" -s3.config="$dir/s3.json" -master.telemetry=false \
            >"$dir/weed.log" 2>&1 &
        echo $! >"$dir/weed.pid"
        touch "$STARTED/seaweedfs"
        wait_port "$S3_PORT" seaweedfs 120 "$(cat "$dir/weed.pid")"
    fi
    "$VENV/bin/python" - "$access_key_file" "$secret_key_file" "${BUCKETS[@]}" <<'PY'
import sys, time
from pathlib import Path
import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
key_id, secret = (Path(p).read_text().strip() for p in sys.argv[1:3])
s3 = boto3.client("s3", endpoint_url="http://127.0.0.1:8333", region_name="us-east-1",
                  aws_access_key_id=key_id, aws_secret_access_key=secret,
                  config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}))
for bucket in sys.argv[3:]:
    for attempt in range(60):
        try:
            s3.head_bucket(Bucket=bucket)
            break
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket"):
                # The audit bucket gets Object Lock, so anchored chain heads can be
                # retained (WORM); SeaweedFS supports it on buckets created with it.
                extra = {"ObjectLockEnabledForBucket": True} if bucket == "zimage-audit" else {}
                s3.create_bucket(Bucket=bucket, **extra)
                print(f"services: seaweedfs: created bucket {bucket}")
                break
            time.sleep(1)
        except BotoCoreError:
            time.sleep(1)
    else:
        sys.exit(f"services: seaweedfs: bucket {bucket} could not be created")
PY
}

write_env() {
    cat >"$LOCAL/zimage.env" <<ENV
# Generated by scripts/services.sh: settings for the local stack (file paths, no secrets).
export ZIMAGE_BROKER__USERNAME="$AMQP_WORKER"
export ZIMAGE_BROKER__PASSWORD_FILE="$SECRETS/amqp_$AMQP_WORKER"
export ZIMAGE_TEST_SECRETS_DIR="$SECRETS"
export ZIMAGE_DATABASE__URL="sqlite:///$LOCAL/zimage.db"
export ZIMAGE_TEST_POSTGRES_URL="postgresql+psycopg://postgres@127.0.0.1:5432/$PG_DATABASE"
export ZIMAGE_DIRECTORY__BIND_PASSWORD_FILE="$SECRETS/ldap_bind_password"
export ZIMAGE_DIRECTORY__CA_CERT_FILE="$LOCAL/ldap/tls/ca.crt"
export ZIMAGE_TEST_LDAP_ADMIN_PASSWORD_FILE="$SECRETS/ldap_admin_password"
export ZIMAGE_TEST_LDAP_USER_PASSWORD_FILE="$SECRETS/ldap_user_password"
export ZIMAGE_STORAGE__ACCESS_KEY_ID_FILE="$SECRETS/s3_access_key_id"
export ZIMAGE_STORAGE__SECRET_ACCESS_KEY_FILE="$SECRETS/s3_secret_access_key"
export ZIMAGE_ENGINE__MODEL_PATH="$LOCAL/models/tiny"
export ZIMAGE_PROVENANCE__C2PA_ENABLED=true
export ZIMAGE_PROVENANCE__C2PA_CERT_CHAIN_FILE="$LOCAL/c2pa/signer-chain.pem"
export ZIMAGE_PROVENANCE__C2PA_PRIVATE_KEY_FILE="$LOCAL/c2pa/signer.key"
export ZIMAGE_PROVENANCE__C2PA_TRUST_ANCHORS_FILE="$LOCAL/c2pa/root.crt"
ENV
    log "wrote .local/zimage.env (source it to use the local stack)"
}

stop_pidfile() {  # stop_pidfile NAME PIDFILE: TERM, wait for exit (ports freed), then KILL
    local pid
    pid="$(cat "$2" 2>/dev/null || true)"
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 80); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        log "$1: stopped"
    fi
    rm -f "$2" "$STARTED/$1"
}

cmd_up() {
    mkdir -p "$STARTED" "$SECRETS"
    chmod 700 "$SECRETS"
    rabbitmq_up
    rabbitmq_tuning
    rabbitmq_accounts
    postgres_up
    slapd_up
    seaweed_up
    c2pa_chain
    write_env
}

cmd_down() {
    stop_pidfile seaweedfs "$LOCAL/s3/weed.pid"
    stop_pidfile slapd "$LOCAL/ldap/slapd.pid"
    if [[ -f "$STARTED/rabbitmq" ]]; then rabbitmqctl stop >/dev/null && log "rabbitmq: stopped"; rm -f "$STARTED/rabbitmq"; fi
    if [[ -f "$STARTED/postgresql" ]]; then
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main stop
        log "postgresql: stopped"; rm -f "$STARTED/postgresql"
    fi
}

cmd_status() {
    local name port
    for pair in rabbitmq:5672 postgresql:5432 slapd:$LDAP_PORT seaweedfs:$S3_PORT; do
        name="${pair%%:*}"; port="${pair##*:}"
        local owner="system"; [[ -f "$STARTED/$name" ]] && owner="started by services.sh"
        if port_open "$port"; then echo "$name: up on 127.0.0.1:$port ($owner)";
        else echo "$name: down (127.0.0.1:$port)"; fi
    done
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
