"""Python SDK of the gradient service: build graphs like numpy, get values and gradients back."""

from .client import (
    AsyncGradientClient,
    ForwardResult,
    GradientCheckReport,
    GradientClient,
    GradientGraphResult,
    GradientResult,
    JacobianResult,
    JvpResult,
    NodeCheck,
    OpAttr,
    OpInfo,
)
from .errors import GradientError
from .graph import Graph, Node
from .security import TLS
from .tensors import from_proto, to_proto

__all__ = [
    "AsyncGradientClient",
    "ForwardResult",
    "Graph",
    "GradientClient",
    "GradientCheckReport",
    "GradientError",
    "GradientGraphResult",
    "GradientResult",
    "JacobianResult",
    "JvpResult",
    "NodeCheck",
    "Node",
    "OpAttr",
    "OpInfo",
    "TLS",
    "from_proto",
    "to_proto",
]

from .drawing import GraphvizError, draw, to_dot

__all__ += ["GraphvizError", "draw", "to_dot"]
