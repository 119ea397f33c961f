"""The one way a server records an allow or deny decision: its audit line and its count, together.

Every decision a runner or the orchestrator makes about a peer (the token interceptor, the
peer gate, the servicers' own refusals, the operator RPCs, the runner's control socket, a
refused registry version) goes through a `DecisionRecorder`. It writes the audit line
(transport/audit_log.py: format unchanged) and then counts it in
secure_runner_auth_decisions_total{decision,reason}, so the log and the metric cannot
disagree about what was decided. The decision words are `smp.audit.ALLOW` / `DENY`.

A refusal's reason is its ErrorCode, both in the line and in the metric. An allow line may
carry an outcome other than OK in its `code` (NOT_DONE, FAILURE_REPORTED): the metric counts
it as reason OK, since what the metric counts is the authorization, and keeps its labels to
ErrorCode names and OK. If the audit line cannot be written (AUDIT_UNAVAILABLE) nothing is
counted and the error propagates, as before: no decision goes unrecorded silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from secure_runner.error_table import reason_label
from secure_runner.errors import ErrorCode
from secure_runner.smp.audit import ALLOW, DENY

__all__ = ["AuditSink", "DecisionCounter", "DecisionRecorder", "OK"]

OK = "OK"


class AuditSink(Protocol):
    """Where decision lines go: an `AuditLog`."""

    def record(self, *, decision: str, code: str, who: str, what: Mapping[str, str]) -> None: ...


class DecisionCounter(Protocol):
    """Where decisions are counted: a process's metrics (secure_runner.metrics.ProcessMetrics)."""

    def count_decision(self, decision: str, reason: str) -> None: ...


class DecisionRecorder:
    """Records each decision in `audit` and counts it in `counter` (none: audit only)."""

    def __init__(self, audit: AuditSink, counter: DecisionCounter | None = None) -> None:
        self.audit = audit
        self._counter = counter

    def allow(self, who: str, what: Mapping[str, str], *, code: str = OK) -> None:
        """An authorized request; `code` is the audit line's outcome (OK unless the caller says otherwise)."""
        self.audit.record(decision=ALLOW, code=code, who=who, what=what)
        if self._counter is not None:
            self._counter.count_decision(ALLOW, OK)

    def deny(self, code: ErrorCode, who: str, what: Mapping[str, str]) -> None:
        """A refusal, for the reason `code`."""
        self.audit.record(decision=DENY, code=code, who=who, what=what)
        if self._counter is not None:
            self._counter.count_decision(DENY, reason_label(code))
