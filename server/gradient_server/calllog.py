"""The per-call log: one structured line per call, failed calls always, successful ones sampled.

A line gives the method, status code, milliseconds, peer, request id, graph digest and node
count (and the details of a failure) on the logger "gradient_server.calls", as `key=value`
pairs or, with `--log-format json`, as one JSON object per line (see JsonFormatter).
Successful calls are logged at INFO with the probability the operator chooses
(`--log-calls`, 0 by default), so the log costs nothing on the fast path; failed calls are
always logged, at WARNING (INTERNAL at ERROR, its trace logged beside it).
"""

from __future__ import annotations

import json
import logging
import random
from typing import Any

import grpc

from .calls import Call

log = logging.getLogger("gradient_server.calls")

MAX_DETAILS = 300
"""Characters of a failure's details kept in its log line."""


class CallLog:
    """Writes the per-call log lines; `sample` is the fraction of successful calls logged."""

    def __init__(self, sample: float = 0.0):
        if not 0.0 <= sample <= 1.0:
            raise ValueError(f"the sampled fraction of calls must be in [0, 1], got {sample}")
        self.sample = sample

    def finished(self, call: Call, code: grpc.StatusCode, details: str = "") -> None:
        """Log a call that ended with `code` (a successful one only if sampled)."""
        if code == grpc.StatusCode.OK:
            if not self.sample or (self.sample < 1.0 and random.random() >= self.sample):
                return
            level = logging.INFO
        else:
            level = logging.ERROR if code == grpc.StatusCode.INTERNAL else logging.WARNING
        if not log.isEnabledFor(level):
            return
        fields: dict[str, Any] = {
            "method": call.method,
            "code": code.name,
            "ms": round(call.seconds() * 1000, 3),
            "peer": call.context.peer(),
            "request_id": call.request_id,
        }
        if call.graph_digest:
            fields["graph_digest"] = call.graph_digest
            fields["nodes"] = call.nodes
        if details:
            fields["details"] = details[:MAX_DETAILS] + (
                "..." if len(details) > MAX_DETAILS else ""
            )
        text = " ".join(
            f"{key}={value!r}" if key == "details" else f"{key}={value}"
            for key, value in fields.items()
        )
        log.log(level, "%s", text, extra={"call": fields})


class JsonFormatter(logging.Formatter):
    """Formats every log record as one JSON object per line: time, level, logger and message,
    and for a call's line its fields (method, code, ms, peer, request_id, graph_digest, nodes,
    details) instead of the message."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        line: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
        }
        call = getattr(record, "call", None)
        if call is not None:
            line.update(call)
        else:
            line["message"] = record.getMessage()
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)
