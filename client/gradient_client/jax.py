"""The service as a differentiable JAX function (the optional ``jax`` extra).

``function(client, graph, output, inputs)`` wraps a graph as a JAX function of its inputs,
whose value and vector-Jacobian products the service computes:

>>> import gradient_client.jax
>>> layer = gradient_client.jax.function(client, g, output=f, inputs=["W", "x"])  # doctest: +SKIP
>>> layer(W, x)  # the value of f, as a jax.Array   # doctest: +SKIP
>>> jax.grad(lambda W, x: layer(W, x).sum(), argnums=(0, 1))(W, x)  # doctest: +SKIP

It is a ``jax.custom_vjp`` function: its forward pass is a ``Forward`` call, and its VJP a
``Gradient`` call with the cotangent as the ``seed`` and the float inputs as ``wrt``, so
``jax.grad``, ``jax.vjp``, ``jax.jit`` and ``jax.vmap`` compose with it:

- Outside ``jit`` and ``vmap`` it calls the service directly, and a failure raises the SDK's
  ``GradientError``.
- Under ``jit`` (and ``vmap``) the calls are ``jax.pure_callback`` host callbacks. The
  output's shape and dtype must then be known while tracing: they are asked of the service
  the first time the function meets an input signature (the inputs' shapes and dtypes), by a
  ``Forward`` on zeros of those shapes, and remembered. That call also checks the graph
  against the inputs, so a graph error (a shape mismatch, an unknown input) raises
  ``GradientError`` where the function is traced. A failure inside a callback (a value the
  service rejects, a limit, a lost server) reaches the caller as JAX's ``JaxRuntimeError``,
  whose message holds the ``GradientError`` (its code and details): JAX does not let a
  callback raise its own exception type.
- Under ``vmap`` over cotangents (``jax.vmap(vjp_fun)``, and so ``jax.jacrev``) the VJPs
  are one ``Gradient`` call with batched seeds (``batched_seed=True``): one forward pass on
  the server for all of them. Under ``vmap`` over inputs each example is one call, the calls
  of a batch travelling over one ``Session`` stream (sent ahead, answered in order), as the
  service has no per-example batching yet (issue 12, item 3): a batch of N costs N
  evaluations on the server. Both combine under nested ``vmap``s: one batched-seed call
  per combination of the inputs.

The VJP is not differentiable again (``jax.hessian`` of a layer raises); the service's own
``client.hvp`` and ``client.hessian`` give second derivatives.

Dtypes: JAX computes in float32 unless ``jax.config.update("jax_enable_x64", True)``; the
layer sends the arrays it is given (an input declared with a dtype in the graph is cast to
it by the SDK), and returns the output, and the cotangents, in JAX's dtypes (the output's
dtype as JAX represents it: float64 results become float32 without x64; each cotangent the
dtype of its input). Integer and bool inputs are fed but not differentiated (their
cotangents are ``float0`` zeros, as JAX requires).

It needs the ``jax`` package (``pip install "gradient-service-client[jax]"``):
``import gradient_client`` never imports it.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .client import GradientClient, GraphLike, NodeLike, _name

__all__ = ["GraphFunction", "function"]


def function(
    client: GradientClient,
    graph: GraphLike,
    output: NodeLike,
    inputs: Sequence[NodeLike],
    *,
    timeout: float | None = None,
) -> GraphFunction:
    """The graph as a differentiable JAX function of `inputs`, returning `output`'s value.

    `client` is a (blocking) ``GradientClient``; `graph` a ``Graph`` or a
    ``gradient.v1.Graph`` message; `output` the node computed (a node or its name); `inputs`
    the graph's input nodes (or names) the function takes, in the order of its positional
    arguments (they may be passed by name too). Every input of the graph that `output`
    depends on must be among them. `timeout` bounds each call (a batch's session as a
    whole); ``None`` leaves the client's deadline for single calls.
    """
    return GraphFunction(client, graph, output, inputs, timeout=timeout)


class GraphFunction:
    """A graph as a JAX function: ``layer(*args, **kwargs)`` returns the output's value as a
    ``jax.Array``, differentiable (``jax.grad``, ``jax.vjp``) and usable under ``jax.jit``
    and ``jax.vmap``. Made by ``gradient_client.jax.function``.

    Attributes: ``client``, ``graph``, ``output`` (the output's name), ``inputs`` (the input
    names, in argument order) and ``timeout``.
    """

    def __init__(
        self,
        client: GradientClient,
        graph: GraphLike,
        output: NodeLike,
        inputs: Sequence[NodeLike],
        *,
        timeout: float | None = None,
    ):
        if isinstance(inputs, str):
            raise TypeError("inputs is a sequence of input names (or nodes), not one string")
        self.client = client
        self.graph = graph
        self.output = _name(output)
        self.inputs = tuple(_name(node) for node in inputs)
        if len(set(self.inputs)) != len(self.inputs):
            raise ValueError(f"an input is named twice in {list(self.inputs)}")
        self.timeout = timeout
        # The output's shape and dtype, as the service computes it, for each input signature
        # ((shape, dtype) per input).
        self._shapes: dict[tuple[tuple[tuple[int, ...], str], ...], tuple[Any, np.dtype]] = {}
        apply = jax.custom_vjp(self._primal)
        apply.defvjp(self._forward, self._backward)
        self._apply = apply

    def __repr__(self) -> str:
        return f"GraphFunction(output={self.output!r}, inputs={list(self.inputs)!r})"

    def __call__(self, *args: Any, **kwargs: Any) -> jax.Array:
        """The output's value for these inputs: arrays (or anything ``jnp.asarray`` takes)
        given in the order of ``inputs``, or by input name."""
        values = _bind(self.inputs, args, kwargs)
        return self._apply(*(jnp.asarray(value) for value in values))

    # -- the custom_vjp rule -------------------------------------------------------------

    def _primal(self, *args: jax.Array) -> jax.Array:
        if not any(isinstance(arg, jax.core.Tracer) for arg in args):
            value = self._host_forward(None, [arg.ndim for arg in args], *args)
            self._shapes.setdefault(_signature(args), (value.shape, value.dtype))
            return jnp.asarray(value, jax.dtypes.canonicalize_dtype(value.dtype))
        result = self._result_shape(args)
        host = functools.partial(self._host_forward, result.dtype, [arg.ndim for arg in args])
        return jax.pure_callback(host, result, *args, vmap_method="expand_dims")

    def _forward(self, *args: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        return self._primal(*args), args

    def _backward(self, args: tuple[jax.Array, ...], cotangent: jax.Array) -> tuple[Any, ...]:
        floats = [i for i, arg in enumerate(args) if jnp.issubdtype(arg.dtype, jnp.floating)]
        differentiable = floats and jnp.issubdtype(cotangent.dtype, jnp.floating)
        results: list[Any] = [np.zeros(arg.shape, jax.dtypes.float0) for arg in args]
        if not differentiable:  # an integer output, or no float input: nothing flows back
            for i in floats:
                results[i] = jnp.zeros(args[i].shape, args[i].dtype)
            return tuple(results)
        ndims = [cotangent.ndim, *(arg.ndim for arg in args)]
        host = functools.partial(self._host_vjp, ndims, floats)
        if any(isinstance(x, jax.core.Tracer) for x in (cotangent, *args)):
            shapes = [jax.ShapeDtypeStruct(args[i].shape, args[i].dtype) for i in floats]
            grads = jax.pure_callback(host, shapes, cotangent, *args, vmap_method="expand_dims")
        else:
            grads = [jnp.asarray(grad) for grad in host(cotangent, *args)]
        for i, grad in zip(floats, grads, strict=True):
            results[i] = grad
        return tuple(results)

    def _result_shape(self, args: Sequence[jax.Array]) -> jax.ShapeDtypeStruct:
        """The output's shape and dtype (as JAX represents it) for inputs of these shapes and
        dtypes: asked of the service once per signature, by a Forward on zeros."""
        key = _signature(args)
        if key not in self._shapes:
            zeros = {
                name: np.zeros(arg.shape, arg.dtype)
                for name, arg in zip(self.inputs, args, strict=True)
            }
            r = self.client.forward(self.graph, zeros, [self.output], timeout=self.timeout)
            self._shapes[key] = (r[self.output].shape, r[self.output].dtype)
        shape, dtype = self._shapes[key]
        return jax.ShapeDtypeStruct(shape, jax.dtypes.canonicalize_dtype(dtype))

    # -- the host side: numpy in, numpy out, one service call per example ---------------

    def _host_forward(self, dtype: Any, ndims: list[int], *arrays: Any) -> np.ndarray:
        """The output, in `dtype` (None: the service's), for inputs that may carry leading
        batch axes (under vmap)."""
        batch, examples = _examples([np.asarray(a) for a in arrays], ndims)
        feeds = [dict(zip(self.inputs, example, strict=True)) for example in examples]
        values: list[np.ndarray]
        if len(feeds) == 1:
            r = self.client.forward(self.graph, feeds[0], [self.output], timeout=self.timeout)
            values = [r[self.output]]
        else:
            with self.client.session(
                self.graph, fetch=[self.output], timeout=self.timeout
            ) as session:
                futures = [session.forward_future(feed) for feed in feeds]
                values = [future.result()[self.output] for future in futures]
        return _stack(batch, values, dtype or values[0].dtype)

    def _host_vjp(self, ndims: list[int], floats: list[int], *arrays: Any) -> list[np.ndarray]:
        """The cotangents of the float inputs (`floats`, by position) for a cotangent of the
        output and the inputs, which may carry leading batch axes (under vmap).

        The cotangents along batch axes where no input varies (vmap over cotangents) go in
        one Gradient call as batched seeds, sharing its forward pass; each combination of
        the inputs is one call (over a Session when there are several and no batched
        seeds)."""
        cotangent, *inputs = (np.asarray(a) for a in arrays)
        leading = [
            a.shape[: a.ndim - nd] for a, nd in zip((cotangent, *inputs), ndims, strict=True)
        ]
        batch = tuple(np.broadcast_shapes(*leading))
        seed_axes = [
            axis
            for axis, size in enumerate(batch)
            if size > 1 and all(shape[axis] == 1 for shape in leading[1:])
        ]
        seed_sizes = tuple(batch[axis] for axis in seed_axes)
        call_axes = [axis for axis in range(len(batch)) if axis not in seed_axes]
        calls = []  # (where in the batch, the feeds, the seed) of each call
        for position in itertools.product(*(range(batch[axis]) for axis in call_axes)):
            where: list[Any] = [slice(None)] * len(batch)
            for axis, i in zip(call_axes, position, strict=True):
                where[axis] = i
            feeds = {
                name: _pick(array, shape, where, keep=False)
                for name, array, shape in zip(self.inputs, inputs, leading[1:], strict=True)
            }
            seed = _pick(cotangent, leading[0], where, keep=True)
            if seed_axes:
                seed = seed.reshape((-1, *seed.shape[len(seed_axes) :]))
            calls.append((tuple(where), feeds, seed))

        wrt = [self.inputs[i] for i in floats]
        if len(calls) == 1 or seed_axes:
            results = [
                self.client.gradient(
                    self.graph,
                    self.output,
                    feeds,
                    wrt,
                    seed,
                    fetch=[self.output],
                    batched_seed=bool(seed_axes),
                    timeout=self.timeout,
                ).gradients
                for _, feeds, seed in calls
            ]
        else:
            with self.client.session(
                self.graph, self.output, wrt, fetch=[self.output], timeout=self.timeout
            ) as session:
                futures = [session.gradient_future(feeds, seed) for _, feeds, seed in calls]
                results = [future.result().gradients for future in futures]

        grads = []
        for i, name in zip(floats, wrt, strict=True):
            shape = inputs[i].shape[len(leading[1 + i]) :]
            grad = np.empty(batch + shape, inputs[i].dtype)
            for (at, _, _), gradients in zip(calls, results, strict=True):
                grad[at] = np.reshape(gradients[name], seed_sizes + shape)
            grads.append(grad)
        return grads


def _bind(names: Sequence[str], arrays: Sequence[Any], named: Mapping[str, Any]) -> list[Any]:
    """The values of `names`, from positional `arrays` then `named` ones (TypeError if one is
    missing, unknown or given twice)."""
    if len(arrays) > len(names):
        raise TypeError(f"takes {len(names)} inputs ({', '.join(names)}), {len(arrays)} given")
    values = dict(zip(names, arrays, strict=False))
    for name, value in named.items():
        if name not in names:
            raise TypeError(f"unknown input {name!r}: the inputs are {list(names)}")
        if name in values:
            raise TypeError(f"input {name!r} is given twice")
        values[name] = value
    missing = [name for name in names if name not in values]
    if missing:
        raise TypeError(f"missing inputs: {missing}")
    return [values[name] for name in names]


def _signature(args: Sequence[Any]) -> tuple[tuple[tuple[int, ...], str], ...]:
    return tuple((tuple(arg.shape), np.dtype(arg.dtype).str) for arg in args)


def _examples(arrays: list[np.ndarray], ndims: list[int]) -> tuple[tuple[int, ...], list[list]]:
    """Split arrays whose leading axes are batch axes (those beyond `ndims`, added by vmap;
    an unbatched array has axes of size 1 there) into the batch's shape and its examples,
    in row-major order."""
    leading = [array.shape[: array.ndim - ndim] for array, ndim in zip(arrays, ndims, strict=True)]
    batch = tuple(np.broadcast_shapes(*leading))
    if not batch:
        return batch, [arrays]
    examples = []
    for index in itertools.product(*map(range, batch)):
        examples.append(
            [
                array[tuple(i if size > 1 else 0 for i, size in zip(index, shape, strict=True))]
                for array, shape in zip(arrays, leading, strict=True)
            ]
        )
    return batch, examples


def _pick(array: np.ndarray, leading: tuple[int, ...], where: list[Any], keep: bool) -> Any:
    """The part of `array` (whose leading axes, of sizes `leading`, are batch axes) at
    `where`: an index on some batch axes, ``slice(None)`` on the others, which are kept if
    `keep` (else taken at 0: the array does not vary along them)."""
    index = tuple(
        (slice(None) if keep else 0) if isinstance(at, slice) else (at if size > 1 else 0)
        for at, size in zip(where, leading, strict=True)
    )
    return array[index]


def _stack(batch: tuple[int, ...], values: list[Any], dtype: Any) -> np.ndarray:
    """The examples' results as one array of shape batch + the result's shape."""
    if not batch:
        return np.asarray(values[0], dtype=dtype)
    stacked = np.stack([np.asarray(value, dtype=dtype) for value in values])
    return stacked.reshape(batch + stacked.shape[1:])
