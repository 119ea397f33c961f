"""A runner's delegation in either accepted form, checked by one function (pure, no I/O).

Ours is a PASETO token (SMP-30..35, `smp.rules.verify_delegation`); the reference's is its
wallet-signed enrolment envelope, a JSON object (EN-1..7, `enrolment`). Both the client
(before it sends a runner anything) and the production orchestrator (before it relays a
delegation) call `verify_runner_delegation`, so they accept the same forms. This module
imports no optional dependency: only a reference enrolment needs the `chain` extra.
"""

from __future__ import annotations

from typing import Any

from secure_runner.errors import AuthError, ErrorCode
from secure_runner.smp import rules


def is_reference_enrolment(delegation: bytes) -> bool:
    """A JSON object is the reference's envelope; a PASETO token never starts with "{"."""
    return delegation.lstrip()[:1] == b"{"


def verify_runner_delegation(delegation: bytes, **checks: Any) -> None:
    """SMP-30..35, or EN-1..7 for a reference enrolment (the same keyword arguments, the same codes)."""
    if not is_reference_enrolment(delegation):
        rules.verify_delegation(delegation, **checks)
        return
    try:
        from secure_runner.registry.enrolment import verify_reference_enrolment
    except ImportError:
        raise AuthError(
            ErrorCode.DELEGATION_MALFORMED, "a reference enrolment needs the `chain` extra to be verified") from None
    verify_reference_enrolment(delegation, **checks)
