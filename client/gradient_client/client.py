"""GradientClient (blocking) and AsyncGradientClient (asyncio) for gradient.v1.GradientService."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from gradient.v1 import gradient_service_pb2 as service_pb2
from gradient.v1 import gradient_service_pb2_grpc as service_grpc

from .errors import GradientError
from .graph import Graph, Node
from .tensors import from_proto, to_proto

__all__ = [
    "AsyncGradientClient",
    "DEFAULT_MAX_MESSAGE_MB",
    "ForwardResult",
    "GradientCheckReport",
    "GradientClient",
    "GradientGraphResult",
    "GradientResult",
    "NodeCheck",
    "OpAttr",
    "OpInfo",
]

DEFAULT_MAX_MESSAGE_MB = 256
"""The message size limit of the client and, by default, of the server (gRPC's is 4 MB)."""

MAX_MESSAGE_MB = 2000
"""The largest message size limit: gRPC sizes are 32-bit and protobuf caps messages at 2 GB."""


def check_message_mb(value: int) -> int:
    """`value` if it is a valid message size limit in MiB, else ValueError."""
    if not 1 <= value <= MAX_MESSAGE_MB:
        raise ValueError(f"a message size limit must be 1 to {MAX_MESSAGE_MB} MiB, got {value}")
    return value


GraphLike = Graph | Any  # a Graph builder or a gradient.v1.Graph message
NodeLike = Node | str


@dataclass(frozen=True)
class ForwardResult:
    """Values of a Forward call: numpy arrays keyed by node name."""

    values: dict[str, np.ndarray]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.values[name]


@dataclass(frozen=True)
class GradientResult:
    """Values and gradients of a Gradient call, numpy arrays keyed by node name.

    `skipped` maps each requested node that has no gradient (int or bool) to the reason.
    """

    values: dict[str, np.ndarray]
    gradients: dict[str, np.ndarray]
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class NodeCheck:
    """The gradient check of one node: worst absolute and relative error, and the verdict."""

    max_abs_error: float
    max_rel_error: float
    passed: bool
    checked: int


@dataclass(frozen=True)
class GradientCheckReport:
    """The result of check_gradient: `passed` overall, and a NodeCheck per checked node."""

    passed: bool
    nodes: dict[str, NodeCheck]
    skipped: dict[str, str]
    eps: float
    atol: float
    rtol: float


@dataclass(frozen=True)
class GradientGraphResult:
    """The backward pass as a graph.

    `graph` is a gradient.v1.Graph holding the forward and backward nodes; `gradients` maps
    each requested node to the node of `graph` holding its gradient; `seed` names the input
    node that takes the output's upstream gradient (feed ones for a plain gradient).
    """

    graph: Any
    gradients: dict[str, str]
    seed: str
    skipped: dict[str, str]


@dataclass(frozen=True)
class OpAttr:
    """An attribute of an op, as ListOps describes it."""

    name: str
    type: str
    required: bool
    default: Any
    doc: str


@dataclass(frozen=True)
class OpInfo:
    """An op the server knows: its operands (and which are differentiable) and attributes."""

    name: str
    doc: str
    inputs: tuple[str, ...]
    differentiable: tuple[bool, ...]
    variadic: bool
    attrs: tuple[OpAttr, ...]


def _graph_message(graph: GraphLike) -> Any:
    return graph.message() if isinstance(graph, Graph) else graph


def _name(node: NodeLike) -> str:
    return node.name if isinstance(node, Node) else node


def _tensor(what: str, value: Any, dtype: Any = None) -> Any:
    """Encode a value sent to the server; GradientError(INVALID_ARGUMENT) if it cannot be."""
    try:
        return to_proto(np.asarray(value, dtype=dtype))
    except (TypeError, ValueError) as e:  # TensorFormatError is a ValueError
        raise GradientError(grpc.StatusCode.INVALID_ARGUMENT, f"{what}: {e}") from None


def _names(nodes: Iterable[NodeLike] | None) -> list[str]:
    return [_name(n) for n in nodes] if nodes is not None else []


def _feeds(graph: GraphLike, inputs: Mapping[str, Any] | None) -> dict[str, Any]:
    """Encode input values; numbers and lists become arrays (cast to the input's declared dtype)."""
    declared: dict[str, str] = {}
    for message in _graph_message(graph).nodes:
        if message.op == "input" and "dtype" in message.attrs:
            declared[message.name] = message.attrs["dtype"].s
    feeds = {}
    for name, value in (inputs or {}).items():
        key = _name(name)
        feeds[key] = _tensor(f"input {key!r}", value, declared.get(key))
    return feeds


def _decode_all(tensors: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {name: from_proto(t, writeable=True) for name, t in tensors.items()}


def _forward_request(graph, inputs, fetch) -> service_pb2.ForwardRequest:
    return service_pb2.ForwardRequest(
        graph=_graph_message(graph), inputs=_feeds(graph, inputs), fetch=_names(fetch)
    )


def _gradient_request(graph, output, inputs, wrt, seed, fetch) -> service_pb2.GradientRequest:
    request = service_pb2.GradientRequest(
        graph=_graph_message(graph),
        inputs=_feeds(graph, inputs),
        output=_name(output),
        wrt=_names(wrt),
        fetch=_names(fetch),
    )
    if seed is not None:
        request.seed.CopyFrom(_tensor("seed", seed))
    return request


def _check_request(
    graph, output, inputs, wrt, seed, eps, atol, rtol, max_elements, directions, random_seed
) -> service_pb2.CheckGradientRequest:
    request = service_pb2.CheckGradientRequest(
        graph=_graph_message(graph),
        inputs=_feeds(graph, inputs),
        output=_name(output),
        wrt=_names(wrt),
        max_elements=max_elements,
        directions=directions,
        random_seed=random_seed,
    )
    if seed is not None:
        request.seed.CopyFrom(_tensor("seed", seed))
    for name, value in (("eps", eps), ("atol", atol), ("rtol", rtol)):
        if value is not None:
            setattr(request, name, value)
    return request


def _check_report(response: service_pb2.CheckGradientResponse) -> GradientCheckReport:
    return GradientCheckReport(
        passed=response.passed,
        nodes={
            n.name: NodeCheck(n.max_abs_error, n.max_rel_error, n.passed, n.checked)
            for n in response.nodes
        },
        skipped={s.name: s.reason for s in response.skipped},
        eps=response.eps,
        atol=response.atol,
        rtol=response.rtol,
    )


def _hvp_request(graph, output, inputs, vector) -> service_pb2.HessianVectorProductRequest:
    return service_pb2.HessianVectorProductRequest(
        graph=_graph_message(graph),
        inputs=_feeds(graph, inputs),
        output=_name(output),
        vector={
            _name(k): _tensor(f"vector {_name(k)!r}", v, float) for k, v in (vector or {}).items()
        },
    )


def _gradient_graph_request(graph, output, inputs, wrt) -> service_pb2.GradientGraphRequest:
    return service_pb2.GradientGraphRequest(
        graph=_graph_message(graph),
        inputs=_feeds(graph, inputs),
        output=_name(output),
        wrt=_names(wrt),
    )


def _gradient_graph_result(response: service_pb2.GradientGraphResponse) -> GradientGraphResult:
    return GradientGraphResult(
        graph=response.graph,
        gradients=dict(response.gradients),
        seed=response.seed,
        skipped={s.name: s.reason for s in response.skipped},
    )


def _hessian_from_products(
    wrt: list[str], shapes: dict[str, tuple[int, ...]], columns: list[dict[str, np.ndarray]]
) -> np.ndarray:
    """Assemble H from H·e_k for each basis vector e_k of the flattened, concatenated `wrt`."""
    matrix = np.stack(
        [np.concatenate([column[name].reshape(-1) for name in wrt]) for column in columns], axis=1
    )
    if len(wrt) == 1:
        shape = shapes[wrt[0]]
        return matrix.reshape(shape + shape)
    return matrix


def _input_shapes(inputs: Mapping[str, Any], names: list[str]) -> dict[str, tuple[int, ...]]:
    missing = [name for name in names if name not in inputs]
    if missing:
        raise GradientError(
            grpc.StatusCode.INVALID_ARGUMENT, f"wrt names {missing}, which are not among the inputs"
        )
    return {name: np.shape(inputs[name]) for name in names}


def _basis(wrt: list[str], shapes: dict[str, tuple[int, ...]]):
    """The basis vectors e_k over the flattened, concatenated `wrt`, as vector dicts."""
    for name in wrt:
        size = int(np.prod(shapes[name], dtype=np.int64))
        for k in range(size):
            direction = np.zeros(size)
            direction[k] = 1.0
            yield {name: direction.reshape(shapes[name])}


def _forward_result(response: service_pb2.ForwardResponse) -> ForwardResult:
    return ForwardResult(_decode_all(response.values))


def _gradient_result(response: service_pb2.GradientResponse) -> GradientResult:
    return GradientResult(
        values=_decode_all(response.values),
        gradients=_decode_all(response.gradients),
        skipped={s.name: s.reason for s in response.skipped},
    )


def _op_infos(response: service_pb2.ListOpsResponse) -> list[OpInfo]:
    def default(attr) -> Any:
        if not attr.HasField("default"):
            return None
        field_name = attr.default.WhichOneof("value")
        value = getattr(attr.default, field_name)
        return list(value.values) if field_name in ("ints", "floats") else value

    return [
        OpInfo(
            name=op.name,
            doc=op.doc,
            inputs=tuple(i.name for i in op.inputs),
            differentiable=tuple(i.differentiable for i in op.inputs),
            variadic=op.variadic,
            attrs=tuple(OpAttr(a.name, a.type, a.required, default(a), a.doc) for a in op.attrs),
        )
        for op in response.ops
    ]


def _channel_options(max_message_mb: int) -> list[tuple[str, int]]:
    size = check_message_mb(max_message_mb) * 1024 * 1024
    return [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
    ]


class GradientClient:
    """A blocking client. Use it as a context manager, or call close().

    >>> with GradientClient("localhost:50051") as client:
    ...     result = client.gradient(g, output=f, inputs={"x": -2.0, "y": 5.0, "z": -4.0})

    Every failure raises GradientError carrying the gRPC status code and the server's message.
    `timeout` (seconds) is the default deadline of each call.
    """

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        timeout: float | None = None,
        max_message_mb: int = DEFAULT_MAX_MESSAGE_MB,
        credentials: grpc.ChannelCredentials | None = None,
    ):
        options = _channel_options(max_message_mb)
        self._channel = (
            grpc.secure_channel(target, credentials, options)
            if credentials
            else grpc.insecure_channel(target, options)
        )
        self._stub = service_grpc.GradientServiceStub(self._channel)
        self.timeout = timeout

    def __enter__(self) -> GradientClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=timeout if timeout is not None else self.timeout)
        except grpc.RpcError as error:
            raise GradientError.from_rpc_error(error) from None

    def forward(
        self,
        graph: GraphLike,
        inputs: Mapping[str, Any] | None = None,
        fetch: Sequence[NodeLike] | None = None,
        *,
        timeout: float | None = None,
    ) -> ForwardResult:
        """Values of the `fetch` nodes (every node by default) given the input values."""
        request = _forward_request(graph, inputs, fetch)
        return _forward_result(self._call(self._stub.Forward, request, timeout))

    def gradient(
        self,
        graph: GraphLike,
        output: NodeLike,
        inputs: Mapping[str, Any] | None = None,
        wrt: Sequence[NodeLike] | None = None,
        seed: Any = None,
        *,
        fetch: Sequence[NodeLike] | None = None,
        timeout: float | None = None,
    ) -> GradientResult:
        """Values and gradients of `output` with respect to `wrt` (every node by default).

        A scalar output's seed defaults to 1; a non-scalar output needs `seed`, an array of
        its shape (the result is then the vector-Jacobian product).
        """
        request = _gradient_request(graph, output, inputs, wrt, seed, fetch)
        return _gradient_result(self._call(self._stub.Gradient, request, timeout))

    def check_gradient(
        self,
        graph: GraphLike,
        output: NodeLike,
        inputs: Mapping[str, Any] | None = None,
        wrt: Sequence[NodeLike] | None = None,
        *,
        seed: Any = None,
        eps: float | None = None,
        atol: float | None = None,
        rtol: float | None = None,
        max_elements: int = 0,
        directions: int = 0,
        random_seed: int = 0,
        timeout: float | None = None,
    ) -> GradientCheckReport:
        """Check the server's gradients against central finite differences in float64.

        Defaults as torch.autograd.gradcheck: eps 1e-6, atol 1e-5, rtol 1e-3; `wrt` defaults
        to every float input. `max_elements` samples that many elements per node;
        `directions` checks random directions instead (cheap for large tensors).
        """
        request = _check_request(
            graph, output, inputs, wrt, seed, eps, atol, rtol, max_elements, directions, random_seed
        )
        return _check_report(self._call(self._stub.CheckGradient, request, timeout))

    def gradient_graph(
        self,
        graph: GraphLike,
        output: NodeLike,
        inputs: Mapping[str, Any] | None = None,
        wrt: Sequence[NodeLike] | None = None,
        *,
        timeout: float | None = None,
    ) -> GradientGraphResult:
        """The backward pass as a graph, specialised to the inputs' dtypes and shapes.

        Forward on the returned graph (feeding `seed` with ones) gives the same gradients as
        gradient(), bit for bit; gradient() on it, with a gradient node as the output, gives
        second derivatives.
        """
        request = _gradient_graph_request(graph, output, inputs, wrt)
        return _gradient_graph_result(self._call(self._stub.GradientGraph, request, timeout))

    def hvp(
        self,
        graph: GraphLike,
        output: NodeLike,
        inputs: Mapping[str, Any],
        vector: Mapping[str, Any],
        *,
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        """The Hessian-vector product H·v of a scalar output over the float inputs.

        `vector` maps input names to arrays of their shapes (missing ones count as zero);
        the result maps each float input to its part of H·v. Computed exactly, by
        reverse-over-reverse differentiation on the server.
        """
        request = _hvp_request(graph, output, inputs, vector)
        response = self._call(self._stub.HessianVectorProduct, request, timeout)
        return _decode_all(response.products)

    def hessian(
        self,
        graph: GraphLike,
        output: NodeLike,
        inputs: Mapping[str, Any],
        wrt: Sequence[NodeLike],
        *,
        timeout: float | None = None,
    ) -> np.ndarray:
        """The full Hessian of a scalar output with respect to the inputs `wrt` (small ones!).

        One Hessian-vector product per element: O(n) calls for n elements in all. With one
        input of shape s the result has shape s + s; with several, it is the (n, n) matrix over
        their flattened values concatenated in `wrt` order.
        """
        names = _names(wrt)
        shapes = _input_shapes(inputs, names)
        columns = [
            self.hvp(graph, output, inputs, direction, timeout=timeout)
            for direction in _basis(names, shapes)
        ]
        return _hessian_from_products(names, shapes, columns)

    def list_ops(self, *, timeout: float | None = None) -> list[OpInfo]:
        """Every op the server knows."""
        response = self._call(self._stub.ListOps, service_pb2.ListOpsRequest(), timeout)
        return _op_infos(response)


class AsyncGradientClient:
    """The asyncio twin of GradientClient (same methods, awaitable); use `async with`."""

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        timeout: float | None = None,
        max_message_mb: int = DEFAULT_MAX_MESSAGE_MB,
        credentials: grpc.ChannelCredentials | None = None,
    ):
        options = _channel_options(max_message_mb)
        self._channel = (
            grpc.aio.secure_channel(target, credentials, options)
            if credentials
            else grpc.aio.insecure_channel(target, options)
        )
        self._stub = service_grpc.GradientServiceStub(self._channel)
        self.timeout = timeout

    async def __aenter__(self) -> AsyncGradientClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()

    async def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, timeout=timeout if timeout is not None else self.timeout)
        except grpc.RpcError as error:
            raise GradientError.from_rpc_error(error) from None

    async def forward(
        self,
        graph: GraphLike,
        inputs: Mapping[str, Any] | None = None,
        fetch: Sequence[NodeLike] | None = None,
        *,
        timeout: float | None = None,
    ) -> ForwardResult:
        """See GradientClient.forward."""
        request = _forward_request(graph, inputs, fetch)
        return _forward_result(await self._call(self._stub.Forward, request, timeout))

    async def gradient(
        self,
        graph: GraphLike,
        output: NodeLike,
        inputs: Mapping[str, Any] | None = None,
        wrt: Sequence[NodeLike] | None = None,
        seed: Any = None,
        *,
        fetch: Sequence[NodeLike] | None = None,
        timeout: float | None = None,
    ) -> GradientResult:
        """See GradientClient.gradient."""
        request = _gradient_request(graph, output, inputs, wrt, seed, fetch)
        return _gradient_result(await self._call(self._stub.Gradient, request, timeout))

    async def check_gradient(
        self,
        graph: GraphLike,
        output: NodeLike,
        inputs: Mapping[str, Any] | None = None,
        wrt: Sequence[NodeLike] | None = None,
        *,
        seed: Any = None,
        eps: float | None = None,
        atol: float | None = None,
        rtol: float | None = None,
        max_elements: int = 0,
        directions: int = 0,
        random_seed: int = 0,
        timeout: float | None = None,
    ) -> GradientCheckReport:
        """See GradientClient.check_gradient."""
        request = _check_request(
            graph, output, inputs, wrt, seed, eps, atol, rtol, max_elements, directions, random_seed
        )
        return _check_report(await self._call(self._stub.CheckGradient, request, timeout))

    async def gradient_graph(
        self,
        graph: GraphLike,
        output: NodeLike,
        inputs: Mapping[str, Any] | None = None,
        wrt: Sequence[NodeLike] | None = None,
        *,
        timeout: float | None = None,
    ) -> GradientGraphResult:
        """See GradientClient.gradient_graph."""
        request = _gradient_graph_request(graph, output, inputs, wrt)
        return _gradient_graph_result(await self._call(self._stub.GradientGraph, request, timeout))

    async def hvp(
        self,
        graph: GraphLike,
        output: NodeLike,
        inputs: Mapping[str, Any],
        vector: Mapping[str, Any],
        *,
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        """See GradientClient.hvp."""
        request = _hvp_request(graph, output, inputs, vector)
        response = await self._call(self._stub.HessianVectorProduct, request, timeout)
        return _decode_all(response.products)

    async def hessian(
        self,
        graph: GraphLike,
        output: NodeLike,
        inputs: Mapping[str, Any],
        wrt: Sequence[NodeLike],
        *,
        timeout: float | None = None,
    ) -> np.ndarray:
        """See GradientClient.hessian (the products are requested concurrently)."""
        names = _names(wrt)
        shapes = _input_shapes(inputs, names)
        columns = await asyncio.gather(
            *(
                self.hvp(graph, output, inputs, direction, timeout=timeout)
                for direction in _basis(names, shapes)
            )
        )
        return _hessian_from_products(names, shapes, list(columns))

    async def list_ops(self, *, timeout: float | None = None) -> list[OpInfo]:
        """See GradientClient.list_ops."""
        response = await self._call(self._stub.ListOps, service_pb2.ListOpsRequest(), timeout)
        return _op_infos(response)
