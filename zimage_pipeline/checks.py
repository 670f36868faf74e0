"""`zimage-pipeline check`: reach every dependency and say, one line each, what is wrong.

Each probe returns a CheckResult instead of raising, so one dead service never hides the
state of the others. Error texts are passed through `redact` so that no secret can leak
through a library's exception message. A result can pass with a warning: something works
but is configured in a way an operator should know about (C2PA signing off).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from zimage_pipeline.errors import ZImageError
from zimage_pipeline.settings import Settings


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    warning: bool = False  # passes, but printed as WARN: worth the operator's attention


def redact(text: str, secrets: Iterable[SecretStr | None]) -> str:
    for secret in secrets:
        value = secret.get_secret_value() if secret is not None else ""
        if value:
            text = text.replace(value, "***")
    return text


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if str(exc) else text


def check_broker(settings: Settings) -> CheckResult:
    from zimage_pipeline.broker import connect

    cfg = settings.broker
    where = f"amqp{'s' if cfg.tls else ''}://{cfg.host}:{cfg.port}{cfg.virtual_host}"
    password = cfg.resolved_password()

    async def probe() -> str:
        connection = await connect(cfg, name="zimage-pipeline check")
        async with connection:
            props = (
                connection.transport.connection.server_properties if connection.transport else {}
            )
            version = props.get("version", b"?")
            return version.decode() if isinstance(version, bytes) else str(version)

    try:
        version = asyncio.run(asyncio.wait_for(probe(), timeout=cfg.connect_timeout_s + 1))
    except Exception as exc:
        return CheckResult("broker", False, f"{where}: {redact(_describe(exc), [password])}")
    return CheckResult("broker", True, f"{where} (RabbitMQ {version}) as {cfg.username}")


def check_database(settings: Settings) -> CheckResult:
    from sqlalchemy import text

    from zimage_pipeline.ledger import migrate
    from zimage_pipeline.ledger.db import create_ledger_engine, database_url

    password = settings.database.resolved_password()
    where = settings.database.url
    try:
        url = database_url(settings.database)
        where = url.render_as_string(hide_password=True)
        engine = create_ledger_engine(settings.database)
        try:
            with engine.connect() as connection:
                connection.execute(text("select 1"))
            current, head = migrate.current_revision(engine), migrate.head_revision()
        finally:
            engine.dispose()
    except Exception as exc:
        return CheckResult("database", False, f"{where}: {redact(_describe(exc), [password])}")
    if current != head:
        return CheckResult(
            "database",
            False,
            f"{where}: schema at {current or 'empty'}, expected {head}: run `zimage-pipeline db upgrade`",
        )
    return CheckResult("database", True, f"{where} (schema {current})")


def check_directory(settings: Settings) -> CheckResult:
    import ldap3

    cfg = settings.directory
    password = cfg.resolved_bind_password()
    tls = ldap3.Tls(
        validate=ssl.CERT_REQUIRED if cfg.verify_tls else ssl.CERT_NONE,
        ca_certs_file=str(cfg.ca_cert_file) if cfg.ca_cert_file else None,
    )
    use_ssl = cfg.url.startswith("ldaps://")
    try:
        server = ldap3.Server(
            cfg.url, use_ssl=use_ssl, tls=tls, connect_timeout=cfg.connect_timeout_s
        )
        connection = ldap3.Connection(
            server,
            user=cfg.bind_dn,
            password=password.get_secret_value(),
            receive_timeout=int(cfg.search_timeout_s),
            raise_exceptions=True,
        )
        connection.open()
        if cfg.start_tls and not use_ssl:
            connection.start_tls()
        connection.bind()
        connection.search(cfg.base_dn, "(objectClass=*)", search_scope=ldap3.BASE)
        connection.unbind()
    except Exception as exc:
        return CheckResult("directory", False, f"{cfg.url}: {redact(_describe(exc), [password])}")
    mode = "LDAPS" if use_ssl else ("StartTLS" if cfg.start_tls else "plaintext")
    verified = "verified" if cfg.verify_tls else "NOT verified"
    return CheckResult(
        "directory", True, f"{cfg.url} ({mode}, certificate {verified}) as {cfg.bind_dn}"
    )


def check_object_store(settings: Settings) -> CheckResult:
    from zimage_pipeline.storage import ObjectStore

    cfg = settings.storage
    secrets: list[SecretStr | None] = []
    try:
        credentials = cfg.resolved_credentials()
        if credentials is not None:
            secrets.extend(credentials)
        inputs = _input_buckets(settings)
        ObjectStore(cfg).check_buckets([cfg.bucket, cfg.audit_bucket, *inputs])
    except Exception as exc:
        return CheckResult(
            "object store",
            False,
            f"{cfg.endpoint_url or 'AWS S3'}: {redact(_describe(exc), secrets)}",
        )
    read_from = f"; image inputs from {', '.join(inputs)}" if inputs else ""
    return CheckResult(
        "object store",
        True,
        f"{cfg.endpoint_url or 'AWS S3'} buckets {cfg.bucket}, {cfg.audit_bucket}{read_from}",
    )


def _input_buckets(settings: Settings) -> list[str]:
    """The buckets the policy's [inputs] grants name: a grant to a bucket the worker
    cannot reach would turn every image request of that publisher into a refusal. A
    policy that does not load is not this check's to report (the worker refuses it)."""
    from zimage_pipeline.policy import load_rules

    try:
        rules = load_rules(settings.policy)
    except Exception:
        return []
    return sorted({grant.bucket for grants in rules.inputs.values() for grant in grants})


def check_model(settings: Settings) -> CheckResult:
    """The model path through the worker's own layout checks (engine.loader), without
    loading weights or downloading anything."""
    from zimage_pipeline.engine.errors import UnsupportedModelLayout
    from zimage_pipeline.engine.loader import PIPELINE_CLASS, classify_location

    location = settings.engine.model_path
    try:
        kind = classify_location(location)
    except UnsupportedModelLayout as exc:
        return CheckResult("model", False, str(exc))
    if kind == "repo":
        return CheckResult(
            "model", True, f"{location}: Hugging Face repo id (fetched at load time)"
        )
    return CheckResult("model", True, f"{Path(location).expanduser()} ({PIPELINE_CLASS})")


def check_adapters(settings: Settings) -> CheckResult:
    """Every catalogue adapter's file hashed as the engine will hash it before loading:
    a missing file or one whose bytes are not the catalogue's SHA-256 fails the check,
    naming the adapter (the worker would refuse every request naming it)."""
    from zimage_pipeline.adapters import catalogue_of
    from zimage_pipeline.engine.adapters import verify_entry

    entries = catalogue_of(settings)
    if not entries:
        return CheckResult("adapters", True, "none configured")
    problems = [
        f"{entry.name}: {problem}"
        for entry in entries
        if (problem := verify_entry(entry)) is not None
    ]
    if problems:
        return CheckResult("adapters", False, "; ".join(problems))
    names = ", ".join(entry.name for entry in entries)
    return CheckResult("adapters", True, f"{len(entries)} verified ({names})")


C2PA_OFF = (
    "C2PA signing is off: images carry only the XMP mark, which anyone can strip or copy "
    "onto another file, so nobody can verify that an image came from this pipeline "
    "unaltered. Turn it on with [provenance] c2pa_enabled = true, c2pa_cert_chain_file "
    "and c2pa_private_key_file (ZIMAGE_PROVENANCE__*; scripts/services.sh up writes a "
    "local chain into .local/zimage.env)"
)


def check_provenance(settings: Settings) -> CheckResult:
    """Signing off is a warning; on, the chain and key must sign (as the worker's startup
    self-test does) and, with trust anchors configured, the signature should chain to them."""
    from zimage_pipeline.provenance import c2pa_manifest

    cfg = settings.provenance
    if not cfg.c2pa_enabled:
        return CheckResult("provenance", True, C2PA_OFF, warning=True)
    signing = c2pa_manifest.load_signing_config(cfg)  # ConfigError: reported as a failure
    assert signing is not None
    anchors_file = cfg.c2pa_trust_anchors_file
    anchors = None
    if anchors_file is not None:
        try:
            anchors = anchors_file.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            return CheckResult(
                "provenance",
                True,
                f"C2PA signing on, but c2pa_trust_anchors_file {anchors_file} is unreadable: {exc}",
                warning=True,
            )
    report = c2pa_manifest.verify(
        c2pa_manifest.sign_sample(signing), "png", trust_anchors_pem=anchors
    )
    what = f"C2PA signing on ({signing.algorithm}) as {report.signer or '?'}"
    if anchors_file is None:
        return CheckResult(
            "provenance", True, f"{what}; no c2pa_trust_anchors_file to verify against"
        )
    if not report.trusted:
        return CheckResult(
            "provenance",
            True,
            f"{what}, but its signature does not chain to c2pa_trust_anchors_file "
            f"{anchors_file} (state {report.validation_state}): `provenance show` will not "
            "trust this pipeline's images",
            warning=True,
        )
    return CheckResult("provenance", True, f"{what}, trusted by {anchors_file}")


def check_plugins(settings: Settings) -> CheckResult:
    """Load every enabled plugin as the worker does; the first that cannot load fails
    the check by name. Values of secret-looking settings are redacted from the text."""
    from zimage_pipeline.plugins.registry import is_enabled, is_secret_key, load_enabled

    tables = settings.plugins.tables()
    secrets = [
        value if isinstance(value, SecretStr) else SecretStr(str(value))
        for table in tables.values()
        for key, value in table.items()
        if isinstance(value, str | SecretStr) and is_secret_key(key)
    ]
    try:
        loaded = load_enabled(tables)
    except ZImageError as exc:
        return CheckResult("plugins", False, redact(str(exc), secrets))
    disabled = sorted(name for name, table in tables.items() if not is_enabled(table))
    detail = ", ".join(loaded.names) + " loaded" if loaded.names else "none enabled"
    if disabled:
        detail += f" (configured but not enabled: {', '.join(disabled)})"
    return CheckResult("plugins", True, detail)


ALL_CHECKS: tuple[Callable[[Settings], CheckResult], ...] = (
    check_broker,
    check_database,
    check_directory,
    check_object_store,
    check_model,
    check_adapters,
    check_provenance,
    check_plugins,
)


def run_checks(settings: Settings) -> list[CheckResult]:
    results = []
    for check in ALL_CHECKS:
        try:
            results.append(check(settings))
        except ZImageError as exc:  # a secret file that cannot be read, etc.
            results.append(CheckResult(check.__name__.removeprefix("check_"), False, str(exc)))
    return results
