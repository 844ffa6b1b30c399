"""The engine's error types; the service maps each to one gRPC status code."""


class GraphError(ValueError):
    """The request is malformed: bad graph, attribute, shape, dtype, feed or tensor payload.

    Maps to INVALID_ARGUMENT.
    """


class LimitExceeded(Exception):
    """The request exceeds a configured limit. Maps to RESOURCE_EXHAUSTED."""


class UnknownGraph(Exception):
    """A request named a graph by a digest this server does not hold. Maps to NOT_FOUND."""


class DeadlineExceeded(Exception):
    """The request's deadline passed while it was running. Maps to DEADLINE_EXCEEDED."""


def no_deadline() -> None:
    """The deadline check of work that has no deadline: never raises."""
