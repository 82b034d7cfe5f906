"""Settings, loaded once at the edge (CLI entry, ASGI factory) and passed down.

Every setting is an environment variable with the ``MONK_`` prefix (or a line of ``.env``).
"""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import platformdirs
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from monk.core.clone_strategy import StrategySetting, parse_size, parse_strategy_setting
from monk.core.identifiers import validate_database_name

# Re-exported: the service and the API read it from here.
from monk.core.tenant_names import MAX_TENANT_CONNECTION_LIMIT as MAX_TENANT_CONNECTION_LIMIT
from monk.errors import ConfigError, InvalidName

EVENT_TYPES = (
    "tenant.provisioned",
    "tenant.disabled",
    "tenant.enabled",
    "tenant.trashed",
    "tenant.restored",
    "tenant.purged",
    "tenant.moved",  # to another host (payload: host, from_host); written by the move
)


class Hook(BaseModel):
    """One observer: a URL that receives tenant events as signed JSON POSTs."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(pattern=r"^https?://", description="Where events are POSTed.")
    events: list[str] = Field(default=["*"], description="Event types, or '*' for all.")
    secret: SecretStr | None = Field(default=None, description="HMAC-SHA256 signing secret.")
    timeout: float = Field(default=5.0, gt=0, le=60, description="Seconds per delivery.")

    @field_validator("events")
    @classmethod
    def _known_events(cls, value: list[str]) -> list[str]:
        unknown = [e for e in value if e != "*" and e not in EVENT_TYPES]
        if unknown:
            raise ValueError(f"unknown event type(s) {unknown}; known: {', '.join(EVENT_TYPES)}")
        return value

    def wants(self, event_type: str) -> bool:
        return "*" in self.events or event_type in self.events


# The settings given as JSON, and what each expects (for the error naming a bad one).
_JSON_EXPECTED = {
    "template_path": 'a JSON list of folders, e.g. ["/srv/monk-templates"]',
    "pool_spares": 'a JSON object of template key to count, e.g. {"basic": 2}',
    "hooks": 'a JSON list of {"url": …, "events": […], "secret": …}, e.g. '
    '[{"url": "https://app.example.com/monk"}]',
    "console_users": 'a JSON object of user name to argon2 hash, e.g. {"alice": "$argon2id$…"}',
}


def _default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("monk", appauthor=False))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MONK_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
    )

    database_url: SecretStr | None = Field(
        default=None,
        description="Admin URL of an existing PostgreSQL server (superuser, or CREATEDB and "
        "CREATEROLE). Unset: monk runs its embedded server.",
    )
    system_db_name: str = Field(default="monk_main", description="Name of the system database.")
    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="Embedded server data, archives and secrets.",
    )
    host_name: str = Field(
        default="localhost",
        description="Name recorded as the host of tenants on this server.",
    )
    embedded_port: int = Field(
        default=54320, ge=1024, le=65535, description="TCP port of the embedded server (127.0.0.1)."
    )
    embedded_durable: bool = Field(
        default=True,
        description="false turns fsync/synchronous_commit/full_page_writes off: tests only.",
    )
    connect_timeout: int = Field(default=10, ge=1, description="Seconds to wait for a connection.")
    statement_timeout_ms: int = Field(
        default=60_000, ge=0, description="statement_timeout of monk's own sessions (ms)."
    )
    scram_iterations: int = Field(
        default=4096,
        ge=1,
        le=1_000_000,
        description="PBKDF2 iterations of the SCRAM verifiers of tenant passwords (PostgreSQL's "
        "default 4096). monk's passwords are random 192-bit tokens, which no iteration count "
        "makes easier or harder to guess; each iteration costs CPU at every role creation, "
        "password change (server side) and tenant login (client side).",
    )
    clone_timeout: float = Field(
        default=30.0, gt=0, description="Seconds a clone may retry while the template is busy."
    )
    clone_strategy: StrategySetting = Field(
        default="auto",
        description="How tenant databases are cloned from templates: auto (FILE_COPY with "
        "reflink where the host's filesystem can clone files, else WAL_LOG or FILE_COPY by the "
        "template's size), wal_log or file_copy. A template's own clone_strategy "
        "(template.json) wins. See docs/clone-strategy.md.",
    )
    clone_file_copy_above: str = Field(
        default="32MB",
        description="With clone_strategy auto on a host that cannot reflink: templates of at "
        "least this size are cloned with FILE_COPY, smaller ones with WAL_LOG (B, kB, MB, GB).",
    )
    upgrade_lock_timeout: float = Field(
        default=2.0,
        gt=0,
        le=60,
        description="Seconds a tenant upgrade waits for a lock its tenant's sessions hold "
        "before it gives up (and is retried later in the run): the longest an upgrade may "
        "block the tenant's own sessions.",
    )
    template_path: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Extra folders holding template sources (one sub-folder per key).",
    )
    archive_dir: Path | None = Field(
        default=None, description="Where tenant archives go (default <data_dir>/archives)."
    )
    pool_spares: Annotated[dict[str, int], NoDecode] = Field(
        default_factory=lambda: {"basic": 2},
        description="Warm pool: spare databases to keep per template key (JSON; 0 disables).",
    )
    pool_max_total: int = Field(
        default=20, ge=0, description="Warm pool: cap on spare databases over all templates."
    )
    pool_roles: int = Field(
        default=32,
        ge=0,
        le=1000,
        description="Spare roles (with passwords) 'monk serve' keeps ready, so that a cold "
        "provision renames one instead of paying for a new password's hashing (0 disables).",
    )
    pool_size: int = Field(
        default=8, ge=1, le=100, description="Max connections per pool (registry, admin)."
    )
    tenant_connection_limit: int = Field(
        default=20,
        ge=1,
        le=MAX_TENANT_CONNECTION_LIMIT,
        description="CONNECTION LIMIT of each tenant's role, unless the tenant has its own "
        "(with max_connections=100, one tenant takes at most a fifth of the server).",
    )
    host_connections: int = Field(
        default=40,
        ge=1,
        le=10_000,
        description="Connection budget: server connections this process opens for tenant data "
        "requests per host, over all its tenant databases (monk's own pools are apart).",
    )
    tenant_connections: int = Field(
        default=4,
        ge=1,
        le=10_000,
        description="Connection budget: connections one tenant's requests hold at once; its "
        "further requests wait without taking slots from other tenants.",
    )
    budget_wait_ms: int = Field(
        default=2000,
        ge=0,
        le=600_000,
        description="Connection budget: how long a request waits for a connection before it "
        "is answered 503 BUDGET_EXHAUSTED (ms).",
    )
    hooks: Annotated[list[Hook], NoDecode] = Field(
        default_factory=list,
        description='Observers (JSON): [{"url": "https://…", "events": ["tenant.provisioned"], '
        '"secret": "…"}]; monk serve delivers tenant events to them, at least once.',
    )
    events_retention_days: int = Field(
        default=30, ge=1, description="Days delivered events are kept as an audit trail."
    )
    template_retention: str = Field(
        default="7d",
        description="monk serve drops the retired template builds that no tenant (trashed "
        "ones included), archive or spare needs once they have been retired this long: a "
        "number with s, m, h, d or w (7d, 12h, 0 for as soon as nothing needs them), or off.",
    )
    fault_pause_at: str | None = Field(
        default=None,
        description="Test hook: pause forever when an operation reaches this step "
        "(crash tests kill -9 the process there).",
    )
    jwt_secret: SecretStr | None = Field(
        default=None,
        description="HS256 secret of root and tenant tokens (default: generated in data_dir).",
    )
    console_users: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description="Operators who may sign in to the web console besides a root token: "
        "JSON object of user name to argon2 hash (docs/console.md).",
    )
    console_session_ttl: int = Field(
        default=8 * 3600, ge=60, le=7 * 86400, description="Lifetime of a console session, seconds."
    )
    tenant_token_ttl: int = Field(
        default=86400, ge=60, le=30 * 86400, description="Lifetime of a tenant token, seconds."
    )
    login_max_failures: int = Field(
        default=5,
        ge=1,
        le=1000,
        description="Failed logins of one tenant and user allowed per login_failure_window.",
    )
    login_failure_window: int = Field(
        default=300,
        ge=1,
        le=86400,
        description="Seconds over which failed logins are counted; past login_max_failures, "
        "logins of that tenant and user get 429 until the window ends.",
    )
    http_keep_alive: int = Field(
        default=5,
        ge=1,
        le=3600,
        description="Seconds monk serve keeps an idle keep-alive HTTP connection open (longer "
        "than a load balancer's own idle timeout, or it may reuse one the server just closed).",
    )
    tenant_state_ttl_ms: int = Field(
        default=500,
        ge=0,
        le=1000,
        description="How long a serve process trusts its cached copy of a tenant's status "
        "(the bound on how late a disable or trash is seen by tenant requests).",
    )

    @field_validator("console_users")
    @classmethod
    def _console_users_are_argon2(cls, value: dict[str, str]) -> dict[str, str]:
        for user, hashed in value.items():
            if not user.strip():
                raise ValueError("has an empty user name")
            if not hashed.startswith("$argon2"):
                raise ValueError(f"user {user!r}: not an argon2 hash (expected $argon2id$…)")
        return value

    @field_validator("system_db_name")
    @classmethod
    def _system_db_name_is_identifier(cls, value: str) -> str:
        try:
            return validate_database_name(value)
        except InvalidName as exc:
            raise ValueError(str(exc)) from exc

    @field_validator("clone_strategy", mode="before")
    @classmethod
    def _known_clone_strategy(cls, value: object) -> object:
        if isinstance(value, str):
            return parse_strategy_setting(value)
        return value

    @field_validator("clone_file_copy_above", mode="before")
    @classmethod
    def _clone_threshold_is_a_size(cls, value: object) -> object:
        if isinstance(value, int):
            return str(value)
        if isinstance(value, str):
            parse_size(value)  # ValueError: the message names what is expected
        return value

    @property
    def file_copy_above(self) -> int:
        """``clone_file_copy_above`` in bytes."""
        return parse_size(self.clone_file_copy_above)

    @field_validator("template_retention", mode="before")
    @classmethod
    def _retention_is_a_duration(cls, value: object) -> object:
        if isinstance(value, int):
            value = f"{value}s"
        if isinstance(value, str):
            value = value.strip().lower()
            parse_duration(value)  # ValueError: the message names what is expected
        return value

    @property
    def retention(self) -> timedelta | None:
        """``template_retention`` as a duration; None when it is off."""
        return parse_duration(self.template_retention)

    @field_validator("data_dir", "archive_dir", mode="before")
    @classmethod
    def _folder_not_empty(cls, value: object) -> object:
        # Path("") is the current directory: an empty variable must not put a server there.
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty: unset it for the default, or name a folder")
        return value

    @field_validator("jwt_secret")
    @classmethod
    def _secret_not_empty(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty HMAC key fails every token: refuse it here, not at the first request.
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("is empty: unset it for a secret generated in MONK_DATA_DIR")
        return value

    @field_validator(*_JSON_EXPECTED, mode="before")
    @classmethod
    def _json_text(cls, value: object, info: ValidationInfo) -> object:
        # These arrive from the environment as text, decoded here (NoDecode) rather than by
        # pydantic-settings, whose failure names neither the variable nor what it expects.
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            expected = _JSON_EXPECTED[str(info.field_name)]
            raise ValueError(f"is not valid JSON (expected {expected})") from None

    @property
    def archives(self) -> Path:
        return self.archive_dir or self.data_dir / "archives"

    def masked(self) -> dict[str, Any]:
        """The effective settings for display, secrets masked."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = (
                    _mask_url(value.get_secret_value()) if name == "database_url" else "********"
                )
            elif isinstance(value, Path):
                value = str(value)
            elif name == "console_users":
                value = dict.fromkeys(value, "********")
            elif isinstance(value, list):
                # pydantic dumps a SecretStr (a hook's secret) as '**********'
                value = [
                    v.model_dump(mode="json") if isinstance(v, BaseModel) else str(v) for v in value
                ]
            out[f"MONK_{name.upper()}"] = value
        return out


_DURATION = re.compile(r"^(\d+)\s*(s|m|h|d|w)?$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta | None:
    """'7d', '12h', '30m', '45s', '2w', a number of seconds, or 'off' (None)."""
    text = text.strip().lower()
    if text == "off":
        return None
    found = _DURATION.match(text)
    if found is None:
        raise ValueError(
            f"{text!r} is not a duration: give a number with s, m, h, d or w (e.g. 7d), or off"
        )
    return timedelta(seconds=int(found.group(1)) * _UNIT_SECONDS[found.group(2) or "s"])


def _mask_url(url: str) -> str:
    """postgresql://user:secret@host/db -> postgresql://user:********@host/db"""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":********@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def load_settings(**overrides: Any) -> Settings:
    """Read the settings once; a bad value is one ConfigError naming the setting."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = [str(p) for p in error["loc"]] or ["?"]
            # MONK_POOL_SPARES[basic], MONK_HOOKS[0][url]: the variable, then where inside it
            inside = "".join(f"[{p}]" for p in loc[1:])
            message = str(error["msg"]).removeprefix("Value error, ")
            problems.append(f"MONK_{loc[0].upper()}{inside}: {message}")
        raise ConfigError("; ".join(problems)) from None
    except SettingsError as exc:
        # A source that could not be read at all (e.g. a complex value that is not JSON).
        found = re.search(r'field "(\w+)"', str(exc))
        name = f"MONK_{found.group(1).upper()}" if found else "a MONK_ setting"
        raise ConfigError(f"{name}: cannot be read ({exc})") from None
