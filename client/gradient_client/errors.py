"""The SDK's single exception type."""

from __future__ import annotations

from typing import Any

import grpc


class GradientError(Exception):
    """A call to the gradient service failed.

    `code` is the gRPC status code (e.g. grpc.StatusCode.INVALID_ARGUMENT) and `details` the
    server's message, which names the offending node. What a program needs to act on the
    failure comes from the status's machine-readable details (google.rpc.Status):

    - `reason`: why, as a constant (e.g. "INVALID_GRAPH", "LIMIT_EXCEEDED",
      "UNKNOWN_GRAPH_DIGEST"), and `info` its particulars (e.g. {"node": "q", "op": "add"}
      or {"limit": "max_bytes"}); `node` is info's node, if any;
    - `field_violations`: (field, description) pairs of an INVALID_ARGUMENT;
    - `quota_violations`: (limit, description) pairs of a RESOURCE_EXHAUSTED;
    - `retry_after`: seconds after which a retry may succeed, when the server says so;
    - `request_id`: the call's id, as written in the server's log;
    - `status_details`: every detail message, decoded.
    """

    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: Any = ()):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.reason = ""
        self.info: dict[str, str] = {}
        self.field_violations: list[tuple[str, str]] = []
        self.quota_violations: list[tuple[str, str]] = []
        self.retry_after: float | None = None
        self.request_id: str | None = None
        self.status_details: list[Any] = []
        for key, value in trailing_metadata or ():
            if key == "x-request-id" and isinstance(value, str):
                self.request_id = value
            elif key == "grpc-status-details-bin" and isinstance(value, bytes):
                self._read_details(value)

    @property
    def node(self) -> str | None:
        """The node at fault, when the server named one."""
        return self.info.get("node")

    def _read_details(self, data: bytes) -> None:
        try:
            from google.protobuf.message import DecodeError
            from google.rpc import error_details_pb2, status_pb2
        except ImportError:  # googleapis-common-protos is absent: the message says it all
            return
        try:
            status = status_pb2.Status.FromString(data)
        except DecodeError:
            return
        kinds = (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.QuotaFailure,
            error_details_pb2.RetryInfo,
            error_details_pb2.ResourceInfo,
            error_details_pb2.RequestInfo,
        )
        for packed in status.details:
            for kind in kinds:
                if packed.Is(kind.DESCRIPTOR):
                    detail = kind()
                    packed.Unpack(detail)
                    self.status_details.append(detail)
                    break
        for detail in self.status_details:
            if isinstance(detail, error_details_pb2.ErrorInfo):
                self.reason, self.info = detail.reason, dict(detail.metadata)
            elif isinstance(detail, error_details_pb2.BadRequest):
                self.field_violations += [(v.field, v.description) for v in detail.field_violations]
            elif isinstance(detail, error_details_pb2.QuotaFailure):
                self.quota_violations += [(v.subject, v.description) for v in detail.violations]
            elif isinstance(detail, error_details_pb2.RetryInfo):
                self.retry_after = detail.retry_delay.ToMilliseconds() / 1000

    @classmethod
    def from_rpc_error(
        cls, error: grpc.RpcError, *, tls: bool = False, target: str = ""
    ) -> GradientError:
        """Wrap a grpc.RpcError (which is also a grpc.Call carrying code and details).

        gRPC reports a refused TLS handshake as UNAVAILABLE, the code of a server that is
        down, which clients retry; on a TLS channel such a refusal is UNAUTHENTICATED here.
        """
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = (error.details() if hasattr(error, "details") else str(error)) or ""
        if code == grpc.StatusCode.UNAVAILABLE and tls and _tls_refusal(details):
            code = grpc.StatusCode.UNAUTHENTICATED
            details = (
                "the TLS handshake failed: the server's certificate is not signed by the CA "
                "the client trusts, or the server requires a client certificate signed by its "
                f"own CA ({details})"
            )
        elif code == grpc.StatusCode.UNAVAILABLE and target and _no_connection(details):
            details = (
                f"no server answered at {target}: is gradient-server running there, on that "
                f"port? ({details})"
            )
        trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else ()
        return cls(code, details, trailing)


def _tls_refusal(details: str) -> bool:
    """Whether gRPC's message of a failed connection tells of a refused TLS handshake: the
    client's check failing ("handshake failed", a certificate error), or the server closing
    the connection during the handshake (it gives no reason, as mutual TLS servers do)."""
    lowered = details.lower()
    return (
        "handshake" in lowered
        or "certificate" in lowered
        or (_no_connection(details) and "socket closed" in lowered)
    )


def _no_connection(details: str) -> bool:
    """Whether gRPC's message says no connection to the target could be made (its wording
    differs between the pick_first and round_robin policies)."""
    lowered = details.lower()
    return "failed to connect" in lowered or "connections to all backends failing" in lowered
