"""`--log-format json`: a real runner's log lines, and an orchestrator's with the audit log's field names."""

from __future__ import annotations

import json
import logging
import re

from secure_runner.log_format import JsonLogFormatter

from conftest import MODELS, eventually, fresh_pki, orchestrating


# gRPC's C core writes its own lines to the process's stderr (absl format, "I1206 14:08:24.647429 ...";
# GRPC_VERBOSITY sets which), past Python's logging: a runner's log file may hold them too.
GRPC_CORE_LINE = re.compile(r"[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ")


def _json_lines(text: str) -> list[dict]:
    """Every line but gRPC core's one JSON object with the fields every line has (fails on any other line)."""
    entries = [json.loads(line) for line in text.splitlines() if not GRPC_CORE_LINE.match(line)]
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= entry.keys(), entry
        assert isinstance(entry["time"], float), entry
    return entries


def test_a_runner_started_with_log_format_json_writes_one_json_object_per_line(fresh_runner, tmp_path):
    log_file = tmp_path / "runner.log"
    fresh_runner("counter", None, "--log-format", "json", "--log-file", str(log_file))  # returns once READY
    entries = _json_lines(log_file.read_text())
    assert any(e["message"].startswith("model counter: sandbox layer") for e in entries), entries


async def test_an_orchestrator_logs_model_node_and_deployment_and_its_runners_log_json(tmp_path):
    captured: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            captured.append(self.format(record))

    handler = Capture()
    handler.setFormatter(JsonLogFormatter())
    logger = logging.getLogger("secure_runner.orchestrator")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        layout = fresh_pki(tmp_path, "counter")
        counter = MODELS / "submissions" / "counter"
        async with orchestrating(layout, tmp_path, {"counter": counter}, runner_log_format="json") as orchestrator:
            deployment = orchestrator.board.get("counter").deployment_id
            await eventually(lambda: any("started model counter" in line for line in captured), what="start logged")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    started = next(e for e in _json_lines("\n".join(captured)) if e["message"].startswith("started model counter"))
    assert (started["model"], started["node"], started["deployment"]) == ("counter", "counter", deployment)
    runner_logs = list(tmp_path.rglob("counter.log"))
    assert len(runner_logs) == 1 and _json_lines(runner_logs[0].read_text())
