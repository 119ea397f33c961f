"""Every error code's behaviour in one table: its gRPC status, whose fault it is, and whether it restarts a worker.

`ErrorCode` (errors.py) names what went wrong; this table says what that means for each
side, so the transport (transport/status.py: the status a refusal travels with), the
client (client/results.py: which outcomes count against a model, which cool it down) and
the README's result table all read the same row. tests/test_error_table.py checks that
every code has a row and that the README agrees with it.

The gRPC status is kept by name (a `grpc.StatusCode` member) so this module imports no
gRPC: the sandboxed worker and the pure trust core may import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from secure_runner.errors import ErrorCode


class Fault(StrEnum):
    """Whose doing an outcome is: only the model's own faults count toward disconnecting it."""

    NONE = "NONE"
    MODEL = "MODEL"
    INFRASTRUCTURE = "INFRASTRUCTURE"


MODEL, INFRASTRUCTURE = Fault.MODEL, Fault.INFRASTRUCTURE


@dataclass(frozen=True)
class ErrorSpec:
    """What one error code means on the wire and to the coordinator.

    grpc_status: the `grpc.StatusCode` name a server ends a refused RPC with.
    fault: MODEL counts toward disconnecting the model (MODEL_TIMEOUT as a timeout, the
        others as failures); INFRASTRUCTURE (the host, the network, the runner, the
        caller's own credentials) counts toward nothing.
    restarts_worker: the runner replaces the model's worker after this outcome, so the
        client cools the model down until its runner's health service says it serves again.
    """

    grpc_status: str
    fault: Fault
    restarts_worker: bool = False


ERROR_TABLE: dict[ErrorCode, ErrorSpec] = {
    # Values on the wire: a coordinator's own mistakes raise RequestError before anything is sent.
    ErrorCode.UNSUPPORTED_TYPE: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    ErrorCode.INVALID_VALUE: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    ErrorCode.VALUE_TOO_LARGE: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    ErrorCode.VALUE_TOO_DEEP: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    ErrorCode.INVALID_ARGUMENTS: ErrorSpec("INVALID_ARGUMENT", INFRASTRUCTURE),
    # Authentication: identity not established is UNAUTHENTICATED; authenticated but not allowed,
    # PERMISSION_DENIED. A runner identity the client refuses (DELEGATION_*, MODEL_NOT_REGISTERED) is the
    # host's problem, not the model's.
    ErrorCode.PEER_UNAUTHENTICATED: ErrorSpec("UNAUTHENTICATED", INFRASTRUCTURE),
    ErrorCode.TOKEN_MISSING: ErrorSpec("UNAUTHENTICATED", INFRASTRUCTURE),
    ErrorCode.TOKEN_TOO_LARGE: ErrorSpec("UNAUTHENTICATED", INFRASTRUCTURE),
    ErrorCode.TOKEN_MALFORMED: ErrorSpec("UNAUTHENTICATED", INFRASTRUCTURE),
    ErrorCode.TOKEN_UNSUPPORTED_VERSION: ErrorSpec("UNAUTHENTICATED", INFRASTRUCTURE),
    ErrorCode.KEY_UNKNOWN: ErrorSpec("UNAUTHENTICATED", INFRASTRUCTURE),
    ErrorCode.KEY_REVOKED: ErrorSpec("PERMISSION_DENIED", INFRASTRUCTURE),
    ErrorCode.KEY_NOT_VALID_NOW: ErrorSpec("UNAUTHENTICATED", INFRASTRUCTURE),
    ErrorCode.TOKEN_BAD_SIGNATURE: ErrorSpec("UNAUTHENTICATED", INFRASTRUCTURE),
    ErrorCode.TOKEN_WRONG_CRUNCH: ErrorSpec("PERMISSION_DENIED", INFRASTRUCTURE),
    ErrorCode.TOKEN_WRONG_AUDIENCE: ErrorSpec("PERMISSION_DENIED", INFRASTRUCTURE),
    ErrorCode.TOKEN_WRONG_METHOD: ErrorSpec("PERMISSION_DENIED", INFRASTRUCTURE),
    ErrorCode.TOKEN_BODY_MISMATCH: ErrorSpec("UNAUTHENTICATED", INFRASTRUCTURE),
    ErrorCode.TOKEN_CERT_MISMATCH: ErrorSpec("UNAUTHENTICATED", INFRASTRUCTURE),
    ErrorCode.TOKEN_EXPIRED: ErrorSpec("UNAUTHENTICATED", INFRASTRUCTURE),
    ErrorCode.TOKEN_NOT_YET_VALID: ErrorSpec("UNAUTHENTICATED", INFRASTRUCTURE),
    ErrorCode.TOKEN_LIFETIME_TOO_LONG: ErrorSpec("UNAUTHENTICATED", INFRASTRUCTURE),
    ErrorCode.TOKEN_ISSUED_BEFORE_START: ErrorSpec("UNAUTHENTICATED", INFRASTRUCTURE),
    ErrorCode.TOKEN_REPLAYED: ErrorSpec("PERMISSION_DENIED", INFRASTRUCTURE),
    ErrorCode.REPLAY_CACHE_FULL: ErrorSpec("RESOURCE_EXHAUSTED", INFRASTRUCTURE),
    ErrorCode.DELEGATION_MISSING: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    ErrorCode.DELEGATION_MALFORMED: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    ErrorCode.DELEGATION_BAD_SIGNATURE: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    ErrorCode.DELEGATION_WRONG_MODEL: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    ErrorCode.DELEGATION_EXPIRED: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    ErrorCode.DELEGATION_KEY_MISMATCH: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    ErrorCode.DELEGATION_WRONG_HOTKEY: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    ErrorCode.MODEL_NOT_REGISTERED: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    ErrorCode.WATCHER_NOT_AUTHORIZED: ErrorSpec("PERMISSION_DENIED", INFRASTRUCTURE),
    ErrorCode.TOKEN_KID_MISMATCH: ErrorSpec("UNAUTHENTICATED", INFRASTRUCTURE),
    ErrorCode.COORDINATOR_CERT_NOT_ENROLLED: ErrorSpec("UNAUTHENTICATED", INFRASTRUCTURE),  # SMP-5a, beside SMP-4a
    ErrorCode.TOKEN_WRONG_DESTINATION: ErrorSpec("PERMISSION_DENIED", INFRASTRUCTURE),
    # Registry, chain and PKI files.
    ErrorCode.REGISTRY_INVALID: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    ErrorCode.REGISTRY_AMBIGUOUS: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    ErrorCode.REGISTRY_STALE: ErrorSpec("UNAVAILABLE", INFRASTRUCTURE),
    ErrorCode.REGISTRY_UNAVAILABLE: ErrorSpec("UNAVAILABLE", INFRASTRUCTURE),
    ErrorCode.CHAIN_RPC_UNREACHABLE: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    ErrorCode.CHAIN_RPC_TIMEOUT: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    ErrorCode.CHAIN_RPC_RATE_LIMITED: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    ErrorCode.CHAIN_RPC_ERROR: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    ErrorCode.CHAIN_ACCOUNT_MISSING: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    ErrorCode.CHAIN_ACCOUNT_WRONG_OWNER: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    ErrorCode.CHAIN_ACCOUNT_WRONG_DISCRIMINATOR: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    ErrorCode.CHAIN_ACCOUNT_WRONG_SIZE: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    ErrorCode.CHAIN_ACCOUNT_INVALID: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    ErrorCode.PKI_INVALID: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    ErrorCode.CSR_INVALID: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    ErrorCode.CSR_KEY_REFUSED: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    ErrorCode.CSR_IDENTITY_REFUSED: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    ErrorCode.CSR_VALIDITY_REFUSED: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    ErrorCode.CERT_NOT_ISSUED_FOR_US: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    # Requests a runner refuses before any model code runs.
    ErrorCode.MALFORMED_REQUEST: ErrorSpec("INVALID_ARGUMENT", INFRASTRUCTURE),
    ErrorCode.MODEL_UNKNOWN: ErrorSpec("NOT_FOUND", INFRASTRUCTURE),
    ErrorCode.MODEL_NOT_SET_UP: ErrorSpec("FAILED_PRECONDITION", INFRASTRUCTURE),
    ErrorCode.METHOD_NOT_ALLOWED: ErrorSpec("PERMISSION_DENIED", INFRASTRUCTURE),
    # Setup: the submission's own faults are the model's; a base class or conflict is the host's.
    ErrorCode.SETUP_NO_CANDIDATE: ErrorSpec("INTERNAL", MODEL),
    ErrorCode.SETUP_MANY_CANDIDATES: ErrorSpec("INTERNAL", MODEL),
    ErrorCode.SETUP_BASE_CLASS: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    ErrorCode.SETUP_IMPORT_FAILED: ErrorSpec("INTERNAL", MODEL),
    ErrorCode.SETUP_CONSTRUCTOR_FAILED: ErrorSpec("INTERNAL", MODEL),
    ErrorCode.SETUP_CONFLICT: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    # What a model did during a call; a starved worker was kept from running, so it is the host's.
    ErrorCode.MODEL_RAISED: ErrorSpec("INTERNAL", MODEL),
    ErrorCode.MODEL_OUTPUT_INVALID: ErrorSpec("INTERNAL", MODEL),
    ErrorCode.MODEL_TIMEOUT: ErrorSpec("INTERNAL", MODEL, restarts_worker=True),
    ErrorCode.WORKER_CRASHED: ErrorSpec("INTERNAL", MODEL, restarts_worker=True),
    ErrorCode.WORKER_PROTOCOL: ErrorSpec("INTERNAL", MODEL, restarts_worker=True),
    ErrorCode.MODEL_RESTARTING: ErrorSpec("INTERNAL", INFRASTRUCTURE, restarts_worker=True),
    ErrorCode.MEMORY_LIMIT: ErrorSpec("INTERNAL", MODEL, restarts_worker=True),
    ErrorCode.CPU_LIMIT: ErrorSpec("INTERNAL", MODEL, restarts_worker=True),
    ErrorCode.SANDBOX_UNAVAILABLE: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    ErrorCode.MODEL_OUTPUT_TOO_LARGE: ErrorSpec("INTERNAL", MODEL, restarts_worker=True),
    ErrorCode.WORKER_STARVED: ErrorSpec("INTERNAL", INFRASTRUCTURE, restarts_worker=True),
    # The runner sends only sealed memfds of the size it announces: a refusal is the worker's own doing.
    ErrorCode.SHARED_PAYLOAD_REFUSED: ErrorSpec("INTERNAL", MODEL),
    # The audit log and the peer gate.
    ErrorCode.AUDIT_MALFORMED: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    ErrorCode.AUDIT_TAMPERED: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    ErrorCode.AUDIT_BROKEN_CHAIN: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    ErrorCode.AUDIT_UNAVAILABLE: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    ErrorCode.RPC_UNIMPLEMENTED: ErrorSpec("UNIMPLEMENTED", INFRASTRUCTURE),
    # Seen by the client.
    ErrorCode.UNREACHABLE: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    ErrorCode.COOLING_DOWN: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    ErrorCode.MODEL_UNAVAILABLE: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    ErrorCode.MODEL_STARTING: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    ErrorCode.MODEL_RECOVERING: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    ErrorCode.MESSAGE_TOO_LARGE: ErrorSpec("RESOURCE_EXHAUSTED", INFRASTRUCTURE),
    ErrorCode.CALL_REFUSED: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    ErrorCode.INTERNAL: ErrorSpec("INTERNAL", INFRASTRUCTURE),
    # The orchestrator's runners.
    ErrorCode.RUNNER_FAILED: ErrorSpec("INTERNAL", INFRASTRUCTURE),
}


def spec_of(code: ErrorCode) -> ErrorSpec:
    """The row of a code (every ErrorCode has one: tests/test_error_table.py)."""
    return ERROR_TABLE[code]


OK_LABEL, OTHER_LABEL = "OK", "OTHER"
_REASON_LABELS = {code.value: code.value for code in ErrorCode} | {"": OK_LABEL, OK_LABEL: OK_LABEL}


def reason_label(code: str) -> str:
    """A result's or decision's reason as a metric label: this table's code, OK, or OTHER for anything else.

    The metrics' reason label set is this table (issue 15): a code a peer made up is never a label value.
    """
    return _REASON_LABELS.get(code, OTHER_LABEL)
