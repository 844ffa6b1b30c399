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
    def from_rpc_error(cls, error: grpc.RpcError) -> GradientError:
        """Wrap a grpc.RpcError (which is also a grpc.Call carrying code and details)."""
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        return cls(code, details or "")
