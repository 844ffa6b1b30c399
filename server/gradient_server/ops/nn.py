"""Neural-network ops: softmax, log_softmax, cross_entropy, conv2d and 2-D pooling.

Convolution and pooling are vectorised with strided window views: the only Python loops run
over kernel positions, never over pixels or batch elements. Each of them has adjoint ops
(conv2d_input_grad / conv2d_weight_grad, avg_pool2d_grad, max_pool2d_grad / max_pool2d_gather)
whose own gradients close over the same set, so second derivatives stay in the table.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..tensor_type import TensorType, float_dtype, promote
from .base import (
    ELEMENT,
    GATHER,
    LOOP_STEP,
    MULTIPLY_ADD,
    AttrSpec,
    Call,
    Emitter,
    GradCall,
    InvalidValue,
    OpDef,
    Ref,
    ShapeError,
    normalize_axis,
    pass_cost,
    register,
    strided_cost,
)
from .reductions import _logsumexp

# ---------------------------------------------------------------------------------------------
# Softmax family


def _axis_attr(default: int = -1) -> AttrSpec:
    return AttrSpec("axis", "int", default, "The class axis.")


def _float_same_shape(name: str):
    def infer(attrs, x: TensorType) -> TensorType:
        if not x.shape:
            raise ShapeError(f"{name} needs at least one axis")
        normalize_axis(attrs["axis"], len(x.shape))
        return TensorType(float_dtype(x.dtype), x.shape, x.weak)

    return infer


def _log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    return x - _logsumexp(x, axis=axis, keepdims=True)


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    # Shifting by the maximum keeps exp in range and is exact (unlike exp(log_softmax)).
    if x.shape[axis] == 0:
        return x.copy()
    shift = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - np.where(np.isfinite(shift), shift, 0))
    return e / np.sum(e, axis=axis, keepdims=True)


def _softmax_grad(b: Emitter, call: GradCall, g: Ref):
    # softmax' g = s * (g - sum(g * s)) along the axis.
    s = call.out
    total = b.sum(b.mul(g, s), axis=call.attrs["axis"], keepdims=True)
    return (b.mul(s, b.sub(g, total)),)


def _log_softmax_grad(b: Emitter, call: GradCall, g: Ref):
    # log_softmax' g = g - softmax(x) * sum(g) along the axis, with softmax = exp(out).
    total = b.sum(g, axis=call.attrs["axis"], keepdims=True)
    return (b.sub(g, b.mul(b.exp(call.out), total)),)


register(
    OpDef(
        "softmax",
        "exp(x) / sum(exp(x)) along an axis, computed without overflow.",
        ("x",),
        _float_same_shape("softmax"),
        lambda call, x: _softmax(x.astype(call.type.dtype, copy=False), call.attrs["axis"]),
        _softmax_grad,
        attrs=(_axis_attr(),),
        cost=pass_cost(3, 1),  # a max, a subtraction, an exp, a sum and a division
    )
)
register(
    OpDef(
        "log_softmax",
        "x - logsumexp(x) along an axis, computed without overflow.",
        ("x",),
        _float_same_shape("log_softmax"),
        lambda call, x: _log_softmax(x.astype(call.type.dtype, copy=False), call.attrs["axis"]),
        _log_softmax_grad,
        attrs=(_axis_attr(),),
        cost=pass_cost(3, 1),  # logsumexp (a max, a subtraction, an exp, a sum), a subtraction
    )
)


_REDUCTIONS = ("mean", "sum", "none")


def _cross_entropy_infer(attrs, logits: TensorType, labels: TensorType) -> TensorType:
    if len(logits.shape) < 1:
        raise ShapeError("logits need a class axis")
    if labels.dtype.kind == "f":
        if labels.shape != logits.shape:
            raise ShapeError(
                f"float labels (class probabilities) {list(labels.shape)} must have the "
                f"logits' shape {list(logits.shape)}"
            )
        dtype = np.result_type(float_dtype(logits.dtype), labels.dtype)
    elif labels.dtype.kind == "i":
        if logits.shape[:-1] != labels.shape:
            raise ShapeError(
                f"logits {list(logits.shape)} must be labels' shape {list(labels.shape)} plus "
                "a class axis"
            )
        dtype = float_dtype(logits.dtype)
    else:
        raise ShapeError(
            "labels must be int32 or int64 class indices or float class probabilities, got "
            f"{labels.dtype.name}"
        )
    if attrs["reduction"] not in _REDUCTIONS:
        raise ShapeError(f"reduction must be one of {', '.join(_REDUCTIONS)}")
    smoothing = attrs["label_smoothing"]
    if not 0.0 <= smoothing <= 1.0:
        raise ShapeError(f"label_smoothing must be in [0, 1], got {smoothing}")
    shape = logits.shape[:-1] if attrs["reduction"] == "none" else ()
    return TensorType(dtype, shape)


def _cross_entropy_forward(call: Call, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    dtype = call.type.dtype
    classes = logits.shape[-1]
    smoothing = call.attrs["label_smoothing"]
    log_p = _log_softmax(logits.astype(dtype, copy=False), -1)
    if labels.dtype.kind == "f":
        # Class probabilities, smoothed towards the uniform distribution.
        target = labels.astype(dtype, copy=False)
        losses = -np.sum(target * log_p, axis=-1)
        if smoothing:
            uniform = -np.sum(log_p, axis=-1) / classes
            losses = (1 - smoothing) * losses + smoothing * uniform
    else:
        if labels.size and (labels.min() < 0 or labels.max() >= classes):
            bad = labels[(labels < 0) | (labels >= classes)].flat[0]
            raise InvalidValue(f"label {bad} is out of range for {classes} classes")
        losses = -np.take_along_axis(log_p, labels[..., None].astype(np.intp), axis=-1)[..., 0]
        if smoothing:
            uniform = -np.sum(log_p, axis=-1) / classes
            losses = (1 - smoothing) * losses + smoothing * uniform
    losses = np.asarray(losses, dtype)
    reduction = call.attrs["reduction"]
    if reduction == "mean":
        return np.mean(losses) if losses.size else np.array(np.nan, dtype)
    return np.sum(losses) if reduction == "sum" else losses


def _cross_entropy_grad(b: Emitter, call: GradCall, g: Ref):
    # With q the (smoothed) target distribution, loss = -sum(q * log_softmax(logits)):
    # d/dlogits = (softmax(logits) * sum(q) - q) * g and, for float labels p, whose q is
    # (1 - e) * p + e / classes, d/dp = -(1 - e) * log_softmax(logits) * g (per row of g,
    # over the number of rows for "mean").
    logits, labels = call.inputs
    classes = logits.shape[-1]
    smoothing = call.attrs["label_smoothing"]
    probabilities = b.softmax(logits, axis=-1)
    upstream = g if call.attrs["reduction"] != "none" else b.expand_dims(g, axis=[-1])
    if call.attrs["reduction"] == "mean":
        upstream = b.div(upstream, max(int(np.prod(logits.shape[:-1])), 1))
    if labels.dtype.kind == "f":
        target = labels
        if smoothing:
            target = b.add(b.mul(labels, 1.0 - smoothing), smoothing / classes)
        total = b.sum(target, axis=[-1], keepdims=True)
        logits_grad = b.mul(b.sub(b.mul(probabilities, total), target), upstream)
        labels_grad = b.mul(b.log_softmax(logits, axis=-1), b.mul(upstream, smoothing - 1.0))
        return logits_grad, labels_grad
    target = b.one_hot(labels, depth=classes, dtype=probabilities.dtype.name)
    if smoothing:
        target = b.add(b.mul(target, 1.0 - smoothing), smoothing / classes)
    return b.mul(b.sub(probabilities, target), upstream), None


register(
    OpDef(
        "cross_entropy",
        "Softmax cross-entropy of logits (..., classes), computed without overflow, against "
        "labels that are either int class indices (...) or float class probabilities of the "
        "logits' shape (as torch.nn.functional.cross_entropy); the loss of a row is "
        "-sum(q * log_softmax(logits)) with q the target distribution, smoothed to "
        "(1 - label_smoothing) * q + label_smoothing / classes. The mean divides by the "
        "number of rows. Gradients flow to float labels.",
        ("logits", "labels"),
        _cross_entropy_infer,
        _cross_entropy_forward,
        _cross_entropy_grad,
        differentiable=(True, True),
        attrs=(
            AttrSpec("reduction", "string", "mean", "mean, sum or none."),
            AttrSpec(
                "label_smoothing",
                "float",
                0.0,
                "In [0, 1]: the weight of the uniform distribution mixed into the target.",
            ),
        ),
        # The labels checked (or multiplied in), log_softmax over the logits, a gather or a
        # product and a reduction, and a sum over the classes when smoothing; its passes count
        # on the logits, much larger than the result.
        cost=lambda call: pass_cost(9 + 2 * (call.attrs["label_smoothing"] != 0.0), 1)(call),
    )
)


# ---------------------------------------------------------------------------------------------
# Windows


def _pair(value: tuple[int, ...], what: str) -> tuple[int, int]:
    if len(value) == 1:
        return value[0], value[0]
    if len(value) == 2:
        return value[0], value[1]
    raise ShapeError(f"{what} must be an int or a pair, got {list(value)}")


_MAX_GEOMETRY = 1 << 20
"""Largest kernel, stride, padding or dilation (beyond it, only the limits would answer)."""

_MAX_KERNEL_AREA = 1 << 16
"""Most kernel positions: the window ops loop over kernel positions (each step vectorised over
the batch, channels and pixels), so this bounds their Python-level work."""


def _geometry(attrs, kernel: tuple[int, int]):
    stride = _pair(attrs["stride"] or kernel, "stride")
    padding = _pair(attrs["padding"], "padding")
    dilation = _pair(attrs.get("dilation") or (1,), "dilation")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0 or min(kernel) < 1:
        raise ShapeError("kernel, stride and dilation must be >= 1 and padding >= 0")
    if max(*stride, *dilation, *padding, *kernel) > _MAX_GEOMETRY:
        raise ShapeError(f"kernel, stride, padding and dilation must be at most {_MAX_GEOMETRY}")
    if kernel[0] * kernel[1] > _MAX_KERNEL_AREA:
        raise ShapeError(
            f"the kernel has {kernel[0] * kernel[1]} positions; the most is {_MAX_KERNEL_AREA} "
            "(for a global average over large images, use mean over the spatial axes)"
        )
    return stride, padding, dilation


def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _windows(x: np.ndarray, kernel, stride, padding, dilation, fill=0.0) -> np.ndarray:
    """(N, C, Ho, Wo, kh, kw) strided view of the windows of a padded NCHW array."""
    (ph, pw), (dh, dw), (sh, sw) = padding, dilation, stride
    if ph or pw:
        x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=fill)
    span = (dh * (kernel[0] - 1) + 1, dw * (kernel[1] - 1) + 1)
    view = sliding_window_view(x, span, axis=(2, 3))
    return view[:, :, ::sh, ::sw, ::dh, ::dw]


def _scatter_windows(
    contributions: np.ndarray, shape, kernel, stride, padding, dilation
) -> np.ndarray:
    """The adjoint of _windows: add (N, C, Ho, Wo, kh, kw) window values back into NCHW."""
    n, c, h, w = shape
    (ph, pw), (dh, dw), (sh, sw) = padding, dilation, stride
    ho, wo = contributions.shape[2:4]
    out = np.zeros((n, c, h + 2 * ph, w + 2 * pw), contributions.dtype)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            rows = slice(i * dh, i * dh + sh * (ho - 1) + 1, sh)
            cols = slice(j * dw, j * dw + sw * (wo - 1) + 1, sw)
            out[:, :, rows, cols] += contributions[:, :, :, :, i, j]
    return out[:, :, ph : ph + h, pw : pw + w]


def _check_nchw(x: TensorType, what: str) -> None:
    if len(x.shape) != 4:
        raise ShapeError(f"{what} must be 4-D (N, C, H, W), got {list(x.shape)}")


def _spatial_out(x_shape, kernel, stride, padding, dilation) -> tuple[int, int]:
    out = tuple(
        _out_size(x_shape[2 + k], kernel[k], stride[k], padding[k], dilation[k]) for k in (0, 1)
    )
    if min(out) < 1:
        raise ShapeError(
            f"the kernel {list(kernel)} (dilation {list(dilation)}) does not fit the padded "
            f"input {list(x_shape)}"
        )
    return out


def _unfolded_bytes(shape: tuple[int, ...], out_shape: tuple[int, ...], kernel, itemsize: int):
    """Bytes of the (N, C, Ho, Wo, kh, kw) windows of an NCHW input, once made contiguous."""
    n, c = shape[:2]
    return n * c * out_shape[2] * out_shape[3] * kernel[0] * kernel[1] * itemsize


def _padded_bytes(shape: tuple[int, ...], padding, itemsize: int) -> int:
    """Bytes of a padded copy of an NCHW array."""
    n, c, h, w = shape
    return n * c * (h + 2 * padding[0]) * (w + 2 * padding[1]) * itemsize


def _conv_workspace(call: Call) -> int:
    # The padded input and its unfolded windows.
    x, w = call.input_types
    itemsize = call.type.dtype.itemsize
    padding = _pair(call.attrs["padding"], "padding")
    unfolded = _unfolded_bytes(x.shape, call.type.shape, w.shape[2:], itemsize)
    return _padded_bytes(x.shape, padding, itemsize) + unfolded


def _conv_input_grad_workspace(call: Call) -> int:
    # The windows' contributions and the padded result they are added into.
    g, w = call.input_types
    itemsize = call.type.dtype.itemsize
    padding = _pair(call.attrs["padding"], "padding")
    unfolded = _unfolded_bytes(call.type.shape, g.shape, w.shape[2:], itemsize)
    return _padded_bytes(call.type.shape, padding, itemsize) + unfolded


def _conv_weight_grad_workspace(call: Call) -> int:
    x, g = call.input_types
    itemsize = call.type.dtype.itemsize
    padding = _pair(call.attrs["padding"], "padding")
    unfolded = _unfolded_bytes(x.shape, g.shape, call.type.shape[2:], itemsize)
    return _padded_bytes(x.shape, padding, itemsize) + unfolded


def _pool_workspace(call: Call) -> int:
    # The padded input; the window reductions read it through a strided view.
    x = call.input_types[0]
    padding = _pair(call.attrs["padding"], "padding")
    return _padded_bytes(x.shape, padding, call.type.dtype.itemsize)


def _avg_pool_grad_workspace(call: Call) -> int:
    # The padded result the windows' shares are added into.
    padding = _pair(call.attrs["padding"], "padding")
    return _padded_bytes(call.type.shape, padding, call.type.dtype.itemsize)


def _max_pool_grad_workspace(call: Call) -> int:
    # Padded copies of x and of the result, and the routing weights of every window (a bool
    # mask and its float shares).
    x = call.input_types[0]
    itemsize = call.type.dtype.itemsize
    padding = _pair(call.attrs["padding"], "padding")
    out_shape = _pool_infer(call.attrs, TensorType(x.dtype, x.shape)).shape
    kernel = _pair(call.attrs["kernel"], "kernel")
    routing = _unfolded_bytes(x.shape, out_shape, kernel, itemsize + 1)
    return 2 * _padded_bytes(x.shape, padding, itemsize) + routing


# Costs (see the cost section of ops/base.py). The windows of an NCHW array are read in runs
# of a kernel row (kw elements, or 1 when dilated); a result gathered across channels, or
# windows added back at a stride, touch one element a cache line.

WINDOW_REDUCE = 5000
"""Flops charged per result of a reduction over windows (a max, mean or sum over the two small
strided kernel axes of a window view): numpy's iterator takes some 80 ns per result."""


def _window_counts(
    x_shape: tuple[int, ...], out_hw: tuple[int, ...], kernel, padding
) -> tuple[int, int]:
    """The elements of the (N, C, Ho, Wo, kh, kw) windows of an NCHW array, and of its padded
    copy."""
    n, c, h, w = x_shape
    unfolded = n * c * out_hw[0] * out_hw[1] * kernel[0] * kernel[1]
    return unfolded, n * c * (h + 2 * padding[0]) * (w + 2 * padding[1])


def _run(kernel, dilation) -> int:
    """Consecutive elements of a window's row in memory."""
    return kernel[1] if dilation[1] == 1 else 1


def _scatter_cost(unfolded: int, kernel, stride) -> int:
    """Windows' values added back into an array: a Python step per kernel position, each
    adding into every stride-th element."""
    return LOOP_STEP * kernel[0] * kernel[1] + strided_cost(unfolded, max(1, 8 // stride[1]))


def _conv_parts(call: Call, x_shape, g_shape, w_shape):
    """Multiply-adds, window elements, padded elements and the window geometry of a conv2d
    of an x, a w and a result g of these shapes."""
    kernel = w_shape[2:]
    stride, padding, dilation = _conv_geometry(call.attrs, w_shape)
    unfolded, padded = _window_counts(x_shape, g_shape[2:], kernel, padding)
    return unfolded * w_shape[0], unfolded, padded, kernel, stride, dilation


def _conv_cost(call: Call) -> int:
    # The padded copy; the windows copied out for the product (in runs of a kernel row); the
    # product; the result moved from NHWC to NCHW (a gather across channels).
    x, w = call.input_types
    macs, unfolded, padded, kernel, _, dilation = _conv_parts(
        call, x.shape, call.type.shape, w.shape
    )
    return (
        MULTIPLY_ADD * macs
        + strided_cost(unfolded, _run(kernel, dilation))
        + GATHER * call.type.size
        + ELEMENT * (x.size + w.size + 2 * padded)
    )


def _conv_input_grad_cost(call: Call) -> int:
    # g moved to NHWC (a gather), the product written as windows, which are then read across
    # channels and added back at the stride, kernel position by kernel position.
    g, w = call.input_types
    macs, unfolded, padded, kernel, stride, _ = _conv_parts(call, call.type.shape, g.shape, w.shape)
    return (
        MULTIPLY_ADD * macs
        + GATHER * g.size
        + (2 * ELEMENT + GATHER) * unfolded
        + _scatter_cost(unfolded, kernel, stride)
        + ELEMENT * (w.size + 2 * padded)
    )


def _conv_weight_grad_cost(call: Call) -> int:
    # The padded copy of x, its windows copied out for the product, g rearranged, the product.
    x, g = call.input_types
    macs, unfolded, padded, kernel, _, dilation = _conv_parts(
        call, x.shape, g.shape, call.type.shape
    )
    return (
        MULTIPLY_ADD * macs
        + strided_cost(unfolded, _run(kernel, dilation))
        + ELEMENT * (x.size + 2 * padded + 3 * g.size + 2 * call.type.size)
    )


def _window_reduction_cost(results: int, unfolded: int, kernel, dilation) -> int:
    return WINDOW_REDUCE * results + strided_cost(unfolded, _run(kernel, dilation))


def _pool_cost(call: Call) -> int:
    # The padded copy and a reduction over its windows.
    x = call.input_types[0]
    kernel, _, padding, dilation = _pool_geometry(call.attrs)
    unfolded, padded = _window_counts(x.shape, call.type.shape[2:], kernel, padding)
    return _window_reduction_cost(call.type.size, unfolded, kernel, dilation) + ELEMENT * (
        x.size + 2 * padded + 2 * call.type.size
    )


def _avg_pool_grad_cost(call: Call) -> int:
    # Each window's share, spread back kernel position by kernel position.
    g = call.input_types[0]
    kernel, stride, padding, _ = _pool_geometry(call.attrs)
    unfolded, padded = _window_counts(call.type.shape, g.shape[2:], kernel, padding)
    return ELEMENT * (3 * g.size + unfolded + 2 * padded) + _scatter_cost(unfolded, kernel, stride)


def _routing_cost(call: Call, x: TensorType, pooled: TensorType) -> tuple[int, int]:
    """The cost of _routing over x's padded windows (two window reductions and four passes
    over the windows) and the number of window elements."""
    kernel, _, padding, dilation = _pool_geometry(call.attrs)
    unfolded, padded = _window_counts(x.shape, pooled.shape[2:], kernel, padding)
    reductions = 2 * _window_reduction_cost(pooled.size, unfolded, kernel, dilation)
    return reductions + ELEMENT * (12 * unfolded + 2 * padded), unfolded


def _max_pool_grad_cost(call: Call) -> int:
    # The routing, times g, added back kernel position by kernel position into zeros.
    x, g = call.input_types
    routing, unfolded = _routing_cost(call, x, g)
    kernel, stride, padding, _ = _pool_geometry(call.attrs)
    padded = _window_counts(x.shape, g.shape[2:], kernel, padding)[1]
    return (
        routing
        + GATHER * unfolded
        + _scatter_cost(unfolded, kernel, stride)
        + ELEMENT * (2 * padded + 3 * x.size)
    )


def _max_pool_gather_cost(call: Call) -> int:
    # The routing, times u's windows, summed over each window.
    x, u = call.input_types
    routing, unfolded = _routing_cost(call, x, call.type)
    kernel, _, padding, dilation = _pool_geometry(call.attrs)
    padded = _window_counts(x.shape, call.type.shape[2:], kernel, padding)[1]
    reduction = _window_reduction_cost(call.type.size, unfolded, kernel, dilation)
    return routing + reduction + ELEMENT * (u.size + 2 * padded + 3 * call.type.size)


# ---------------------------------------------------------------------------------------------
# Convolution


def _conv_attrs() -> tuple[AttrSpec, ...]:
    return (
        AttrSpec("stride", "ints", (1,), "Stride: an int or a (height, width) pair."),
        AttrSpec("padding", "ints", (0,), "Zero padding on each side: an int or a pair."),
        AttrSpec("dilation", "ints", (1,), "Spacing of kernel elements: an int or a pair."),
    )


def _conv_geometry(attrs, w_shape):
    return _geometry(attrs, (w_shape[2], w_shape[3]))


def _conv2d_infer(attrs, x: TensorType, w: TensorType) -> TensorType:
    _check_nchw(x, "input")
    _check_nchw(w, "weight (O, C, kh, kw)")
    if x.shape[1] != w.shape[1]:
        raise ShapeError(f"input has {x.shape[1]} channels but the weight expects {w.shape[1]}")
    stride, padding, dilation = _conv_geometry(attrs, w.shape)
    ho, wo = _spatial_out(x.shape, w.shape[2:], stride, padding, dilation)
    dtype, weak = promote(x, w)
    if dtype.kind != "f":
        raise ShapeError("conv2d takes float operands")
    return TensorType(dtype, (x.shape[0], w.shape[0], ho, wo), weak)


def _conv2d_forward(call: Call, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    dtype = call.type.dtype
    x, w = x.astype(dtype, copy=False), w.astype(dtype, copy=False)
    windows = _windows(x, w.shape[2:], *_conv_geometry(call.attrs, w.shape))
    # (N, C, Ho, Wo, kh, kw) . (O, C, kh, kw) -> (N, Ho, Wo, O) -> NCHW
    out = np.tensordot(windows, w, axes=([1, 4, 5], [1, 2, 3]))
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def _geometry_attrs(attrs) -> dict:
    return {"stride": attrs["stride"], "padding": attrs["padding"], "dilation": attrs["dilation"]}


def _conv2d_grad(b: Emitter, call: GradCall, g: Ref):
    x, w = call.inputs
    geometry = _geometry_attrs(call.attrs)
    return (
        b.conv2d_input_grad(g, w, input_shape=list(x.shape), **geometry),
        b.conv2d_weight_grad(x, g, weight_shape=list(w.shape), **geometry),
    )


register(
    OpDef(
        "conv2d",
        "2-D cross-correlation of NCHW input with OIHW weight (as torch.nn.functional.conv2d; "
        "add a bias with add).",
        ("x", "w"),
        _conv2d_infer,
        _conv2d_forward,
        _conv2d_grad,
        attrs=_conv_attrs(),
        workspace=_conv_workspace,
        cost=_conv_cost,
    )
)


def _conv2d_input_grad_infer(attrs, g: TensorType, w: TensorType) -> TensorType:
    shape = tuple(attrs["input_shape"])
    expected = _conv2d_infer(attrs, TensorType(g.dtype, shape), w)
    if expected.shape != g.shape:
        raise ShapeError(f"gradient {list(g.shape)} does not match conv2d output {expected}")
    return TensorType(promote(g, w)[0], shape)


def _conv2d_input_grad_forward(call: Call, g: np.ndarray, w: np.ndarray) -> np.ndarray:
    dtype = call.type.dtype
    g, w = g.astype(dtype, copy=False), w.astype(dtype, copy=False)
    # Each output pixel's gradient spreads over its window: (N, O, Ho, Wo) . (O, C, kh, kw).
    contributions = np.tensordot(g, w, axes=([1], [0])).transpose(0, 3, 1, 2, 4, 5)
    return _scatter_windows(
        contributions, call.type.shape, w.shape[2:], *_conv_geometry(call.attrs, w.shape)
    )


def _conv2d_input_grad_grad(b: Emitter, call: GradCall, u: Ref):
    # conv2d_input_grad is bilinear in (g, w) and the adjoint of conv2d in x.
    g, w = call.inputs
    geometry = _geometry_attrs(call.attrs)
    return (
        b.conv2d(u, w, **geometry),
        b.conv2d_weight_grad(u, g, weight_shape=list(w.shape), **geometry),
    )


register(
    OpDef(
        "conv2d_input_grad",
        "Gradient of conv2d with respect to its input, given the output gradient and weight "
        "(a transposed convolution).",
        ("g", "w"),
        _conv2d_input_grad_infer,
        _conv2d_input_grad_forward,
        _conv2d_input_grad_grad,
        attrs=(AttrSpec("input_shape", "ints", doc="Shape of conv2d's input."), *_conv_attrs()),
        workspace=_conv_input_grad_workspace,
        cost=_conv_input_grad_cost,
    )
)


def _conv2d_weight_grad_infer(attrs, x: TensorType, g: TensorType) -> TensorType:
    shape = tuple(attrs["weight_shape"])
    expected = _conv2d_infer(attrs, x, TensorType(x.dtype, shape))
    if expected.shape != g.shape:
        raise ShapeError(f"gradient {list(g.shape)} does not match conv2d output {expected}")
    return TensorType(promote(x, g)[0], shape)


def _conv2d_weight_grad_forward(call: Call, x: np.ndarray, g: np.ndarray) -> np.ndarray:
    dtype = call.type.dtype
    x, g = x.astype(dtype, copy=False), g.astype(dtype, copy=False)
    shape = call.type.shape
    windows = _windows(x, shape[2:], *_conv_geometry(call.attrs, shape))
    # (N, O, Ho, Wo) . (N, C, Ho, Wo, kh, kw) over N, Ho, Wo -> (O, C, kh, kw)
    return np.tensordot(g, windows, axes=([0, 2, 3], [0, 2, 3]))


def _conv2d_weight_grad_grad(b: Emitter, call: GradCall, u: Ref):
    x, g = call.inputs
    geometry = _geometry_attrs(call.attrs)
    return (
        b.conv2d_input_grad(g, u, input_shape=list(x.shape), **geometry),
        b.conv2d(x, u, **geometry),
    )


register(
    OpDef(
        "conv2d_weight_grad",
        "Gradient of conv2d with respect to its weight, given the input and output gradient.",
        ("x", "g"),
        _conv2d_weight_grad_infer,
        _conv2d_weight_grad_forward,
        _conv2d_weight_grad_grad,
        attrs=(AttrSpec("weight_shape", "ints", doc="Shape of conv2d's weight."), *_conv_attrs()),
        workspace=_conv_weight_grad_workspace,
        cost=_conv_weight_grad_cost,
    )
)


# ---------------------------------------------------------------------------------------------
# Pooling


def _pool_attrs() -> tuple[AttrSpec, ...]:
    return (
        AttrSpec("kernel", "ints", doc="Window size: an int or a (height, width) pair."),
        AttrSpec("stride", "ints", None, "Stride: an int or a pair; default the kernel size."),
        AttrSpec("padding", "ints", (0,), "Padding on each side: an int or a pair."),
    )


def _pool_geometry(attrs):
    kernel = _pair(attrs["kernel"], "kernel")
    stride, padding, dilation = _geometry(attrs, kernel)
    if padding[0] * 2 > kernel[0] or padding[1] * 2 > kernel[1]:
        raise ShapeError("padding must be at most half the kernel size")
    return kernel, stride, padding, dilation


def _pool_infer(attrs, x: TensorType) -> TensorType:
    _check_nchw(x, "input")
    kernel, stride, padding, dilation = _pool_geometry(attrs)
    ho, wo = _spatial_out(x.shape, kernel, stride, padding, dilation)
    if x.dtype.kind != "f":
        raise ShapeError("pooling takes float input")
    return TensorType(x.dtype, (*x.shape[:2], ho, wo), x.weak)


def _pool_attr_values(attrs) -> dict:
    return {"kernel": attrs["kernel"], "stride": attrs["stride"], "padding": attrs["padding"]}


def _avg_pool_forward(call: Call, x: np.ndarray) -> np.ndarray:
    kernel, stride, padding, dilation = _pool_geometry(call.attrs)
    # Padding counts as zeros in the average (PyTorch's count_include_pad=True default).
    windows = _windows(x, kernel, stride, padding, dilation)
    return windows.mean(axis=(4, 5), dtype=x.dtype)


register(
    OpDef(
        "avg_pool2d",
        "Average over 2-D windows of NCHW input; padding counts as zeros.",
        ("x",),
        _pool_infer,
        _avg_pool_forward,
        lambda b, call, g: (
            b.avg_pool2d_grad(
                g, input_shape=list(call.inputs[0].shape), **_pool_attr_values(call.attrs)
            ),
        ),
        attrs=_pool_attrs(),
        workspace=_pool_workspace,
        cost=_pool_cost,
    )
)


def _avg_pool_grad_infer(attrs, g: TensorType) -> TensorType:
    shape = tuple(attrs["input_shape"])
    expected = _pool_infer(attrs, TensorType(g.dtype, shape))
    if expected.shape != g.shape:
        raise ShapeError(f"gradient {list(g.shape)} does not match avg_pool2d output {expected}")
    return TensorType(g.dtype, shape, g.weak)


def _avg_pool_grad_forward(call: Call, g: np.ndarray) -> np.ndarray:
    kernel, stride, padding, dilation = _pool_geometry(call.attrs)
    share = g / (kernel[0] * kernel[1])
    contributions = np.broadcast_to(share[..., None, None], (*g.shape, *kernel))
    return _scatter_windows(contributions, call.type.shape, kernel, stride, padding, dilation)


register(
    OpDef(
        "avg_pool2d_grad",
        "Gradient of avg_pool2d with respect to its input (each window's share spread back).",
        ("g",),
        _avg_pool_grad_infer,
        _avg_pool_grad_forward,
        lambda b, call, u: (b.avg_pool2d(u, **_pool_attr_values(call.attrs)),),
        attrs=(AttrSpec("input_shape", "ints", doc="Shape of avg_pool2d's input."), *_pool_attrs()),
        workspace=_avg_pool_grad_workspace,
        cost=_avg_pool_grad_cost,
    )
)


def _max_windows(call: Call, x: np.ndarray):
    kernel, stride, padding, dilation = _pool_geometry(call.attrs)
    windows = _windows(x, kernel, stride, padding, dilation, fill=-np.inf)
    return windows, (kernel, stride, padding, dilation)


def _max_pool_forward(call: Call, x: np.ndarray) -> np.ndarray:
    windows, _ = _max_windows(call, x)
    return windows.max(axis=(4, 5))


def _routing(windows: np.ndarray) -> np.ndarray:
    """Each window's share of its gradient: 1/k on its k tied maxima, 0 elsewhere."""
    winners = windows == windows.max(axis=(4, 5), keepdims=True)
    return winners / winners.sum(axis=(4, 5), keepdims=True)


register(
    OpDef(
        "max_pool2d",
        "Maximum over 2-D windows of NCHW input; tied maxima share the gradient evenly.",
        ("x",),
        _pool_infer,
        _max_pool_forward,
        lambda b, call, g: (b.max_pool2d_grad(call.inputs[0], g, **_pool_attr_values(call.attrs)),),
        attrs=_pool_attrs(),
        workspace=_pool_workspace,
        cost=_pool_cost,
    )
)


def _max_pool_grad_infer(attrs, x: TensorType, g: TensorType) -> TensorType:
    expected = _pool_infer(attrs, x)
    if expected.shape != g.shape:
        raise ShapeError(f"gradient {list(g.shape)} does not match max_pool2d output {expected}")
    return TensorType(promote(x, g)[0], x.shape)


def _max_pool_grad_forward(call: Call, x: np.ndarray, g: np.ndarray) -> np.ndarray:
    windows, geometry = _max_windows(call, x)
    contributions = _routing(windows) * g[..., None, None]
    return _scatter_windows(contributions, x.shape, *geometry).astype(call.type.dtype)


register(
    OpDef(
        "max_pool2d_grad",
        "Gradient of max_pool2d with respect to its input x, given the output gradient g.",
        ("x", "g"),
        _max_pool_grad_infer,
        _max_pool_grad_forward,
        # Linear in g; the routing is piecewise constant in x, so x gets no gradient.
        lambda b, call, u: (
            None,
            b.max_pool2d_gather(call.inputs[0], u, **_pool_attr_values(call.attrs)),
        ),
        differentiable=(False, True),
        attrs=_pool_attrs(),
        workspace=_max_pool_grad_workspace,
        cost=_max_pool_grad_cost,
    )
)


def _max_pool_gather_infer(attrs, x: TensorType, u: TensorType) -> TensorType:
    if u.shape != x.shape:
        raise ShapeError(f"u {list(u.shape)} must have x's shape {list(x.shape)}")
    out = _pool_infer(attrs, x)
    return TensorType(promote(x, u)[0], out.shape)


def _max_pool_gather_forward(call: Call, x: np.ndarray, u: np.ndarray) -> np.ndarray:
    windows, geometry = _max_windows(call, x)
    u_windows = _windows(u.astype(call.type.dtype, copy=False), *geometry)
    return (_routing(windows) * u_windows).sum(axis=(4, 5)).astype(call.type.dtype)


register(
    OpDef(
        "max_pool2d_gather",
        "The adjoint of max_pool2d_grad in g: each window's tied maxima of x pick their "
        "share of u.",
        ("x", "u"),
        _max_pool_gather_infer,
        _max_pool_gather_forward,
        lambda b, call, v: (
            None,
            b.max_pool2d_grad(call.inputs[0], v, **_pool_attr_values(call.attrs)),
        ),
        differentiable=(False, True),
        attrs=_pool_attrs(),
        workspace=_max_pool_grad_workspace,
        cost=_max_pool_gather_cost,
    )
)
