"""Typed settings: config/zimage.toml, overridden by ZIMAGE_* environment variables.

This is the only module that reads the environment. Nested keys use a double underscore:
``ZIMAGE_BROKER__HOST`` overrides ``[broker] host``. Secrets are ``SecretStr`` (masked in
repr, logs and validation errors) and come from the environment or from a ``*_file``
setting naming a file that holds them; the TOML file never carries a secret.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from zimage_pipeline.errors import ConfigError
from zimage_pipeline.inputs.model import InputGrant, parse_grants

DEFAULT_CONFIG_PATH = Path("config/zimage.toml")
CONFIG_PATH_ENV = "ZIMAGE_CONFIG"


def read_secret_file(path: Path, *, setting: str) -> SecretStr:
    """Read a secret from a file; one trailing newline is not part of the secret."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read secret file {path}: {exc.strerror}") from exc
    return SecretStr(text.removesuffix("\n").removesuffix("\r"))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=5672, ge=1, le=65535)
    virtual_host: str = "/"
    username: str = "guest"
    password: SecretStr | None = None
    password_file: Path | None = None
    tls: bool = False
    ca_cert_file: Path | None = None
    verify_tls: bool = True
    heartbeat_s: int = Field(default=30, ge=0)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    requests_exchange: str = "zimage.requests"
    requests_queue: str = "zimage.requests"
    results_exchange: str = "zimage.results"
    dead_letter_exchange: str = "zimage.dlx"

    def resolved_password(self) -> SecretStr:
        if self.password is not None:
            return self.password
        if self.password_file is not None:
            return read_secret_file(self.password_file, setting="broker.password_file")
        return SecretStr("")


class DatabaseSettings(_Section):
    url: str = "sqlite:///var/zimage.db"
    password: SecretStr | None = None
    password_file: Path | None = None
    connect_timeout_s: float = Field(default=5.0, gt=0)
    pool_size: int = Field(default=5, ge=1)

    @model_validator(mode="after")
    def _no_password_in_url(self) -> Self:
        # A password inside the URL would end up in logs and reprs; it must come separately.
        from sqlalchemy.engine import make_url

        try:
            parsed = make_url(self.url)
        except Exception as exc:
            raise ValueError(f"database.url is not a database URL: {exc}") from None
        if parsed.password:
            raise ValueError(
                "database.url must not contain a password; "
                "set ZIMAGE_DATABASE__PASSWORD or database.password_file"
            )
        return self

    def resolved_password(self) -> SecretStr | None:
        if self.password is not None:
            return self.password
        if self.password_file is not None:
            return read_secret_file(self.password_file, setting="database.password_file")
        return None


class DirectorySettings(_Section):
    url: str = "ldap://127.0.0.1:3389"
    start_tls: bool = True
    verify_tls: bool = True
    ca_cert_file: Path | None = None
    bind_dn: str = "uid=zimage-svc,ou=services,dc=example,dc=org"
    bind_password: SecretStr | None = None
    bind_password_file: Path | None = None
    base_dn: str = "dc=example,dc=org"
    user_base_dn: str = "dc=example,dc=org"
    user_filter: str = "(&(objectClass=inetOrgPerson)(uid={username}))"
    disabled_filter: str = "(employeeType=disabled)"
    group_base_dn: str = "ou=groups,dc=example,dc=org"
    membership: str = "member"
    connect_timeout_s: float = Field(default=3.0, gt=0)
    search_timeout_s: float = Field(default=5.0, gt=0)
    cache_ttl_s: float = Field(default=60.0, ge=0)
    negative_cache_ttl_s: float = Field(default=15.0, ge=0)
    cache_max_entries: int = Field(default=10_000, ge=1)

    def resolved_bind_password(self) -> SecretStr:
        if self.bind_password is not None:
            return self.bind_password
        if self.bind_password_file is not None:
            return read_secret_file(self.bind_password_file, setting="directory.bind_password_file")
        return SecretStr("")


class PriorityClass(StrEnum):
    """Priority classes, lowest first; a role allows its class and every lower one."""

    BULK = "bulk"
    STANDARD = "standard"
    INTERACTIVE = "interactive"


KNOWN_FORMATS = frozenset({"png", "webp", "jpeg"})


class RoleSettings(_Section):
    """What one role allows. A limit a role leaves at 0 (or a quota it leaves unset) adds
    nothing when roles are combined: the most generous role that sets it decides."""

    max_pixels: int = Field(default=0, ge=0)
    max_side: int = Field(default=0, ge=0)
    max_images: int = Field(default=0, ge=0)
    max_steps: int = Field(default=0, ge=0)
    allowed_formats: tuple[str, ...] = ()
    priority: PriorityClass = PriorityClass.BULK
    generate: bool = False
    delegate: bool = False
    images_per_day: int | None = Field(default=None, ge=0)
    images_per_month: int | None = Field(default=None, ge=0)
    # Templates the role may use: ids, "tag:<tag>", "*" (any); and free prompts or not.
    templates: tuple[
        Annotated[
            str, StringConstraints(pattern=r"^(\*|tag:[a-z0-9][a-z0-9-]*|[a-z0-9][a-z0-9-]*)$")
        ],
        ...,
    ] = ("*",)
    free_prompt: bool = True
    # LoRA adapters ([adapters.<name>]) a request may name: names, or "*" (any). A brand's
    # trained style is its own: give the adapter only to that brand's roles. Adapters a
    # template fixes come with the template (the role needs the template, not these).
    adapters: tuple[
        Annotated[str, StringConstraints(pattern=r"^(\*|[a-z0-9][a-z0-9-]*)$", max_length=64)],
        ...,
    ] = ("*",)

    @model_validator(mode="after")
    def _known_formats(self) -> Self:
        unknown = set(self.allowed_formats) - KNOWN_FORMATS
        if unknown:
            raise ValueError(
                f"unknown image formats {sorted(unknown)}; known: {sorted(KNOWN_FORMATS)}"
            )
        return self


class TeamBudgetSettings(_Section):
    """A pooled budget shared by every member (nested members included) of one group."""

    images_per_day: int | None = Field(default=None, ge=0)
    images_per_month: int | None = Field(default=None, ge=0)


class PolicyRules(_Section):
    """Group DN -> roles, role -> limits, group DN -> pooled team budget."""

    groups: dict[str, tuple[str, ...]] = {}
    roles: dict[str, RoleSettings] = {}
    teams: dict[str, TeamBudgetSettings] = {}
    # Publisher (AMQP account) -> the "bucket/prefix" places its requests' input images
    # may be read from (image-to-image, inpainting); none: no image inputs. Parsed here,
    # as the policy loads: a malformed grant refuses the file (inputs/model.py).
    inputs: dict[str, tuple[InputGrant, ...]] = {}

    @field_validator("inputs", mode="before")
    @classmethod
    def _parsed_grants(cls, value: object) -> object:
        if not isinstance(value, Mapping):
            return value  # pydantic names the type error
        return parse_grants(value)

    @model_validator(mode="after")
    def _roles_exist(self) -> Self:
        missing = {r for names in self.groups.values() for r in names} - set(self.roles)
        if missing:
            raise ValueError(f"groups name undefined roles: {sorted(missing)}")
        return self


DEFAULT_POLICY_PATH = Path("policy.toml")  # beside the config file


class PolicySettings(_Section):
    """Where the policy lives. The rules are read by `load_rules()` (at startup and by
    the CLI), not while settings load: they are a separate file, owned by whoever
    administers access, and the inline tables only add to it."""

    file: Path | None = DEFAULT_POLICY_PATH
    lease_s: float = Field(default=900.0, gt=0)
    groups: dict[str, tuple[str, ...]] = {}
    roles: dict[str, RoleSettings] = {}
    teams: dict[str, TeamBudgetSettings] = {}
    inputs: dict[str, tuple[str, ...]] = {}  # "bucket/prefix" texts, parsed by PolicyRules

    def load_rules(self) -> PolicyRules:
        """The policy file merged with the inline tables (inline wins on a clash).

        A missing file is an error, the default path's too: a worker that silently
        denied everything because the file was not where it looked is worse than one
        that does not start. `file = ""` (None) means inline tables only.
        """
        import tomllib

        from pydantic import ValidationError

        loaded: dict[str, Any] = {}
        if self.file is not None:
            try:
                loaded = tomllib.loads(self.file.read_text(encoding="utf-8"))
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"policy.file {self.file}: {exc}") from None
        tables = ("groups", "roles", "teams", "inputs")
        inline = self.model_dump(include=set(tables))
        merged = {k: {**loaded.get(k, {}), **inline[k]} for k in tables}
        unknown = set(loaded) - set(merged)
        if unknown:
            raise ConfigError(f"policy.file {self.file}: unknown tables {sorted(unknown)}")
        try:
            return PolicyRules(**merged)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
                for err in exc.errors(include_input=False)
            )
            raise ConfigError(f"policy ({self.file}): {problems}") from None


class AddressingStyle(StrEnum):
    PATH = "path"
    VIRTUAL = "virtual"
    AUTO = "auto"


class StorageSettings(_Section):
    endpoint_url: str | None = "http://127.0.0.1:8333"
    region: str = "us-east-1"
    addressing_style: AddressingStyle = AddressingStyle.PATH
    bucket: str = "zimage-images"
    audit_bucket: str = "zimage-audit"
    prefix: str = "zimage"
    access_key_id: SecretStr | None = None
    access_key_id_file: Path | None = None
    secret_access_key: SecretStr | None = None
    secret_access_key_file: Path | None = None
    verify_tls: bool = True
    ca_bundle: Path | None = None
    connect_timeout_s: float = Field(default=3.0, gt=0)
    read_timeout_s: float = Field(default=30.0, gt=0)
    presign_ttl_s: int = Field(default=0, ge=0)
    conditional_writes: bool = True
    max_attempts: int = Field(default=5, ge=1)
    retry_budget_s: float = Field(default=30.0, gt=0)
    backoff_base_s: float = Field(default=0.2, ge=0)
    backoff_max_s: float = Field(default=5.0, ge=0)

    def resolved_credentials(self) -> tuple[SecretStr, SecretStr] | None:
        """Static keys, or None to let boto3 find an instance role / its own chain."""
        key_id = self.access_key_id
        if key_id is None and self.access_key_id_file is not None:
            key_id = read_secret_file(self.access_key_id_file, setting="storage.access_key_id_file")
        secret = self.secret_access_key
        if secret is None and self.secret_access_key_file is not None:
            secret = read_secret_file(
                self.secret_access_key_file, setting="storage.secret_access_key_file"
            )
        if key_id is None and secret is None:
            return None
        if key_id is None or secret is None:
            raise ConfigError("storage: access_key_id and secret_access_key must be set together")
        return key_id, secret


class C2paAlgorithm(StrEnum):
    ES256 = "es256"
    ES384 = "es384"
    ES512 = "es512"
    PS256 = "ps256"
    PS384 = "ps384"
    PS512 = "ps512"
    ED25519 = "ed25519"


class ProvenanceSettings(_Section):
    creator_tool: str = "zimage-pipeline"
    c2pa_enabled: bool = False
    c2pa_algorithm: C2paAlgorithm = C2paAlgorithm.ES256
    c2pa_cert_chain_file: Path | None = None
    c2pa_private_key: SecretStr | None = None
    c2pa_private_key_file: Path | None = None
    c2pa_timestamp_url: str | None = None
    c2pa_trust_anchors_file: Path | None = None
    c2pa_thumbnail: bool = False

    @model_validator(mode="after")
    def _signing_material(self) -> Self:
        if self.c2pa_enabled and self.c2pa_cert_chain_file is None:
            raise ValueError("provenance.c2pa_enabled needs provenance.c2pa_cert_chain_file")
        if (
            self.c2pa_enabled
            and self.c2pa_private_key is None
            and self.c2pa_private_key_file is None
        ):
            raise ValueError(
                "provenance.c2pa_enabled needs ZIMAGE_PROVENANCE__C2PA_PRIVATE_KEY "
                "or provenance.c2pa_private_key_file"
            )
        return self

    def resolved_private_key(self) -> SecretStr | None:
        if self.c2pa_private_key is not None:
            return self.c2pa_private_key
        if self.c2pa_private_key_file is not None:
            return read_secret_file(
                self.c2pa_private_key_file, setting="provenance.c2pa_private_key_file"
            )
        return None


class PromptRetention(StrEnum):
    KEEP = "keep"  # prompt text kept beside its hash
    HASH = "hash"  # only the SHA-256 of the prompt is ever stored
    REDACT = "redact"  # text kept for prompt_redact_after_days, then removed


class LockMode(StrEnum):
    GOVERNANCE = "GOVERNANCE"
    COMPLIANCE = "COMPLIANCE"


class AuditSettings(_Section):
    prompt_retention: PromptRetention = PromptRetention.KEEP
    prompt_redact_after_days: int = Field(default=30, ge=0)
    anchor_interval_s: float = Field(default=300.0, gt=0)
    anchor_prefix: str = "audit-anchors"
    anchor_lock_mode: LockMode = LockMode.COMPLIANCE
    anchor_retention_days: int = Field(default=2555, ge=1)
    # The chain this deployment's ledger must be (its first event's hash, which `audit
    # verify` prints): pinned, a ledger rewritten from its first event, or another
    # ledger pointed at this configuration, cannot pass as this one.
    chain_id: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    export_signing_key_file: Path | None = None


class MemoryMode(StrEnum):
    GPU = "gpu"
    MODEL_OFFLOAD = "model_offload"
    SEQUENTIAL_OFFLOAD = "sequential_offload"


class EngineSettings(_Section):
    model_path: str = "var/models/tiny"
    device: str = "auto"
    memory_mode: MemoryMode = MemoryMode.GPU
    attention_backend: str = "sdpa"
    max_batch: int = Field(default=4, ge=1)
    default_steps: int = Field(default=8, ge=1)
    revision: str | None = None
    compile: bool = True
    compile_mode: str = ""
    real_rope: bool = True
    compile_text_encoder: bool = False
    compile_cache_dir: str = ""
    fuse_projections: bool = True
    text_encoder_graphs: bool = True
    prompt_bucket: int = Field(default=32, ge=1)
    vae_decode_batch: int = Field(default=1, ge=1)
    linear_fp8: bool = False  # LOSSY opt-in tier: FP8 block projections (engine/fp8.py)
    # LoRA adapters (engine/adapters.py), used only when [adapters] names some: how many
    # run at once (fixed slots on the transformer, so a switch never recompiles), how
    # many stay loaded in device memory (LRU), and the largest rank a slot takes.
    adapter_slots: int = Field(default=2, ge=1, le=4)
    max_loaded_adapters: int = Field(default=3, ge=1)
    adapter_rank: int = Field(default=64, ge=1, le=1024)

    @model_validator(mode="after")
    def _slots_fit_the_cache(self) -> EngineSettings:
        if self.max_loaded_adapters < self.adapter_slots:
            raise ValueError(
                f"engine.max_loaded_adapters ({self.max_loaded_adapters}) must be at least "
                f"engine.adapter_slots ({self.adapter_slots}): a request's adapters stay loaded"
            )
        return self


class AdapterSettings(_Section):
    """`[adapters.<name>]`: a LoRA adapter a request may name. `path` is a local
    .safetensors file, or a directory holding exactly one (relative to the config file);
    a hub id is not supported (the worker reads no model hub at run time)."""

    path: Path
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # of the weights file's bytes
    weight: float = Field(default=1.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    description: str = ""


class WorkerSettings(_Section):
    worker_id: str = ""
    prefetch: int = Field(default=8, ge=1)
    concurrency: int = Field(default=2, ge=1)
    max_buffered_per_principal: int = Field(default=2, ge=1)
    retry_delays_s: list[int] = Field(default_factory=lambda: [5, 30, 120], min_length=1)
    max_attempts: int = Field(default=5, ge=1)
    delivery_limit: int = Field(default=10, ge=1)
    # Starts of one request the ledger allows (its first, retries after transient
    # failures, takeovers after a worker died running it); one more ends it failed
    # ATTEMPTS_EXHAUSTED. The broker's delivery_limit cannot stop a request that kills
    # its workers: the redelivery finds the job busy and comes back as a new message.
    max_job_attempts: int = Field(default=8, ge=1)
    job_busy_s: float = Field(default=30.0, ge=0)
    # A cancel that arrives before its request waits for it in the ledger this long;
    # then its row is deleted (a request arriving later runs). Without a bound, cancels
    # of ids nobody ever uses would grow the ledger forever.
    cancel_wait_days: int = Field(default=7, ge=1)
    max_body_bytes: int = Field(default=65536, ge=1024)
    shutdown_grace_s: float = Field(default=60.0, ge=0)
    # The time limit of one generation (one request's images, one GPU call):
    # max(floor, allowance x width x height / 10^6 x steps x images). Past it the GPU is
    # taken to be hung: /healthz fails, the worker exits 70 for its supervisor to restart
    # it, and the request is redelivered (watchdog.py). Generous on purpose: a limit too
    # tight kills healthy workers, one too loose only finds a hang later.
    generation_timeout_floor_s: float = Field(default=300.0, gt=0)
    generation_timeout_per_megapixel_step_s: float = Field(default=2.0, ge=0)
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=9464, ge=0, le=65535)

    @model_validator(mode="after")
    def _attempts_cover_the_retries(self) -> WorkerSettings:
        if self.max_job_attempts <= self.max_attempts:
            raise ValueError(
                f"worker.max_job_attempts ({self.max_job_attempts}) must exceed "
                f"worker.max_attempts ({self.max_attempts}): transient retries count too"
            )
        return self


class ClientSettings(_Section):
    """The account `zimage-pipeline submit` and `cancel` publish as (not the worker's)."""

    username: str = ""
    password: SecretStr | None = None
    password_file: Path | None = None
    wait_s: float = Field(default=300.0, gt=0)

    def resolved_password(self) -> SecretStr:
        if self.password is not None:
            return self.password
        if self.password_file is not None:
            return read_secret_file(self.password_file, setting="client.password_file")
        return SecretStr("")


class LoggingSettings(_Section):
    level: str = "INFO"
    json_logs: bool = True
    log_prompts: bool = False


class InputsSettings(_Section):
    """Input images (image_to_image, inpaint): the most a worker reads and decodes. A
    larger object, or an image whose header claims more, is refused before decoding."""

    max_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(default=4096 * 4096, ge=64 * 64)
    max_side: int = Field(default=4096, ge=64)


class TemplatesSettings(_Section):
    """The template catalogue (templates/): a directory of TOML files, reloaded when a
    file changes (polled every `reload_poll_s`) and on SIGHUP. None: no templates."""

    dir: Path | None = Path("templates")  # beside the config file; missing: no templates
    reload_poll_s: float = Field(default=2.0, gt=0)


class PluginsSettings(BaseModel):
    """`[plugins]`: the stage limits, then one table per plugin, `[plugins.<name>]`,
    handed to that plugin alone (plugins/registry.py). A plugin runs only when its table
    says `enabled = true`; an installed plugin without one does nothing."""

    model_config = ConfigDict(extra="allow", frozen=True)

    # A plugin call running longer than this ends its request PLUGIN_FAILED.
    stage_timeout_s: float = Field(default=60.0, gt=0)
    # How often the outbox of the result sinks is polled for due deliveries.
    sink_poll_s: float = Field(default=5.0, gt=0)
    # Delivered and dead outbox rows are deleted this long after they ended (what was
    # delivered stays in the audit trail; `audit show` lists deliveries until then).
    sink_retention_days: int = Field(default=30, ge=1)
    # How long a worker's claim on a due delivery lasts: a worker killed mid-delivery
    # holds its rows this long before another delivers them again. It must outlast a
    # batch's deliveries (5 rows x URLs x the sink's timeout), or rows are sent twice.
    sink_lease_s: float = Field(default=300.0, gt=0)

    @model_validator(mode="after")
    def _tables_only(self) -> Self:
        for name, value in (self.model_extra or {}).items():
            if not isinstance(value, dict):
                raise ValueError(f"plugins.{name} must be a table ([plugins.{name}])")
        return self

    def tables(self) -> dict[str, dict[str, Any]]:
        """Each plugin's table, by plugin name, in the configuration's order."""
        return {name: dict(value) for name, value in (self.model_extra or {}).items()}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ZIMAGE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    broker: BrokerSettings = BrokerSettings()
    database: DatabaseSettings = DatabaseSettings()
    directory: DirectorySettings = DirectorySettings()
    policy: PolicySettings = PolicySettings()
    storage: StorageSettings = StorageSettings()
    provenance: ProvenanceSettings = ProvenanceSettings()
    audit: AuditSettings = AuditSettings()
    engine: EngineSettings = EngineSettings()
    worker: WorkerSettings = WorkerSettings()
    client: ClientSettings = ClientSettings()
    logging: LoggingSettings = LoggingSettings()
    plugins: PluginsSettings = PluginsSettings()
    templates: TemplatesSettings = TemplatesSettings()
    inputs: InputsSettings = InputsSettings()
    adapters: dict[
        Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]*$", max_length=64)],
        AdapterSettings,
    ] = {}

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence: explicit arguments > environment > TOML file > defaults.
        toml_path = _CONFIG_PATH_OVERRIDE or Path(
            os.environ.get(CONFIG_PATH_ENV, str(DEFAULT_CONFIG_PATH))
        )
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_path))


_CONFIG_PATH_OVERRIDE: Path | None = None


def load_settings(config_path: Path | None = None, **overrides: Any) -> Settings:
    """Load and validate settings once; a bad key or value raises ConfigError naming it."""
    from pydantic import ValidationError

    global _CONFIG_PATH_OVERRIDE
    if config_path is not None and not config_path.is_file():
        raise ConfigError(f"config file not found: {config_path}")
    _CONFIG_PATH_OVERRIDE = config_path
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
            for err in exc.errors(include_input=False)
        )
        raise ConfigError(f"invalid configuration: {problems}") from None
    finally:
        _CONFIG_PATH_OVERRIDE = None
    toml_path = config_path or Path(os.environ.get(CONFIG_PATH_ENV, str(DEFAULT_CONFIG_PATH)))
    return _relative_to_config_file(settings, toml_path, overrides)


# Paths a config file names relative to itself, as people expect of a file that refers
# to its neighbours (a path from the environment or an argument is the caller's own).
# These two defaults are neighbours of the config file too, even when the file is silent.
DEFAULTS_BESIDE_CONFIG_FILE = (("policy", "file"), ("templates", "dir"))


def _relative_to_config_file(
    settings: Settings, toml_path: Path, overrides: dict[str, Any]
) -> Settings:
    """Relative paths of the file resolved against its directory: every path setting
    the file sets (`ca_cert_file = "ca.pem"`, `[adapters.x] path`), the two defaults
    above, and in the plugins' tables every key ending in `_file` (the project's
    convention for a key naming a file, e.g. the webhook's `secret_file`). Without a
    config file, relative paths stay relative to the working directory."""
    if not toml_path.is_file():
        return settings
    base = toml_path.parent
    from_env = {name.upper() for name in os.environ}
    changes: dict[str, Any] = {}
    for section in type(settings).model_fields:
        if section in overrides:
            continue
        current = getattr(settings, section)
        if isinstance(current, PluginsSettings):
            tables = {
                name: _plugin_files_beside(base, table, f"ZIMAGE_PLUGINS__{name}", from_env)
                for name, table in current.tables().items()
            }
            if tables != current.tables():
                changes[section] = current.model_copy(update=tables)
        elif isinstance(current, BaseModel):
            update = {
                key: base / value
                for key, value in _relative_paths(current)
                if f"ZIMAGE_{section}__{key}".upper() not in from_env
                and (
                    key in current.model_fields_set or (section, key) in DEFAULTS_BESIDE_CONFIG_FILE
                )
            }
            if update:
                changes[section] = current.model_copy(update=update)
    if settings.adapters and "adapters" not in overrides:
        changes["adapters"] = {
            name: adapter
            if adapter.path.is_absolute()
            else adapter.model_copy(update={"path": base / adapter.path})
            for name, adapter in settings.adapters.items()
        }
    return settings.model_copy(update=changes) if changes else settings


def _relative_paths(section: BaseModel) -> list[tuple[str, Path]]:
    return [
        (key, value)
        for key in type(section).model_fields
        if isinstance(value := getattr(section, key), Path) and not value.is_absolute()
    ]


def _plugin_files_beside(
    base: Path, table: dict[str, Any], env_prefix: str, from_env: set[str]
) -> dict[str, Any]:
    """A plugin table with its relative `*_file` strings resolved against `base`, in
    nested tables too (`publishers.<account>.secret_file`); one set from the
    environment (`from_env`: its variable names, upper case) is left as given."""
    resolved: dict[str, Any] = {}
    for key, value in table.items():
        env = f"{env_prefix}__{key}".upper()
        if isinstance(value, dict):
            resolved[key] = _plugin_files_beside(base, value, env, from_env)
        elif (
            key.endswith("_file")
            and isinstance(value, str)
            and not Path(value).is_absolute()
            and env not in from_env
        ):
            resolved[key] = str(base / value)
        else:
            resolved[key] = value
    return resolved
