"""Big arguments reach workers through one sealed memfd per request (runner/shared_payload.py).

From the outside: a real runner fans a big array out to two copies of a real malicious
submission (`tests/models/malicious/payload-tamper`) that keeps every descriptor its worker
is given and attacks it; and a real worker, driven by the runner's own supervisor code, is
handed wrong descriptors and must refuse each with SHARED_PAYLOAD_REFUSED.
"""

from __future__ import annotations

import fcntl
import os
import socket

import numpy

from secure_runner import codec
from secure_runner.errors import ErrorCode
from secure_runner.runner import shared_payload
from secure_runner.runner.supervisor import ModelHost, WorkerCall
from secure_runner.smp.token import model_id_field
from secure_runner.transport.status import TOKEN_KEY
from secure_runner.v1 import runner_pb2
from secure_runner.v1.values_pb2 import VariantType

from conftest import BASE_PATH, MODELS
from test_worker_trust import FANOUT_RPC, MALICIOUS, OK, Node, node_runner

TAMPER = MALICIOUS / "payload-tamper"
COUNTER = MODELS / "submissions" / "counter"
# Over the threshold: this array goes through the shared payload.
ARRAY = numpy.arange(shared_payload.SHARED_THRESHOLD // 8 + 1024, dtype=numpy.float64)
ENCODED = len(codec.encode_data(VariantType.NDARRAY, ARRAY))
ATTACKS = {"write", "shrink", "grow", "map_shared_writable", "mprotect_to_writable", "add_seal"}


async def fan_out_common(node: Node, method: str, values: list, model_ids: list[str]) -> dict:
    """One FanOut whose arguments every model shares (one WorkerCall, one shared payload on the runner)."""
    request = runner_pb2.FanOutRequest(model_ids=model_ids, method=method, arguments=codec.encode_arguments(values, {})[0])
    body = model_id_field(node.node_id) + request.SerializeToString()
    node.raw.model_id = node.node_id
    token = node.raw.token(body, rpc=FANOUT_RPC, method=method, audience=model_ids)
    stream = node.raw.channel.unary_stream(FANOUT_RPC, response_deserializer=runner_pb2.FanOutResults.FromString)
    results = {}
    async for batch in stream(body, metadata=((TOKEN_KEY, token),), timeout=30):
        results.update((result.model_id, result.response) for result in batch.results)
    return results


def memfds_of(pid: int) -> list[str]:
    links = (os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))
    return [link for link in links if link.startswith("/memfd:")]


async def test_a_model_can_neither_change_nor_receive_the_payload_its_node_mates_read(layout, tmp_path):
    models = {"tamper-a": TAMPER, "tamper-b": TAMPER}
    with node_runner(layout, tmp_path, "payload-node", models) as (private, runner):
        node = Node(private, runner.address, "payload-node")
        assert [setup.status for setup in await node.setup(*models)] == [OK, OK]
        for round_number in (1, 2):
            results = await fan_out_common(node, "echo", [ARRAY], list(models))
            for model_id, response in results.items():
                assert response.status == OK, (model_id, response.error)
                report = codec.from_variant(response.output)
                # Its own calls' descriptors only, one per call, each of its call's payload size.
                assert report["sizes"] == [ENCODED] * round_number, model_id
                for attacks in report["attacks"]:  # every write path is refused by the seals
                    assert set(attacks) == ATTACKS and set(attacks.values()) <= {"EPERM", "EACCES"}, attacks
                # It changed its own copy in place; its node-mate's filling never showed through.
                assert report["only_mine"] is True, model_id
            assert memfds_of(runner.proc.pid) == []  # the runner closed its descriptor once both answered
        await node.close()


class WrongDescriptor:
    """Stands in for a request's SealedPayload and hands the worker other descriptors instead."""

    def __init__(self, *fds: int) -> None:
        self.fds = fds

    def send(self, sock: socket.socket) -> None:
        socket.send_fds(sock, [shared_payload.MARKER], list(self.fds))


def memfd(data: bytes, seals: int) -> int:
    fd = os.memfd_create("not-the-payload", os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


async def test_a_worker_refuses_a_descriptor_that_is_not_its_sealed_payload():
    host = ModelHost("counter", COUNTER, [BASE_PATH])
    await host.start()
    try:
        setup = await host.setup(runner_pb2.SetupRequest(base_classname="sr_testgame.base.GameBase"))
        assert setup.status == OK, setup.error
        arguments, _ = codec.encode_arguments([ARRAY], {})
        real = WorkerCall.encode("echo", arguments, [])
        assert real.payload is not None and real.payload.size == ENCODED
        content = os.pread(real.payload.fd, real.payload.size, 0)
        pipe_read, pipe_write = os.pipe()
        ours = [pipe_read, pipe_write, memfd(content, 0), memfd(content, fcntl.F_SEAL_WRITE),
                memfd(content + b"\0", shared_payload.SEALS)]
        wrong = {
            "a pipe": WrongDescriptor(pipe_read),
            "an unsealed memfd": WrongDescriptor(ours[2]),
            "a memfd sealed against writes only": WrongDescriptor(ours[3]),
            "a sealed memfd of another size": WrongDescriptor(ours[4]),
            "two descriptors": WrongDescriptor(real.payload.fd, real.payload.fd),
            "no descriptor": None,
        }
        for case, payload in wrong.items():
            response = await host.call(WorkerCall("echo", real.frame, payload), 30)
            assert (response.status, response.error.code) == (
                runner_pb2.CALL_STATUS_FAILURE, ErrorCode.SHARED_PAYLOAD_REFUSED,
            ), (case, response)
        for fd in ours:
            os.close(fd)
        # Each wrong descriptor was taken and dropped: the real one is read as before.
        response = await host.call(real, 30)
        assert response.status == OK, response.error
        assert numpy.array_equal(codec.from_variant(response.output), ARRAY)
        real.close()
    finally:
        await host.close()
