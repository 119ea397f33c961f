"""How typed errors travel over gRPC: a status code plus a stable reason code.

The reason code is sent as trailing metadata `sr-reason` and as the prefix of
the status details ("CODE: message"). Nothing else about an error, and never a
traceback, crosses the wire.
"""

from __future__ import annotations

import grpc

from secure_runner.errors import ErrorCode, SecureRunnerError

REASON_KEY = "sr-reason"
TOKEN_KEY = "sr-token-bin"

# Authenticated but not allowed: PERMISSION_DENIED. Everything else that the
# auth layer refuses means the caller's identity was not established.
_PERMISSION_DENIED = {
    ErrorCode.KEY_REVOKED,
    ErrorCode.TOKEN_REPLAYED,
    ErrorCode.TOKEN_WRONG_CRUNCH,
    ErrorCode.TOKEN_WRONG_AUDIENCE,
    ErrorCode.TOKEN_WRONG_METHOD,
    ErrorCode.METHOD_NOT_ALLOWED,
    ErrorCode.WATCHER_NOT_AUTHORIZED,
    ErrorCode.TOKEN_WRONG_DESTINATION,
}
_OTHER = {
    ErrorCode.REPLAY_CACHE_FULL: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.REGISTRY_STALE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.REGISTRY_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.MODEL_UNKNOWN: grpc.StatusCode.NOT_FOUND,
    ErrorCode.MODEL_NOT_SET_UP: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.MALFORMED_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.INVALID_ARGUMENTS: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.RPC_UNIMPLEMENTED: grpc.StatusCode.UNIMPLEMENTED,
    ErrorCode.MESSAGE_TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
_AUTH_PREFIXES = ("TOKEN_", "KEY_", "PEER_")


def grpc_status(code: ErrorCode) -> grpc.StatusCode:
    if code in _PERMISSION_DENIED:
        return grpc.StatusCode.PERMISSION_DENIED
    if code.startswith(_AUTH_PREFIXES):
        return grpc.StatusCode.UNAUTHENTICATED
    return _OTHER.get(code, grpc.StatusCode.INTERNAL)


async def abort(context: grpc.aio.ServicerContext, error: SecureRunnerError) -> None:
    """End the RPC with the error's status and reason code (raises, never returns)."""
    context.set_trailing_metadata(((REASON_KEY, str(error.code)),))
    await context.abort(grpc_status(error.code), f"{error.code}: {error.message}")


def reason_of(error: grpc.aio.AioRpcError) -> str | None:
    """The reason code a server attached to a failed call, if any."""
    for key, value in error.trailing_metadata() or ():
        if key == REASON_KEY:
            return value
    return None
