"""One FanOut call to a model node, seen as one in-flight call per model.

A node (one runner process) may host several of the crunch's models; the client
then sends them one FanOut request with one token instead of one call each. The
runner streams each model's result as soon as that model answers. Each model's
`ModelFlight` behaves like a single call's `InFlight`: its latency runs from
the node call's send step to the arrival of that model's result, and its
outcome is the model's CallResponse, or what went wrong, never an exception.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import grpc

from secure_runner.v1 import runner_pb2


def fan_out_request(
    model_requests: Sequence[tuple[str, bytes]], method: str, parsed: dict[bytes, runner_pb2.CallRequest]
) -> runner_pb2.FanOutRequest:
    """The FanOut for (model id, shared Call bytes) pairs: common arguments once, the others per model.

    Each distinct request is parsed once into `parsed`, which the caller keeps for every
    node of one call, so the usual case (the same arguments for every model) costs one
    parse whatever the number of models and nodes.
    """
    for _, shared in model_requests:
        if shared not in parsed:
            parsed[shared] = runner_pb2.CallRequest.FromString(shared)
    common_bytes = model_requests[0][1]
    common = parsed[common_bytes]
    request = runner_pb2.FanOutRequest(
        model_ids=[model_id for model_id, _ in model_requests],
        method=method,
        arguments=common.arguments,
        kwargs=common.kwargs,
    )
    for model_id, shared in model_requests:
        if shared != common_bytes:
            request.per_model.add(model_id=model_id, arguments=parsed[shared].arguments, kwargs=parsed[shared].kwargs)
    return request


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """A call's failure made on this side, shaped like one gRPC reports."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class ModelFlight:
    def __init__(self, node: NodeFlight) -> None:
        self._node = node
        self.ended: float | None = None
        self.future: asyncio.Future = asyncio.get_running_loop().create_future()

    @property
    def latency_us(self) -> int:
        ended = self.ended if self.ended is not None else time.perf_counter()
        return max(int((ended - self._node.started) * 1_000_000), 0)

    def settle(self, outcome: runner_pb2.CallResponse | Exception) -> None:
        if not self.future.done():
            self.ended = time.perf_counter()
            self.future.set_result(outcome)

    def outcome(self) -> asyncio.Future:
        """The model's CallResponse, or what went wrong; a plain future, so gathering costs no task."""
        return self.future


class NodeFlight:
    """Reads one FanOut stream and settles every model's flight, whatever happens to the stream."""

    def __init__(self, call: grpc.aio.UnaryStreamCall, model_ids: Sequence[str]) -> None:
        self.call = call
        self.started = time.perf_counter()
        loop = asyncio.get_running_loop()
        loop.call_soon(self._start)  # right behind gRPC's own send step, as for single calls
        self.flights = {model_id: ModelFlight(self) for model_id in model_ids}
        self._reader = loop.create_task(self._read())

    def _start(self) -> None:
        self.started = time.perf_counter()

    async def _read(self) -> None:
        failure: Exception = rpc_error(grpc.StatusCode.INTERNAL, "the node ended its stream without this model's result")
        try:
            async for batch in self.call:
                for result in batch.results:
                    flight = self.flights.get(result.model_id)
                    if flight is not None:
                        flight.settle(result.response)
        except grpc.aio.AioRpcError as exc:
            failure = exc
        except asyncio.CancelledError:
            failure = rpc_error(grpc.StatusCode.CANCELLED, "the fan-out was cancelled")
            raise
        except Exception as exc:  # noqa: BLE001 - a bug in the stream: a result per model, not a crash
            failure = exc
        finally:
            for flight in self.flights.values():
                flight.settle(failure)
