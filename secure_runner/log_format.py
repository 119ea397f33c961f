"""`--log-format json`: one JSON object per log line, for log shippers that parse rather than grep.

Every line has `time` (Unix seconds, as in the audit log), `level`, `logger` and `message`;
the audit log's names `model`, `node`, `deployment` and `reason` are added when a log call
passes them (`log.info(..., extra=log_fields(model=..., node=...))`), and `exception` when
it logs one. A message is one JSON string whatever it holds, so text a worker or a peer
wrote (a model's output in a runner's log) cannot start a line of its own.
"""

from __future__ import annotations

import json
import logging

CONTEXT_FIELDS = ("model", "node", "deployment", "reason")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_fields(**fields: object) -> dict[str, str]:
    """`extra=` for a log call: the audit log's field names (CONTEXT_FIELDS) only, values as text."""
    unknown = set(fields) - set(CONTEXT_FIELDS)
    if unknown:
        raise ValueError(f"not a log context field: {sorted(unknown)}")
    return {name: str(value) for name, value in fields.items()}


class JsonLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": record.created,
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def formatter(log_format: str) -> logging.Formatter:
    """The formatter `--log-format` names: "text" (the default) or "json"."""
    return JsonLogFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
