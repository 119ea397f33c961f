"""Typed errors with stable codes.

Every refusal the system makes, to a coordinator, a runner or a model, is one of
these. The `code` is part of the public contract: it travels in gRPC trailing
metadata (`sr-reason`) and in result objects, tests assert on it, and it never
changes meaning once released. Messages are for humans and may change; they
never contain a traceback. Every code has a row in `secure_runner/error_table.py` (its
gRPC status, whose fault it is, whether it restarts a worker): add one with a new code.
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
    DELEGATION_WRONG_HOTKEY = "DELEGATION_WRONG_HOTKEY"  # a reference enrolment names another hotkey than the chain
    COORDINATOR_CERT_NOT_ENROLLED = "COORDINATOR_CERT_NOT_ENROLLED"  # TLS key in neither of the chain's cert-hash slots
    MODEL_NOT_REGISTERED = "MODEL_NOT_REGISTERED"
    WATCHER_NOT_AUTHORIZED = "WATCHER_NOT_AUTHORIZED"
    TOKEN_KID_MISMATCH = "TOKEN_KID_MISMATCH"  # the token's kid is not the key id its peer's certificate names
    TOKEN_WRONG_DESTINATION = "TOKEN_WRONG_DESTINATION"  # the token names other servers (dst), not this one

    # Registry and PKI files.
    REGISTRY_INVALID = "REGISTRY_INVALID"
    REGISTRY_AMBIGUOUS = "REGISTRY_AMBIGUOUS"  # a key id or model id listed twice, or a JSON member repeated
    REGISTRY_STALE = "REGISTRY_STALE"  # the registry could not be (re)loaded for longer than allowed
    REGISTRY_UNAVAILABLE = "REGISTRY_UNAVAILABLE"  # the registry source failed in an unexpected way
    # The chain registry adapter (secure_runner/registry/): its RPC and the accounts it reads.
    CHAIN_RPC_UNREACHABLE = "CHAIN_RPC_UNREACHABLE"  # no connection to the Solana JSON-RPC endpoint
    CHAIN_RPC_TIMEOUT = "CHAIN_RPC_TIMEOUT"  # the endpoint did not answer within the configured timeout
    CHAIN_RPC_RATE_LIMITED = "CHAIN_RPC_RATE_LIMITED"  # the endpoint answered HTTP 429
    CHAIN_RPC_ERROR = "CHAIN_RPC_ERROR"  # an HTTP or JSON-RPC error, or an answer that is not the expected shape
    CHAIN_ACCOUNT_MISSING = "CHAIN_ACCOUNT_MISSING"  # an account the registry needs does not exist
    CHAIN_ACCOUNT_WRONG_OWNER = "CHAIN_ACCOUNT_WRONG_OWNER"  # owned by another program than configured
    CHAIN_ACCOUNT_WRONG_DISCRIMINATOR = "CHAIN_ACCOUNT_WRONG_DISCRIMINATOR"  # its first 8 bytes name another type
    CHAIN_ACCOUNT_WRONG_SIZE = "CHAIN_ACCOUNT_WRONG_SIZE"  # truncated or over-long for its layout
    CHAIN_ACCOUNT_INVALID = "CHAIN_ACCOUNT_INVALID"  # right size, but a field is not a valid value
    PKI_INVALID = "PKI_INVALID"
    # The crunch CA's signing policy (provisioning/ca.py) and installing what it issued.
    CSR_INVALID = "CSR_INVALID"  # not a PEM CSR, or its signature (proof of key possession) does not verify
    CSR_KEY_REFUSED = "CSR_KEY_REFUSED"  # the CSR's key is not ECDSA P-256
    CSR_IDENTITY_REFUSED = "CSR_IDENTITY_REFUSED"  # it asks for another crunch, role or id, or for other SANs
    CSR_VALIDITY_REFUSED = "CSR_VALIDITY_REFUSED"  # the validity asked for is outside the policy's bounds
    CERT_NOT_ISSUED_FOR_US = "CERT_NOT_ISSUED_FOR_US"  # a certificate to install: wrong key, CA or identity

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
    MODEL_OUTPUT_TOO_LARGE = "MODEL_OUTPUT_TOO_LARGE"  # a worker's answer over the runner's cap: refused unread
    WORKER_STARVED = "WORKER_STARVED"  # past its deadline while waiting for a CPU: the host's fault, not the model's
    SHARED_PAYLOAD_REFUSED = "SHARED_PAYLOAD_REFUSED"  # a worker refused the descriptor of a call's shared payload

    # The audit log (smp/audit.py, transport/audit_log.py, `secure-runner audit verify`).
    AUDIT_MALFORMED = "AUDIT_MALFORMED"
    AUDIT_TAMPERED = "AUDIT_TAMPERED"
    AUDIT_BROKEN_CHAIN = "AUDIT_BROKEN_CHAIN"
    AUDIT_UNAVAILABLE = "AUDIT_UNAVAILABLE"
    RPC_UNIMPLEMENTED = "RPC_UNIMPLEMENTED"  # a method this server does not have (audited by the peer gate)

    # Seen by the client (secure_runner/error_table.py says which side each reason blames).
    UNREACHABLE = "UNREACHABLE"  # the runner cannot be reached, or the model is still (re)connecting
    COOLING_DOWN = "COOLING_DOWN"  # skipped: the model's worker is restarting after a fault
    MODEL_UNAVAILABLE = "MODEL_UNAVAILABLE"  # a model id asked for that is not running now
    MODEL_STARTING = "MODEL_STARTING"  # listed by the orchestrator, its (new) deployment not up yet
    MODEL_RECOVERING = "MODEL_RECOVERING"  # listed by the orchestrator, its runner or worker being recovered
    MESSAGE_TOO_LARGE = "MESSAGE_TOO_LARGE"  # a request or answer over the gRPC message cap
    CALL_REFUSED = "CALL_REFUSED"
    INTERNAL = "INTERNAL"

    # The orchestrator's runners (orchestrator/launcher.py) and its operators.
    RUNNER_FAILED = "RUNNER_FAILED"  # a runner exited, did not start in time, or is not the one launched


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
