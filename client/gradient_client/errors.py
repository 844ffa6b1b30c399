"""The SDK's single exception type."""

from __future__ import annotations

import grpc


class GradientError(Exception):
    """A call to the gradient service failed.

    `code` is the gRPC status code (e.g. grpc.StatusCode.INVALID_ARGUMENT) and `details` the
    server's message, which names the offending node.
    """

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError, *, tls: bool = False) -> GradientError:
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
        return cls(code, details)


def _tls_refusal(details: str) -> bool:
    """Whether gRPC's message of a failed connection tells of a refused TLS handshake: the
    client's check failing ("handshake failed", a certificate error), or the server closing
    the connection during the handshake (it gives no reason, as mutual TLS servers do)."""
    lowered = details.lower()
    return (
        "handshake" in lowered
        or "certificate" in lowered
        or ("failed to connect" in lowered and "socket closed" in lowered)
    )
