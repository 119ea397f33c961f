"""The Model Runner server: one servicer, the auth interceptor, health, workers.

Health reports one service per hosted model (named by its model id) plus the
overall service "": a model is SERVING only while its worker is up and set up
(or ready for Setup), so a coordinator can see a restart in progress.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pydantic import BaseModel, ConfigDict

from secure_runner.errors import ErrorCode, RequestError, SecureRunnerError
from secure_runner.runner.auth import CallAuthInterceptor
from secure_runner.runner.supervisor import ModelHost
from secure_runner.runner.worker import WorkerLimits
from secure_runner.smp.identity import validate_id
from secure_runner.transport import tls
from secure_runner.transport.registry_file import RegistryFile
from secure_runner.transport.status import abort
from secure_runner.v1 import runner_pb2, runner_pb2_grpc

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Answer TIMEOUT this long before the caller's own deadline, so the answer arrives.
DEADLINE_MARGIN_SECONDS = 0.05


class RunnerSettings(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    crunch_id: str
    models: dict[str, Path]
    tls: tls.TlsFiles
    registry: Path
    base_paths: list[Path] = []
    host: str = "127.0.0.1"
    port: int = 0
    max_call_seconds: float = 300.0
    setup_timeout: float = 60.0
    limits: WorkerLimits = WorkerLimits()


class ModelRunnerServicer(runner_pb2_grpc.ModelRunnerServicer):
    def __init__(self, hosts: dict[str, ModelHost], settings: RunnerSettings) -> None:
        self._hosts = hosts
        self._settings = settings

    async def _host(self, model_id: str, context) -> ModelHost:
        host = self._hosts.get(model_id)
        if host is None:
            await abort(context, RequestError(ErrorCode.MODEL_UNKNOWN, f"this runner does not host {model_id[:64]!r}"))
        return host

    async def Setup(self, request, context):
        host = await self._host(request.model_id, context)
        return await host.setup(request)

    async def Call(self, request, context):
        host = await self._host(request.model_id, context)
        remaining = context.time_remaining()
        timeout = self._settings.max_call_seconds
        if remaining is not None:
            timeout = min(timeout, remaining - DEADLINE_MARGIN_SECONDS)
        try:
            response = await host.call(request, timeout)
        except SecureRunnerError as exc:
            await abort(context, exc)
        log.debug("model %s %s -> %s", request.model_id, request.method, response.status)
        return response

    async def Reset(self, request, context):
        host = await self._host(request.model_id, context)
        await host.reset()
        return runner_pb2.ResetResponse(status=runner_pb2.CALL_STATUS_SUCCESS)


class RunnerServer:
    def __init__(self, settings: RunnerSettings) -> None:
        validate_id(settings.crunch_id, "crunch id")
        for model_id in settings.models:
            validate_id(model_id, "model id")
        self.settings = settings
        self.health = health.aio.HealthServicer()
        self.hosts = {
            model_id: ModelHost(
                model_id,
                path.resolve(),
                [p.resolve() for p in settings.base_paths],
                settings.limits,
                settings.setup_timeout,
                self._on_health,
            )
            for model_id, path in settings.models.items()
        }
        self._registry = RegistryFile(settings.registry)
        self._server = grpc.aio.server(
            interceptors=[CallAuthInterceptor(settings.crunch_id, self._registry.current)],
            options=tls.SERVER_OPTIONS,
        )
        runner_pb2_grpc.add_ModelRunnerServicer_to_server(ModelRunnerServicer(self.hosts, settings), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self._health_tasks: set[asyncio.Task] = set()
        self.port = 0

    def _on_health(self, model_id: str, serving: bool) -> None:
        task = asyncio.get_running_loop().create_task(self.health.set(model_id, SERVING if serving else NOT_SERVING))
        self._health_tasks.add(task)
        task.add_done_callback(self._health_tasks.discard)

    async def start(self) -> int:
        await asyncio.gather(*(host.start() for host in self.hosts.values()))
        address = f"{self.settings.host}:{self.settings.port}"
        self.port = self._server.add_secure_port(address, tls.server_credentials(self.settings.tls))
        await self._server.start()
        await self.health.set("", SERVING)
        return self.port

    async def stop(self, grace: float = 1.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self._server.stop(grace)
        await asyncio.gather(*(host.close() for host in self.hosts.values()))

    async def wait(self) -> None:
        await self._server.wait_for_termination()
