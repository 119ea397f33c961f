"""An orchestrator process for runners started elsewhere (the tests start them).

    python static_orchestrator.py PKI_DIR CRUNCH_ID MODELS_JSON PORT AUDIT_FILE

MODELS_JSON lists `{"model_id", "deployment_id", "address"}`; names and crunchers come
from the PKI's registry, and each runner's delegation is signed for the runner
certificate in PKI_DIR (as the embedded orchestrator does). It serves that list
over mTLS, takes failure reports (a report for the listed deployment marks it
STOPPED), prints `READY <port>` and runs until killed. Killing it leaves the
runners running, which is what an orchestrator restart test needs.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from secure_runner import pki
from secure_runner.orchestrator.credentials import sign_delegation
from secure_runner.orchestrator.service import ModelBoard, OrchestratorServer
from secure_runner.v1 import orchestrator_pb2

RUNNING, STOPPED = orchestrator_pb2.MODEL_STATE_RUNNING, orchestrator_pb2.MODEL_STATE_STOPPED


async def main(pki_dir: str, crunch_id: str, models_json: str, port: str, audit_file: str) -> None:
    layout = pki.PkiLayout(Path(pki_dir))
    board = ModelBoard(crunch_id)

    async def stop_model(model_id: str, deployment_id: str) -> bool:
        info = board.get(model_id)
        if info is None or info.deployment_id != deployment_id or info.state != RUNNING:
            return False
        stopped = orchestrator_pb2.ModelInfo()
        stopped.CopyFrom(info)
        stopped.state = STOPPED
        await board.put(stopped)
        return True

    server = OrchestratorServer(board, layout, Path(audit_file), stop_model)
    registry = server.registry.current().registry
    for entry in json.loads(Path(models_json).read_text()):
        listed = registry.model(crunch_id, entry["model_id"])
        info = orchestrator_pb2.ModelInfo(
            model_id=entry["model_id"], model_name=listed.model_name, cruncher_id=listed.cruncher_id,
            cruncher_name=listed.cruncher_name, deployment_id=entry["deployment_id"], address=entry["address"],
            state=RUNNING,
        )
        cert = pki.load_certificate(layout.runner_cert(info.model_id))
        info.runner_delegation = sign_delegation(layout, crunch_id, info, cert)
        await board.put(info)
    print(f"READY {await server.start(port=int(port))}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
