"""secure-runner: call many untrusted AI models over mutual TLS, safely.

The public API for coordinators. Names are loaded lazily so that the sandboxed
worker, which imports `secure_runner.codec`, never pulls in grpc or key code.

    from secure_runner import (
        DynamicSubclassModelConcurrentRunner, CoordinatorSecurity,
        Argument, KwArgument, Variant, VariantType, encode_data,
    )
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING

# TLS 1.3 only (SECURITY.md T-1). grpcio has no TLS version setting; its core reads
# this cipher list from the C environment once, when grpc is first imported. Naming
# only a PSK suite, which grpc never negotiates, leaves TLS 1.2 no cipher (TLS 1.3
# suites are not configurable and stay on). Servers check at start that it took
# effect (tls.check_tls13_only). putenv, not os.environ: grpc reads the C environment,
# and the sandboxed worker, which imports this package for the codec, checks that its
# os.environ holds only the variables the runner gave it.
_TLS13_CIPHERS = "PSK-AES128-CBC-SHA"
TLS13_ONLY = "grpc" not in sys.modules or os.environ.get("GRPC_SSL_CIPHER_SUITES") == _TLS13_CIPHERS
os.putenv("GRPC_SSL_CIPHER_SUITES", _TLS13_CIPHERS)
# grpc's documented default verbosity is ERROR, but its core prints INFO lines (every refused
# handshake, the start-up self-check's included) unless told: keep operators' output to errors
# unless they ask for more.
if "GRPC_VERBOSITY" not in os.environ:
    os.putenv("GRPC_VERBOSITY", "ERROR")

_EXPORTS = {
    "DynamicSubclassModelConcurrentRunner": "secure_runner.client.concurrent_runner",
    "CoordinatorSecurity": "secure_runner.client.security",
    "CallResult": "secure_runner.client.results",
    "CallStatus": "secure_runner.client.results",
    "Fault": "secure_runner.client.results",
    "ModelIdentity": "secure_runner.client.results",
    "Argument": "secure_runner.v1.values_pb2",
    "KwArgument": "secure_runner.v1.values_pb2",
    "Variant": "secure_runner.v1.values_pb2",
    "VariantType": "secure_runner.v1.values_pb2",
    "encode_data": "secure_runner.codec",
    "decode_data": "secure_runner.codec",
    "ErrorCode": "secure_runner.errors",
    "SecureRunnerError": "secure_runner.errors",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from secure_runner.client.concurrent_runner import DynamicSubclassModelConcurrentRunner
    from secure_runner.client.results import CallResult, CallStatus, Fault, ModelIdentity
    from secure_runner.client.security import CoordinatorSecurity
    from secure_runner.codec import decode_data, encode_data
    from secure_runner.errors import ErrorCode, SecureRunnerError
    from secure_runner.v1.values_pb2 import Argument, KwArgument, Variant, VariantType


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'secure_runner' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
