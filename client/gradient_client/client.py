"""GradientClient (blocking) and AsyncGradientClient (asyncio) for gradient.v1.GradientService."""

from __future__ import annotations

import functools
import itertools
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy as np
from google.protobuf import message_factory

from gradient.v1 import gradient_service_pb2 as service_pb2
from gradient.v1 import graph_pb2

from . import wire
from .channel import channel_options
from .errors import GradientError
from .graph import Graph, Node
from .security import TLS, token_metadata
from .tensors import TensorFormatError, wire_array
from .wire import WireGraph, WireMessage

if TYPE_CHECKING:
    from .session import AsyncSession, Session

__all__ = [
    "AsyncGradientClient",
    "DEFAULT_MAX_MESSAGE_MB",
    "ForwardResult",
    "GradientCheckReport",
    "GradientClient",
    "GradientGraphResult",
    "GradientResult",
    "JacobianResult",
    "JvpResult",
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


V = TypeVar("V")

GraphLike = Graph | Any  # a Graph builder or a gradient.v1.Graph message
NodeLike = Node | str


class ByNode(dict[str, V]):
    """A dict keyed by node name that also takes the Node itself: `r.gradients[x]` and
    `r.gradients["x"]` are the same."""

    def __getitem__(self, key: NodeLike) -> V:
        return super().__getitem__(_name(key))

    def __contains__(self, key: object) -> bool:
        return super().__contains__(key.name if isinstance(key, Node) else key)

    def get(self, key: NodeLike, default: Any = None) -> Any:  # type: ignore[override]
        """The value of the node (or name), or `default`."""
        return super().get(_name(key), default)


@dataclass(frozen=True)
class ForwardResult:
    """Values of a Forward call: numpy arrays keyed by node name (or by the Node)."""

    values: dict[str, np.ndarray]

    def __getitem__(self, node: NodeLike) -> np.ndarray:
        return self.values[_name(node)]


@dataclass(frozen=True)
class GradientResult:
    """Values and gradients of a Gradient call, numpy arrays keyed by node name (a Node
    works as a key too).

    `skipped` maps each requested node that has no gradient (int or bool) to the reason.
    """

    values: dict[str, np.ndarray]
    gradients: dict[str, np.ndarray]
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class JvpResult:
    """Values and tangents of a jvp call, numpy arrays keyed by node name (a Node works as a
    key too).

    `tangents[output]` is the Jacobian-vector product J·v; `values[output]` the output's
    value; `skipped` maps each requested node that has no tangent (int or bool) to the reason.
    """

    values: dict[str, np.ndarray]
    tangents: dict[str, np.ndarray]
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class JacobianResult:
    """The Jacobian of a jacobian call: `jacobians` maps each wrt input (name or Node) to
    d(output)/d(input), of shape output.shape + input.shape; `mode` says how the server
    computed it ("reverse" or "forward") and `products` how many VJPs or JVPs that took.
    `r[x]` is `r.jacobians[x]`."""

    jacobians: dict[str, np.ndarray]
    mode: str
    products: int

    def __getitem__(self, node: NodeLike) -> np.ndarray:
        return self.jacobians[_name(node)]


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
    batchable: bool = False
    """Whether per-example gradients (``gradient(batch=...)``) vectorize the op with a
    batching rule; a graph with an op without one runs as a loop over the examples."""


def _name(node: NodeLike) -> str:
    return node.name if isinstance(node, Node) else node


def _names(nodes: Iterable[NodeLike] | None) -> list[str]:
    return [_name(n) for n in nodes] if nodes is not None else []


def wire_graph(graph: GraphLike) -> WireGraph:
    """The graph as sent: a builder's is encoded once; a gradient.v1.Graph message each call."""
    return graph.wire_form() if isinstance(graph, Graph) else WireGraph.of(graph)


def encode_array(value: Any, dtype: Any = None, *, what: str, name: str = "") -> np.ndarray:
    """A value sent to the server as a little-endian C-contiguous array of a wire dtype;
    GradientError(INVALID_ARGUMENT) naming it (`what` and `name`) if it cannot be one."""
    try:
        return wire_array(np.asarray(value, dtype=dtype))[1]
    except (TypeError, ValueError) as e:  # TensorFormatError is a ValueError
        named = f"{what} {name!r}" if name else what
        raise GradientError(grpc.StatusCode.INVALID_ARGUMENT, f"{named}: {e}") from None


def encode_feeds(graph: WireGraph, inputs: Mapping[Any, Any] | None) -> dict[str, np.ndarray]:
    """Input values as arrays; numbers and lists are cast to the input's declared dtype."""
    feeds = {}
    for name, value in (inputs or {}).items():
        key = _name(name)
        feeds[key] = encode_array(value, graph.input_dtypes.get(key), what="input", name=key)
    return feeds


def _forward_request(graph: WireGraph, inputs, fetch) -> WireMessage:
    fields = service_pb2.ForwardRequest(fetch=_names(fetch))
    return WireMessage(fields, tensors={"inputs": encode_feeds(graph, inputs)})


def _gradient_request(
    graph: WireGraph,
    output,
    inputs,
    wrt,
    seed,
    fetch,
    batched_seed: bool = False,
    batch: Mapping[Any, int] | None = None,
) -> WireMessage:
    fields = service_pb2.GradientRequest(
        output=_name(output),
        wrt=_names(wrt),
        fetch=_names(fetch),
        batched_seed=batched_seed,
        batch_axes={_name(name): int(axis) for name, axis in (batch or {}).items()},
    )
    tensors: dict[str, Any] = {"inputs": encode_feeds(graph, inputs)}
    if seed is not None:
        tensors["seed"] = encode_array(seed, what="seed")
    return WireMessage(fields, tensors=tensors)


def _check_request(
    graph: WireGraph,
    output,
    inputs,
    wrt,
    seed,
    eps,
    atol,
    rtol,
    max_elements,
    directions,
    random_seed,
) -> WireMessage:
    fields = service_pb2.CheckGradientRequest(
        output=_name(output),
        wrt=_names(wrt),
        max_elements=max_elements,
        directions=directions,
        random_seed=random_seed,
    )
    for name, value in (("eps", eps), ("atol", atol), ("rtol", rtol)):
        if value is not None:
            setattr(fields, name, value)
    tensors: dict[str, Any] = {"inputs": encode_feeds(graph, inputs)}
    if seed is not None:
        tensors["seed"] = encode_array(seed, what="seed")
    return WireMessage(fields, tensors=tensors)


def _check_report(response: WireMessage) -> GradientCheckReport:
    fields = response.fields
    return GradientCheckReport(
        passed=fields.passed,
        nodes=ByNode(
            {
                n.name: NodeCheck(n.max_abs_error, n.max_rel_error, n.passed, n.checked)
                for n in fields.nodes
            }
        ),
        skipped=ByNode({s.name: s.reason for s in fields.skipped}),
        eps=fields.eps,
        atol=fields.atol,
        rtol=fields.rtol,
    )


def _hvp_request(graph: WireGraph, output, inputs, vector) -> WireMessage:
    vectors = {
        _name(k): encode_array(v, float, what="vector", name=_name(k))
        for k, v in (vector or {}).items()
    }
    return WireMessage(
        service_pb2.HessianVectorProductRequest(output=_name(output)),
        tensors={"inputs": encode_feeds(graph, inputs), "vector": vectors},
    )


def _jvp_request(
    graph: WireGraph, output, inputs, tangents, tangents_of, all_tangents, fetch, batched
) -> WireMessage:
    encoded = {
        _name(k): encode_array(v, float, what="tangent", name=_name(k))
        for k, v in (tangents or {}).items()
    }
    fields = service_pb2.JacobianVectorProductRequest(
        output=_name(output),
        tangents_of=_names(tangents_of),
        all_tangents=all_tangents,
        fetch=_names(fetch),
        batched_tangents=batched,
    )
    return WireMessage(fields, tensors={"inputs": encode_feeds(graph, inputs), "tangents": encoded})


def jvp_result(tensors: Mapping[str, Any], skipped: Iterable[Any]) -> JvpResult:
    """A JvpResult from decoded tensors and SkippedNode messages."""
    return JvpResult(
        values=ByNode(tensors.get("values", {})),
        tangents=ByNode(tensors.get("tangents", {})),
        skipped=ByNode({s.name: s.reason for s in skipped}),
    )


_JACOBIAN_MODES = {
    "auto": service_pb2.JACOBIAN_MODE_AUTO,
    "reverse": service_pb2.JACOBIAN_MODE_REVERSE,
    "forward": service_pb2.JACOBIAN_MODE_FORWARD,
}
_JACOBIAN_MODE_NAMES = {number: name for name, number in _JACOBIAN_MODES.items()}


def _jacobian_request(graph: WireGraph, output, inputs, wrt, mode: str) -> WireMessage:
    if mode not in _JACOBIAN_MODES:
        raise ValueError(f"mode must be 'auto', 'reverse' or 'forward', got {mode!r}")
    fields = service_pb2.JacobianRequest(
        output=_name(output), wrt=_names(wrt), mode=_JACOBIAN_MODES[mode]
    )
    return WireMessage(fields, tensors={"inputs": encode_feeds(graph, inputs)})


def _jacobian_result(response: WireMessage) -> JacobianResult:
    fields = response.fields
    return JacobianResult(
        ByNode(response.tensors.get("jacobians", {})),
        _JACOBIAN_MODE_NAMES.get(fields.mode, str(fields.mode)),
        fields.products,
    )


def _hessian_problem(
    gg: GradientGraphResult, output: NodeLike, inputs: Mapping[Any, Any], names: list[str]
) -> tuple[Graph, str, dict[str, Any]]:
    """The gradient graph extended with the flattened gradients of `names` concatenated (one
    node: the Hessian is its Jacobian), that node's name, and the feeds (the seed is 1)."""
    extended = Graph.from_proto(gg.graph)
    seed = next(node for node in gg.graph.nodes if node.name == gg.seed)
    shape = list(seed.attrs["shape"].ints.values) if "shape" in seed.attrs else []
    if int(np.prod(shape, dtype=np.int64)) != 1:
        raise GradientError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"output {_name(output)!r} has shape {shape}; a Hessian needs an output with one "
            "element",
        )
    flat = [extended.reshape(extended[gg.gradients[name]], [-1]) for name in names]
    gradient = flat[0] if len(flat) == 1 else extended.concat(*flat, axis=0)
    feeds = {_name(key): value for key, value in inputs.items()}
    feeds[gg.seed] = np.ones(shape)
    return extended, gradient.name, feeds


def _hessian_from_jacobian(
    names: list[str], shapes: dict[str, tuple[int, ...]], result: JacobianResult
) -> np.ndarray:
    """H from the Jacobian of the concatenated flattened gradient: shape s + s for one input
    of shape s, else the (n, n) matrix over the inputs flattened and concatenated."""
    if len(names) == 1:
        shape = shapes[names[0]]
        return np.asarray(result.jacobians[names[0]]).reshape(shape + shape)
    blocks = [np.asarray(result.jacobians[name]) for name in names]
    return np.concatenate([block.reshape(block.shape[0], -1) for block in blocks], axis=1)


def _gradient_graph_request(graph: WireGraph, output, inputs, wrt) -> WireMessage:
    fields = service_pb2.GradientGraphRequest(output=_name(output), wrt=_names(wrt))
    return WireMessage(fields, tensors={"inputs": encode_feeds(graph, inputs)})


def _gradient_graph_result(response: WireMessage) -> GradientGraphResult:
    fields = response.fields
    return GradientGraphResult(
        graph=graph_pb2.Graph.FromString(response.raw.get("graph", b"")),
        gradients=ByNode(fields.gradients),
        seed=fields.seed,
        skipped=ByNode({s.name: s.reason for s in fields.skipped}),
    )


def _input_shapes(inputs: Mapping[Any, Any], names: list[str]) -> dict[str, tuple[int, ...]]:
    by_name = {_name(key): value for key, value in inputs.items()}  # keyed by Node or name
    missing = [name for name in names if name not in by_name]
    if missing:
        raise GradientError(
            grpc.StatusCode.INVALID_ARGUMENT, f"wrt names {missing}, which are not among the inputs"
        )
    return {name: np.shape(by_name[name]) for name in names}


def forward_result(tensors: Mapping[str, Any]) -> ForwardResult:
    """A ForwardResult from decoded tensors."""
    return ForwardResult(ByNode(tensors.get("values", {})))


def gradient_result(tensors: Mapping[str, Any], skipped: Iterable[Any]) -> GradientResult:
    """A GradientResult from decoded tensors and SkippedNode messages."""
    return GradientResult(
        values=ByNode(tensors.get("values", {})),
        gradients=ByNode(tensors.get("gradients", {})),
        skipped=ByNode({s.name: s.reason for s in skipped}),
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
            batchable=op.batchable,
        )
        for op in response.ops
    ]


# ---------------------------------------------------------------------------------------------
# Channels and calls, shared by both clients

_SERVICE = service_pb2.DESCRIPTOR.services_by_name["GradientService"]
_RESPONSE_TYPES = {
    method.name: message_factory.GetMessageClass(method.output_type) for method in _SERVICE.methods
}


def _connect(
    module: Any,
    target: str,
    *,
    max_message_mb: int,
    credentials: grpc.ChannelCredentials | None,
    connections: int,
    tls: bool | TLS | None,
    token: str | None,
    options: Sequence[tuple[str, Any]],
    service_config: Mapping[str, Any] | str | None,
) -> tuple[list[_Connection], bool]:
    """The connections of a client (`module` is grpc or grpc.aio) and whether they speak TLS."""
    if connections < 1:
        raise ValueError(f"connections must be at least 1, got {connections}")
    credentials, tls_options = _security(credentials, tls)
    extra = [*tls_options, *options]
    if connections > 1:  # each channel its own connection, not one shared subchannel
        extra = [("grpc.use_local_subchannel_pool", 1), *extra]
    size = check_message_mb(max_message_mb) * 1024 * 1024
    settings = channel_options(size, service_config=service_config, options=extra)
    metadata = token_metadata(token)
    channels = [
        module.secure_channel(target, credentials, settings)
        if credentials is not None
        else module.insecure_channel(target, settings)
        for _ in range(connections)
    ]
    return [_Connection(channel, metadata) for channel in channels], credentials is not None


class _Connection:
    """One channel and a raw-bytes callable for each RPC of the service on it (each call
    carrying `metadata`, e.g. a bearer token)."""

    def __init__(self, channel: Any, metadata: tuple[tuple[str, str], ...] | None = None):
        self.channel = channel
        prefix = f"/{_SERVICE.full_name}/"
        self.unary = {
            method.name: _with_metadata(
                channel.unary_unary(prefix + method.name, _registered_method=True), metadata
            )
            for method in _SERVICE.methods
            if not method.client_streaming
        }
        self.session = _with_metadata(
            channel.stream_stream(prefix + "Session", _registered_method=True), metadata
        )


def _with_metadata(callable_: Any, metadata: tuple[tuple[str, str], ...] | None) -> Any:
    return callable_ if metadata is None else functools.partial(callable_, metadata=metadata)


def _security(
    credentials: grpc.ChannelCredentials | None, tls: bool | TLS | None
) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, str]]]:
    """The channel credentials and options of a client's `credentials` or `tls` argument."""
    if tls is None or tls is False:
        return credentials, []
    if credentials is not None:
        raise ValueError("give either credentials or tls, not both")
    settings = TLS() if tls is True else tls
    return settings.credentials(), settings.options()


def decode_response(data: bytes, method: str) -> WireMessage:
    """A response's bytes decoded; GradientError(INTERNAL) if they do not parse."""
    try:
        return wire.decode(data, _RESPONSE_TYPES[method])
    except (wire.WireFormatError, TensorFormatError) as e:
        raise GradientError(
            grpc.StatusCode.INTERNAL, f"the {method} response does not parse: {e}"
        ) from None


class _KnownGraphs:
    """Digests of the graphs this client has sent (bounded): later calls send the digest.

    Behind a load balancer, calls on one graph reach several servers, and the call that sends
    the graph again after a NOT_FOUND may reach another server than the one that answered it.
    So after a NOT_FOUND the graph is sent whole on the next few calls as well (twice as many
    after each further miss, up to WHOLE_AFTER_MISS), until every server has it.
    """

    WHOLE_AFTER_MISS = 64

    def __init__(self, size: int = 1024):
        self._size = size
        self._digests: OrderedDict[str, list[int]] = OrderedDict()  # [misses, whole sends due]
        self._lock = threading.Lock()

    def send_digest(self, digest: str) -> bool:
        """Whether the next call on this graph sends its digest (rather than the graph)."""
        with self._lock:
            entry = self._digests.get(digest)
            if entry is None:
                return False
            if entry[1] > 0:
                entry[1] -= 1
                return False
            return True

    def sent(self, digest: str) -> None:
        """The graph was sent whole and accepted."""
        with self._lock:
            self._digests.setdefault(digest, [0, 0])
            self._digests.move_to_end(digest)
            while len(self._digests) > self._size:
                self._digests.popitem(last=False)

    def missed(self, digest: str) -> None:
        """A server answered NOT_FOUND to the digest."""
        with self._lock:
            entry = self._digests.get(digest)
            if entry is not None:
                entry[0] += 1
                entry[1] = min(2 ** entry[0], self.WHOLE_AFTER_MISS)


def _with_digest(request: WireMessage, graph: WireGraph) -> WireMessage:
    request.fields.graph_digest = graph.digest
    request.raw.pop("graph", None)
    return request


def _with_graph(request: WireMessage, graph: WireGraph) -> WireMessage:
    request.fields.ClearField("graph_digest")
    request.raw["graph"] = graph.data
    return request


class GradientClient:
    """A blocking client. Use it as a context manager, or call close().

    >>> with GradientClient("localhost:50051") as client:
    ...     result = client.gradient(g, output=f, inputs={"x": -2.0, "y": 5.0, "z": -4.0})

    Every failure raises GradientError carrying the gRPC status code and the server's message.
    `timeout` (seconds) is the default deadline of each call. `connections` channels are
    opened, each its own connection, and calls are spread over them in turn: against a
    server with `--workers N`, N or more connections spread one client's load over its
    processes. A graph is sent whole once; later calls on it send only its digest (and send
    it whole again if the server answers that it does not hold it).

    `target` is any gRPC target: `host:port`, `dns:///name:port` (every address the name
    resolves to, e.g. a headless Kubernetes Service), `ipv4:a:p,b:p`. Calls are balanced
    round-robin over its addresses and retried on UNAVAILABLE or a stopping server's
    CANCELLED (up to 5 attempts, within the call's deadline; every RPC of the service is
    idempotent), and connections are kept alive
    with pings: see gradient_client.channel for each default and why. `service_config`
    (a dict or JSON) replaces that default service config; `options` are channel arguments
    added to (or overriding) the SDK's.

    Security: `tls=True` speaks TLS trusting the system's roots, `tls=TLS(ca=..., cert=...,
    key=...)` a given CA and (for mutual TLS) a client certificate; `token` is sent as
    `authorization: Bearer <token>` on every call. A refused TLS handshake or token raises
    GradientError with UNAUTHENTICATED. `credentials` are channel credentials of your own.
    """

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        timeout: float | None = None,
        max_message_mb: int = DEFAULT_MAX_MESSAGE_MB,
        credentials: grpc.ChannelCredentials | None = None,
        connections: int = 1,
        tls: bool | TLS | None = None,
        token: str | None = None,
        options: Sequence[tuple[str, Any]] = (),
        service_config: Mapping[str, Any] | str | None = None,
    ):
        self._connections, self.tls = _connect(
            grpc,
            target,
            max_message_mb=max_message_mb,
            credentials=credentials,
            connections=connections,
            tls=tls,
            token=token,
            options=options,
            service_config=service_config,
        )
        self.target = target
        self._next = itertools.cycle(self._connections)
        self._known = _KnownGraphs()
        self.timeout = timeout
        self.max_message_bytes = max_message_mb * 1024 * 1024

    def __enter__(self) -> GradientClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channels."""
        for connection in self._connections:
            connection.channel.close()

    def _connection(self) -> _Connection:
        return next(self._next)

    def _call(self, method: str, request: WireMessage, timeout: float | None) -> WireMessage:
        data = wire.encode(request)
        call = self._connection().unary[method]
        try:
            response = call(data, timeout=timeout if timeout is not None else self.timeout)
        except grpc.RpcError as error:
            raise GradientError.from_rpc_error(error, tls=self.tls, target=self.target) from None
        return decode_response(response, method)

    def _call_on_graph(
        self, method: str, request: WireMessage, graph: WireGraph, timeout: float | None
    ) -> WireMessage:
        """Call with the graph's digest if it was sent before, else (or if the server does not
        hold it) with the graph itself."""
        if self._known.send_digest(graph.digest):
            try:
                return self._call(method, _with_digest(request, graph), timeout)
            except GradientError as error:
                if error.code != grpc.StatusCode.NOT_FOUND:
                    raise
                self._known.missed(graph.digest)
        response = self._call(method, _with_graph(request, graph), timeout)
        self._known.sent(graph.digest)
        return response

    def forward(
        self,
        graph: GraphLike,
        inputs: Mapping[str, Any] | None = None,
        fetch: Sequence[NodeLike] | None = None,
        *,
        timeout: float | None = None,
    ) -> ForwardResult:
        """Values of the `fetch` nodes (every node by default) given the input values.

        The arrays returned are read-only views of the response (np.array(x) copies one).
        """
        sent = wire_graph(graph)
        request = _forward_request(sent, inputs, fetch)
        response = self._call_on_graph("Forward", request, sent, timeout)
        return forward_result(response.tensors)

    def gradient(
        self,
        graph: GraphLike,
        output: NodeLike,
        inputs: Mapping[str, Any] | None = None,
        wrt: Sequence[NodeLike] | None = None,
        seed: Any = None,
        *,
        fetch: Sequence[NodeLike] | None = None,
        batched_seed: bool = False,
        batch: Mapping[NodeLike, int] | None = None,
        timeout: float | None = None,
    ) -> GradientResult:
        """Values and gradients of `output` with respect to `wrt` (every node by default).

        A scalar output's seed defaults to 1; a non-scalar output needs `seed`, an array of
        its shape (the result is then the vector-Jacobian product). With `batched_seed`,
        `seed` stacks K seeds along a new leading axis and every gradient comes back stacked
        the same way: K vector-Jacobian products from one forward pass.

        With `batch` (input -> axis, e.g. ``{"X": 0, "y": 0}``), per-example gradients, as
        ``jax.vmap(jax.grad(f), in_axes)``: the graph is evaluated for each slice of those
        inputs along their axes (the same size B for all), and every value and gradient
        comes back stacked along a new leading axis of B, a gradient per example for the
        unbatched inputs (the weights) too. The output must have one element per example,
        or `seed` stacks B seeds ([B] + the output's shape).

        The arrays returned are read-only views of the response.
        """
        sent = wire_graph(graph)
        request = _gradient_request(sent, output, inputs, wrt, seed, fetch, batched_seed, batch)
        response = self._call_on_graph("Gradient", request, sent, timeout)
        return gradient_result(response.tensors, response.fields.skipped)

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
        sent = wire_graph(graph)
        request = _check_request(
            sent, output, inputs, wrt, seed, eps, atol, rtol, max_elements, directions, random_seed
        )
        return _check_report(self._call_on_graph("CheckGradient", request, sent, timeout))

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
        sent = wire_graph(graph)
        request = _gradient_graph_request(sent, output, inputs, wrt)
        response = self._call_on_graph("GradientGraph", request, sent, timeout)
        return _gradient_graph_result(response)

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
        sent = wire_graph(graph)
        request = _hvp_request(sent, output, inputs, vector)
        response = self._call_on_graph("HessianVectorProduct", request, sent, timeout)
        return ByNode(response.tensors.get("products", {}))

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

        The Jacobian of the gradient: one GradientGraph call, then one Jacobian call on the
        gradients flattened and concatenated (n vector-Jacobian products for n elements in
        all, from one forward pass on the server). With one input of shape s the result has
        shape s + s; with several, it is the (n, n) matrix over their flattened values
        concatenated in `wrt` order.
        """
        names = _names(wrt)
        shapes = _input_shapes(inputs, names)
        gg = self.gradient_graph(graph, output, inputs, wrt=names, timeout=timeout)
        extended, gradient, feeds = _hessian_problem(gg, output, inputs, names)
        result = self.jacobian(extended, gradient, feeds, wrt=names, timeout=timeout)
        return _hessian_from_jacobian(names, shapes, result)

    def jvp(
        self,
        graph: GraphLike,
        output: NodeLike,
        inputs: Mapping[str, Any] | None = None,
        tangents: Mapping[str, Any] | None = None,
        *,
        tangents_of: Sequence[NodeLike] | None = None,
        all_tangents: bool = False,
        fetch: Sequence[NodeLike] | None = None,
        batched: bool = False,
        timeout: float | None = None,
    ) -> JvpResult:
        """The Jacobian-vector product J·v (forward mode): the tangent of `output` when the
        inputs move along `tangents` (input name -> array of its shape; missing inputs count
        as zero), in `r.tangents[output]`, with the output's value in `r.values[output]`.

        `tangents_of` adds the tangents of those nodes, `all_tangents=True` of every node;
        `fetch` adds values. With `batched`, each tangent stacks K tangents along a new leading
        axis and every tangent comes back stacked the same way, from one forward pass.
        """
        sent = wire_graph(graph)
        request = _jvp_request(
            sent, output, inputs, tangents, tangents_of, all_tangents, fetch, batched
        )
        response = self._call_on_graph("JacobianVectorProduct", request, sent, timeout)
        return jvp_result(response.tensors, response.fields.skipped)

    def jacobian(
        self,
        graph: GraphLike,
        output: NodeLike,
        inputs: Mapping[str, Any] | None = None,
        wrt: Sequence[NodeLike] | None = None,
        *,
        mode: str = "auto",
        timeout: float | None = None,
    ) -> JacobianResult:
        """The Jacobian of `output` with respect to the float inputs `wrt` (every float input
        by default): `r[x]` has shape output.shape + x.shape.

        The server runs reverse mode (one VJP per output element, as jax.jacrev) or forward
        mode (one JVP per input element, as jax.jacfwd), whichever runs fewer, unless `mode`
        is "reverse" or "forward"; `r.mode` says which. All the products share one forward pass.
        """
        sent = wire_graph(graph)
        request = _jacobian_request(sent, output, inputs, wrt, mode)
        return _jacobian_result(self._call_on_graph("Jacobian", request, sent, timeout))

    def list_ops(self, *, timeout: float | None = None) -> list[OpInfo]:
        """Every op the server knows."""
        response = self._call("ListOps", WireMessage(service_pb2.ListOpsRequest()), timeout)
        return _op_infos(response.fields)

    def session(
        self,
        graph: GraphLike,
        output: NodeLike | None = None,
        wrt: Sequence[NodeLike] | None = None,
        fetch: Sequence[NodeLike] | None = None,
        *,
        stop_on_error: bool = False,
        timeout: float | None = None,
    ) -> Session:
        """A Session: many steps on one graph over one stream (use it as a context manager).

        >>> with client.session(g, output=loss, wrt=params, fetch=[loss]) as s:
        ...     for batch in batches:
        ...         r = s.gradient({"X": batch.x, "y": batch.y, **weights})

        The graph, output, wrt and fetch cross the wire once; each step sends only its
        inputs. Steps from several threads share the stream (their messages are batched).
        `timeout` (seconds) bounds the whole session; by default it has no deadline (the
        client's `timeout` is for single calls).
        """
        from .session import Session

        return Session(
            self._connection().session,
            wire_graph(graph),
            _session_start(output, wrt, fetch, stop_on_error, self.max_message_bytes),
            timeout,
            self.max_message_bytes,
            tls=self.tls,
            target=self.target,
        )


def _session_start(output, wrt, fetch, stop_on_error: bool, max_message_bytes: int) -> Any:
    return service_pb2.SessionStart(
        output=_name(output) if output is not None else "",
        wrt=_names(wrt),
        fetch=_names(fetch),
        stop_on_error=stop_on_error,
        max_message_bytes=max_message_bytes,
    )


class AsyncGradientClient:
    """The asyncio twin of GradientClient (same methods, awaitable); use `async with`."""

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        timeout: float | None = None,
        max_message_mb: int = DEFAULT_MAX_MESSAGE_MB,
        credentials: grpc.ChannelCredentials | None = None,
        connections: int = 1,
        tls: bool | TLS | None = None,
        token: str | None = None,
        options: Sequence[tuple[str, Any]] = (),
        service_config: Mapping[str, Any] | str | None = None,
    ):
        self._connections, self.tls = _connect(
            grpc.aio,
            target,
            max_message_mb=max_message_mb,
            credentials=credentials,
            connections=connections,
            tls=tls,
            token=token,
            options=options,
            service_config=service_config,
        )
        self.target = target
        self._next = itertools.cycle(self._connections)
        self._known = _KnownGraphs()
        self.timeout = timeout
        self.max_message_bytes = max_message_mb * 1024 * 1024

    async def __aenter__(self) -> AsyncGradientClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channels."""
        for connection in self._connections:
            await connection.channel.close()

    async def _call(self, method: str, request: WireMessage, timeout: float | None) -> WireMessage:
        data = wire.encode(request)
        call = next(self._next).unary[method]
        try:
            response = await call(data, timeout=timeout if timeout is not None else self.timeout)
        except grpc.RpcError as error:
            raise GradientError.from_rpc_error(error, tls=self.tls, target=self.target) from None
        return decode_response(response, method)

    async def _call_on_graph(
        self, method: str, request: WireMessage, graph: WireGraph, timeout: float | None
    ) -> WireMessage:
        """See GradientClient._call_on_graph."""
        if self._known.send_digest(graph.digest):
            try:
                return await self._call(method, _with_digest(request, graph), timeout)
            except GradientError as error:
                if error.code != grpc.StatusCode.NOT_FOUND:
                    raise
                self._known.missed(graph.digest)
        response = await self._call(method, _with_graph(request, graph), timeout)
        self._known.sent(graph.digest)
        return response

    async def forward(
        self,
        graph: GraphLike,
        inputs: Mapping[str, Any] | None = None,
        fetch: Sequence[NodeLike] | None = None,
        *,
        timeout: float | None = None,
    ) -> ForwardResult:
        """See GradientClient.forward."""
        sent = wire_graph(graph)
        request = _forward_request(sent, inputs, fetch)
        response = await self._call_on_graph("Forward", request, sent, timeout)
        return forward_result(response.tensors)

    async def gradient(
        self,
        graph: GraphLike,
        output: NodeLike,
        inputs: Mapping[str, Any] | None = None,
        wrt: Sequence[NodeLike] | None = None,
        seed: Any = None,
        *,
        fetch: Sequence[NodeLike] | None = None,
        batched_seed: bool = False,
        batch: Mapping[NodeLike, int] | None = None,
        timeout: float | None = None,
    ) -> GradientResult:
        """See GradientClient.gradient."""
        sent = wire_graph(graph)
        request = _gradient_request(sent, output, inputs, wrt, seed, fetch, batched_seed, batch)
        response = await self._call_on_graph("Gradient", request, sent, timeout)
        return gradient_result(response.tensors, response.fields.skipped)

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
        sent = wire_graph(graph)
        request = _check_request(
            sent, output, inputs, wrt, seed, eps, atol, rtol, max_elements, directions, random_seed
        )
        return _check_report(await self._call_on_graph("CheckGradient", request, sent, timeout))

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
        sent = wire_graph(graph)
        request = _gradient_graph_request(sent, output, inputs, wrt)
        response = await self._call_on_graph("GradientGraph", request, sent, timeout)
        return _gradient_graph_result(response)

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
        sent = wire_graph(graph)
        request = _hvp_request(sent, output, inputs, vector)
        response = await self._call_on_graph("HessianVectorProduct", request, sent, timeout)
        return ByNode(response.tensors.get("products", {}))

    async def hessian(
        self,
        graph: GraphLike,
        output: NodeLike,
        inputs: Mapping[str, Any],
        wrt: Sequence[NodeLike],
        *,
        timeout: float | None = None,
    ) -> np.ndarray:
        """See GradientClient.hessian."""
        names = _names(wrt)
        shapes = _input_shapes(inputs, names)
        gg = await self.gradient_graph(graph, output, inputs, wrt=names, timeout=timeout)
        extended, gradient, feeds = _hessian_problem(gg, output, inputs, names)
        result = await self.jacobian(extended, gradient, feeds, wrt=names, timeout=timeout)
        return _hessian_from_jacobian(names, shapes, result)

    async def jvp(
        self,
        graph: GraphLike,
        output: NodeLike,
        inputs: Mapping[str, Any] | None = None,
        tangents: Mapping[str, Any] | None = None,
        *,
        tangents_of: Sequence[NodeLike] | None = None,
        all_tangents: bool = False,
        fetch: Sequence[NodeLike] | None = None,
        batched: bool = False,
        timeout: float | None = None,
    ) -> JvpResult:
        """See GradientClient.jvp."""
        sent = wire_graph(graph)
        request = _jvp_request(
            sent, output, inputs, tangents, tangents_of, all_tangents, fetch, batched
        )
        response = await self._call_on_graph("JacobianVectorProduct", request, sent, timeout)
        return jvp_result(response.tensors, response.fields.skipped)

    async def jacobian(
        self,
        graph: GraphLike,
        output: NodeLike,
        inputs: Mapping[str, Any] | None = None,
        wrt: Sequence[NodeLike] | None = None,
        *,
        mode: str = "auto",
        timeout: float | None = None,
    ) -> JacobianResult:
        """See GradientClient.jacobian."""
        sent = wire_graph(graph)
        request = _jacobian_request(sent, output, inputs, wrt, mode)
        return _jacobian_result(await self._call_on_graph("Jacobian", request, sent, timeout))

    async def list_ops(self, *, timeout: float | None = None) -> list[OpInfo]:
        """See GradientClient.list_ops."""
        request = WireMessage(service_pb2.ListOpsRequest())
        return _op_infos((await self._call("ListOps", request, timeout)).fields)

    def session(
        self,
        graph: GraphLike,
        output: NodeLike | None = None,
        wrt: Sequence[NodeLike] | None = None,
        fetch: Sequence[NodeLike] | None = None,
        *,
        stop_on_error: bool = False,
        timeout: float | None = None,
    ) -> AsyncSession:
        """See GradientClient.session; use it with `async with`, and await its steps."""
        from .session import AsyncSession

        return AsyncSession(
            next(self._next).session,
            wire_graph(graph),
            _session_start(output, wrt, fetch, stop_on_error, self.max_message_bytes),
            timeout,
            self.max_message_bytes,
            tls=self.tls,
            target=self.target,
        )
