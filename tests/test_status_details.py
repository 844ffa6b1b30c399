"""Machine-readable error details: every failed call carries a google.rpc.Status in its
trailing metadata (grpcio-status), which gRPC's own tools decode and GradientError exposes,
while the status message stays readable alone."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from lecture import LECTURE, lecture_graph
from test_serving import running_server

from gradient.v1 import gradient_service_pb2 as service_pb2
from gradient.v1 import graph_pb2
from gradient_client import GradientClient, GradientError, Graph
from gradient_server.engine import Engine, Limits


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    with running_server(engine=Engine(Limits(max_bytes=1 << 20))) as running:
        yield running


def failing(call) -> GradientError:
    with pytest.raises(GradientError) as failed:
        call()
    return failed.value


def raw_forward(address: str, request: bytes) -> grpc.RpcError:
    with grpc.insecure_channel(address) as channel:
        forward = channel.unary_unary("/gradient.v1.GradientService/Forward")
        with pytest.raises(grpc.RpcError) as failed:
            forward(request, metadata=(("x-request-id", "trace-7"),), timeout=10)
    return failed.value


def test_a_bad_node_is_named_in_error_info_and_a_field_violation(address):
    g = lecture_graph()
    g.op("no_such_op", g["q"], name="odd")
    with GradientClient(address, timeout=10) as client:
        error = failing(lambda: client.forward(g, LECTURE))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'odd'" in error.details and "no_such_op" in error.details  # readable alone
    assert error.reason == "INVALID_GRAPH"
    assert error.node == "odd" and error.info["op"] == "no_such_op"
    assert error.field_violations == [("graph.nodes", error.details)]
    assert error.request_id and error.quota_violations == [] and error.retry_after is None


def test_a_shape_error_names_its_node_and_op(address):
    g = Graph()
    a, b = g.input("a"), g.input("b")
    g.matmul(a, b, name="product")
    with GradientClient(address, timeout=10) as client:
        error = failing(lambda: client.forward(g, {"a": np.ones((2, 3)), "b": np.ones((4, 5))}))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.reason, error.node, error.info["op"]) == ("INVALID_GRAPH", "product", "matmul")


def test_a_limit_is_a_quota_failure_naming_it(address):
    g = Graph()
    g.mul(g.input("x"), 2.0, name="twice")
    with GradientClient(address, timeout=10) as client:
        error = failing(lambda: client.forward(g, {"x": np.ones(1 << 18)}))
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.reason == "LIMIT_EXCEEDED" and error.info == {"limit": "max_bytes"}
    assert error.quota_violations == [("max_bytes", error.details)]
    assert "max_bytes" in error.details


def test_standard_grpc_tools_decode_the_details(address):
    """A client in any language reads them with its gRPC's status library; here grpcio-status."""
    error = raw_forward(address, b"\x0a\x05\xff\xff")  # a truncated graph field
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(error)
    assert (
        status.message == error.details()
        and status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    )
    kinds = {}
    for packed in status.details:
        for kind in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.RequestInfo,
        ):
            if packed.Is(kind.DESCRIPTOR):
                kinds[kind] = kind()
                packed.Unpack(kinds[kind])
    assert kinds[error_details_pb2.ErrorInfo].domain == "gradient.v1.GradientService"
    assert kinds[error_details_pb2.ErrorInfo].reason == "MALFORMED_REQUEST"
    assert kinds[error_details_pb2.BadRequest].field_violations[0].description == error.details()
    assert kinds[error_details_pb2.RequestInfo].request_id == "trace-7"
    assert dict(error.trailing_metadata())["x-request-id"] == "trace-7"


def test_an_unknown_digest_is_a_resource_info(address):
    digest = "ab" * 32
    request = service_pb2.ForwardRequest(graph_digest=digest).SerializeToString()
    error = GradientError.from_rpc_error(raw_forward(address, request))
    assert error.code == grpc.StatusCode.NOT_FOUND and error.reason == "UNKNOWN_GRAPH_DIGEST"
    (info,) = [d for d in error.status_details if isinstance(d, error_details_pb2.ResourceInfo)]
    assert (info.resource_type, info.resource_name) == ("gradient.v1.Graph", digest)
    assert error.request_id == "trace-7"


def test_bytes_that_do_not_parse_are_a_malformed_request(address):
    error = GradientError.from_rpc_error(raw_forward(address, b"\xff\xff\xff"))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "MALFORMED_REQUEST" and len(error.field_violations) == 1


def test_a_huge_node_name_keeps_the_details_small(address):
    name = "n" * 100_000
    graph = graph_pb2.Graph(nodes=[graph_pb2.Node(name=name, op="no_such_op")])
    request = service_pb2.ForwardRequest(graph=graph).SerializeToString()
    failed = raw_forward(address, request)
    assert failed.code() == grpc.StatusCode.INVALID_ARGUMENT  # not a dropped trailer
    trailer = dict(failed.trailing_metadata())["grpc-status-details-bin"]
    assert len(trailer) < 4096
    error = GradientError.from_rpc_error(failed)
    assert error.node is not None and error.node.startswith("nnn") and len(error.node) <= 256


def test_a_session_ended_by_a_failed_step_carries_its_details(address):
    g = Graph()
    g.mul(g.input("x"), 2.0, name="twice")
    with GradientClient(address, timeout=10) as client:

        def run() -> None:
            with client.session(g, "twice", stop_on_error=True) as session:
                session.gradient({"x": np.ones(1 << 18)})

        error = failing(run)
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.reason == "LIMIT_EXCEEDED" and error.info["limit"] == "max_bytes"


def test_too_many_sessions_is_a_quota_failure():
    with running_server(max_sessions=1) as address, GradientClient(address, timeout=10) as client:
        with client.session(lecture_graph(), "f") as first:
            assert float(first.gradient(LECTURE).values["f"]) == -12.0

            def second() -> None:
                with client.session(lecture_graph(), "f") as session:
                    session.gradient(LECTURE)

            error = failing(second)
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.quota_violations[0][0] == "max_sessions"
