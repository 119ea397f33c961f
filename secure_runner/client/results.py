"""What a fan-out returns: one `CallResult` per targeted model, and who is to blame for it.

Every targeted model gets exactly one result per call, whatever happened. Its
`status` is SUCCESS, FAILURE or TIMEOUT; anything but SUCCESS carries a stable
`reason` code (`secure_runner.errors.ErrorCode`) and a one-line `message`. The
reason says whose fault the outcome is (`CallResult.fault`, from the reason's row in
secure_runner/error_table.py), and only the model's own faults count toward disconnecting it:

- SUCCESS (fault NONE, reason empty): resets both counters.
- TIMEOUT, fault MODEL, counts toward `max_consecutive_timeouts`:
  MODEL_TIMEOUT, no answer within the call's timeout (the runner cut the call off
  and is replacing the worker, or the runner's answer never came).
- FAILURE, fault MODEL, counts toward `max_consecutive_failures`:
  MODEL_RAISED, MODEL_OUTPUT_INVALID (an output no codec encodes, or an answer the
  worker may not give), MODEL_OUTPUT_TOO_LARGE (an answer over the runner's cap),
  WORKER_CRASHED, WORKER_PROTOCOL, MEMORY_LIMIT, CPU_LIMIT; and the submission's own setup faults:
  SETUP_NO_CANDIDATE, SETUP_MANY_CANDIDATES, SETUP_IMPORT_FAILED, SETUP_CONSTRUCTOR_FAILED.
- FAILURE, fault INFRASTRUCTURE, counts toward nothing:
  - UNREACHABLE: the runner cannot be reached, or the model is still connecting or
    reconnecting (then nothing was sent);
  - COOLING_DOWN: skipped, nothing sent: the model's worker is being replaced after a
    fault, until its runner's health service says the model serves again;
  - MODEL_RESTARTING: the runner answered that the worker is still being replaced
    after a fault it already reported (the fault was counted then, not again);
  - MODEL_STARTING, MODEL_RECOVERING: the orchestrator lists the model as starting or
    recovering (down, not gone): every call targeting it gets this, the message saying
    since when and why; nothing sent;
  - MODEL_UNAVAILABLE: a model id asked for that is not running now (never listed,
    stopped, or disconnected by the limits); nothing sent;
  - MESSAGE_TOO_LARGE: the answer is over the gRPC message cap;
  - WORKER_STARVED: the deadline passed while the model waited for a CPU (the host
    was overloaded: it was kept from running, not slow); its worker is replaced;
  - auth failures: the runner's identity was refused (PEER_UNAUTHENTICATED,
    DELEGATION_*, MODEL_NOT_REGISTERED; nothing sent), or the runner refused our
    token (TOKEN_*, KEY_*, REPLAY_CACHE_FULL), or its registry is out of date
    (REGISTRY_STALE, REGISTRY_UNAVAILABLE);
  - the host's problems: SANDBOX_UNAVAILABLE, SETUP_BASE_CLASS;
  - CALL_REFUSED or the runner's own refusal code (MODEL_UNKNOWN, ...), INTERNAL.

Only a SUCCESS resets the counters; a timeout leaves the failure count alone and
a failure the timeout count. Coordinator mistakes (a method the base class does
not declare, arguments that cannot be encoded, a request over the message cap)
are not results: `call()` raises `RequestError` before anything is sent.

Latency (`latency_us`) is the model's time plus the network's, not the
coordinator's queueing. Every request is serialized and signed before the first
one is sent; the clock of each call starts right after gRPC has started sending
that call (a callback queued behind gRPC's own send step), and stops in gRPC's
completion callback for that call (for a model reached by its node's FanOut: when
that model's result arrives on the stream), before any result of the fan-out is decoded
(outputs are decoded only once every call has completed). So a model's latency
does not include preparing other models' requests, nor handling other models'
answers. It does include the runner's own work (token check, the pipe to the
worker) and any time the coordinator's event loop is blocked by its own code
while the call is in flight: nothing in-process can see an answer arrive then.
Results that were never sent (UNREACHABLE, COOLING_DOWN, MODEL_STARTING, MODEL_RECOVERING,
MODEL_UNAVAILABLE) have latency 0.

`model_latency_us` is the part of it the model's worker had the call, as its runner
measured it (from handing the call to the worker to its answer, the pipe included; the
worker's own figure is ignored). It is 0 when the runner has no such figure (a timeout,
a call not sent), and never more than `latency_us`: the runner is not trusted with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from secure_runner.error_table import ERROR_TABLE, Fault
from secure_runner.errors import ErrorCode


class CallStatus(StrEnum):
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    TIMEOUT = "TIMEOUT"


# FAILURE reasons that are the model's own doing; only these count toward max_consecutive_failures.
# (MODEL_TIMEOUT is the model's fault too, counted as a TIMEOUT by its status.)
MODEL_FAULTS = frozenset(
    code for code, spec in ERROR_TABLE.items() if spec.fault is Fault.MODEL and code is not ErrorCode.MODEL_TIMEOUT
)
# Outcomes after which the runner replaces the model's worker: the model cools down until it serves again.
RESTARTING_FAULTS = frozenset(code for code, spec in ERROR_TABLE.items() if spec.restarts_worker)


def fault_of(status: CallStatus, reason: str) -> Fault:
    if status is CallStatus.SUCCESS:
        return Fault.NONE
    if status is CallStatus.TIMEOUT or reason in MODEL_FAULTS:
        return Fault.MODEL
    return Fault.INFRASTRUCTURE


@dataclass(frozen=True)
class ModelIdentity:
    """Who a model is: names from the coordinator's registry, deployment from the orchestrator's feed.

    The runner's certificate and its cruncher's delegation prove the model id; the
    orchestrator is trusted only for where the model runs and which deployment it is.
    """

    model_id: str
    model_name: str
    cruncher_id: str
    cruncher_name: str
    deployment_id: str


@dataclass(frozen=True)
class CallResult:
    """One model's answer to one call (the module docstring lists every reason and how latency is measured)."""

    model: ModelIdentity
    status: CallStatus
    output: Any = None
    latency_us: int = 0
    reason: str = ""
    message: str = ""
    model_latency_us: int = 0

    @property
    def fault(self) -> Fault:
        return fault_of(self.status, self.reason)

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
