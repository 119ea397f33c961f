"""One table for every error code (secure_runner/error_table.py), and refusals standard tools read.

The table decides a code's gRPC status, whose fault it is and whether it restarts a worker;
these tests check it covers every code, that the README's result table says what it says,
and that a plain gRPC client (grpcio-status, none of this project's decoding) reads the
reason of a real runner's and a real orchestrator's refusal from gRPC's rich error model.
"""

from __future__ import annotations

import re
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from secure_runner.error_table import ERROR_TABLE, Fault
from secure_runner.errors import ErrorCode
from secure_runner.orchestrator.service import WATCH_RPC
from secure_runner.smp.identity import PeerIdentity, Role

from conftest import CALL_RPC, CRUNCH, fresh_pki, orchestrating

README = Path(__file__).resolve().parent.parent / "README.md"
# The whole google.rpc.Status of a refusal: its details are capped, so the trailer stays small.
MAX_STATUS_BYTES = 2048


def test_every_error_code_has_exactly_one_row_with_a_real_grpc_status():
    assert set(ERROR_TABLE) == set(ErrorCode)
    for code, spec in ERROR_TABLE.items():
        assert spec.grpc_status in grpc.StatusCode.__members__ and spec.grpc_status != "OK", code
        assert spec.fault in (Fault.MODEL, Fault.INFRASTRUCTURE), code


def _readme_fault_rows() -> list[tuple[str, set[ErrorCode], Fault]]:
    """(status, codes named, fault) of each row of the README's "Whose fault" table; `X_*` names every X_ code."""
    section = README.read_text().split("**Whose fault.**", 1)[1].split("\n\n", 2)[1]
    rows = []
    for line in section.splitlines()[2:]:
        status, reasons, fault, _ = (cell.strip() for cell in line.strip("|").split("|"))
        codes: set[ErrorCode] = set()
        for name in re.findall(r"`([A-Z_]+\*?)`", reasons):
            named = {c for c in ErrorCode if c.startswith(name[:-1])} if name.endswith("*") else {ErrorCode(name)}
            assert named, name
            codes |= named
        rows.append((status, codes, Fault(fault)))
    return rows


def test_the_readme_result_table_agrees_with_the_error_table():
    rows = _readme_fault_rows()
    assert [status for status, _, _ in rows] == ["SUCCESS", "TIMEOUT", "FAILURE", "FAILURE"]
    for status, codes, fault in rows:
        for code in codes:
            assert ERROR_TABLE[code].fault is fault, (code, fault)
    # Every code the model is blamed for is named, so a reader sees the whole list of what counts.
    named_as_model = set().union(*(codes for _, codes, fault in rows if fault is Fault.MODEL))
    assert named_as_model == {c for c, spec in ERROR_TABLE.items() if spec.fault is Fault.MODEL}
    assert next(codes for status, codes, _ in rows if status == "TIMEOUT") == {ErrorCode.MODEL_TIMEOUT}


def test_the_readme_lists_exactly_the_codes_that_restart_a_worker():
    paragraph = README.read_text().split("**Errors.**", 1)[1].split("A refused RPC", 1)[0]
    listed = {ErrorCode(name) for name in re.findall(r"`([A-Z_]+)`", paragraph)} - {ErrorCode.COOLING_DOWN}
    assert listed == {c for c, spec in ERROR_TABLE.items() if spec.restarts_worker}


def _plain_channel(layout, address: str, server_name: str) -> grpc.aio.Channel:
    """A coordinator's mTLS channel built with grpc alone."""
    creds = grpc.ssl_channel_credentials(
        layout.ca_cert.read_bytes(), layout.coordinator_key.read_bytes(), layout.coordinator_cert.read_bytes()
    )
    return grpc.aio.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", server_name)])


async def _error_info_of_refused(call) -> tuple[grpc.StatusCode, error_details_pb2.ErrorInfo, int]:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        status = rpc_status.from_call(error)  # checks code and message agree with the call's own
        assert status is not None, "no google.rpc.Status in the trailers"
        assert len(status.details) == 1 and status.details[0].Is(error_details_pb2.ErrorInfo.DESCRIPTOR)
        info = error_details_pb2.ErrorInfo()
        status.details[0].Unpack(info)
        return error.code(), info, status.ByteSize()
    raise AssertionError("the call was not refused")


async def test_a_runners_refusal_carries_an_error_info_a_plain_client_reads(layout, runners):
    server_name = PeerIdentity.make(CRUNCH, Role.RUNNER, "counter").tls_server_name
    async with _plain_channel(layout, runners["counter"].address, server_name) as channel:
        call = channel.unary_unary(CALL_RPC)(b"\x0a\x07counter", timeout=10)  # no token
        code, info, size = await _error_info_of_refused(call)
    assert (code, info.reason, info.domain) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MISSING", "secure-runner")
    assert dict(info.metadata) == {"fault": "INFRASTRUCTURE"}
    assert size < MAX_STATUS_BYTES


async def test_an_orchestrators_refusal_carries_an_error_info_a_plain_client_reads(tmp_path):
    layout = fresh_pki(tmp_path)
    async with orchestrating(layout, tmp_path, {}) as orchestrator:
        server_name = PeerIdentity.make(CRUNCH, Role.ORCHESTRATOR, "orchestrator").tls_server_name
        async with _plain_channel(layout, f"127.0.0.1:{orchestrator.port}", server_name) as channel:
            code, info, size = await _error_info_of_refused(channel.unary_stream(WATCH_RPC)(b"", timeout=10).read())
    assert (code, info.reason, info.domain) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MISSING", "secure-runner")
    assert size < MAX_STATUS_BYTES
