"""The boundaries the design promises, checked on what a fresh interpreter actually imports.

`secure_runner/smp/` is the pure trust core: no gRPC, no transport, no key files.
The worker (the sandboxed side, with the discovery and sandbox modules it loads)
never touches gRPC, transport, the trust core or key-handling code: a submission
that escapes into the worker's interpreter must find none of it already imported.
Each check imports the modules in a new `python -I` process and reads `sys.modules`,
so an import hidden in a function that runs at import time counts too.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import pytest

import secure_runner.smp

SMP_MODULES = sorted(f"secure_runner.smp.{m.name}" for m in pkgutil.iter_modules(secure_runner.smp.__path__))
WORKER_MODULES = ["secure_runner.runner.worker", "secure_runner.runner.discovery", "secure_runner.runner.sandbox.bootstrap"]

# Forbidden everywhere below: the network stack and the services built on it, and key issuance.
NETWORK_AND_KEYS = ("grpc", "grpc_health", "secure_runner.transport", "secure_runner.pki",
                    "secure_runner.client", "secure_runner.orchestrator", "secure_runner.runner.server")
# The worker also never holds the trust core or any signature or certificate code.
WORKER_ONLY = ("secure_runner.smp", "nacl", "cryptography")


def _imported_by(modules: list[str]) -> set[str]:
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return set(json.loads(out.stdout))


def _offenders(imported: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(name for name in imported if any(name == f or name.startswith(f + ".") for f in forbidden))


def test_the_trust_core_imports_no_grpc_transport_or_key_files():
    assert len(SMP_MODULES) >= 6  # identity, paseto, registry, replay, rules, token (and audit)
    assert _offenders(_imported_by(SMP_MODULES), NETWORK_AND_KEYS) == []


@pytest.mark.parametrize("module", WORKER_MODULES)
def test_the_worker_side_imports_no_grpc_transport_trust_core_or_keys(module):
    assert _offenders(_imported_by([module]), NETWORK_AND_KEYS + WORKER_ONLY) == []
