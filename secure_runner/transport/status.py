"""How typed errors travel over gRPC: a status code plus a stable reason code.

The status is the code's row in secure_runner/error_table.py. The reason code is sent
three ways: as trailing metadata `sr-reason`, as the prefix of the status details
("CODE: message", at most MAX_DETAILS_CHARS), and as gRPC's rich error model
(`grpc-status-details-bin`: a `google.rpc.Status` holding one `google.rpc.ErrorInfo`
with the code as `reason`, ERROR_DOMAIN as `domain`, and the code's fault from the
table as its only metadata), so grpcurl and other languages' clients read it without
this project's code. Nothing else about an error, and never a traceback, crosses the wire.
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from secure_runner.error_table import spec_of
from secure_runner.errors import ErrorCode, SecureRunnerError

REASON_KEY = "sr-reason"
TOKEN_KEY = "sr-token-bin"

ERROR_DOMAIN = "secure-runner"
# A refusal's details stay short whatever its message: the whole status fits in a small trailer.
MAX_DETAILS_CHARS = 512


def grpc_status(code: ErrorCode) -> grpc.StatusCode:
    return grpc.StatusCode[spec_of(code).grpc_status]


async def abort(context: grpc.aio.ServicerContext, error: SecureRunnerError) -> None:
    """End the RPC with the error's status and reason code (raises, never returns)."""
    status_code = grpc_status(error.code)
    details = f"{error.code}: {error.message}"[:MAX_DETAILS_CHARS]
    info = error_details_pb2.ErrorInfo(
        reason=str(error.code), domain=ERROR_DOMAIN, metadata={"fault": str(spec_of(error.code).fault)}
    )
    rich = status_pb2.Status(code=status_code.value[0], message=details)
    rich.details.add().Pack(info)
    trailers = ((REASON_KEY, str(error.code)), *rpc_status.to_status(rich).trailing_metadata)
    await context.abort(status_code, details, trailers)


def reason_of(error: grpc.aio.AioRpcError) -> str | None:
    """The reason code a server attached to a failed call, if any."""
    for key, value in error.trailing_metadata() or ():
        if key == REASON_KEY:
            return value
    return None
