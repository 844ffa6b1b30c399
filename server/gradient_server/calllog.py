"""The per-call log: one structured line per call, failed calls always, successful ones sampled.

A line is `key=value` pairs (method, code, ms, peer, and the details of a failure) on the
logger "gradient_server.calls". Successful calls are logged at INFO with the probability the
operator chooses (`--log-calls`, 0 by default), so the log costs nothing on the fast path;
failed calls are always logged, at WARNING (INTERNAL at ERROR, its trace logged beside it).
"""

from __future__ import annotations

import logging
import random
import time

import grpc

log = logging.getLogger("gradient_server.calls")

MAX_DETAILS = 300
"""Characters of a failure's details kept in its log line."""


class CallLog:
    """Writes the per-call log lines; `sample` is the fraction of successful calls logged."""

    def __init__(self, sample: float = 0.0):
        if not 0.0 <= sample <= 1.0:
            raise ValueError(f"the sampled fraction of calls must be in [0, 1], got {sample}")
        self.sample = sample

    def ok(self, method: str, start: float, context: grpc.ServicerContext) -> None:
        """Log a successful call (if sampled). `start` is its time.perf_counter() start."""
        if self.sample and (self.sample >= 1.0 or random.random() < self.sample):
            self._write(logging.INFO, method, "OK", start, context, "")

    def failed(
        self,
        method: str,
        start: float,
        context: grpc.ServicerContext,
        code: grpc.StatusCode,
        details: str,
    ) -> None:
        """Log a failed call."""
        level = logging.ERROR if code == grpc.StatusCode.INTERNAL else logging.WARNING
        self._write(level, method, code.name, start, context, details)

    @staticmethod
    def _write(
        level: int,
        method: str,
        code: str,
        start: float,
        context: grpc.ServicerContext,
        details: str,
    ) -> None:
        if not log.isEnabledFor(level):
            return
        milliseconds = (time.perf_counter() - start) * 1000
        line = f"method={method} code={code} ms={milliseconds:.3f} peer={context.peer()}"
        if details:
            if len(details) > MAX_DETAILS:
                details = details[:MAX_DETAILS] + "..."
            line += f" details={details!r}"
        log.log(level, "%s", line)
