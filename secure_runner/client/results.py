"""What a fan-out returns: one `CallResult` per targeted model."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class CallStatus(StrEnum):
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    TIMEOUT = "TIMEOUT"


@dataclass(frozen=True)
class ModelIdentity:
    """Who a model is, as the orchestrator announced it (and the runner's certificate proved)."""

    model_id: str
    model_name: str
    cruncher_id: str
    cruncher_name: str
    deployment_id: str


@dataclass(frozen=True)
class CallResult:
    """One model's answer to one call.

    `reason` is a stable code (secure_runner.errors.ErrorCode) for anything but
    SUCCESS; `message` is for humans. `latency_us` is the round trip from the
    moment the request was handed to gRPC to the moment its answer arrived.
    """

    model: ModelIdentity
    status: CallStatus
    output: Any = None
    latency_us: int = 0
    reason: str = ""
    message: str = ""

    # Names used by the reference client, kept so existing coordinator code runs.
    @property
    def model_runner(self) -> ModelIdentity:
        return self.model

    @property
    def result(self) -> Any:
        return self.output

    @property
    def exec_time_us(self) -> int:
        return self.latency_us

    def __getattr__(self, name: str) -> Any:
        # model_id, model_name, cruncher_id, cruncher_name, deployment_id
        if name in ModelIdentity.__dataclass_fields__:
            return getattr(self.model, name)
        raise AttributeError(name)
