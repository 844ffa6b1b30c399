"""Metrics over HTTP (Prometheus text), the per-call log as JSON, and request ids.

Counts are checked against the calls the test made: each call is counted once, under its
method and final status, with the exact bytes of its request.
"""

from __future__ import annotations

import contextlib
import json
import logging
import urllib.request
import uuid
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from lecture import LECTURE, lecture_graph
from prometheus_client.parser import text_string_to_metric_families
from test_service import ServerProcess, free_port

from gradient.v1 import gradient_service_pb2 as service_pb2
from gradient_client import GradientClient, GradientError
from gradient_client.tensors import to_proto
from gradient_server.calllog import CallLog, JsonFormatter
from gradient_server.service import create_server


def lecture_request(output: str = "f") -> service_pb2.GradientRequest:
    return service_pb2.GradientRequest(
        graph=lecture_graph().to_proto(),
        output=output,
        inputs={name: to_proto(np.float64(value)) for name, value in LECTURE.items()},
    )


@contextlib.contextmanager
def metered_server(**settings) -> Iterator[tuple[str, str]]:
    """A server with metrics; yields its address and its metrics URL."""
    server, port = create_server("127.0.0.1:0", metrics=True, **settings)
    metrics_port = server.serve_metrics("127.0.0.1", 0)
    server.start()
    try:
        yield f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        server.stop(0)


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of the metrics page: (name, labels) -> value."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def grpc_labels(method: str, kind: str = "UNARY") -> dict[str, str]:
    return {
        "grpc_method": method,
        "grpc_service": "gradient.v1.GradientService",
        "grpc_type": kind,
    }


def test_metrics_count_calls_codes_times_bytes_caches_and_ops():
    with metered_server() as (address, url):
        channel = grpc.insecure_channel(address)
        gradient = channel.unary_unary(
            "/gradient.v1.GradientService/Gradient",
            request_serializer=None,
            response_deserializer=None,
        )
        good = lecture_request().SerializeToString()
        bad = lecture_request(output="nowhere").SerializeToString()
        sent = []
        for _ in range(3):
            sent.append(len(gradient(good, timeout=10)))
        with pytest.raises(grpc.RpcError) as refused:
            gradient(bad, timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with GradientClient(address) as client, client.session(lecture_graph(), "f") as session:
            for _ in range(2):
                result = session.gradient(LECTURE)
                assert float(result.gradients["z"]) == 3.0
        samples = scrape(url)
        channel.close()

    unary = grpc_labels("Gradient")
    assert sample(samples, "grpc_server_started_total", **unary) == 4
    assert sample(samples, "grpc_server_handled_total", **unary, grpc_code="OK") == 3
    assert sample(samples, "grpc_server_handled_total", **unary, grpc_code="INVALID_ARGUMENT") == 1
    assert sample(samples, "grpc_server_handling_seconds_count", **unary) == 4
    assert sample(samples, "grpc_server_handling_seconds_bucket", **unary, le="+Inf") == 4
    assert 0 < sample(samples, "grpc_server_handling_seconds_sum", **unary) < 10
    assert sample(samples, "gradient_received_bytes_total", grpc_method="Gradient") == (
        3 * len(good) + len(bad)
    )
    assert sample(samples, "gradient_sent_bytes_total", grpc_method="Gradient") == sum(sent)

    stream = grpc_labels("Session", "BIDI_STREAM")
    assert sample(samples, "grpc_server_started_total", **stream) == 1
    assert sample(samples, "grpc_server_handled_total", **stream, grpc_code="OK") == 1
    assert sample(samples, "gradient_received_bytes_total", grpc_method="Session") > 0

    # One graph decoded (the session's start names the same graph: a hit), one gradient plan
    # compiled; the lecture's forward ops ran once per successful step or call (5 in all).
    assert sample(samples, "gradient_cache_misses_total", cache="graphs") == 1
    assert sample(samples, "gradient_cache_hits_total", cache="graphs") == 4
    assert sample(samples, "gradient_plan_compiles_total") == 1
    assert sample(samples, "gradient_plan_compile_seconds_total") > 0
    assert sample(samples, "gradient_cache_entries", cache="graphs") == 1
    assert sample(samples, "gradient_cache_bytes", cache="graphs") > 0
    assert sample(samples, "gradient_op_runs_total", op="add") == 5
    assert sample(samples, "gradient_op_runs_total", op="mul") >= 5
    assert sample(samples, "gradient_op_seconds_total", op="mul") > 0


def test_request_ids_are_echoed_or_made_and_returned_in_trailing_metadata():
    with metered_server() as (address, _):
        channel = grpc.insecure_channel(address)
        gradient = channel.unary_unary(
            "/gradient.v1.GradientService/Gradient",
            request_serializer=None,
            response_deserializer=None,
        )
        good = lecture_request().SerializeToString()
        _, call = gradient.with_call(good, metadata=(("x-request-id", "req-42"),), timeout=10)
        assert dict(call.trailing_metadata())["x-request-id"] == "req-42"
        _, call = gradient.with_call(good, timeout=10)
        made = dict(call.trailing_metadata())["x-request-id"]
        assert uuid.UUID(made).version == 4
        # A failed call carries its id too, and an unusable one (too long) is replaced.
        with pytest.raises(grpc.RpcError) as failed:
            gradient(b"\xff\xff", metadata=(("x-request-id", "r" * 200),), timeout=10)
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert uuid.UUID(dict(failed.value.trailing_metadata())["x-request-id"])
        channel.close()


class Captured(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def test_json_call_log_has_one_object_per_call_with_its_fields():
    handler = Captured()
    logger = logging.getLogger("gradient_server.calls")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with metered_server(call_log=CallLog(1.0)) as (address, _):
            with grpc.insecure_channel(address) as channel:
                gradient = channel.unary_unary("/gradient.v1.GradientService/Gradient")
                request = lecture_request().SerializeToString()
                gradient(request, metadata=(("x-request-id", "a1"),), timeout=10)
            with GradientClient(address) as client, pytest.raises(GradientError):
                client.gradient(lecture_graph(), "nowhere", LECTURE)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    lines = [json.loads(line) for line in handler.lines]
    ok, failed = [line for line in lines if line["method"] == "Gradient"]
    assert ok["code"] == "OK" and ok["level"] == "INFO" and ok["request_id"] == "a1"
    assert ok["nodes"] == 5 and len(ok["graph_digest"]) == 64
    assert ok["peer"].startswith("ipv4:127.0.0.1:") and ok["ms"] > 0
    assert failed["code"] == "INVALID_ARGUMENT" and failed["level"] == "WARNING"
    assert "'nowhere'" in failed["details"] and failed["graph_digest"] == ok["graph_digest"]


def test_the_server_command_serves_metrics_and_json_logs(tmp_path):
    metrics_port = free_port()
    server = ServerProcess(
        tmp_path / "server.log",
        "--metrics-port",
        str(metrics_port),
        "--log-format",
        "json",
        "--log-calls",
        "1",
    )
    try:
        with grpc.insecure_channel(server.target) as channel:
            server.wait_serving(channel)
            with GradientClient(server.target, timeout=30) as client:
                result = client.gradient(lecture_graph(), "f", LECTURE)
                assert float(result.gradients["x"]) == -4.0
            samples = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
            labels = grpc_labels("Gradient")
            assert sample(samples, "grpc_server_handled_total", **labels, grpc_code="OK") == 1
    finally:
        server.process.terminate()
        server.process.wait(timeout=30)
        log = server.close()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert len(lines) == len(log.splitlines()), log  # every line is JSON
    calls = [line for line in lines if line.get("method") == "Gradient"]
    assert calls and calls[0]["code"] == "OK" and calls[0]["nodes"] == 5
