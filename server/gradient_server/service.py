"""The gRPC service: maps protobuf <-> engine, and engine errors to status codes, in one place."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gradient.v1 import gradient_service_pb2 as service_pb2
from gradient.v1 import gradient_service_pb2_grpc as service_grpc
from gradient.v1 import graph_pb2
from gradient_client.client import DEFAULT_MAX_MESSAGE_MB, check_message_mb
from gradient_client.tensors import TensorFormatError, from_proto, to_proto

from .engine import Engine, Limits
from .errors import DeadlineExceeded, GraphError, LimitExceeded
from .gradcheck import CheckSettings, check_gradient
from .ir import canonical_attr, encode_attr, encode_graph
from .ops import OPS, AttrSpec, OpDef
from .ops.base import REQUIRED

log = logging.getLogger("gradient_server")

SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["GradientService"].full_name

R = TypeVar("R")


class _Cancelled(Exception):
    """The client went away; nobody will read the answer."""


def _decode_tensors(tensors: Any, what: str = "input") -> dict[str, np.ndarray]:
    decoded = {}
    for name, tensor in tensors.items():
        try:
            decoded[name] = from_proto(tensor)
        except TensorFormatError as e:
            raise GraphError(f"{what} {name!r}: {e}") from None
    return decoded


def _decode_seed(request: Any) -> np.ndarray | None:
    if not request.HasField("seed"):
        return None
    try:
        return from_proto(request.seed)
    except TensorFormatError as e:
        raise GraphError(f"seed: {e}") from None


def _skipped(skipped: dict[str, str]) -> list[service_pb2.SkippedNode]:
    return [service_pb2.SkippedNode(name=name, reason=reason) for name, reason in skipped.items()]


def _encode(values: dict[str, np.ndarray], payload: int) -> dict[str, Any]:
    as_lists = payload == service_pb2.PAYLOAD_FORM_LISTS
    return {name: to_proto(value, as_lists=as_lists) for name, value in values.items()}


class GradientServicer(service_grpc.GradientServiceServicer):
    """Implements gradient.v1.GradientService on an Engine."""

    def __init__(self, engine: Engine | None = None):
        self.engine = engine or Engine()
        self._ops = service_pb2.ListOpsResponse(ops=[_op_info(OPS[name]) for name in sorted(OPS)])

    def Forward(self, request, context):
        def work(check: Callable[[], None]):
            graph = self.engine.load_graph(request.graph, check)
            values = self.engine.forward(
                graph, _decode_tensors(request.inputs), list(request.fetch), check
            )
            return service_pb2.ForwardResponse(values=_encode(values, request.response_payload))

        return self._handle("Forward", context, work)

    def Gradient(self, request, context):
        def work(check: Callable[[], None]):
            graph = self.engine.load_graph(request.graph, check)
            result = self.engine.gradient(
                graph,
                _decode_tensors(request.inputs),
                request.output,
                _decode_seed(request),
                list(request.wrt),
                list(request.fetch),
                check,
            )
            return service_pb2.GradientResponse(
                values=_encode(result.values, request.response_payload),
                gradients=_encode(result.gradients, request.response_payload),
                skipped=_skipped(result.skipped),
            )

        return self._handle("Gradient", context, work)

    def CheckGradient(self, request, context):
        def work(check: Callable[[], None]):
            graph = self.engine.load_graph(request.graph, check)
            defaults = CheckSettings()
            settings = CheckSettings(
                eps=request.eps if request.HasField("eps") else defaults.eps,
                atol=request.atol if request.HasField("atol") else defaults.atol,
                rtol=request.rtol if request.HasField("rtol") else defaults.rtol,
                max_elements=max(request.max_elements, 0),
                directions=max(request.directions, 0),
                random_seed=request.random_seed,
            )
            report = check_gradient(
                self.engine,
                graph,
                _decode_tensors(request.inputs),
                request.output,
                _decode_seed(request),
                list(request.wrt),
                settings,
                check,
            )
            return service_pb2.CheckGradientResponse(
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
            )

        return self._handle("CheckGradient", context, work)

    def GradientGraph(self, request, context):
        def work(check: Callable[[], None]):
            graph = self.engine.load_graph(request.graph, check)
            combined = self.engine.gradient_graph(
                graph, _decode_tensors(request.inputs), request.output, list(request.wrt), check
            )
            return service_pb2.GradientGraphResponse(
                graph=encode_graph(combined.graph),
                gradients=combined.gradients,
                seed=combined.seed,
                skipped=_skipped(combined.skipped),
            )

        return self._handle("GradientGraph", context, work)

    def HessianVectorProduct(self, request, context):
        def work(check: Callable[[], None]):
            graph = self.engine.load_graph(request.graph, check)
            vector = _decode_tensors(request.vector, "vector")
            products = self.engine.hvp(
                graph, _decode_tensors(request.inputs), request.output, vector, check
            )
            return service_pb2.HessianVectorProductResponse(
                products=_encode(products, request.response_payload)
            )

        return self._handle("HessianVectorProduct", context, work)

    def ListOps(self, request, context):
        return self._handle("ListOps", context, lambda check: self._ops)

    def _handle(self, method: str, context, work: Callable[[Callable[[], None]], R]) -> R:
        """Run one call: map every failure to a status code, and log one line."""
        start = time.perf_counter()
        code, details = grpc.StatusCode.OK, ""

        def check_deadline() -> None:
            if not context.is_active():
                raise _Cancelled
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded

        try:
            return work(check_deadline)
        except GraphError as e:
            code, details = grpc.StatusCode.INVALID_ARGUMENT, str(e)
        except LimitExceeded as e:
            code, details = grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)
        except DeadlineExceeded:
            code, details = grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded; work stopped"
        except _Cancelled:
            code, details = grpc.StatusCode.CANCELLED, "cancelled by the client"
        except MemoryError:
            code, details = grpc.StatusCode.RESOURCE_EXHAUSTED, "the server ran out of memory"
        except Exception as e:  # a bug: the trace goes to the log, a short message to the client
            log.exception("%s failed", method)
            code, details = grpc.StatusCode.INTERNAL, f"internal error ({type(e).__name__})"
        finally:
            elapsed = (time.perf_counter() - start) * 1000
            log.info("%s %s %.1f ms", method, code.name, elapsed)
        context.abort(code, details)


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
        """Turn every service NOT_SERVING for good, and tell the watchers."""
        with self._lock:
            services = list(self._server_status)
        self._update({s: health_pb2.HealthCheckResponse.NOT_SERVING for s in services})
        with self._lock:
            self._gracefully_shutting_down = True


class GradientServer:
    """A running gRPC server with the gradient, health and reflection services."""

    def __init__(self, server: grpc.Server, health_servicer: health.HealthServicer):
        self.grpc_server = server
        self.health = health_servicer

    def start(self) -> None:
        """Start serving and report SERVING on the health service."""
        self.grpc_server.start()
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float | None = 5.0) -> None:
        """Turn health NOT_SERVING, refuse new calls, let in-flight calls finish within `grace`."""
        self.health.enter_graceful_shutdown()
        self.grpc_server.stop(grace).wait()

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
    reuse_port: bool = False,
) -> tuple[GradientServer, int]:
    """Build (but do not start) a server bound to `address`; returns it and the bound port.

    Bind "127.0.0.1:0" to get a free port (as the tests do).
    """
    max_bytes = check_message_mb(max_message_mb) * 1024 * 1024
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gradient"),
        options=[
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", max_bytes),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ],
    )
    service_grpc.add_GradientServiceServicer_to_server(
        GradientServicer(engine or Engine(limits)), server
    )
    health_servicer = _HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(f"could not bind {address} (address in use or not available)")
    return GradientServer(server, health_servicer), port
