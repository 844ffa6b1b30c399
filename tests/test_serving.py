"""The serving path end to end: graph digests (handles), the SDK's digest reuse, Sessions,
tensors as views, the call log and cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from gradient.v1 import gradient_service_pb2 as service_pb2
from gradient.v1 import gradient_service_pb2_grpc as service_grpc
from gradient_client import AsyncGradientClient, GradientClient, GradientError, Graph
from gradient_client.tensors import from_proto, to_proto
from gradient_client.wire import WireGraph, graph_digest
from gradient_server.calllog import CallLog
from gradient_server.engine import Engine, Limits
from gradient_server.errors import UnknownGraph, no_deadline
from gradient_server.service import create_server

SERVICE = "gradient.v1.GradientService"
SESSION_PATH = f"/{SERVICE}/Session"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
MB = 1024 * 1024

# The lecture's example, f = (x + y) * z at x=-2, y=5, z=-4, with its values and gradients as
# the lecture derives them by hand.
LECTURE_INPUTS = {"x": -2.0, "y": 5.0, "z": -4.0}
LECTURE_VALUES = {"x": -2.0, "y": 5.0, "z": -4.0, "q": 3.0, "f": -12.0}
LECTURE_GRADIENTS = {"x": -4.0, "y": -4.0, "z": 3.0, "q": -4.0, "f": 1.0}


def lecture_graph() -> Graph:
    g = Graph()
    x, y, z = g.input("x"), g.input("y"), g.input("z")
    g.mul(g.add(x, y, name="q"), z, name="f")
    return g


def product_graph() -> Graph:
    """y = x * w, elementwise: a non-scalar output whose gradients numpy gives exactly."""
    g = Graph()
    g.mul(g.input("x"), g.input("w"), name="y")
    return g


def assert_lecture(values, gradients=None) -> None:
    for name, expected in LECTURE_VALUES.items():
        assert float(values[name]) == expected, name
    if gradients is not None:
        for name, expected in LECTURE_GRADIENTS.items():
            assert float(gradients[name]) == expected, name


def lecture_tensors() -> dict:
    return {name: to_proto(np.float64(value)) for name, value in LECTURE_INPUTS.items()}


class CountingEngine(Engine):
    """An Engine recording how each request named its graph: whole (loads) or by digest."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loads: list[str] = []  # sha256 of each Graph's bytes received whole
        self.hits: list[str] = []  # digests found in the cache
        self.misses: list[str] = []  # digests not found (answered NOT_FOUND)

    def load_graph_bytes(self, data, check_deadline=no_deadline):
        self.loads.append(hashlib.sha256(data).hexdigest())
        return super().load_graph_bytes(data, check_deadline)

    def cached_graph(self, digest):
        try:
            graph = super().cached_graph(digest)
        except UnknownGraph:
            self.misses.append(digest)
            raise
        self.hits.append(digest)
        return graph


class RecordingCallLog(CallLog):
    """A CallLog that also keeps each call's method, status and peer."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, grpc.StatusCode, str]] = []
        self._lock = threading.Lock()

    def finished(self, call, code, details=""):
        super().finished(call, code, details)
        with self._lock:
            self.calls.append((call.method, code, call.context.peer()))

    def of(self, method: str) -> list[tuple[str, grpc.StatusCode, str]]:
        with self._lock:
            return [call for call in self.calls if call[0] == method]


@contextlib.contextmanager
def running_server(**settings) -> Iterator[str]:
    """A server of its own (create_server settings), stopped at the end; yields its address."""
    server, port = create_server("127.0.0.1:0", **settings)
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def wait_until(predicate, timeout: float = 5.0) -> bool:
    """Poll `predicate` until it holds or `timeout` seconds pass; whether it held."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.fixture(scope="module")
def channel(server_address) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server_address) as connected:
        yield connected


@pytest.fixture(scope="module")
def stub(channel) -> service_grpc.GradientServiceStub:
    return service_grpc.GradientServiceStub(channel)


def raw_session(stub, messages, timeout: float = 10):
    """Run a Session on the typed stub: (responses received, (code, details) or None)."""
    responses = []
    try:
        for response in stub.Session(iter(messages), timeout=timeout):
            responses.append(response)
    except grpc.RpcError as error:
        return responses, (error.code(), error.details())
    return responses, None


def results_of(responses) -> list:
    return [result for response in responses for result in response.results]


# ---------------------------------------------------------------------------------------------
# A. Graph handles on the raw wire


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _lecture_request(method: str):
    """The method's request on the lecture graph (without graph or digest), and a check of
    its response against the lecture's truths."""
    inputs = lecture_tensors()
    if method == "Forward":
        return service_pb2.ForwardRequest(inputs=inputs), _check_forward
    if method == "Gradient":
        return service_pb2.GradientRequest(inputs=inputs, output="f"), _check_gradient
    if method == "CheckGradient":
        return service_pb2.CheckGradientRequest(inputs=inputs, output="f"), _check_check
    if method == "GradientGraph":
        return service_pb2.GradientGraphRequest(inputs=inputs, output="f"), _check_graph
    vector = {name: to_proto(np.float64(v)) for name, v in zip("xyz", HVP_VECTOR, strict=True)}
    request = service_pb2.HessianVectorProductRequest(inputs=inputs, output="f", vector=vector)
    return request, _check_hvp


def _check_forward(response) -> None:
    assert_lecture({k: from_proto(v) for k, v in response.values.items()})


def _check_gradient(response) -> None:
    assert_lecture(
        {k: from_proto(v) for k, v in response.values.items()},
        {k: from_proto(v) for k, v in response.gradients.items()},
    )


def _check_check(response) -> None:
    assert response.passed
    assert {node.name for node in response.nodes} == {"x", "y", "z"}


def _check_graph(response) -> None:
    assert set(response.gradients) == {"x", "y", "z", "q", "f"}
    assert response.seed


# f = (x + y) z has the constant Hessian [[0,0,1],[0,0,1],[1,1,0]] over (x, y, z).
HVP_VECTOR = np.array([1.0, 2.0, 5.0])
LECTURE_HESSIAN = np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])


def _check_hvp(response) -> None:
    expected = LECTURE_HESSIAN @ HVP_VECTOR
    got = [float(from_proto(response.products[name])) for name in "xyz"]
    np.testing.assert_array_equal(got, expected)


GRAPH_METHODS = ["Forward", "Gradient", "CheckGradient", "GradientGraph", "HessianVectorProduct"]
RESPONSE_TYPES = {
    method.name: getattr(service_pb2, method.output_type.name)
    for method in service_pb2.DESCRIPTOR.services_by_name["GradientService"].methods
}


def call_with_graph_bytes(channel, method: str, request, graph_bytes: bytes | None):
    """Call `method` with `request` plus, if given, exactly `graph_bytes` as its graph field
    (bytes written by hand, so the server sees them as they are here)."""
    data = request.SerializeToString()
    if graph_bytes is not None:
        number = type(request).DESCRIPTOR.fields_by_name["graph"].number
        data += _varint(number << 3 | 2) + _varint(len(graph_bytes)) + graph_bytes
    call = channel.unary_unary(f"/{SERVICE}/{method}")
    return RESPONSE_TYPES[method].FromString(call(data, timeout=10))


@pytest.mark.parametrize("method", GRAPH_METHODS)
def test_every_response_carries_the_sha256_of_the_graph_bytes_sent(channel, method):
    sent = WireGraph.of(lecture_graph().to_proto())
    request, check = _lecture_request(method)
    response = call_with_graph_bytes(channel, method, request, sent.data)
    check(response)
    assert response.graph_digest == hashlib.sha256(sent.data).hexdigest()
    assert response.graph_digest == graph_digest(sent.data) == sent.digest


@pytest.mark.parametrize("method", GRAPH_METHODS)
def test_a_digest_alone_gives_the_same_response_as_the_graph(channel, method):
    sent = WireGraph.of(lecture_graph().to_proto())
    request, check = _lecture_request(method)
    with_graph = call_with_graph_bytes(channel, method, request, sent.data)
    request.graph_digest = sent.digest
    with_digest = call_with_graph_bytes(channel, method, request, None)
    check(with_digest)
    assert with_digest == with_graph


@pytest.mark.parametrize("method", GRAPH_METHODS)
def test_an_unknown_digest_is_not_found_and_asks_for_the_graph(channel, method):
    request, _ = _lecture_request(method)
    request.graph_digest = hashlib.sha256(b"a graph this server never saw").hexdigest()
    with pytest.raises(grpc.RpcError) as info:
        call_with_graph_bytes(channel, method, request, None)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "send the graph" in info.value.details()


@pytest.mark.parametrize("method", GRAPH_METHODS)
def test_graph_and_digest_together_are_invalid(channel, method):
    sent = WireGraph.of(lecture_graph().to_proto())
    request, _ = _lecture_request(method)
    request.graph_digest = sent.digest
    with pytest.raises(grpc.RpcError) as info:
        call_with_graph_bytes(channel, method, request, sent.data)
    assert info.value.code() == INVALID
    assert "graph_digest" in info.value.details()


def test_the_digest_is_of_the_bytes_as_sent_not_of_a_reserialization(channel):
    canonical = WireGraph.of(lecture_graph().to_proto()).data
    unusual = canonical + b"\x78\x01"  # an unknown field 15: the same graph, other bytes
    request, _ = _lecture_request("Gradient")
    response = call_with_graph_bytes(channel, "Gradient", request, unusual)
    assert response.graph_digest == hashlib.sha256(unusual).hexdigest()
    assert response.graph_digest != hashlib.sha256(canonical).hexdigest()
    request.graph_digest = response.graph_digest
    again = call_with_graph_bytes(channel, "Gradient", request, None)
    _check_gradient(again)


def test_a_graph_sent_by_a_session_is_known_to_unary_calls_and_back(stub):
    g = Graph()  # unique to this test; no attributes, so the stub's bytes are the SDK's
    g.mul(g.sub(g.input("a"), g.input("b"), name="d"), g.input("c"), name="h")
    sent = WireGraph.of(g.to_proto())
    inputs = {name: to_proto(np.float64(v)) for name, v in {"a": 7.0, "b": 2.0, "c": 3.0}.items()}
    start = service_pb2.SessionStart(graph=g.to_proto(), output="h")
    step = service_pb2.SessionStep(inputs=inputs)
    responses, error = raw_session(stub, [service_pb2.SessionRequest(start=start, steps=[step])])
    assert error is None
    assert responses[0].graph_digest == sent.digest
    by_digest = stub.Forward(
        service_pb2.ForwardRequest(graph_digest=sent.digest, inputs=inputs), timeout=10
    )
    assert by_digest.graph_digest == sent.digest
    assert float(from_proto(by_digest.values["h"])) == (7.0 - 2.0) * 3.0
    start = service_pb2.SessionStart(graph_digest=sent.digest, output="h")
    responses, error = raw_session(stub, [service_pb2.SessionRequest(start=start, steps=[step])])
    assert error is None
    assert responses[0].graph_digest == sent.digest
    (result,) = results_of(responses)
    assert float(from_proto(result.gradients["a"])) == 3.0
    assert float(from_proto(result.gradients["b"])) == -3.0


# ---------------------------------------------------------------------------------------------
# A. The SDK sends a graph once, then its digest, and resends it when asked


def test_the_sdk_sends_a_graph_once_then_only_its_digest():
    engine = CountingEngine()
    g = lecture_graph()
    digest = hashlib.sha256(g.wire_form().data).hexdigest()
    with running_server(engine=engine) as address, GradientClient(address, timeout=10) as client:
        assert_lecture(client.forward(g, LECTURE_INPUTS).values)
        r = client.gradient(g, "f", LECTURE_INPUTS)
        assert_lecture(r.values, r.gradients)
        assert client.check_gradient(g, "f", LECTURE_INPUTS).passed
        assert set(client.gradient_graph(g, "f", LECTURE_INPUTS).gradients) == set(LECTURE_VALUES)
        vector = dict(zip("xyz", HVP_VECTOR, strict=True))
        products = client.hvp(g, "f", LECTURE_INPUTS, vector)
        np.testing.assert_array_equal([products[n] for n in "xyz"], LECTURE_HESSIAN @ HVP_VECTOR)
        r = client.gradient(g, "f", {"x": 1.0, "y": 2.0, "z": 3.0})
        assert float(r.values["f"]) == (1.0 + 2.0) * 3.0
    assert engine.loads == [digest]
    assert engine.hits == [digest] * 5
    assert engine.misses == []


def test_a_graph_message_is_sent_once_too():
    engine = CountingEngine()
    message = lecture_graph().to_proto()
    with running_server(engine=engine) as address, GradientClient(address, timeout=10) as client:
        for _ in range(3):
            r = client.gradient(message, "f", LECTURE_INPUTS)
            assert_lecture(r.values, r.gradients)
    digest = WireGraph.of(message).digest
    assert (engine.loads, engine.hits) == ([digest], [digest, digest])


def test_the_sdk_resends_a_graph_the_server_evicted():
    engine = CountingEngine(cache_size=1)  # holds one graph: the second evicts the first
    lecture = lecture_graph()
    other = Graph()
    other.mul(other.input("u"), other.input("v"), name="p")
    a, b = lecture.wire_form().digest, other.wire_form().digest
    with running_server(engine=engine) as address, GradientClient(address, timeout=10) as client:
        assert_lecture(client.gradient(lecture, "f", LECTURE_INPUTS).values)
        r = client.gradient(other, "p", {"u": 3.0, "v": -5.0})
        assert (float(r.values["p"]), float(r.gradients["u"])) == (-15.0, -5.0)
        r = client.gradient(lecture, "f", LECTURE_INPUTS)  # NOT_FOUND, then sent whole
        assert_lecture(r.values, r.gradients)
        # Sent whole on the next two calls too (behind a balancer, other servers may lack
        # it), then the digest suffices again.
        for _ in range(3):
            r = client.gradient(lecture, "f", LECTURE_INPUTS)
            assert_lecture(r.values, r.gradients)
    assert engine.loads == [a, b, a, a, a]
    assert engine.misses == [a]
    assert engine.hits == [a]


def test_one_client_on_two_servers_in_turn_gets_right_results():
    first, second = CountingEngine(), CountingEngine()
    g = lecture_graph()
    digest = g.wire_form().digest
    with running_server(engine=second) as address_b:
        server_a, port_a = create_server("127.0.0.1:0", engine=first)
        server_a.start()
        # pick_first: every call goes to A while it serves, then to B.
        target = f"ipv4:127.0.0.1:{port_a},{address_b}"
        pick_first = {"loadBalancingConfig": [{"pick_first": {}}]}
        with GradientClient(target, timeout=10, service_config=pick_first) as client:
            try:
                for z in (1.0, 2.0):
                    r = client.gradient(g, "f", {"x": -2.0, "y": 5.0, "z": z})
                    assert (float(r.values["f"]), float(r.gradients["z"])) == (3.0 * z, 3.0)
            finally:
                server_a.stop(0)
            for z in (4.0, 5.0):
                r = client.gradient(g, "f", {"x": -2.0, "y": 5.0, "z": z})
                assert (float(r.values["f"]), float(r.gradients["z"])) == (3.0 * z, 3.0)
    assert (first.loads, first.hits, first.misses) == ([digest], [digest], [])
    # B did not hold the graph: one NOT_FOUND, the graph resent (and sent whole on the next
    # call too, for other servers behind the target that may lack it).
    assert (second.misses, second.loads, second.hits) == ([digest], [digest, digest], [])


def test_the_async_client_sends_a_graph_once_and_resends_it_when_evicted():
    engine = CountingEngine(cache_size=1)
    lecture = lecture_graph()
    other = Graph()
    other.add(other.input("u"), 1.0, name="p")
    a, b = lecture.wire_form().digest, other.wire_form().digest

    async def run(address):
        async with AsyncGradientClient(address, timeout=10) as client:
            for _ in range(2):
                r = await client.gradient(lecture, "f", LECTURE_INPUTS)
                assert_lecture(r.values, r.gradients)
            assert float((await client.forward(other, {"u": 2.5})).values["p"]) == 3.5
            r = await client.gradient(lecture, "f", LECTURE_INPUTS)
            assert_lecture(r.values, r.gradients)

    with running_server(engine=engine) as address:
        asyncio.run(run(address))
    assert engine.loads == [a, b, a]
    assert engine.hits == [a]
    assert engine.misses == [a]


# ---------------------------------------------------------------------------------------------
# B. Sessions through the SDK


def test_session_gives_the_lecture_values(client):
    with client.session(lecture_graph(), output="f") as session:
        r = session.gradient(LECTURE_INPUTS)
        assert_lecture(r.values, r.gradients)
        assert_lecture(session.forward(LECTURE_INPUTS).values)
        assert session.graph_digest == lecture_graph().wire_form().digest


def test_session_steps_come_back_in_order_matched_to_their_inputs(client):
    with client.session(lecture_graph(), output="f", wrt=["x", "z"], fetch=["f"]) as session:
        for i in range(100):
            r = session.gradient({"x": float(i), "y": 5.0, "z": -4.0})
            assert set(r.values) == {"f"} and set(r.gradients) == {"x", "z"}
            assert float(r.values["f"]) == (i + 5.0) * -4.0
            assert float(r.gradients["x"]) == -4.0
            assert float(r.gradients["z"]) == i + 5.0


def test_session_steps_from_eight_threads_each_get_their_own_result(client):
    def run(thread: int, session) -> list[tuple[float, float, float]]:
        seen = []
        for i in range(25):
            x = float(thread * 1000 + i)
            r = session.gradient({"x": x, "y": 1.0, "z": 2.0})
            seen.append((x, float(r.values["f"]), float(r.gradients["z"])))
        return seen

    with client.session(lecture_graph(), output="f", wrt=["z"], fetch=["f"]) as session:
        with ThreadPoolExecutor(8) as pool:
            per_thread = list(pool.map(lambda t: run(t, session), range(8)))
    assert sum(len(seen) for seen in per_thread) == 200
    for seen in per_thread:
        for x, f, dz in seen:
            assert (f, dz) == ((x + 1.0) * 2.0, x + 1.0)


def test_two_hundred_futures_sent_before_reading_come_back_in_order(client):
    with client.session(lecture_graph(), output="f") as session:
        futures = [session.gradient_future({"x": float(i), "y": 1.0, "z": 3.0}) for i in range(200)]
        forward = session.forward_future({"x": 10.0, "y": 1.0, "z": 3.0})
        for i, future in enumerate(futures):
            r = future.result()
            assert float(r.values["f"]) == (i + 1.0) * 3.0
            assert float(r.gradients["z"]) == i + 1.0
        assert float(forward.result().values["f"]) == 33.0


def norm_graph() -> Graph:
    """f(W, x) = ||W x||^2."""
    g = Graph()
    w, x = g.input("W"), g.input("x")
    g.sum(g.square(g.matmul(w, x, name="r")), name="f")
    return g


def test_session_inputs_may_change_shape_and_dtype_between_steps(client):
    rng = np.random.default_rng(7)
    cases = [
        (np.array([[0.1, 0.5], [-0.3, 0.8]]), np.array([0.2, 0.4])),  # the lecture's
        (rng.standard_normal((3, 4)), rng.standard_normal(4)),
        (rng.standard_normal((1, 5)), rng.standard_normal(5)),
        (rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(4).astype(np.float32)),
        (np.array([[0.1, 0.5], [-0.3, 0.8]]), np.array([0.2, 0.4])),
    ]
    with client.session(norm_graph(), output="f") as session:
        for w, x in cases:
            r = session.gradient({"W": w, "x": x})
            wide_w, wide_x = w.astype(np.float64), x.astype(np.float64)
            q = wide_w @ wide_x
            tolerance = 1e-5 if w.dtype == np.float32 else 1e-12
            np.testing.assert_allclose(r.values["f"], q @ q, rtol=tolerance)
            np.testing.assert_allclose(r.gradients["W"], 2 * np.outer(q, wide_x), rtol=tolerance)
            np.testing.assert_allclose(r.gradients["x"], 2 * wide_w.T @ q, rtol=tolerance)
            assert r.gradients["W"].shape == w.shape and r.gradients["W"].dtype == w.dtype
            assert r.gradients["x"].shape == x.shape and r.gradients["x"].dtype == x.dtype


PRODUCT_X = np.array([1.0, -2.0, 3.0])
PRODUCT_W = np.array([0.5, 4.0, -1.5])
PRODUCT_SEED = np.array([2.0, 1.0, -3.0])

STEP_ERRORS = {
    "missing input": ({"x": PRODUCT_X}, PRODUCT_SEED, "'w'"),
    "unknown input": ({"x": PRODUCT_X, "w": PRODUCT_W, "v": PRODUCT_X}, PRODUCT_SEED, "'v'"),
    "wrong-shape seed": ({"x": PRODUCT_X, "w": PRODUCT_W}, np.ones(4), "'y'"),
}


@pytest.mark.parametrize(("inputs", "seed", "named"), STEP_ERRORS.values(), ids=STEP_ERRORS)
def test_a_failed_step_names_the_node_and_the_session_goes_on(client, inputs, seed, named):
    with client.session(product_graph(), output="y") as session:
        with pytest.raises(GradientError) as info:
            session.gradient(inputs, seed=seed)
        assert info.value.code == INVALID
        assert named in info.value.details
        r = session.gradient({"x": PRODUCT_X, "w": PRODUCT_W}, seed=PRODUCT_SEED)
        np.testing.assert_array_equal(r.values["y"], PRODUCT_X * PRODUCT_W)
        np.testing.assert_array_equal(r.gradients["x"], PRODUCT_SEED * PRODUCT_W)
        np.testing.assert_array_equal(r.gradients["w"], PRODUCT_SEED * PRODUCT_X)


def test_stop_on_error_ends_the_session_at_the_first_failure(client):
    with client.session(lecture_graph(), output="f", stop_on_error=True) as session:
        r = session.gradient(LECTURE_INPUTS)
        assert_lecture(r.values, r.gradients)
        with pytest.raises(GradientError) as failure:
            session.gradient({"x": 1.0, "y": 2.0})
        assert failure.value.code == INVALID and "'z'" in failure.value.details
        with pytest.raises(GradientError) as after:
            session.gradient(LECTURE_INPUTS)
        assert after.value.code == INVALID
        with pytest.raises(GradientError) as closing:
            session.close()
        assert closing.value.code == INVALID
    assert_lecture(client.forward(lecture_graph(), LECTURE_INPUTS).values)


def test_stop_on_error_still_answers_the_steps_before_the_failure(stub):
    """Steps batched in one message with a failing one (as the SDK batches futures) get their
    results before the stream ends: every step before the first failure has one StepResult."""
    start = service_pb2.SessionStart(
        graph=lecture_graph().to_proto(), output="f", fetch=["f"], stop_on_error=True
    )
    good = [
        service_pb2.SessionStep(
            inputs={"x": to_proto(np.float64(i)), "y": to_proto(1.0), "z": to_proto(2.0)}
        )
        for i in range(2)
    ]
    bad = service_pb2.SessionStep(inputs={"x": to_proto(1.0)})
    message = service_pb2.SessionRequest(start=start, steps=[*good, bad, good[0]])
    responses, error = raw_session(stub, [message])
    assert error is not None and error[0] == INVALID
    results = results_of(responses)
    assert [float(from_proto(r.values["f"])) for r in results] == [2.0, 4.0]


def bad_op_graph() -> Graph:
    g = Graph()
    g.op("no_such_op", g.input("x"), name="n")
    return g


BAD_STARTS = {
    "unknown op": (bad_op_graph, {"output": "n"}, "no_such_op"),
    "wrt names a missing node": (lecture_graph, {"output": "f", "wrt": ["nope"]}, "'nope'"),
    "fetch names a missing node": (lecture_graph, {"output": "f", "fetch": ["nope"]}, "'nope'"),
    "output names a missing node": (lecture_graph, {"output": "nope"}, "'nope'"),
}


@pytest.mark.parametrize(("build", "settings", "named"), BAD_STARTS.values(), ids=BAD_STARTS)
def test_a_bad_start_ends_the_session(client, build, settings, named):
    with pytest.raises(GradientError) as info:
        with client.session(build(), **settings) as session:
            session.gradient(LECTURE_INPUTS)
    assert info.value.code == INVALID
    assert named in info.value.details
    assert_lecture(client.forward(lecture_graph(), LECTURE_INPUTS).values)


def test_a_forward_only_session_runs_forward_steps_and_fails_a_gradient_step(client):
    with client.session(lecture_graph(), fetch=["q", "f"]) as session:
        r = session.forward(LECTURE_INPUTS)
        assert (float(r.values["q"]), float(r.values["f"])) == (3.0, -12.0)
        with pytest.raises(GradientError) as info:
            session.gradient(LECTURE_INPUTS)
        assert info.value.code == INVALID and "output" in info.value.details
        r = session.forward({"x": 1.0, "y": 2.0, "z": 4.0})
        assert (float(r.values["q"]), float(r.values["f"])) == (3.0, 12.0)


# ---------------------------------------------------------------------------------------------
# B. The Session protocol on the raw stub


def lecture_start(**fields) -> service_pb2.SessionStart:
    return service_pb2.SessionStart(graph=lecture_graph().to_proto(), output="f", **fields)


def lecture_step() -> service_pb2.SessionStep:
    return service_pb2.SessionStep(inputs=lecture_tensors())


def assert_lecture_result(result) -> None:
    assert result.error.code == 0, result.error.message
    assert_lecture(
        {k: from_proto(v) for k, v in result.values.items()},
        {k: from_proto(v) for k, v in result.gradients.items()},
    )


def test_raw_session_runs_steps_and_returns_the_digest_first(stub):
    messages = [
        service_pb2.SessionRequest(start=lecture_start()),
        service_pb2.SessionRequest(steps=[lecture_step(), lecture_step()]),
        service_pb2.SessionRequest(steps=[lecture_step()]),
    ]
    responses, error = raw_session(stub, messages)
    assert error is None
    assert responses[0].graph_digest == WireGraph.of(lecture_graph().to_proto()).digest
    assert all(not response.graph_digest for response in responses[1:])
    results = results_of(responses)
    assert len(results) == 3
    for result in results:
        assert_lecture_result(result)


def test_steps_before_any_start_end_the_stream(stub):
    messages = [
        service_pb2.SessionRequest(steps=[lecture_step()]),
        service_pb2.SessionRequest(start=lecture_start(), steps=[lecture_step()]),
    ]
    responses, error = raw_session(stub, messages)
    assert responses == []
    assert error is not None and error[0] == INVALID and "start" in error[1]


def test_a_second_start_ends_the_stream(stub):
    messages = [
        service_pb2.SessionRequest(start=lecture_start(), steps=[lecture_step()]),
        service_pb2.SessionRequest(start=lecture_start(), steps=[lecture_step()]),
    ]
    responses, error = raw_session(stub, messages)
    (result,) = results_of(responses)
    assert_lecture_result(result)
    assert error is not None and error[0] == INVALID and "one start" in error[1]


def test_a_start_with_an_unknown_digest_is_not_found(stub):
    start = service_pb2.SessionStart(graph_digest=hashlib.sha256(b"unseen").hexdigest())
    responses, error = raw_session(stub, [service_pb2.SessionRequest(start=start)])
    assert responses == []
    assert error is not None and error[0] == grpc.StatusCode.NOT_FOUND
    assert "send the graph" in error[1]


def test_a_start_with_graph_and_digest_is_invalid(stub):
    start = lecture_start(graph_digest=WireGraph.of(lecture_graph().to_proto()).digest)
    responses, error = raw_session(stub, [service_pb2.SessionRequest(start=start)])
    assert responses == []
    assert error is not None and error[0] == INVALID


GARBAGE = {
    "random bytes": np.random.default_rng(2024).bytes(64),
    "an endless varint": b"\xff" * 12,
    "a truncated field": b"\x0a\x05ab",
}


@pytest.mark.parametrize("garbage", GARBAGE.values(), ids=GARBAGE)
def test_bytes_that_do_not_parse_end_the_stream(channel, garbage):
    session = channel.stream_stream(SESSION_PATH)
    with pytest.raises(grpc.RpcError) as info:
        list(session(iter([garbage]), timeout=10))
    assert info.value.code() == INVALID
    assert "does not parse" in info.value.details()


def test_bytes_that_do_not_parse_mid_stream_end_it_after_the_earlier_steps(channel):
    first = service_pb2.SessionRequest(start=lecture_start(), steps=[lecture_step()])
    session = channel.stream_stream(SESSION_PATH)
    received = []
    with pytest.raises(grpc.RpcError) as info:
        for data in session(iter([first.SerializeToString(), b"\xff" * 12]), timeout=10):
            received.append(service_pb2.SessionResponse.FromString(data))
    assert info.value.code() == INVALID
    (result,) = results_of(received)
    assert_lecture_result(result)


# ---------------------------------------------------------------------------------------------
# B. Chunked tensors


def chunked_client(address: str) -> GradientClient:
    return GradientClient(address, timeout=30, max_message_mb=1)


THREE_MB = 3 * MB // 8  # float64 elements


def test_three_megabyte_tensors_round_trip_in_chunks_both_ways():
    rng = np.random.default_rng(3)
    x, w, seed = rng.standard_normal((3, THREE_MB))
    with running_server(max_message_mb=1) as address, chunked_client(address) as client:
        with client.session(product_graph(), output="y") as session:
            r = session.gradient({"x": x, "w": w}, seed=seed)  # inputs and seed in chunks
            assert set(r.values) == set(r.gradients) == {"x", "w", "y"}
            np.testing.assert_array_equal(r.values["x"], x)
            np.testing.assert_array_equal(r.values["y"], x * w)
            np.testing.assert_array_equal(r.gradients["x"], seed * w)
            np.testing.assert_array_equal(r.gradients["w"], seed * x)
            np.testing.assert_array_equal(r.gradients["y"], seed)
            r = session.forward({"x": w, "w": seed})
            np.testing.assert_array_equal(r.values["y"], w * seed)
            small = session.gradient({"x": x[:3], "w": w[:3]}, seed=seed[:3])
            np.testing.assert_array_equal(small.gradients["x"], seed[:3] * w[:3])


def test_a_chunked_input_with_a_scalar_loss_gives_chunked_values_and_gradients():
    x = np.linspace(-3.0, 3.0, THREE_MB)
    g = Graph()
    g.sum(g.square(g.sin(g.input("x"), name="s"), name="s2"), name="f")
    with running_server(max_message_mb=1) as address, chunked_client(address) as client:
        with client.session(g, output="f") as session:
            r = session.gradient({"x": x})
            np.testing.assert_allclose(r.values["s2"], np.sin(x) ** 2, rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(r.values["f"], np.sum(np.sin(x) ** 2), rtol=1e-9)
            np.testing.assert_allclose(
                r.gradients["x"], 2 * np.sin(x) * np.cos(x), rtol=1e-12, atol=1e-15
            )
            np.testing.assert_allclose(r.gradients["s"], 2 * np.sin(x), rtol=1e-12, atol=1e-15)
            r = session.forward({"x": x})
            np.testing.assert_allclose(r.values["s"], np.sin(x), rtol=1e-12, atol=1e-15)


def test_an_input_and_a_seed_that_fit_one_message_each_but_not_together():
    """Each is under the message size; together they are over it: the step must still go
    through (as chunks), as any input of that size alone does."""
    n = 100_000  # 0.8 MB of float64: under the 1 MB limit alone, 1.6 MB with the seed
    rng = np.random.default_rng(5)
    x, seed = rng.standard_normal((2, n))
    g = Graph()
    g.mul(g.input("x"), 2.0, name="y")
    call_log = RecordingCallLog()
    with running_server(max_message_mb=1, call_log=call_log) as address:
        with chunked_client(address) as client:
            try:
                with client.session(g, output="y", wrt=["x"], fetch=["y"]) as session:
                    outcome = session.gradient({"x": x}, seed=seed)
            except GradientError as error:
                outcome = error
        # The verdict waits for the server to be done with the stream (and with its log).
        wait_until(lambda: call_log.of("Session"))
    assert not isinstance(outcome, GradientError), outcome
    np.testing.assert_array_equal(outcome.values["y"], 2.0 * x)
    np.testing.assert_array_equal(outcome.gradients["x"], 2.0 * seed)


def test_a_lists_payload_session_sends_results_too_big_for_a_message_in_chunks():
    """PAYLOAD_FORM_LISTS writes float32 as 8-byte doubles: the size check must count that."""
    x = np.arange(200_000, dtype=np.float32)  # 0.8 MB raw, 1.6 MB as a list of doubles
    g = Graph()
    g.mul(g.input("x"), 2.0, name="y")
    start = service_pb2.SessionStart(
        graph=g.to_proto(),
        fetch=["y"],
        response_payload=service_pb2.PAYLOAD_FORM_LISTS,
        max_message_bytes=MB,
    )
    step = service_pb2.SessionStep(kind=service_pb2.STEP_KIND_FORWARD, inputs={"x": to_proto(x)})
    messages = [service_pb2.SessionRequest(start=start, steps=[step])]
    with running_server(max_message_mb=1) as address:
        options = [("grpc.max_receive_message_length", MB)]
        with grpc.insecure_channel(address, options=options) as raw:
            responses, error = raw_session(service_grpc.GradientServiceStub(raw), messages)
    assert error is None, error
    (result,) = results_of(responses)
    assert result.error.code == 0
    if "y" in result.values:
        y = from_proto(result.values["y"])
    else:
        chunks = [c for r in responses for c in r.chunks if c.name == "y"]
        y = np.frombuffer(b"".join(c.data for c in chunks), np.float32)
    np.testing.assert_array_equal(y, 2.0 * x)


CHUNK_X = np.array([1.0, 2.0, 3.0, 4.0])
CHUNK_BYTES = CHUNK_X.tobytes()  # 32 bytes


def chunk(index: int, data: bytes, shape=(4,)) -> service_pb2.TensorChunk:
    """A TensorChunk of input x (float64); chunk 0 carries the dtype and shape."""
    fields = service_pb2.TensorChunk(
        target=service_pb2.CHUNK_TARGET_INPUT, name="x", index=index, data=data
    )
    if index == 0:
        fields.dtype = to_proto(CHUNK_X).dtype
        fields.shape.extend(shape)
    return fields


def sum_of_squares_start() -> service_pb2.SessionStart:
    g = Graph()
    x = g.input("x")
    g.sum(g.mul(x, x), name="f")
    return service_pb2.SessionStart(graph=g.to_proto(), output="f", wrt=["x"], fetch=["f"])


def assert_sum_of_squares(result, x: np.ndarray) -> None:
    assert result.error.code == 0, result.error.message
    assert float(from_proto(result.values["f"])) == float(np.sum(x * x))
    np.testing.assert_array_equal(from_proto(result.gradients["x"]), 2 * x)


BAD_CHUNKS = {
    "a missing index": [chunk(0, CHUNK_BYTES[:8]), chunk(2, CHUNK_BYTES[8:])],
    "a repeated chunk": [
        chunk(0, CHUNK_BYTES[:8]),
        chunk(1, CHUNK_BYTES[8:16]),
        chunk(1, CHUNK_BYTES[8:16]),
    ],
    "chunk 0 again after a complete tensor": [chunk(0, CHUNK_BYTES), chunk(0, CHUNK_BYTES)],
    "a chunk beyond the size": [
        chunk(0, CHUNK_BYTES[:16]),
        chunk(1, CHUNK_BYTES[16:] + b"8bytes!!"),
    ],
    "a step before the last chunk": [chunk(0, CHUNK_BYTES[:16])],
    "no chunk 0": [chunk(1, CHUNK_BYTES[16:])],
}


@pytest.mark.parametrize("chunks", BAD_CHUNKS.values(), ids=BAD_CHUNKS)
def test_a_bad_chunk_sequence_fails_its_step_and_the_next_step_succeeds(stub, chunks):
    good = service_pb2.SessionStep(inputs={"x": to_proto(CHUNK_X)})
    messages = [
        service_pb2.SessionRequest(start=sum_of_squares_start()),
        service_pb2.SessionRequest(chunks=chunks),
        service_pb2.SessionRequest(steps=[service_pb2.SessionStep()]),
        service_pb2.SessionRequest(steps=[good]),
    ]
    responses, error = raw_session(stub, messages)
    assert error is None
    failed, following = results_of(responses)
    assert failed.error.code == INVALID.value[0]
    assert "'x'" in failed.error.message
    assert not failed.values and not failed.gradients
    assert_sum_of_squares(following, CHUNK_X)


def test_a_well_formed_chunk_sequence_feeds_its_step(stub):
    chunks = [chunk(0, CHUNK_BYTES[:8]), chunk(1, CHUNK_BYTES[8:24]), chunk(2, CHUNK_BYTES[24:])]
    messages = [
        service_pb2.SessionRequest(start=sum_of_squares_start(), chunks=chunks[:2]),
        service_pb2.SessionRequest(chunks=chunks[2:], steps=[service_pb2.SessionStep()]),
    ]
    responses, error = raw_session(stub, messages)
    assert error is None
    (result,) = results_of(responses)
    assert_sum_of_squares(result, CHUNK_X)


def test_a_chunked_input_over_the_element_limit_is_resource_exhausted():
    limits = Limits(max_tensor_elements=1000)
    big = chunk(0, bytes(800), shape=(2000,))
    good = service_pb2.SessionStep(inputs={"x": to_proto(CHUNK_X)})
    messages = [
        service_pb2.SessionRequest(start=sum_of_squares_start()),
        service_pb2.SessionRequest(chunks=[big], steps=[service_pb2.SessionStep()]),
        service_pb2.SessionRequest(steps=[good]),
    ]
    with running_server(engine=Engine(limits)) as address, grpc.insecure_channel(address) as raw:
        responses, error = raw_session(service_grpc.GradientServiceStub(raw), messages)
    assert error is None
    over, following = results_of(responses)
    assert over.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "max_tensor_elements" in over.error.message
    assert_sum_of_squares(following, CHUNK_X)


@pytest.mark.parametrize("shape", [(2**40, 2**40), (2**31, 2**31, 4)])
def test_a_chunked_input_of_an_absurd_shape_is_resource_exhausted_not_allocated(shape):
    absurd = chunk(0, bytes(8), shape=shape)
    good = service_pb2.SessionStep(inputs={"x": to_proto(CHUNK_X)})
    messages = [
        service_pb2.SessionRequest(start=sum_of_squares_start()),
        service_pb2.SessionRequest(chunks=[absurd], steps=[service_pb2.SessionStep()]),
        service_pb2.SessionRequest(steps=[good]),
    ]
    with running_server() as address, grpc.insecure_channel(address) as raw:
        responses, error = raw_session(service_grpc.GradientServiceStub(raw), messages)
    assert error is None
    over, following = results_of(responses)
    assert over.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "max_tensor_elements" in over.error.message
    assert_sum_of_squares(following, CHUNK_X)


# ---------------------------------------------------------------------------------------------
# B. Session slots and cancellation


def test_sessions_over_the_limit_are_refused_until_one_closes():
    with running_server(max_sessions=2) as address, GradientClient(address, timeout=10) as client:
        with (
            client.session(lecture_graph(), output="f") as first,
            client.session(lecture_graph(), output="f") as second,
        ):
            for session in (first, second):  # both are open on the server
                assert_lecture(session.gradient(LECTURE_INPUTS).values)
            with pytest.raises(GradientError) as info:
                with client.session(lecture_graph(), output="f") as third:
                    third.gradient(LECTURE_INPUTS)
            assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_sessions" in info.value.details
            first.close()  # the server frees the slot before it ends the stream
            with client.session(lecture_graph(), output="f") as third:
                r = third.gradient(LECTURE_INPUTS)
                assert_lecture(r.values, r.gradients)
            r = second.gradient({"x": 1.0, "y": 1.0, "z": 1.0})
            assert float(r.values["f"]) == 2.0


def open_when_free(client: GradientClient, timeout: float = 5.0):
    """A session on the lecture graph that has run one step, retried while the server still
    counts a cancelled one (cancellation reaches the server asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        session = client.session(lecture_graph(), output="f")
        try:
            assert_lecture(session.gradient(LECTURE_INPUTS).values)
            return session
        except GradientError as error:
            session.cancel()
            if error.code != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def test_a_cancelled_session_frees_its_slot_and_the_server_keeps_serving():
    with running_server(max_sessions=1) as address, GradientClient(address, timeout=10) as client:
        for round_ in range(5):
            session = open_when_free(client)
            r = session.gradient({"x": float(round_), "y": 1.0, "z": 2.0})
            assert float(r.values["f"]) == (round_ + 1.0) * 2.0
            pending = session.gradient_future(LECTURE_INPUTS)
            session.cancel()
            assert pending.done()  # resolved: its result or CANCELLED, never left hanging
            with pytest.raises(GradientError) as info:
                session.gradient(LECTURE_INPUTS)
            assert info.value.code == grpc.StatusCode.CANCELLED
            r = client.gradient(lecture_graph(), "f", LECTURE_INPUTS)
            assert_lecture(r.values, r.gradients)
        session = open_when_free(client)
        session.close()


def test_leaving_a_session_block_by_an_exception_cancels_it():
    with running_server(max_sessions=1) as address, GradientClient(address, timeout=10) as client:
        for _ in range(3):
            with pytest.raises(KeyError):
                with open_when_free(client) as session:
                    session.gradient(LECTURE_INPUTS)
                    raise KeyError("the caller's own failure")
            assert_lecture(client.forward(lecture_graph(), LECTURE_INPUTS).values)
        with open_when_free(client) as session:
            assert_lecture(session.forward(LECTURE_INPUTS).values)


def test_a_cancelled_session_is_not_reported_as_a_server_bug():
    """The call log has one line per call with its status (README), and keeps INTERNAL (logged
    at ERROR with a trace) for the server's own bugs: a session the client cancels while the
    server waits for its next message is not one. (gRPC hands the server the end of the
    request stream and the cancellation as two events, in either order: the line says
    CANCELLED, or OK when the stream's end came first.)"""
    opened = threading.Event()
    release = threading.Event()

    class SignallingEngine(Engine):
        def load_graph_bytes(self, data, check_deadline=no_deadline):
            graph = super().load_graph_bytes(data, check_deadline)
            opened.set()  # the session's start is being served
            return graph

    def requests():
        yield service_pb2.SessionRequest(start=lecture_start())
        release.wait(10)  # no half-close: the server is left waiting for the next message

    call_log = RecordingCallLog()
    with running_server(engine=SignallingEngine(), call_log=call_log) as address:
        with grpc.insecure_channel(address) as raw:
            call = service_grpc.GradientServiceStub(raw).Session(requests(), timeout=10)
            try:
                assert opened.wait(5)
                call.cancel()
                assert wait_until(lambda: call_log.of("Session"))
            finally:
                release.set()
        with GradientClient(address, timeout=10) as client:
            assert_lecture(client.forward(lecture_graph(), LECTURE_INPUTS).values)
    codes = [code for _, code, _ in call_log.of("Session")]
    assert codes in ([grpc.StatusCode.CANCELLED], [grpc.StatusCode.OK])


# ---------------------------------------------------------------------------------------------
# B. Async sessions


def test_async_session_lecture_values_and_fifty_concurrent_steps(server_address):
    async def run():
        async with AsyncGradientClient(server_address, timeout=20) as client:
            async with client.session(lecture_graph(), output="f") as session:
                r = await session.gradient(LECTURE_INPUTS)
                assert_lecture(r.values, r.gradients)
                assert_lecture((await session.forward(LECTURE_INPUTS)).values)
                steps = [session.gradient({"x": float(i), "y": 5.0, "z": -4.0}) for i in range(50)]
                results = await asyncio.gather(*steps)
        for i, r in enumerate(results):
            assert float(r.values["f"]) == (i + 5.0) * -4.0
            assert float(r.gradients["z"]) == i + 5.0
            assert float(r.gradients["x"]) == -4.0

    asyncio.run(run())


def test_async_session_step_errors_and_a_bad_start(server_address):
    async def run():
        async with AsyncGradientClient(server_address, timeout=20) as client:
            async with client.session(product_graph(), output="y") as session:
                with pytest.raises(GradientError) as info:
                    await session.gradient({"x": PRODUCT_X}, seed=PRODUCT_SEED)
                assert info.value.code == INVALID and "'w'" in info.value.details
                r = await session.gradient({"x": PRODUCT_X, "w": PRODUCT_W}, seed=PRODUCT_SEED)
                np.testing.assert_array_equal(r.gradients["w"], PRODUCT_SEED * PRODUCT_X)
            with pytest.raises(GradientError) as info:
                async with client.session(bad_op_graph(), output="n") as session:
                    await session.gradient({"x": 1.0})
            assert info.value.code == INVALID and "no_such_op" in info.value.details
            assert_lecture((await client.forward(lecture_graph(), LECTURE_INPUTS)).values)

    asyncio.run(run())


def test_async_session_concurrent_chunked_steps():
    rng = np.random.default_rng(11)
    x, seed = rng.standard_normal((2, THREE_MB))

    async def run(address):
        async with AsyncGradientClient(address, timeout=30, max_message_mb=1) as client:
            async with client.session(product_graph(), output="y") as session:
                steps = [session.gradient({"x": x, "w": x * k}, seed=seed) for k in range(3)]
                results = await asyncio.gather(*steps)
        for k, r in enumerate(results):
            np.testing.assert_array_equal(r.values["y"], x * (x * k))
            np.testing.assert_array_equal(r.gradients["x"], seed * (x * k))
            np.testing.assert_array_equal(r.gradients["w"], seed * x)

    with running_server(max_message_mb=1) as address:
        asyncio.run(run(address))


# ---------------------------------------------------------------------------------------------
# C. Several connections


def test_a_client_with_three_connections_spreads_calls_and_gets_right_results():
    call_log = RecordingCallLog()
    with running_server(call_log=call_log) as address:
        with GradientClient(address, timeout=10, connections=3) as client:
            g = lecture_graph()
            for i in range(6):
                r = client.gradient(g, "f", {"x": float(i), "y": 5.0, "z": -4.0})
                assert float(r.values["f"]) == (i + 5.0) * -4.0
                assert float(r.gradients["z"]) == i + 5.0
            with client.session(g, output="f") as session:
                assert_lecture(session.gradient(LECTURE_INPUTS).values)
    peers = {peer for method, _, peer in call_log.of("Gradient")}
    assert len(peers) == 3


# ---------------------------------------------------------------------------------------------
# D. Tensors as views, the call log, and a cancelled call


class FeedKeepingEngine(Engine):
    """An Engine keeping the arrays each Gradient call was fed."""

    def __init__(self):
        super().__init__()
        self.fed: list[dict[str, np.ndarray]] = []

    def gradient(self, graph, feeds, *args, **kwargs):
        self.fed.append(dict(feeds))
        return super().gradient(graph, feeds, *args, **kwargs)


def _owner(array: np.ndarray):
    """The object whose memory an array views (following views of views)."""
    while isinstance(array, np.ndarray) and array.base is not None:
        array = array.base
    return array


def test_inputs_reach_the_engine_and_results_reach_the_caller_as_read_only_views():
    engine = FeedKeepingEngine()
    x = np.arange(100_000, dtype=np.float64)
    g = Graph()
    g.sum(g.square(g.input("x")), name="f")
    with running_server(engine=engine) as address, GradientClient(address) as client:
        result = client.gradient(g, "f", {"x": x})
    fed = engine.fed[0]["x"]
    assert not fed.flags.writeable and isinstance(_owner(fed), bytes)  # the request's bytes
    np.testing.assert_array_equal(fed, x)
    gradient = result.gradients["x"]
    assert not gradient.flags.writeable and isinstance(_owner(gradient), bytes)
    np.testing.assert_array_equal(gradient, 2 * x)
    assert float(result.values["f"]) == float(np.sum(x * x))


class CapturedLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def captured_call_log() -> Iterator[CapturedLog]:
    handler = CapturedLog()
    logger = logging.getLogger("gradient_server.calls")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.mark.parametrize("sample, logged", [(0.0, 0), (1.0, 5)])
def test_successful_calls_are_logged_at_the_sampled_rate_and_failures_always(sample, logged):
    with captured_call_log() as log, running_server(call_log=CallLog(sample)) as address:
        with GradientClient(address) as client:
            for _ in range(5):
                client.gradient(lecture_graph(), "f", LECTURE_INPUTS)
            with pytest.raises(GradientError):
                client.gradient(lecture_graph(), "nowhere", LECTURE_INPUTS)
    lines = [r for r in log.records if r.getMessage().startswith("method=Gradient")]
    ok = [r for r in lines if " code=OK " in r.getMessage()]
    failed = [r for r in lines if " code=INVALID_ARGUMENT " in r.getMessage()]
    assert len(ok) == logged and all(r.levelno == logging.INFO for r in ok)
    assert len(failed) == 1 and failed[0].levelno == logging.WARNING
    assert "'nowhere'" in failed[0].getMessage() and failed[0].exc_info is None


def test_the_sampled_fraction_must_be_a_fraction():
    with pytest.raises(ValueError):
        CallLog(1.5)


def test_an_expired_deadline_is_logged_as_deadline_exceeded():
    """Many short deadlines on a long call: each is DEADLINE_EXCEEDED for the client and in the
    server's log (not CANCELLED, which gRPC's own deadline timer could suggest)."""
    call_log = RecordingCallLog()
    g = Graph()
    w = h = g.input("w")
    for _ in range(3000):
        h = g.matmul(h, w)
    with running_server(call_log=call_log) as address, GradientClient(address) as client:
        client.forward(g, {"w": np.eye(200)}, fetch=[h.name])  # compiled once, for the shape
        for timeout in (0.05, 0.1, 0.2, 0.3):
            with pytest.raises(GradientError) as expired:
                client.forward(g, {"w": np.eye(200) * 0.5}, fetch=[h.name], timeout=timeout)
            assert expired.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        codes = lambda: [code for _, code, _ in call_log.of("Forward")]  # noqa: E731
        assert wait_until(lambda: len(codes()) == 5, timeout=30)
    assert codes() == [grpc.StatusCode.OK] + [grpc.StatusCode.DEADLINE_EXCEEDED] * 4


def test_a_cancelled_call_stops_its_work_and_the_server_serves_the_next():
    """One request thread: the next call is served soon after the cancel, so the heavy call's
    remaining ops (many seconds of matmuls) were not run; the call is logged as CANCELLED."""
    call_log = RecordingCallLog()
    g = Graph()
    w = h = g.input("w")
    for _ in range(3000):
        h = g.matmul(h, w)
    weights = np.eye(300)
    engine = Engine()
    with running_server(threads=1, max_sessions=1, call_log=call_log, engine=engine) as address:
        with grpc.insecure_channel(address) as channel, GradientClient(address) as client:
            request = service_pb2.ForwardRequest(
                graph=g.message(), inputs={"w": to_proto(weights)}, fetch=[h.name]
            )
            future = service_grpc.GradientServiceStub(channel).Forward.future(request)
            # Cancel once the call runs (its plan compiled), not while it waits for a thread.
            assert wait_until(lambda: engine.stats().compiles == 1, timeout=30)
            time.sleep(0.1)
            future.cancel()
            started = time.monotonic()
            assert_lecture(client.forward(lecture_graph(), LECTURE_INPUTS, timeout=30).values)
            assert time.monotonic() - started < 3.0
            # Its thread logs the call once it has seen the cancellation (at its next check).
            codes = lambda: [code for _, code, _ in call_log.of("Forward")]  # noqa: E731
            assert wait_until(lambda: grpc.StatusCode.CANCELLED in codes(), timeout=10)
