"""The service as a differentiable PyTorch function and module (the optional ``torch`` extra).

``function(client, graph, output, inputs)`` wraps a graph as a function of tensors whose
value the service computes, and whose backward pass is the service's vector-Jacobian
product, through a ``torch.autograd.Function``:

>>> import gradient_client.torch
>>> layer = gradient_client.torch.function(client, g, output=f, inputs=["W", "x"])  # doctest: +SKIP
>>> loss = layer(W, x)  # a tensor; loss.backward() fills W.grad and x.grad  # doctest: +SKIP

Its forward is a ``Forward`` call; its backward a ``Gradient`` call with ``grad_output`` as
the ``seed`` and, as ``wrt``, the float inputs that need a gradient. ``GraphModule`` holds
some of the graph's inputs (the weights) as ``nn.Parameter``s, fed with every call, so that
an optimizer trains them.

- Tensors are sent as numpy arrays (moved to the CPU first); the output comes back on the
  device of the first input tensor, in the dtype the service computes it in (a float64
  graph gives float64), and each input's gradient in that input's dtype and device.
- Integer and bool inputs are fed but get no gradient (``None``).
- The backward pass is not differentiable again (``create_graph=True`` through a layer
  raises); the service's own ``client.hvp`` and ``client.hessian`` give second
  derivatives. ``torch.func`` transforms (``vmap``, ``grad``) are not supported: use
  ``gradient_client.jax`` for those.
- A failure raises the SDK's ``GradientError``, from the forward pass or from
  ``backward()``.

It needs the ``torch`` package (``pip install "gradient-service-client[torch]"``):
``import gradient_client`` never imports it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from .client import GradientClient, GraphLike, NodeLike, _name

__all__ = ["GraphFunction", "GraphModule", "function"]


def function(
    client: GradientClient,
    graph: GraphLike,
    output: NodeLike,
    inputs: Sequence[NodeLike],
    *,
    timeout: float | None = None,
) -> GraphFunction:
    """The graph as a differentiable function of tensors: `inputs` in, `output`'s value out.

    `client` is a (blocking) ``GradientClient``; `graph` a ``Graph`` or a
    ``gradient.v1.Graph`` message; `output` the node computed (a node or its name); `inputs`
    the graph's input nodes (or names) the function takes, in the order of its positional
    arguments (they may be passed by name too). `timeout` bounds each call (``None``: the
    client's deadline).
    """
    return GraphFunction(client, graph, output, inputs, timeout=timeout)


class GraphFunction:
    """A graph as a differentiable function of tensors: ``layer(*args, **kwargs)`` returns
    the output's value as a tensor, whose ``backward()`` asks the service for the inputs'
    gradients. Made by ``gradient_client.torch.function``.

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

    def __repr__(self) -> str:
        return f"GraphFunction(output={self.output!r}, inputs={list(self.inputs)!r})"

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The output's value for these inputs: tensors (or arrays, numbers) given in the
        order of ``inputs``, or by input name."""
        values = [_tensor(value) for value in _bind(self.inputs, args, kwargs)]
        return _Apply.apply(self, *values)

    def _forward(self, arrays: list[np.ndarray]) -> np.ndarray:
        feeds = dict(zip(self.inputs, arrays, strict=True))
        r = self.client.forward(self.graph, feeds, [self.output], timeout=self.timeout)
        return np.array(r[self.output])  # a writable copy, for torch.from_numpy

    def _vjp(self, arrays: list[np.ndarray], seed: np.ndarray, wrt: list[str]) -> Mapping:
        feeds = dict(zip(self.inputs, arrays, strict=True))
        r = self.client.gradient(
            self.graph, self.output, feeds, wrt, seed, fetch=[self.output], timeout=self.timeout
        )
        return r.gradients


class _Apply(torch.autograd.Function):
    """forward: the service's Forward; backward: its Gradient, seeded with grad_output."""

    @staticmethod
    def forward(ctx: Any, layer: GraphFunction, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.layer = layer
        ctx.save_for_backward(*tensors)
        value = layer._forward([_numpy(t) for t in tensors])
        device = tensors[0].device if tensors else torch.device("cpu")
        return torch.from_numpy(value).to(device)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        layer: GraphFunction = ctx.layer
        tensors = ctx.saved_tensors
        wanted = [
            i
            for i, tensor in enumerate(tensors)
            if ctx.needs_input_grad[1 + i] and tensor.is_floating_point()
        ]
        grads: list[torch.Tensor | None] = [None] * len(tensors)
        if not wanted:
            return (None, *grads)
        wrt = [layer.inputs[i] for i in wanted]
        gradients = layer._vjp([_numpy(t) for t in tensors], _numpy(grad_output), wrt)
        for i, name in zip(wanted, wrt, strict=True):
            tensor = tensors[i]
            grads[i] = torch.from_numpy(np.array(gradients[name])).to(tensor.device, tensor.dtype)
        return (None, *grads)


class GraphModule(torch.nn.Module):
    """A graph as an ``nn.Module``: `parameters` (graph input names mapped to initial
    values) become trainable ``nn.Parameter``s in ``module.params``, fed with every call, and
    ``module(*args, **kwargs)`` feeds the other `inputs` and returns `output`'s value.

    ``module.params`` is an ``nn.ParameterDict`` keyed by the input names, with ``_`` for
    each ``.`` (which PyTorch does not allow in a parameter's name); ``module.layer`` is the
    underlying ``GraphFunction`` (taking `inputs`, then the parameters). `client`, `graph`,
    `output` and `timeout` are as for ``function``.
    """

    def __init__(
        self,
        client: GradientClient,
        graph: GraphLike,
        output: NodeLike,
        inputs: Sequence[NodeLike],
        parameters: Mapping[NodeLike, Any],
        *,
        timeout: float | None = None,
    ):
        super().__init__()
        names = [_name(node) for node in parameters]
        self.params = torch.nn.ParameterDict()
        self._keys: dict[str, str] = {}
        for name, value in zip(names, parameters.values(), strict=True):
            key = name.replace(".", "_")
            if key in self.params:
                raise ValueError(f"parameters {name!r} and another are both stored as {key!r}")
            self.params[key] = torch.nn.Parameter(_tensor(value).detach().clone())
            self._keys[name] = key
        self.layer = GraphFunction(
            client, graph, output, [*map(_name, inputs), *names], timeout=timeout
        )
        self._arguments = self.layer.inputs[: len(inputs)]

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The output's value for these inputs (in the order of `inputs`, or by name) and the
        module's parameters."""
        values = _bind(self._arguments, args, kwargs)
        weights = [self.params[key] for key in self._keys.values()]
        return self.layer(*values, *weights)


def _tensor(value: Any) -> torch.Tensor:
    """A tensor as it is; anything else (an array, possibly read-only, a list, a number)
    copied into a new tensor."""
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.array(value))


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


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
