"""Each hosted model's own call counters: what `secure-runner status` shows as its last result.

The runner counts, per hosted model and for its current deployment only (a redeploy
starts from zero), the calls its model was asked to answer, by Call or FanOut: how
many, how many did not succeed, the last one's status, latency and time, and the
last failure's code and message. A request refused before it reaches the model
(an unknown model, an undeclared method) is not a call of the model and is not
counted. The counters travel to the orchestrator in the control socket's STATUS
answer (runner/control.py), which puts them on its operators' model list.

Bounded and typed on both ends: integers, a CallStatus name, an ErrorCode-shaped
code of at most MAX_CODE characters and a message of at most MAX_MESSAGE;
`from_fields` (the orchestrator's side) refuses anything else. Deliberately not
Prometheus: the status view must work whether or not metrics are on.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from secure_runner.v1 import runner_pb2

MAX_CODE = 64
MAX_MESSAGE = 200
STATUS_NAMES = frozenset(
    name.removeprefix("CALL_STATUS_") for name in runner_pb2.CallStatus.keys() if name != "CALL_STATUS_UNSPECIFIED"
)


@dataclass
class CallStats:
    calls: int = 0
    failures: int = 0  # calls answered FAILURE or TIMEOUT
    last_status: str = ""  # SUCCESS, FAILURE or TIMEOUT; "" before the first call
    last_latency_us: int = 0  # the runner's time for the last call, from its arrival to the model's answer
    last_call_ms: int = 0  # unix milliseconds of the last call's answer
    last_failure_code: str = ""  # the last failed call's ErrorCode
    last_failure_message: str = ""

    def record(self, response: runner_pb2.CallResponse, latency_us: int) -> None:
        """Count one answered call (on the event loop: no lock needed)."""
        self.calls += 1
        self.last_status = runner_pb2.CallStatus.Name(response.status).removeprefix("CALL_STATUS_")
        self.last_latency_us = latency_us
        self.last_call_ms = int(time.time() * 1000)
        if response.status != runner_pb2.CALL_STATUS_SUCCESS:
            self.failures += 1
            self.last_failure_code = response.error.code[:MAX_CODE]
            self.last_failure_message = response.error.message[:MAX_MESSAGE]

    def fields(self) -> dict:
        """As the STATUS answer carries them (JSON)."""
        return asdict(self)

    @classmethod
    def from_fields(cls, fields: object) -> CallStats:
        """The counters of a STATUS answer; ValueError unless each field has its type and bounds."""
        if not isinstance(fields, dict) or set(fields) != set(cls.__dataclass_fields__):
            raise ValueError("call counters: unexpected fields")
        numbers = ("calls", "failures", "last_latency_us", "last_call_ms")
        if any(type(fields[name]) is not int or not 0 <= fields[name] < 1 << 63 for name in numbers):
            raise ValueError("call counters: a count is not a non-negative integer")
        if fields["last_status"] not in STATUS_NAMES | {""}:
            raise ValueError("call counters: unknown last status")
        texts = (("last_failure_code", MAX_CODE), ("last_failure_message", MAX_MESSAGE))
        if any(not isinstance(fields[name], str) or len(fields[name]) > cap for name, cap in texts):
            raise ValueError("call counters: a code or message is not a bounded string")
        return cls(**fields)
