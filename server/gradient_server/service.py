"""The gRPC service: maps the wire <-> the engine, and engine errors to status codes, in one place.

The methods are registered with raw-bytes handlers: requests are parsed here (by the SDK's wire
codec, so tensors arrive as read-only views of the received bytes and bytes that do not parse
are INVALID_ARGUMENT), and responses are written straight into their bytes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message_factory
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gradient.v1 import gradient_service_pb2 as service_pb2
from gradient.v1 import graph_pb2
from gradient_client import wire
from gradient_client.client import DEFAULT_MAX_MESSAGE_MB, check_message_mb
from gradient_client.wire import WireMessage

from .auth import TokenAuth, Tokens
from .batching import batchable
from .calllog import CallLog
from .calls import Call, failure_of
from .engine import Engine, Limits
from .errors import GraphError, LimitExceeded
from .gradcheck import CheckSettings, check_gradient
from .ir import Graph, canonical_attr, encode_attr, encode_graph
from .metrics import Metrics
from .ops import OPS, AttrSpec, OpDef
from .ops.base import REQUIRED
from .session import run_session

SERVICE = service_pb2.DESCRIPTOR.services_by_name["GradientService"]
SERVICE_NAME = SERVICE.full_name


@dataclass(frozen=True)
class _Method:
    """One unary RPC: its request type and the function computing its response."""

    name: str
    request_type: Any
    run: Callable[[WireMessage, Call], WireMessage]


class GradientServicer:
    """Implements gradient.v1.GradientService on an Engine, over raw-bytes handlers."""

    def __init__(
        self,
        engine: Engine | None = None,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_MB << 20,
        call_log: CallLog | None = None,
        metrics: bool = False,
        max_sessions: int = 16,
    ):
        self.engine = engine or Engine()
        self.max_message_bytes = max_message_bytes
        self.call_log = call_log or CallLog()
        self.metrics = Metrics(self.engine, SERVICE_NAME) if metrics else None
        self._list_ops = service_pb2.ListOpsResponse(
            ops=[_op_info(OPS[name]) for name in sorted(OPS)]
        ).SerializeToString()
        self.sessions = threading.BoundedSemaphore(max_sessions)
        self.max_sessions = max_sessions
        self.open_sessions: set = set()  # the _Session of each open stream (session.py)
        self.shutting_down = False

    # -- the handlers ----------------------------------------------------------------------

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """A raw-bytes handler for every RPC of the service, by method name."""
        handlers = {
            method.name: grpc.unary_unary_rpc_method_handler(self._unary(method))
            for method in (
                self._method("Forward", self._forward),
                self._method("Gradient", self._gradient),
                self._method("CheckGradient", self._check_gradient),
                self._method("GradientGraph", self._gradient_graph),
                self._method("HessianVectorProduct", self._hvp),
                self._method("JacobianVectorProduct", self._jvp),
                self._method("Jacobian", self._jacobian),
            )
        }
        handlers["ListOps"] = grpc.unary_unary_rpc_method_handler(self._list_ops_handler)
        handlers["Session"] = grpc.stream_stream_rpc_method_handler(
            lambda requests, context: run_session(self, requests, context)
        )
        assert set(handlers) == set(SERVICE.methods_by_name), "every RPC has a handler"
        return handlers

    @staticmethod
    def _method(name: str, run) -> _Method:
        request = message_factory.GetMessageClass(SERVICE.methods_by_name[name].input_type)
        return _Method(name, request, run)

    def _unary(self, method: _Method) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        def handle(data: bytes, context: grpc.ServicerContext) -> bytes:
            call = self.started(method.name, context, len(data))
            try:
                request = wire.decode(data, method.request_type)
                response = method.run(request, call)
                payload = getattr(request.fields, "response_payload", 0)
                lists = payload == service_pb2.PAYLOAD_FORM_LISTS
                encoded = wire.encode(response, as_lists=lists)
                self._check_response_size(len(encoded))
                call.sent = len(encoded)
                self.finished(call, grpc.StatusCode.OK)
                return encoded
            except Exception as error:  # noqa: BLE001 - every failure gets a status
                failure = failure_of(error, method.name, call.request_id)
            self.finished(call, failure.code, failure.details)
            context.abort_with_status(failure)
            raise AssertionError("abort returns only by raising")

        return handle

    def _list_ops_handler(self, data: bytes, context: grpc.ServicerContext) -> bytes:
        call = self.started("ListOps", context, len(data))
        call.sent = len(self._list_ops)
        self.finished(call, grpc.StatusCode.OK)
        return self._list_ops

    def started(
        self, method: str, context: grpc.ServicerContext, received: int = 0, kind: str = "UNARY"
    ) -> Call:
        """A call that has begun (`kind`: UNARY or BIDI_STREAM), counted in the metrics."""
        call = Call(method, context, received)
        if self.metrics is not None:
            self.metrics.started(call, kind)
        return call

    def finished(
        self, call: Call, code: grpc.StatusCode, details: str = "", kind: str = "UNARY"
    ) -> None:
        """A call that has ended with `code`: logged and counted."""
        self.call_log.finished(call, code, details)
        if self.metrics is not None:
            self.metrics.finished(call, code, kind)

    def begin_shutdown(self) -> None:
        """Tell open sessions to end: a session waiting for its client's next message is
        cancelled now; one running steps ends, UNAVAILABLE, once their results are sent."""
        self.shutting_down = True
        for session in list(self.open_sessions):
            session.end_if_idle()

    def _check_response_size(self, size: int) -> None:
        if size > self.max_message_bytes:
            raise LimitExceeded(
                f"the response would be {size} bytes; the message size limit (max_message_mb) "
                f"is {self.max_message_bytes} bytes: ask for fewer nodes (fetch, wrt), or use a "
                "Session, which sends large tensors in chunks",
                limit="max_message_mb",
            )

    # -- the RPCs --------------------------------------------------------------------------

    def graph_of(self, request: WireMessage, call: Call) -> Graph:
        """The request's graph: sent whole (cached by its digest) or named by its digest."""
        digest = request.fields.graph_digest
        sent = request.raw.get("graph")
        if digest and sent is not None:
            raise GraphError("set either graph or graph_digest, not both", field="graph_digest")
        if digest:
            graph = self.engine.cached_graph(digest)
        else:
            graph = self.engine.load_graph_bytes(sent if sent is not None else b"", call.check)
        call.graph_digest, call.nodes = graph.digest, len(graph.nodes)
        return graph

    def _forward(self, request: WireMessage, call: Call) -> WireMessage:
        graph = self.graph_of(request, call)
        values = self.engine.forward(
            graph, request.tensors.get("inputs", {}), request.fields.fetch, call.check
        )
        response = service_pb2.ForwardResponse(graph_digest=graph.digest)
        return WireMessage(response, tensors={"values": values})

    def _gradient(self, request: WireMessage, call: Call) -> WireMessage:
        graph = self.graph_of(request, call)
        fields = request.fields
        if fields.batch_axes:
            return self._gradient_per_example(request, call, graph)
        if fields.batched_seed:
            return self._gradient_batched(request, call, graph)
        result = self.engine.gradient(
            graph,
            request.tensors.get("inputs", {}),
            fields.output,
            request.tensors.get("seed"),
            fields.wrt,
            fields.fetch,
            call.check,
        )
        response = service_pb2.GradientResponse(
            skipped=_skipped(result.skipped), graph_digest=graph.digest
        )
        return WireMessage(
            response, tensors={"values": result.values, "gradients": result.gradients}
        )

    def _gradient_per_example(self, request: WireMessage, call: Call, graph: Graph) -> WireMessage:
        fields = request.fields
        if fields.batched_seed:
            raise GraphError(
                "batch_axes and batched_seed do not combine: per-example seeds are stacked "
                "along the batch axis already (send batch_axes alone)",
                field="batched_seed",
            )
        result = self.engine.gradient_per_example(
            graph,
            request.tensors.get("inputs", {}),
            fields.output,
            dict(fields.batch_axes),
            request.tensors.get("seed"),
            fields.wrt,
            fields.fetch,
            call.check,
        )
        response = service_pb2.GradientResponse(
            skipped=_skipped(result.skipped), graph_digest=graph.digest
        )
        return WireMessage(
            response, tensors={"values": result.values, "gradients": result.gradients}
        )

    def _gradient_batched(self, request: WireMessage, call: Call, graph: Graph) -> WireMessage:
        fields = request.fields
        seeds = request.tensors.get("seed")
        if seeds is None:
            raise GraphError(
                "batched_seed is set but no seed was sent: send K seeds stacked along a new "
                "leading axis",
                field="seed",
            )
        result = self.engine.gradient_batched(
            graph,
            request.tensors.get("inputs", {}),
            fields.output,
            seeds,
            fields.wrt,
            fields.fetch,
            call.check,
        )
        response = service_pb2.GradientResponse(
            skipped=_skipped(result.skipped), graph_digest=graph.digest
        )
        return WireMessage(
            response, tensors={"values": result.values, "gradients": result.gradients}
        )

    def _check_gradient(self, request: WireMessage, call: Call) -> WireMessage:
        graph = self.graph_of(request, call)
        fields = request.fields
        defaults = CheckSettings()
        settings = CheckSettings(
            eps=fields.eps if fields.HasField("eps") else defaults.eps,
            atol=fields.atol if fields.HasField("atol") else defaults.atol,
            rtol=fields.rtol if fields.HasField("rtol") else defaults.rtol,
            max_elements=max(fields.max_elements, 0),
            directions=max(fields.directions, 0),
            random_seed=fields.random_seed,
        )
        report = check_gradient(
            self.engine,
            graph,
            request.tensors.get("inputs", {}),
            fields.output,
            request.tensors.get("seed"),
            list(fields.wrt),
            settings,
            call.check,
        )
        response = service_pb2.CheckGradientResponse(
            passed=report.passed,
            nodes=[
                service_pb2.NodeGradientCheck(
                    name=name,
                    max_abs_error=node.max_abs_error,
                    max_rel_error=node.max_rel_error,
                    passed=node.passed,
                    checked=node.checked,
                )
                for name, node in report.nodes.items()
            ],
            skipped=_skipped(report.skipped),
            eps=settings.eps,
            atol=settings.atol,
            rtol=settings.rtol,
            graph_digest=graph.digest,
        )
        return WireMessage(response)

    def _gradient_graph(self, request: WireMessage, call: Call) -> WireMessage:
        graph = self.graph_of(request, call)
        fields = request.fields
        combined = self.engine.gradient_graph(
            graph, request.tensors.get("inputs", {}), fields.output, fields.wrt, call.check
        )
        response = service_pb2.GradientGraphResponse(
            gradients=combined.gradients,
            seed=combined.seed,
            skipped=_skipped(combined.skipped),
            graph_digest=graph.digest,
        )
        return WireMessage(
            response, raw={"graph": encode_graph(combined.graph).SerializeToString()}
        )

    def _hvp(self, request: WireMessage, call: Call) -> WireMessage:
        graph = self.graph_of(request, call)
        products = self.engine.hvp(
            graph,
            request.tensors.get("inputs", {}),
            request.fields.output,
            request.tensors.get("vector", {}),
            call.check,
        )
        response = service_pb2.HessianVectorProductResponse(graph_digest=graph.digest)
        return WireMessage(response, tensors={"products": products})

    def _jvp(self, request: WireMessage, call: Call) -> WireMessage:
        graph = self.graph_of(request, call)
        fields = request.fields
        result = self.engine.jvp(
            graph,
            request.tensors.get("inputs", {}),
            fields.output,
            request.tensors.get("tangents", {}),
            fields.tangents_of,
            fields.all_tangents,
            fields.fetch,
            fields.batched_tangents,
            call.check,
        )
        response = service_pb2.JacobianVectorProductResponse(
            skipped=_skipped(result.skipped), graph_digest=graph.digest
        )
        return WireMessage(response, tensors={"values": result.values, "tangents": result.tangents})

    def _jacobian(self, request: WireMessage, call: Call) -> WireMessage:
        graph = self.graph_of(request, call)
        fields = request.fields
        if fields.mode not in _JACOBIAN_MODES:
            raise GraphError(f"unknown Jacobian mode {fields.mode}", field="mode")
        result = self.engine.jacobian(
            graph,
            request.tensors.get("inputs", {}),
            fields.output,
            fields.wrt,
            _JACOBIAN_MODES[fields.mode],
            call.check,
        )
        response = service_pb2.JacobianResponse(
            mode=_JACOBIAN_MODE_NUMBERS[result.mode],
            products=result.products,
            graph_digest=graph.digest,
        )
        return WireMessage(response, tensors={"jacobians": result.jacobians})


_JACOBIAN_MODES = {
    service_pb2.JACOBIAN_MODE_AUTO: "auto",
    service_pb2.JACOBIAN_MODE_REVERSE: "reverse",
    service_pb2.JACOBIAN_MODE_FORWARD: "forward",
}
_JACOBIAN_MODE_NUMBERS = {name: number for number, name in _JACOBIAN_MODES.items()}


def _skipped(skipped: dict[str, str]) -> list[service_pb2.SkippedNode]:
    return [service_pb2.SkippedNode(name=name, reason=reason) for name, reason in skipped.items()]


def _attr_default(spec: AttrSpec) -> graph_pb2.AttrValue | None:
    if spec.default is REQUIRED or spec.default is None:
        return None
    return encode_attr(spec.kind, canonical_attr(spec.kind, spec.default))


def _op_info(op: OpDef) -> service_pb2.OpInfo:
    return service_pb2.OpInfo(
        name=op.name,
        doc=op.doc,
        inputs=[
            service_pb2.OpInput(name=name, differentiable=op.is_differentiable(i))
            for i, name in enumerate(op.inputs)
        ],
        variadic=op.variadic,
        batchable=batchable(op.name),
        attrs=[
            service_pb2.OpAttr(
                name=spec.name,
                type="string" if spec.kind == "dtype" else spec.kind,
                required=spec.default is REQUIRED,
                default=_attr_default(spec),
                doc=spec.doc,
            )
            for spec in op.attrs
        ],
    )


class _HealthServicer(health.HealthServicer):
    """grpc.health.v1 Health whose status updates are sent outside the servicer's lock.

    The stock servicer sends updates to Watch streams while holding its lock; a stream closing
    at that moment (a load balancer dropping its watch on NOT_SERVING) waits for the same lock
    on gRPC's event thread, and shutdown deadlocks (grpc/grpc#43403). Here the callbacks are
    collected under the lock and called after it is released.
    """

    def _update(self, statuses: dict[str, int]) -> None:
        with self._lock:
            if self._gracefully_shutting_down:
                return
            sends = []
            for service, status in statuses.items():
                self._server_status[service] = status
                response = health_pb2.HealthCheckResponse(status=status)
                for callback in list(self._send_response_callbacks.get(service, ())):
                    sends.append((callback, response))
        for callback, response in sends:
            callback(response)

    def set(self, service: str, status: int) -> None:
        """Set a service's status and tell its watchers."""
        self._update({service: status})

    def enter_graceful_shutdown(self) -> None:
        """Turn every service NOT_SERVING for good, tell the watchers, and end their streams
        (so that an open Watch does not hold the server for its whole grace period)."""
        with self._lock:
            services = list(self._server_status)
        self._update({s: health_pb2.HealthCheckResponse.NOT_SERVING for s in services})
        with self._lock:
            self._gracefully_shutting_down = True
            watchers = []
            for callbacks in self._send_response_callbacks.values():
                watchers += callbacks
                callbacks.clear()
        for callback in watchers:
            callback(None)  # ends the stream, OK: its watcher has seen NOT_SERVING

    def _on_close_callback(self, send_response_callback, service):
        def closed() -> None:
            with self._lock:
                callbacks = self._send_response_callbacks.get(service, set())
                if send_response_callback not in callbacks:
                    return  # its stream was already ended at shutdown
                callbacks.discard(send_response_callback)
            send_response_callback(None)

        return closed


class GradientServer:
    """A running gRPC server with the gradient, health and reflection services."""

    def __init__(
        self,
        server: grpc.Server,
        health_servicer: _HealthServicer,
        servicer: GradientServicer,
        health_server: grpc.Server | None = None,
        health_port: int = 0,
    ):
        self.grpc_server = server
        self.health = health_servicer
        self.servicer = servicer
        self.health_server = health_server  # the plaintext health-only port, if any
        self.health_port = health_port

    def start(self) -> None:
        """Start serving and report SERVING on the health service."""
        self.grpc_server.start()
        if self.health_server is not None:
            self.health_server.start()
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    def serve_metrics(self, host: str, port: int) -> int:
        """Serve Prometheus metrics at http://host:port/metrics (the server must have been
        created with metrics=True); returns the bound port."""
        if self.servicer.metrics is None:
            raise ValueError("this server was created without metrics")
        return self.servicer.metrics.serve(host, port)

    def stop(self, grace: float | None = 5.0) -> None:
        """Turn health NOT_SERVING (ending Watch streams), refuse new calls, tell open
        sessions to end, and let in-flight calls finish within `grace`; returns as soon as the
        last one has."""
        # Idle sessions end and new calls are refused before anyone hears NOT_SERVING, so a
        # client that heard it is never served here again.
        self.servicer.begin_shutdown()
        stopped = self.grpc_server.stop(grace)
        self.health.enter_graceful_shutdown()
        stopped.wait()
        if self.health_server is not None:
            self.health_server.stop(0).wait()
        if self.servicer.metrics is not None:
            self.servicer.metrics.stop()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until the server stops (or the timeout passes)."""
        return self.grpc_server.wait_for_termination(timeout)


def create_server(
    address: str,
    *,
    engine: Engine | None = None,
    limits: Limits | None = None,
    threads: int = 8,
    max_message_mb: int = DEFAULT_MAX_MESSAGE_MB,
    max_sessions: int = 16,
    max_concurrent_rpcs: int | None = None,
    reuse_port: bool = False,
    call_log: CallLog | None = None,
    metrics: bool = False,
    credentials: grpc.ServerCredentials | None = None,
    tokens: Tokens | None = None,
    health_address: str | None = None,
    max_connection_age: float = 0.0,
) -> tuple[GradientServer, int]:
    """Build (but do not start) a server bound to `address`; returns it and the bound port.

    Bind "127.0.0.1:0" to get a free port (as the tests do). A session holds a thread for as
    long as its stream is open, so the pool has `threads` for calls plus one per session.
    Beyond `max_concurrent_rpcs` calls at once (streams included), gRPC refuses a call at once
    with RESOURCE_EXHAUSTED instead of queueing it (None: no limit). With `metrics`, calls
    and the engine are counted (`GradientServer.serve_metrics` serves them).

    With `credentials` (auth.server_credentials) the port speaks TLS; with `tokens`, every
    call but health checks needs a bearer token. `health_address` adds a plaintext port
    serving only the health service (for probes that speak neither TLS nor tokens).
    `max_connection_age` (seconds, 0 for none) asks clients to reconnect that often, so that
    those balancing over DNS (a headless Service) find replicas added since they connected;
    calls in flight, sessions included, finish on the old connection.
    """
    max_bytes = check_message_mb(max_message_mb) * 1024 * 1024
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=threads + max_sessions,
            thread_name_prefix="gradient",
        ),
        interceptors=[TokenAuth(tokens)] if tokens is not None else None,
        maximum_concurrent_rpcs=max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", max_bytes),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            # Ping idle connections, so that a client that vanished (a session's, say) is
            # noticed and its call ended within about a minute and a half.
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            # Accept the SDK's keepalive pings (every 60 s, idle connections included): by
            # default gRPC tolerates one per 5 minutes without calls and closes the rest.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 30_000),
            *(
                [("grpc.max_connection_age_ms", int(max_connection_age * 1000))]
                if max_connection_age > 0
                else []
            ),
        ],
    )
    servicer = GradientServicer(
        engine or Engine(limits),
        max_message_bytes=max_bytes,
        call_log=call_log,
        metrics=metrics,
        max_sessions=max_sessions,
    )
    handlers = servicer.method_handlers()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
    health_servicer = _HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = _bind(server, address, credentials)
    health_server, health_port = None, 0
    if health_address is not None:
        health_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"),
            options=[("grpc.so_reuseport", 1 if reuse_port else 0)],
        )
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        health_port = _bind(health_server, health_address, None)
    return GradientServer(server, health_servicer, servicer, health_server, health_port), port


def _bind(server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    try:
        if credentials is not None:
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        why = "address in use or not available"
        if credentials is not None:
            why += ", or the TLS certificate and key are not valid or do not match"
        raise OSError(f"could not bind {address} ({why})")
    return port
