"""The engine's error types; the service maps each to one gRPC status code.

Each carries, beside its message, what a program needs to act on it (the node and op at
fault, the limit exceeded, the graph not found); the service puts these in the status's
machine-readable details.
"""


class GraphError(ValueError):
    """The request is malformed: bad graph, attribute, shape, dtype, feed or tensor payload.

    Maps to INVALID_ARGUMENT. `node` and `op` name the node at fault, when there is one;
    `field` the request field at fault (e.g. "inputs", "graph_digest"), when known.
    """

    def __init__(
        self, message: str, *, node: str | None = None, op: str | None = None, field: str = ""
    ):
        super().__init__(message)
        self.node = node
        self.op = op
        self.field = field


class LimitExceeded(Exception):
    """The request exceeds a configured limit. Maps to RESOURCE_EXHAUSTED.

    `limit` names it (e.g. "max_bytes", as the server's flag --max-bytes); `retry_after`
    (seconds) is set when the same request may succeed later (the server was busy).
    """

    def __init__(self, message: str, *, limit: str = "", retry_after: float | None = None):
        super().__init__(message)
        self.limit = limit
        self.retry_after = retry_after


class UnknownGraph(Exception):
    """A request named a graph by a digest this server does not hold. Maps to NOT_FOUND."""

    def __init__(self, message: str, *, digest: str = ""):
        super().__init__(message)
        self.digest = digest


class DeadlineExceeded(Exception):
    """The request's deadline passed while it was running. Maps to DEADLINE_EXCEEDED."""


def no_deadline() -> None:
    """The deadline check of work that has no deadline: never raises."""
