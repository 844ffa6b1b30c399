"""The service as a differentiable layer: gradient_client.jax and gradient_client.torch.

Every value and gradient is compared with the same model written in plain JAX or PyTorch
(float64, to 1e-12 relative to the result's scale): the lecture's f(x, W) = ||W·x||² and a
small MLP with tanh and a mean squared loss. JAX: jax.grad, jax.jit, jax.vmap of gradients
and over cotangents, float32, integer inputs. PyTorch: torch.autograd.grad, gradcheck, an
nn.Module trained step for step like the plain one. Errors of the service surface as
GradientError. The JAX tests skip without jax and the PyTorch ones without torch, saying so.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from gradient_client import GradientClient, GradientError, Graph

JAX_MISSING = 'jax is not installed (pip install "gradient-service-client[jax]")'
TORCH_MISSING = (
    "torch is not installed: the PyTorch layer tests run where it is (pip install torch)"
)
LECTURE_W = np.array([[0.1, 0.5], [-0.3, 0.8]])
LECTURE_X = np.array([0.2, 0.4])


def assert_close(actual, expected, rtol=1e-12):
    """Equal to `rtol` relative to the expected array's largest magnitude (elements near zero
    are compared at the array's scale, as a sum in another order perturbs them)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def lecture_graph():
    """f(x, W) = ||W·x||², and q = W·x."""
    g = Graph()
    W, x = g.input("W"), g.input("x")
    q = g.matmul(W, x, name="q")
    g.sum(g.square(q), name="f")
    return g


def mlp_graph():
    """loss = mean((tanh(X·W1 + b1)·W2 + b2 - Y)²), and `out`, the network's output."""
    g = Graph()
    X, Y = g.input("X"), g.input("Y")
    W1, b1, W2, b2 = (g.input(name) for name in ("W1", "b1", "W2", "b2"))
    out = g.add(g.tanh(X @ W1 + b1) @ W2, b2, name="out")
    g.mean(g.square(out - Y), name="loss")
    return g


MLP_PARAMS = ("W1", "b1", "W2", "b2")


def mlp_data(seed=0, batch=8):
    rng = np.random.default_rng(seed)
    params = {
        "W1": rng.standard_normal((3, 5)),
        "b1": 0.1 * rng.standard_normal(5),
        "W2": rng.standard_normal((5, 2)),
        "b2": 0.1 * rng.standard_normal(2),
    }
    return rng.standard_normal((batch, 3)), rng.standard_normal((batch, 2)), params


def dead_client():
    """A client of a port where nothing listens: every call fails with UNAVAILABLE."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return GradientClient(f"127.0.0.1:{port}", timeout=5)


# ------------------------------------------------------------------------------------ JAX


@pytest.fixture
def jax():
    """jax, with float64 enabled for the test (and the setting restored after it)."""
    jax = pytest.importorskip("jax", reason=JAX_MISSING)
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield jax
    jax.config.update("jax_enable_x64", before)


@pytest.fixture
def gj(jax):
    import gradient_client.jax as gj

    return gj


def plain_mlp_loss(np_like, X, Y, W1, b1, W2, b2):
    out = np_like.tanh(X @ W1 + b1) @ W2 + b2
    return np_like.mean((out - Y) ** 2)


def test_jax_lecture_value_and_gradients(client, jax, gj):
    jnp = jax.numpy
    layer = gj.function(client, lecture_graph(), "f", inputs=["W", "x"])
    W, x = jnp.asarray(LECTURE_W), jnp.asarray(LECTURE_X)

    def plain(W, x):
        return jnp.sum((W @ x) ** 2)

    value = layer(W, x)
    assert value.dtype == jnp.float64 and value.shape == ()
    assert_close(value, plain(W, x))
    assert_close(value, 0.116)
    dW, dx = jax.grad(layer, argnums=(0, 1))(W, x)
    pW, px = jax.grad(plain, argnums=(0, 1))(W, x)
    assert_close(dW, pW)
    assert_close(dx, px)
    assert_close(dW, [[0.088, 0.176], [0.104, 0.208]])  # the lecture's values
    assert_close(dx, [-0.112, 0.636])
    # jit, of the value and of the gradient; inputs by name too
    assert_close(jax.jit(layer)(W, x), plain(W, x))
    for got, want in zip(jax.jit(jax.grad(layer, argnums=(0, 1)))(W, x), (pW, px), strict=True):
        assert_close(got, want)
    assert_close(layer(x=x, W=W), plain(W, x))
    assert jax.eval_shape(layer, W, x) == jax.ShapeDtypeStruct((), jnp.float64)


def test_jax_mlp_matches_plain_jax(client, jax, gj):
    jnp = jax.numpy
    X, Y, params = mlp_data()
    layer = gj.function(client, mlp_graph(), "loss", inputs=["X", "Y", *MLP_PARAMS])

    def loss(params, X, Y):
        return layer(X, Y, *(params[name] for name in MLP_PARAMS))

    def plain(params, X, Y):
        return plain_mlp_loss(jnp, X, Y, *(params[name] for name in MLP_PARAMS))

    params = {name: jnp.asarray(value) for name, value in params.items()}
    X, Y = jnp.asarray(X), jnp.asarray(Y)
    assert_close(loss(params, X, Y), plain(params, X, Y))
    expected = jax.grad(plain)(params, X, Y)
    for grad in (jax.grad(loss), jax.jit(jax.grad(loss))):
        got = grad(params, X, Y)
        for name in MLP_PARAMS:
            assert_close(got[name], expected[name])
    # with respect to the data as well
    got = jax.grad(loss, argnums=(1, 2))(params, X, Y)
    want = jax.grad(plain, argnums=(1, 2))(params, X, Y)
    for a, b in zip(got, want, strict=True):
        assert_close(a, b)
    # a training step's value and gradient together
    value, grads = jax.jit(jax.value_and_grad(loss))(params, X, Y)
    assert_close(value, plain(params, X, Y))
    assert_close(grads["W1"], expected["W1"])


def test_jax_vmap_of_grad_matches_plain_vmap(client, jax, gj):
    """Per-example gradients: vmap(grad(layer)) over a batch of inputs, jitted or not."""
    jnp = jax.numpy
    X, Y, params = mlp_data(seed=1, batch=6)
    layer = gj.function(client, mlp_graph(), "loss", inputs=["X", "Y", *MLP_PARAMS])
    params = {name: jnp.asarray(value) for name, value in params.items()}

    def loss(params, x, y):  # one example: x (3,), y (2,)
        return layer(x[None], y[None], *(params[name] for name in MLP_PARAMS))

    def plain(params, x, y):
        return plain_mlp_loss(jnp, x[None], y[None], *(params[name] for name in MLP_PARAMS))

    expected = jax.vmap(jax.grad(plain), in_axes=(None, 0, 0))(params, X, Y)
    per_example = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))
    for transform in (per_example, jax.jit(per_example)):
        got = transform(params, jnp.asarray(X), jnp.asarray(Y))
        for name in MLP_PARAMS:
            assert got[name].shape == (6, *params[name].shape)
            assert_close(got[name], expected[name])
    values = jax.vmap(loss, in_axes=(None, 0, 0))(params, X, Y)
    assert_close(values, jax.vmap(plain, in_axes=(None, 0, 0))(params, X, Y))

    # the lecture's f over a grid of W (outer vmap) and x (inner vmap), gradients by x
    lecture = gj.function(client, lecture_graph(), "f", inputs=["W", "x"])
    Ws = jnp.stack([jnp.asarray(LECTURE_W), 2 * jnp.asarray(LECTURE_W), -jnp.eye(2)])
    xs = jnp.asarray(np.random.default_rng(2).standard_normal((4, 2)))

    def grid(f):
        return jax.vmap(jax.vmap(jax.grad(f, argnums=1), in_axes=(None, 0)), in_axes=(0, None))

    got = jax.jit(grid(lecture))(Ws, xs)
    assert got.shape == (3, 4, 2)
    assert_close(got, grid(lambda W, x: jnp.sum((W @ x) ** 2))(Ws, xs))


def test_jax_vmap_over_cotangents(client, jax, gj, monkeypatch):
    """A vector output's VJP per row of a batch of cotangents: the Jacobian, row by row, in
    one Gradient call with batched seeds (one per combination of the inputs when they are
    batched too)."""
    jnp = jax.numpy
    calls = []
    gradient = client.gradient

    def spy(*args, **kwargs):
        seed = np.asarray(args[4] if len(args) > 4 else kwargs["seed"])
        calls.append((seed.shape, kwargs.get("batched_seed", False)))
        return gradient(*args, **kwargs)

    monkeypatch.setattr(client, "gradient", spy)
    g = lecture_graph()
    g.tanh(g["q"], name="h")
    layer = gj.function(client, g, "h", inputs=["W", "x"])
    rng = np.random.default_rng(3)
    W, x = jnp.asarray(rng.standard_normal((3, 2))), jnp.asarray(rng.standard_normal(2))

    def plain(W, x):
        return jnp.tanh(W @ x)

    value, vjp = jax.vjp(layer, W, x)
    _, plain_vjp = jax.vjp(plain, W, x)
    assert_close(value, plain(W, x))
    cotangents = jnp.asarray(rng.standard_normal((5, 3)))
    expected = jax.vmap(plain_vjp)(cotangents)
    for transform in (jax.vmap(vjp), jax.jit(jax.vmap(vjp))):
        calls.clear()
        dW, dx = transform(cotangents)
        assert dW.shape == (5, 3, 2) and dx.shape == (5, 2)
        assert_close(dW, expected[0])
        assert_close(dx, expected[1])
        assert calls == [((5, 3), True)]  # the five VJPs from one forward pass

    # over a batch of x (one call each), the VJPs of each for the five cotangents
    xs = jnp.asarray(rng.standard_normal((4, 2)))

    def rows(f):
        return jax.vmap(lambda x: jax.vmap(jax.vjp(f, W, x)[1])(cotangents))

    calls.clear()
    got = jax.jit(rows(layer))(xs)
    assert calls == [((5, 3), True)] * 4
    for a, b in zip(got, rows(plain)(xs), strict=True):
        assert a.shape[:2] == (4, 5)
        assert_close(a, b)
    # jacrev is a vmap over the rows of the identity
    for got, want in zip(
        jax.jacrev(layer, argnums=(0, 1))(W, x),
        jax.jacrev(plain, argnums=(0, 1))(W, x),
        strict=True,
    ):
        assert_close(got, want)


def test_jax_float32(client, jax, gj):
    """A float32 graph stays float32, without x64 too; a declared float64 input is computed
    in float64 by the service and handed back in JAX's float32."""
    jnp = jax.numpy
    layer = gj.function(client, lecture_graph(), "f", inputs=["W", "x"])
    W, x = jnp.asarray(LECTURE_W, jnp.float32), jnp.asarray(LECTURE_X, jnp.float32)

    def plain(W, x):
        return jnp.sum((W @ x) ** 2)

    for enable_x64 in (True, False):
        jax.config.update("jax_enable_x64", enable_x64)
        value = jax.jit(layer)(W, x)
        assert value.dtype == jnp.float32
        assert_close(value, plain(W, x), rtol=1e-6)
        grads = jax.grad(layer, argnums=(0, 1))(W, x)
        for got, want in zip(grads, jax.grad(plain, argnums=(0, 1))(W, x), strict=True):
            assert got.dtype == jnp.float32
            assert_close(got, want, rtol=1e-6)

    g = Graph()
    x64 = g.input("x", dtype="float64")
    g.sum(g.exp(x64), name="f")
    declared = gj.function(client, g, "f", inputs=["x"])
    with_x32 = jnp.asarray([0.5, 1.5], jnp.float32)
    value, grad = jax.jit(jax.value_and_grad(declared))(with_x32)
    assert value.dtype == jnp.float32 and grad.dtype == jnp.float32
    assert_close(value, np.exp([0.5, 1.5]).sum(), rtol=1e-7)
    assert_close(grad, np.exp([0.5, 1.5]), rtol=1e-7)
    jax.config.update("jax_enable_x64", True)  # the same inputs: float64 out, now
    value = jax.jit(declared)(with_x32)
    assert value.dtype == jnp.float64
    assert_close(value, np.exp(np.float32([0.5, 1.5]).astype(np.float64)).sum())


def test_jax_integer_inputs_are_fed_not_differentiated(client, jax, gj):
    jnp = jax.numpy
    g = Graph()
    x, indices = g.input("x"), g.input("indices")
    picked = g.take(x, indices, name="picked")
    g.sum(g.square(picked), name="f")
    layer = gj.function(client, g, "f", inputs=["x", "indices"])
    xs = jnp.asarray([1.0, -2.0, 3.0])
    indices = jnp.asarray([2, 0, 2])

    def plain(x, indices):
        return jnp.sum(x[indices] ** 2)

    assert_close(layer(xs, indices), plain(xs, indices))
    for grad in (jax.grad(layer), jax.jit(jax.grad(layer))):
        assert_close(grad(xs, indices), jax.grad(plain)(xs, indices))  # [2·3, 0, 4·3]
    _, vjp = jax.vjp(layer, xs, indices)
    dx, dindices = vjp(jnp.asarray(1.0))
    assert_close(dx, [2.0, 0.0, 12.0])
    assert dindices.dtype == jax.dtypes.float0 and dindices.shape == (3,)


def test_jax_service_errors_raise_gradient_error(client, jax, gj):
    jnp = jax.numpy
    W, x = jnp.asarray(LECTURE_W), jnp.asarray(LECTURE_X)
    layer = gj.function(client, lecture_graph(), "f", inputs=["W", "x"])
    # a graph error: the shapes are checked when the function is traced, jit or not
    for call in (layer, jax.jit(layer), jax.grad(layer)):
        with pytest.raises(GradientError) as error:
            call(W, jnp.ones(3))
        assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.node == "q"
    # a value the service rejects (an index out of range): GradientError outside jit, and
    # under jit JAX's runtime error holding it (JAX does not let a callback raise its own)
    g = Graph()
    xs, indices = g.input("x"), g.input("indices")
    g.sum(g.take(xs, indices), name="f")
    picking = gj.function(client, g, "f", inputs=["x", "indices"])
    with pytest.raises(GradientError, match="out of range") as error:
        picking(x, jnp.asarray([5]))
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(Exception, match=r"GradientError: INVALID_ARGUMENT: node 'take_\d+'"):
        jax.jit(picking)(x, jnp.asarray([5])).block_until_ready()
    # the server gone between the forward pass and the backward one
    value, vjp = jax.vjp(layer, W, x)
    layer.client = dead_client()
    try:
        with pytest.raises(GradientError) as error:
            vjp(jnp.asarray(1.0))
        assert error.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        layer.client.close()
    # arguments that do not match the inputs
    with pytest.raises(TypeError, match="missing inputs"):
        picking(x)
    with pytest.raises(TypeError, match="unknown input 'y'"):
        picking(x, y=1)
    with pytest.raises(TypeError, match="given twice"):
        picking(x, x=x)
    with pytest.raises(ValueError, match="named twice"):
        gj.function(client, g, "f", inputs=["x", "x"])


# -------------------------------------------------------------------------------- PyTorch


@pytest.fixture
def torch():
    return pytest.importorskip("torch", reason=TORCH_MISSING)


@pytest.fixture
def gt(torch):
    import gradient_client.torch as gt

    return gt


def test_torch_lecture_and_mlp_match_plain_torch(client, torch, gt):
    lecture = gt.function(client, lecture_graph(), "f", inputs=["W", "x"])
    W = torch.tensor(LECTURE_W, requires_grad=True)
    x = torch.tensor(LECTURE_X, requires_grad=True)
    value = lecture(W, x)
    assert value.dtype == torch.float64 and value.shape == ()
    plain = torch.sum((W @ x) ** 2)
    assert_close(value.detach(), plain.detach())
    got = torch.autograd.grad(value, (W, x))
    want = torch.autograd.grad(plain, (W, x))
    for a, b in zip(got, want, strict=True):
        assert_close(a, b)
    assert_close(got[0], [[0.088, 0.176], [0.104, 0.208]])
    value = lecture(x=x, W=W)  # by name; backward() fills .grad
    value.backward()
    assert_close(W.grad, want[0])
    assert_close(x.grad, want[1])

    X, Y, params = mlp_data(seed=4)
    layer = gt.function(client, mlp_graph(), "loss", inputs=["X", "Y", *MLP_PARAMS])
    X, Y = torch.tensor(X, requires_grad=True), torch.tensor(Y)
    weights = [torch.tensor(params[name], requires_grad=True) for name in MLP_PARAMS]
    value = layer(X, Y, *weights)
    plain = plain_mlp_loss(torch, X, Y, *weights)
    assert_close(value.detach(), plain.detach())
    got = torch.autograd.grad(value, [X, *weights])
    want = torch.autograd.grad(plain, [X, *weights])
    for a, b in zip(got, want, strict=True):
        assert_close(a, b)
    # gradcheck: the service's backward against finite differences of its forward
    assert torch.autograd.gradcheck(layer, (X, Y, *weights))


def test_torch_vector_output_float32_and_integer_inputs(client, torch, gt):
    g = lecture_graph()
    g.tanh(g["q"], name="h")
    layer = gt.function(client, g, "h", inputs=["W", "x"])
    rng = np.random.default_rng(5)
    W = torch.tensor(rng.standard_normal((3, 2)), requires_grad=True)
    x = torch.tensor(rng.standard_normal(2), requires_grad=True)
    seed = torch.tensor(rng.standard_normal(3))
    got = torch.autograd.grad(layer(W, x), (W, x), grad_outputs=seed)
    want = torch.autograd.grad(torch.tanh(W @ x), (W, x), grad_outputs=seed)
    for a, b in zip(got, want, strict=True):
        assert_close(a, b)
    # only what needs a gradient is asked for
    (dx,) = torch.autograd.grad(layer(W.detach(), x), (x,), grad_outputs=seed)
    assert_close(dx, want[1])

    W32, x32 = W.detach().float().requires_grad_(), x.detach().float().requires_grad_()
    value = layer(W32, x32)
    assert value.dtype == torch.float32
    value.backward(seed.float())
    assert W32.grad.dtype == torch.float32
    assert_close(W32.grad, want[0].numpy(), rtol=1e-6)

    g = Graph()
    xs, indices = g.input("x"), g.input("indices")
    g.sum(g.square(g.take(xs, indices)), name="f")
    picking = gt.function(client, g, "f", inputs=["x", "indices"])
    values = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64, requires_grad=True)
    picking(values, torch.tensor([2, 0, 2])).backward()
    assert_close(values.grad, [2.0, 0.0, 12.0])


def test_torch_module_trains_like_plain_torch(client, torch, gt):
    """GraphModule's parameters train step for step as the same nn.Module in plain torch."""
    X, Y, params = mlp_data(seed=6, batch=16)
    module = gt.GraphModule(client, mlp_graph(), "loss", inputs=["X", "Y"], parameters=params)
    assert sorted(name for name, _ in module.named_parameters()) == sorted(
        f"params.{name}" for name in MLP_PARAMS
    )
    plain = torch.nn.ParameterDict(
        {name: torch.nn.Parameter(torch.tensor(value)) for name, value in params.items()}
    )
    X, Y = torch.tensor(X), torch.tensor(Y)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    plain_optimizer = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        plain_optimizer.zero_grad()
        loss = module(X, Y)
        plain_loss = plain_mlp_loss(torch, X, Y, *(plain[name] for name in MLP_PARAMS))
        assert_close(loss.detach(), plain_loss.detach())
        loss.backward()
        plain_loss.backward()
        optimizer.step()
        plain_optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] * 0.9, losses
    for name in MLP_PARAMS:
        assert_close(module.params[name].detach(), plain[name].detach())

    # a name with a dot (as ONNX initializers have) is kept with "_"
    g = Graph()
    w, x = g.input("fc.weight"), g.input("x")
    g.sum(w * x, name="f")
    dotted = gt.GraphModule(client, g, "f", ["x"], {"fc.weight": np.ones(2)})
    dotted(torch.tensor([1.0, 2.0], dtype=torch.float64)).backward()
    assert_close(dotted.params["fc_weight"].grad, [1.0, 2.0])


def test_torch_service_errors_raise_gradient_error(client, torch, gt):
    layer = gt.function(client, lecture_graph(), "f", inputs=["W", "x"])
    W = torch.tensor(LECTURE_W, requires_grad=True)
    with pytest.raises(GradientError) as error:
        layer(W, torch.ones(3, dtype=torch.float64))
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT and error.value.node == "q"
    value = layer(W, torch.tensor(LECTURE_X))
    layer.client = dead_client()  # the server gone between the forward and the backward
    try:
        with pytest.raises(GradientError) as error:
            value.backward()
        assert error.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        layer.client.close()


# --------------------------------------------------------------------- packaging and docs


def test_the_sdk_never_imports_jax_or_torch():
    code = (
        "import pkgutil, sys, importlib, gradient_client\n"
        "for module in pkgutil.iter_modules(gradient_client.__path__):\n"
        "    if module.name not in ('jax', 'torch'):\n"
        "        importlib.import_module('gradient_client.' + module.name)\n"
        "found = sorted(m for m in ('jax', 'jaxlib', 'torch') if m in sys.modules)\n"
        "assert not found, f'gradient_client imported {found}'\n"
        "assert 'gradient_client.onnx' in sys.modules and 'gradient_client.cli' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_layer_modules_import_the_real_packages(jax, torch):
    """gradient_client.jax and gradient_client.torch do not shadow jax and torch."""
    import gradient_client.jax as gj
    import gradient_client.torch as gt

    assert gj.jax is jax and gt.torch is torch
    assert gj.__name__ == "gradient_client.jax" and gt.__name__ == "gradient_client.torch"


def test_readme_documents_the_layers_signatures():
    from test_docs import _assert_documented

    gj = pytest.importorskip("gradient_client.jax", reason=JAX_MISSING)
    _assert_documented("gradient_client.jax.function", gj.function)
    _assert_documented("layer", gj.GraphFunction.__call__)
    gt = pytest.importorskip("gradient_client.torch", reason=TORCH_MISSING)
    _assert_documented("gradient_client.torch.function", gt.function)
    _assert_documented("gradient_client.torch.GraphModule", gt.GraphModule)
    _assert_documented("module", gt.GraphModule.forward)
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "## Using the service inside JAX or PyTorch" in readme


def test_readme_example_prints_what_it_says(server_address, jax, capsys):
    from test_docs import TARGET, _one

    block = _one("gradient_client.jax.function(client, g, output=f")
    exec(compile(block.code.replace(TARGET, server_address), "README.md", "exec"), {})
    value, dx, *rest = capsys.readouterr().out.splitlines()
    assert abs(float(value) - 0.116) < 1e-15
    assert dx == "[-0.112  0.636]"
    assert rest[-1] == "True"
