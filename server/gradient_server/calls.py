"""One call's lifetime: its deadline and cancellation, and how its failure maps to a status.

The one place errors map to gRPC status codes (unary calls and Session streams alike).
"""

from __future__ import annotations

import logging
import time
import uuid

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from gradient_client.tensors import TensorFormatError
from gradient_client.wire import WireFormatError

from .errors import DeadlineExceeded, GraphError, LimitExceeded, UnknownGraph

log = logging.getLogger("gradient_server")


class Cancelled(Exception):
    """The client went away; nobody will read the answer."""


class Call:
    """One call as the server sees it: its method, start, request id and graph (for its log
    line and metrics), and its deadline and cancellation, checked between ops without taking
    a lock per op.

    The deadline is fixed once as a monotonic time. Whether the client is still there is
    asked of gRPC (which takes the call's lock) at most once per CANCEL_PROBE seconds of
    work, so short calls never ask and a cancelled long one stops within that time.
    """

    __slots__ = (
        "method",
        "context",
        "start",
        "request_id",
        "graph_digest",
        "nodes",
        "received",
        "sent",
        "_deadline",
        "_next_probe",
    )

    CANCEL_PROBE = 0.005

    def __init__(self, method: str, context: grpc.ServicerContext, received: int = 0):
        self.start = time.perf_counter()
        now = time.monotonic()
        self.method = method
        self.context = context
        self.request_id = _request_id(context)
        self.graph_digest = ""
        self.nodes = 0
        self.received = received  # request bytes
        self.sent = 0  # response bytes
        self._deadline = now + context.time_remaining()
        self._next_probe = now + self.CANCEL_PROBE

    def check(self) -> None:
        """DeadlineExceeded once the deadline has passed; Cancelled once the call has ended."""
        now = time.monotonic()
        if now > self._deadline:
            raise DeadlineExceeded
        if now >= self._next_probe:
            self._next_probe = now + self.CANCEL_PROBE
            if not self.context.is_active():
                # gRPC ends a call at its deadline too (its clock started a little earlier).
                remaining = self.context.time_remaining()
                raise DeadlineExceeded if remaining is not None and remaining <= 0 else Cancelled

    def seconds(self) -> float:
        """Seconds since the call began."""
        return time.perf_counter() - self.start


REQUEST_ID = "x-request-id"
"""The metadata key of a call's request id: the client's (if it sent a usable one) or one
made here; it is returned in the call's trailing metadata and written in its log line."""

MAX_REQUEST_ID = 128


def _request_id(context: grpc.ServicerContext) -> str:
    request_id = ""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID and isinstance(value, str):
            request_id = value if 0 < len(value) <= MAX_REQUEST_ID else ""
            break
    if not request_id:
        request_id = str(uuid.uuid4())
    context.set_trailing_metadata(((REQUEST_ID, request_id),))
    return request_id


MAX_DETAILS = 1024
"""Bytes of a status message at most. A longer one (a huge name, a long cycle or list echoed
from the request) is cut in its middle, keeping its start (the node and op) and its end (the
problem): gRPC clients drop status messages near 16 KiB, and a log line should stay a line."""


def bounded(details: str, limit: int = MAX_DETAILS) -> str:
    """`details` cut in the middle, with an ellipsis and a count, to at most `limit` bytes."""
    encoded = details.encode()
    if len(encoded) <= limit:
        return details
    keep = limit - 48  # room for the marker
    head = encoded[: keep * 2 // 3].decode(errors="ignore")
    tail = encoded[len(encoded) - keep // 3 :].decode(errors="ignore")
    cut = len(details) - len(head) - len(tail)
    return f"{head}…[{cut} characters cut]…{tail}"


def status_of(error: BaseException, method: str) -> tuple[grpc.StatusCode, str]:
    """The status code and message of a failure: the one place errors map to codes."""
    if isinstance(error, GraphError | TensorFormatError | WireFormatError):
        return grpc.StatusCode.INVALID_ARGUMENT, bounded(str(error))
    if isinstance(error, UnknownGraph):
        return grpc.StatusCode.NOT_FOUND, bounded(str(error))
    if isinstance(error, LimitExceeded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, bounded(str(error))
    if isinstance(error, MemoryError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "the server ran out of memory"
    if isinstance(error, DeadlineExceeded):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded; work stopped"
    if isinstance(error, Cancelled):
        return grpc.StatusCode.CANCELLED, "cancelled by the client"
    # A bug: the trace goes to the log, a short message to the client.
    log.error("%s failed", method, exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__})"


DOMAIN = "gradient.v1.GradientService"
"""The domain of the ErrorInfo reasons below."""

MAX_DETAIL = 256
"""Characters at most of a name (node, op) in the machine-readable details."""


def _reason(error: BaseException | None, code: grpc.StatusCode) -> str:
    if isinstance(error, GraphError):
        return "INVALID_GRAPH"
    if isinstance(error, TensorFormatError | WireFormatError):
        return "MALFORMED_REQUEST"
    if isinstance(error, LimitExceeded):
        return "LIMIT_EXCEEDED"
    if isinstance(error, UnknownGraph):
        return "UNKNOWN_GRAPH_DIGEST"
    if isinstance(error, MemoryError):
        return "OUT_OF_MEMORY"
    return code.name


class Failure(grpc.Status):
    """A failed call's status: its code, its bounded message, and trailing metadata holding
    the request id and a google.rpc.Status with machine-readable details (grpcio-status's
    `grpc-status-details-bin`): ErrorInfo always (a reason, and the node, op or limit),
    BadRequest for INVALID_ARGUMENT, QuotaFailure for a limit, ResourceInfo for NOT_FOUND,
    RetryInfo when retrying later may succeed, RequestInfo with the request id."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        error: BaseException | None = None,
        request_id: str = "",
        retry_after: float | None = None,
    ):
        self.code = code
        self.details = message
        if retry_after is None and isinstance(error, LimitExceeded):
            retry_after = error.retry_after
        status = status_pb2.Status(
            code=code.value[0],
            message=message,
            details=[_packed(d) for d in _details(error, code, message, request_id, retry_after)],
        )
        metadata: list[tuple[str, str | bytes]] = [
            ("grpc-status-details-bin", status.SerializeToString())
        ]
        if request_id:
            metadata.append((REQUEST_ID, request_id))
        self.trailing_metadata = tuple(metadata)


def _packed(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _details(
    error: BaseException | None,
    code: grpc.StatusCode,
    message: str,
    request_id: str,
    retry_after: float | None,
) -> list[Message]:
    metadata: dict[str, str] = {}
    details: list[Message] = []
    if isinstance(error, GraphError):
        if error.node:
            metadata["node"] = bounded(error.node, MAX_DETAIL)
        if error.op:
            metadata["op"] = bounded(error.op, MAX_DETAIL)
        field = error.field or ("graph.nodes" if error.node else "")
        violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
        details.append(error_details_pb2.BadRequest(field_violations=[violation]))
    elif code == grpc.StatusCode.INVALID_ARGUMENT:
        violation = error_details_pb2.BadRequest.FieldViolation(description=message)
        details.append(error_details_pb2.BadRequest(field_violations=[violation]))
    elif isinstance(error, LimitExceeded) and error.limit:
        metadata["limit"] = error.limit
        quota = error_details_pb2.QuotaFailure.Violation(subject=error.limit, description=message)
        details.append(error_details_pb2.QuotaFailure(violations=[quota]))
    elif isinstance(error, UnknownGraph):
        details.append(
            error_details_pb2.ResourceInfo(
                resource_type="gradient.v1.Graph",
                resource_name=bounded(error.digest, MAX_DETAIL),
                description=message,
            )
        )
    if retry_after is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromMilliseconds(max(int(retry_after * 1000), 1))
        details.append(retry)
    info = error_details_pb2.ErrorInfo(
        reason=_reason(error, code), domain=DOMAIN, metadata=metadata
    )
    details.insert(0, info)
    if request_id:
        details.append(error_details_pb2.RequestInfo(request_id=request_id))
    return details


def failure_of(error: BaseException, method: str, request_id: str = "") -> Failure:
    """The status of a call that failed with `error` (status_of's code and message)."""
    code, message = status_of(error, method)
    return Failure(code, message, error, request_id)
