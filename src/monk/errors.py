"""monk's error tree. Every failure monk reports is one of these; nothing else escapes.

    MonkError                      base; .code is the stable error_code      HTTP / exit
    ├── UsageError                 bad input to monk (validation)             400 / 2
    │   ├── InvalidName            tenant, template, schema or database name  400 / 2
    │   ├── InvalidTemplateSource  template.json, schemas, data, migrations   422 / 2
    │   ├── InvalidRequest         a well-formed body or argument, wrong      422 / 2
    │   ├── LoginFieldMissing      AUTH_{TENANT,USERNAME,PASSWORD}_MISSING     400 / 2
    │   ├── IdempotencyKeyReused   one Idempotency-Key, other parameters      422 / 2
    │   ├── InvalidQuery           a data request's where/order/select/field  400 / 2
    │   ├── RecordInvalid          VALIDATION_ERROR: a record fails its model 400 / 2
    │   └── HostUnsuitable         a server that cannot be a host (role, version) 422 / 2
    ├── ConfigError                a setting is wrong or its target unusable  500 / 6
    ├── NotFound                                                              404 / 3
    │   ├── TenantNotFound
    │   ├── TemplateNotFound
    │   ├── OperationNotFound
    │   ├── HostNotFound
    │   ├── ModelNotFound          a tenant's model (schema) not registered
    │   ├── RecordNotFound         a tenant's record (or trashed/deleted)
    │   └── DatabaseMissing        a database monk expected is not there
    ├── Conflict                                                              409 / 4
    │   ├── TenantExists
    │   ├── HashCollision          two names, one hash: refused
    │   ├── InvalidState           not in a state that allows the action
    │   ├── DatabaseExists         a database of that name is already there
    │   ├── StrayDatabase          a tenant's database exists with no live tenant
    │   ├── TemplateInUse          a build that tenants or spares still need
    │   ├── TemplateNotBuilt       a provision of a key with no build yet
    │   ├── HostExists             a host of that name, URL or cluster is registered
    │   ├── HostInUse              a host that live tenants still record
    │   ├── UpgradeRunning         another process runs an upgrade of the key
    │   ├── MoveRunning            the tenant is being moved by another process
    │   └── DrainRunning           the host is being drained by another process
    ├── Unavailable                retryable: try again later                 503 / 5
    │   ├── DatabaseUnavailable    the PostgreSQL server cannot be reached
    │   ├── TemplateBusy           sessions kept the template busy too long
    │   ├── ServerStartError       the embedded server did not start
    │   ├── HostUnavailable        a host of the fleet cannot be reached
    │   ├── BudgetExhausted        no tenant connection free within the wait  503 / 5
    │   ├── NoHostAvailable        placement found no eligible host (full, draining, labels)
    │   └── DiskFull               the server's disk is full: free space      507 / 5
    ├── AuthError                                                             401 / 7
    │   ├── RootAccessRequired                                                403 / 7
    │   ├── LoginFailed            unknown tenant, unknown user, wrong password 401 / 7
    │   ├── TokenRequired / TokenInvalid / TokenExpired  (tenant routes)      401 / 7
    │   ├── LoginThrottled         too many failed logins: Retry-After        429 / 7
    │   ├── TenantDisabled         a valid tenant token, the tenant disabled  403 / 7
    │   ├── AccessDenied           the tenant user's access is deny           403 / 7
    │   ├── AccessInsufficient     the user's access is below the action's    403 / 7
    │   └── TenantGone             a valid tenant token, the tenant trashed/purged 410 / 7
    └── OperationFailed            a step failed and was undone (.step)       500 / 1

``ERROR_TABLE`` maps each class to its HTTP status and CLI exit code; the most specific class wins.
"""

from __future__ import annotations

from typing import Any, ClassVar


class MonkError(Exception):
    """Base of every error monk reports."""

    code: ClassVar[str] = "MONK_ERROR"
    retryable: ClassVar[bool] = False
    # With retryable: seconds a client should wait before trying again (HTTP Retry-After).
    retry_after: ClassVar[int] = 2

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def __str__(self) -> str:
        return self.message


class UsageError(MonkError):
    code = "VALIDATION_ERROR"


class InvalidName(UsageError):
    code = "INVALID_NAME"


class InvalidTemplateSource(UsageError):
    code = "INVALID_TEMPLATE_SOURCE"


class InvalidRequest(UsageError):
    code = "INVALID_REQUEST"


class LoginFieldMissing(UsageError):
    """A login body without one of its fields; ``field`` picks the origin's code."""

    code = "AUTH_FIELD_MISSING"


class TenantMissing(LoginFieldMissing):
    code = "AUTH_TENANT_MISSING"


class UsernameMissing(LoginFieldMissing):
    code = "AUTH_USERNAME_MISSING"


class PasswordMissing(LoginFieldMissing):
    code = "AUTH_PASSWORD_MISSING"


class IdempotencyKeyReused(UsageError):
    code = "IDEMPOTENCY_KEY_REUSED"


class InvalidQuery(UsageError):
    """A tenant data request naming a field the model does not have, or a malformed where,
    order, select, limit or id."""

    code = "INVALID_QUERY"


class RecordInvalid(UsageError):
    """A record the model's JSON Schema (or the table's constraints) refuses; the message names
    the record's index and the field. Nothing of the request was written."""

    code = "VALIDATION_ERROR"


class HostUnsuitable(UsageError):
    """A server ``monk host add`` refuses: its role lacks privileges, its version is not
    supported, or it refused the credentials."""

    code = "HOST_UNSUITABLE"


class ConfigError(MonkError):
    code = "CONFIG_ERROR"


class NotFound(MonkError):
    code = "NOT_FOUND"


class TenantNotFound(NotFound):
    code = "TENANT_NOT_FOUND"


class TemplateNotFound(NotFound):
    code = "TEMPLATE_NOT_FOUND"


class OperationNotFound(NotFound):
    code = "OPERATION_NOT_FOUND"


class HostNotFound(NotFound):
    code = "HOST_NOT_FOUND"


class ModelNotFound(NotFound):
    code = "MODEL_NOT_FOUND"


class RecordNotFound(NotFound):
    code = "RECORD_NOT_FOUND"


class DatabaseMissing(NotFound):
    code = "DATABASE_NOT_FOUND"


class Conflict(MonkError):
    code = "CONFLICT"


class TenantExists(Conflict):
    code = "TENANT_EXISTS"


class HashCollision(Conflict):
    code = "TENANT_HASH_COLLISION"


class InvalidState(Conflict):
    code = "INVALID_STATE"


class DatabaseExists(Conflict):
    code = "DATABASE_EXISTS"


class StrayDatabase(Conflict):
    code = "STRAY_DATABASE"


class TemplateInUse(Conflict):
    code = "TEMPLATE_IN_USE"


class TemplateNotBuilt(Conflict):
    """A provision of a template key that has no ready build: no HTTP request builds one."""

    code = "TEMPLATE_NOT_BUILT"


class HostExists(Conflict):
    code = "HOST_EXISTS"


class HostInUse(Conflict):
    code = "HOST_IN_USE"


class UpgradeRunning(Conflict):
    """A fleet upgrade of a key while another process runs one (its lock is held)."""

    code = "UPGRADE_RUNNING"


class MoveRunning(Conflict):
    """A move of a tenant while another process moves it (its lock is held)."""

    code = "MOVE_RUNNING"


class DrainRunning(Conflict):
    """A drain of a host while another process drains it (its lock is held)."""

    code = "DRAIN_RUNNING"


class Unavailable(MonkError):
    code = "UNAVAILABLE"
    retryable = True


class DatabaseUnavailable(Unavailable):
    code = "DATABASE_UNAVAILABLE"
    retry_after = 1  # the circuit breaker probes the server every half second


class TemplateBusy(Unavailable):
    code = "TEMPLATE_BUSY"


class ServerStartError(Unavailable):
    code = "SERVER_START_FAILED"


class HostUnavailable(Unavailable):
    """A host of the fleet does not answer (or its breaker is open): its tenants' operations
    fail at once with its name; the other hosts' tenants are served as usual."""

    code = "HOST_UNAVAILABLE"
    retry_after = 1  # its breaker lets one attempt through every half second


class BudgetExhausted(Unavailable):
    """Every tenant data connection of the host stayed in use for MONK_BUDGET_WAIT_MS."""

    code = "BUDGET_EXHAUSTED"
    retry_after = 1  # a request holds a connection for milliseconds


class NoHostAvailable(Unavailable):
    """Placement found no eligible host: every one is draining, full, or lacks the labels
    asked for. Retryable: capacity frees, a host is added or undrained."""

    code = "NO_HOST_AVAILABLE"
    retry_after = 30


class DiskFull(Unavailable):
    """PostgreSQL could not write (SQLSTATE 53100), or monk could not write a file (ENOSPC)."""

    code = "DISK_FULL"
    retry_after = 60


class AuthError(MonkError):
    code = "AUTH_FAILED"


class RootAccessRequired(AuthError):
    code = "ROOT_ACCESS_REQUIRED"


class LoginFailed(AuthError):
    """One answer for an unknown tenant, an unknown user and a wrong password."""

    code = "AUTH_LOGIN_FAILED"


class TokenRequired(AuthError):
    code = "AUTH_TOKEN_REQUIRED"


class TokenInvalid(AuthError):
    code = "AUTH_TOKEN_INVALID"


class TokenExpired(AuthError):
    code = "AUTH_TOKEN_EXPIRED"


class LoginThrottled(AuthError):
    """Too many failed logins for one tenant and user; ``details["retry_after"]`` seconds."""

    code = "AUTH_RATE_LIMITED"
    retryable = True


class TenantDisabled(AuthError):
    code = "TENANT_DISABLED"


class AccessDenied(AuthError):
    """A tenant user whose access is ``deny``: no data route answers them."""

    code = "ACCESS_DENIED"


class AccessInsufficient(AuthError):
    """A tenant user whose access is below what the action needs (read < edit < full < root)."""

    code = "ACCESS_INSUFFICIENT"


class TenantGone(AuthError):
    code = "TENANT_GONE"


class OperationFailed(MonkError):
    code = "OPERATION_FAILED"

    def __init__(self, message: str, *, step: str, **details: Any) -> None:
        super().__init__(message, step=step, **details)
        self.step = step


# class -> (HTTP status, CLI exit code). Exit codes: 0 ok, 1 error, 2 usage, 3 not found,
# 4 conflict, 5 unavailable (retry), 6 configuration, 7 auth. The CLI's exits that are results,
# not errors (a check that found problems: 1), are named in monk.cli.exits.
ERROR_TABLE: dict[type[MonkError], tuple[int, int]] = {
    MonkError: (500, 1),
    UsageError: (400, 2),
    InvalidName: (400, 2),
    InvalidTemplateSource: (422, 2),
    InvalidRequest: (422, 2),
    IdempotencyKeyReused: (422, 2),
    HostUnsuitable: (422, 2),
    ConfigError: (500, 6),
    NotFound: (404, 3),
    Conflict: (409, 4),
    TemplateNotBuilt: (409, 4),
    Unavailable: (503, 5),
    BudgetExhausted: (503, 5),
    NoHostAvailable: (503, 5),
    DiskFull: (507, 5),
    AuthError: (401, 7),
    RootAccessRequired: (403, 7),
    LoginThrottled: (429, 7),
    TenantDisabled: (403, 7),
    AccessDenied: (403, 7),
    AccessInsufficient: (403, 7),
    TenantGone: (410, 7),
    OperationFailed: (500, 1),
}


def error_codes() -> list[str]:
    """Every ``code`` of the tree (its classes and their subclasses)."""
    found: list[str] = []
    todo: list[type[MonkError]] = [MonkError]
    while todo:
        cls = todo.pop()
        found.append(cls.code)
        todo.extend(cls.__subclasses__())
    return sorted(set(found))


def table_entry(error_class: type[MonkError]) -> tuple[int, int]:
    """The HTTP status and exit code of an error class: the entry of its most specific class."""
    for cls in error_class.__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return ERROR_TABLE[MonkError]


def status_and_exit(err: MonkError) -> tuple[int, int]:
    """The HTTP status and exit code of ``err``."""
    return table_entry(type(err))
