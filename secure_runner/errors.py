"""Typed errors with stable codes.

Every refusal the system makes, to a coordinator, a runner or a model, is one of
these. The `code` is part of the public contract: it travels in gRPC trailing
metadata (`sr-reason`) and in result objects, tests assert on it, and it never
changes meaning once released. Messages are for humans and may change; they
never contain a traceback.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    # Values on the wire (codec.py).
    UNSUPPORTED_TYPE = "UNSUPPORTED_TYPE"
    INVALID_VALUE = "INVALID_VALUE"
    VALUE_TOO_LARGE = "VALUE_TOO_LARGE"
    VALUE_TOO_DEEP = "VALUE_TOO_DEEP"
    INVALID_ARGUMENTS = "INVALID_ARGUMENTS"

    # Authentication and authorization (smp/, the runner's interceptor).
    PEER_UNAUTHENTICATED = "PEER_UNAUTHENTICATED"
    TOKEN_MISSING = "TOKEN_MISSING"
    TOKEN_TOO_LARGE = "TOKEN_TOO_LARGE"
    TOKEN_MALFORMED = "TOKEN_MALFORMED"
    TOKEN_UNSUPPORTED_VERSION = "TOKEN_UNSUPPORTED_VERSION"
    KEY_UNKNOWN = "KEY_UNKNOWN"
    KEY_REVOKED = "KEY_REVOKED"
    KEY_NOT_VALID_NOW = "KEY_NOT_VALID_NOW"
    TOKEN_BAD_SIGNATURE = "TOKEN_BAD_SIGNATURE"
    TOKEN_WRONG_CRUNCH = "TOKEN_WRONG_CRUNCH"
    TOKEN_WRONG_AUDIENCE = "TOKEN_WRONG_AUDIENCE"
    TOKEN_WRONG_METHOD = "TOKEN_WRONG_METHOD"
    TOKEN_BODY_MISMATCH = "TOKEN_BODY_MISMATCH"
    TOKEN_CERT_MISMATCH = "TOKEN_CERT_MISMATCH"
    TOKEN_EXPIRED = "TOKEN_EXPIRED"
    TOKEN_NOT_YET_VALID = "TOKEN_NOT_YET_VALID"
    TOKEN_LIFETIME_TOO_LONG = "TOKEN_LIFETIME_TOO_LONG"
    TOKEN_ISSUED_BEFORE_START = "TOKEN_ISSUED_BEFORE_START"
    TOKEN_REPLAYED = "TOKEN_REPLAYED"
    REPLAY_CACHE_FULL = "REPLAY_CACHE_FULL"
    DELEGATION_MISSING = "DELEGATION_MISSING"
    DELEGATION_MALFORMED = "DELEGATION_MALFORMED"
    DELEGATION_BAD_SIGNATURE = "DELEGATION_BAD_SIGNATURE"
    DELEGATION_WRONG_MODEL = "DELEGATION_WRONG_MODEL"
    DELEGATION_EXPIRED = "DELEGATION_EXPIRED"
    DELEGATION_KEY_MISMATCH = "DELEGATION_KEY_MISMATCH"
    MODEL_NOT_REGISTERED = "MODEL_NOT_REGISTERED"
    WATCHER_NOT_AUTHORIZED = "WATCHER_NOT_AUTHORIZED"

    # Registry and PKI files.
    REGISTRY_INVALID = "REGISTRY_INVALID"
    PKI_INVALID = "PKI_INVALID"

    # Requests a runner refuses before any model code runs.
    MALFORMED_REQUEST = "MALFORMED_REQUEST"
    MODEL_UNKNOWN = "MODEL_UNKNOWN"
    MODEL_NOT_SET_UP = "MODEL_NOT_SET_UP"
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"

    # Setup of a submission.
    SETUP_NO_CANDIDATE = "SETUP_NO_CANDIDATE"
    SETUP_MANY_CANDIDATES = "SETUP_MANY_CANDIDATES"
    SETUP_BASE_CLASS = "SETUP_BASE_CLASS"
    SETUP_IMPORT_FAILED = "SETUP_IMPORT_FAILED"
    SETUP_CONSTRUCTOR_FAILED = "SETUP_CONSTRUCTOR_FAILED"
    SETUP_CONFLICT = "SETUP_CONFLICT"

    # What a model did during a call.
    MODEL_RAISED = "MODEL_RAISED"
    MODEL_OUTPUT_INVALID = "MODEL_OUTPUT_INVALID"
    MODEL_TIMEOUT = "MODEL_TIMEOUT"
    WORKER_CRASHED = "WORKER_CRASHED"
    WORKER_PROTOCOL = "WORKER_PROTOCOL"
    MODEL_RESTARTING = "MODEL_RESTARTING"
    MEMORY_LIMIT = "MEMORY_LIMIT"  # killed by its cgroup memory limit, or over its address-space limit
    CPU_LIMIT = "CPU_LIMIT"  # used up its CPU seconds (RLIMIT_CPU)
    # The runner could not give the worker a required sandbox layer: the host's fault, not the model's.
    SANDBOX_UNAVAILABLE = "SANDBOX_UNAVAILABLE"

    # The audit log (smp/audit.py, transport/audit_log.py, `secure-runner audit verify`).
    AUDIT_MALFORMED = "AUDIT_MALFORMED"
    AUDIT_TAMPERED = "AUDIT_TAMPERED"
    AUDIT_BROKEN_CHAIN = "AUDIT_BROKEN_CHAIN"
    AUDIT_UNAVAILABLE = "AUDIT_UNAVAILABLE"

    # Seen by the client (see secure_runner/client/results.py for which side each reason blames).
    UNREACHABLE = "UNREACHABLE"  # the runner cannot be reached, or the model is still (re)connecting
    COOLING_DOWN = "COOLING_DOWN"  # skipped: the model's worker is restarting after a fault
    MODEL_UNAVAILABLE = "MODEL_UNAVAILABLE"  # a model id asked for that is not running now
    MESSAGE_TOO_LARGE = "MESSAGE_TOO_LARGE"  # a request or answer over the gRPC message cap
    CALL_REFUSED = "CALL_REFUSED"
    INTERNAL = "INTERNAL"


class SecureRunnerError(Exception):
    """Base of every error this package raises on purpose."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class CodecError(SecureRunnerError):
    """A value cannot be encoded or decoded within the codec's rules and limits."""


class AuthError(SecureRunnerError):
    """A peer or a token failed a Secure Model Protocol rule."""


class ConfigError(SecureRunnerError):
    """A registry, PKI or configuration file is unusable."""


class RequestError(SecureRunnerError):
    """A request is well authenticated but cannot be served as asked."""


class SetupError(SecureRunnerError):
    """A submission cannot be loaded or instantiated."""


class ModelError(SecureRunnerError):
    """The model misbehaved during a call (raised, bad output, crash, timeout)."""


class AuditError(SecureRunnerError):
    """An audit log does not verify (`line` is 1-based), or cannot be read or written."""

    def __init__(self, code: ErrorCode, message: str, *, line: int | None = None) -> None:
        super().__init__(code, message)
        self.line = line
