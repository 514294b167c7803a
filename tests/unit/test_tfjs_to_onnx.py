"""The TF.js graph → ONNX converter, op by op, on small graphs written here and checked against numpy.

The whole detector is checked against TensorFlow.js itself by
tests/integration/test_detector_conversion.py; these pin each op's translation (layout,
padding, rounding of integer division, masks of StridedSlice) on inputs that reach the
corners the detector's graph may not (odd sizes, negative numbers).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from models import tfjs_to_onnx

ort = pytest.importorskip("onnxruntime")
RNG = np.random.default_rng(25)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def attrs(**values: object) -> dict:
    """TF.js-JSON attributes from Python values."""
    out: dict = {}
    for key, value in values.items():
        if isinstance(value, bool):
            out[key] = {"b": value}
        elif isinstance(value, int):
            out[key] = {"i": str(value)}
        elif isinstance(value, str) and value.startswith("DT_"):
            out[key] = {"type": value}
        elif isinstance(value, str):
            out[key] = {"s": b64(value)}
        elif isinstance(value, list) and value and isinstance(value[0], str):
            out[key] = {"list": {"s": [b64(v) for v in value]}}
        elif isinstance(value, list):
            out[key] = {"list": {"i": [str(v) for v in value]}}
    return out


class Graph:
    """A TF.js graph model being written: nodes, constants (float ones stored as float16)."""

    def __init__(self, shape: list[int], dtype: str = "DT_FLOAT"):
        self.nodes: list[dict] = [
            {
                "name": "x",
                "op": "Placeholder",
                "attr": {"shape": {"shape": {"dim": [{"size": str(d)} for d in shape]}}, "dtype": {"type": dtype}},
            }
        ]
        self.weights: dict[str, np.ndarray] = {}

    def const(self, name: str, value: np.ndarray) -> str:
        self.nodes.append({"name": name, "op": "Const", "attr": {}})
        self.weights[name] = value
        return name

    def op(self, name: str, op: str, inputs: list[str], **attr: object) -> str:
        self.nodes.append({"name": name, "op": op, "input": inputs, "attr": attrs(**attr)})
        return name

    def write(self, folder: Path, outputs: list[str]) -> Path:
        specs, blobs = [], []
        for name, value in self.weights.items():
            dtype = "int32" if value.dtype == np.int32 else "float32"
            spec = {"name": name, "shape": list(value.shape), "dtype": dtype}
            if value.dtype == np.int32:
                blobs.append(value.astype("<i4").tobytes())
            else:
                spec["quantization"] = {"dtype": "float16", "original_dtype": "float32"}
                blobs.append(value.astype("<f2").tobytes())
            specs.append(spec)
        (folder / "w.bin").write_bytes(b"".join(blobs))
        signature = {"outputs": {name: {"name": name, "dtype": "DT_FLOAT"} for name in outputs}}
        graph = {
            "format": "graph-model",
            "signature": signature,
            "modelTopology": {"node": self.nodes},
            "weightsManifest": [{"paths": ["w.bin"], "weights": specs}],
        }
        path = folder / "model.json"
        path.write_text(json.dumps(graph))
        return path

    def run(self, folder: Path, x: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        onnx_path = folder / "model.onnx"
        tfjs_to_onnx.convert(self.write(folder, outputs), onnx_path)
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        return session.run(outputs, {"x": x})


def f16(a: np.ndarray) -> np.ndarray:
    """What a float16-quantised weight holds once read back."""
    return a.astype(np.float16).astype(np.float32)


def same_pad(size: int, k: int, stride: int) -> tuple[int, int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return out, total // 2, total - total // 2


def conv_ref(x: np.ndarray, w: np.ndarray, stride: int, depthwise: bool = False) -> np.ndarray:
    """TF's NHWC convolution with SAME padding (w: HWIO, or H W C M for depthwise)."""
    _, h, wd, c = x.shape
    kh, kw = w.shape[:2]
    oh, t, b = same_pad(h, kh, stride)
    ow, left, right = same_pad(wd, kw, stride)
    xp = np.pad(x, ((0, 0), (t, b), (left, right), (0, 0)))
    out = np.zeros((1, oh, ow, c * w.shape[3] if depthwise else w.shape[3]), np.float64)
    for i in range(oh):
        for j in range(ow):
            patch = xp[0, i * stride : i * stride + kh, j * stride : j * stride + kw, :]
            if depthwise:
                out[0, i, j] = np.einsum("hwc,hwcm->cm", patch, w).reshape(-1)
            else:
                out[0, i, j] = np.einsum("hwc,hwco->o", patch, w)
    return out.astype(np.float32)


def test_fused_convolutions_with_same_padding_on_odd_sizes(tmp_path):
    x = RNG.normal(size=(1, 7, 9, 3)).astype(np.float32)
    w = RNG.normal(size=(3, 3, 3, 4)).astype(np.float32)
    bias = RNG.normal(size=(4,)).astype(np.float32)
    dw = RNG.normal(size=(3, 3, 4, 2)).astype(np.float32)
    dbias = RNG.normal(size=(8,)).astype(np.float32)
    g = Graph([1, 7, 9, 3])
    common = {"padding": "SAME", "data_format": "NHWC", "dilations": [1, 1, 1, 1]}
    g.op(
        "c",
        "_FusedConv2D",
        ["x", g.const("w", w), g.const("b", bias)],
        strides=[1, 2, 2, 1],
        fused_ops=["BiasAdd", "Relu"],
        **common,
    )
    g.op(
        "d",
        "FusedDepthwiseConv2dNative",
        ["c", g.const("dw", dw), g.const("db", dbias)],
        strides=[1, 1, 1, 1],
        fused_ops=["BiasAdd", "Relu6"],
        **common,
    )
    g.op("plain", "Conv2D", ["x", "w"], strides=[1, 1, 1, 1], **common)
    got_d, got_plain = g.run(tmp_path, x, ["d", "plain"])
    c = np.maximum(conv_ref(x, f16(w), 2) + f16(bias), 0)
    d = np.clip(conv_ref(c, f16(dw), 1, depthwise=True) + f16(dbias), 0, 6)
    np.testing.assert_allclose(got_d, d, atol=1e-4)
    np.testing.assert_allclose(got_plain, conv_ref(x, f16(w), 1), atol=1e-4)


def test_elementwise_mean_concat_resize_and_max_pool_keep_the_nhwc_meaning(tmp_path):
    x = RNG.normal(size=(1, 4, 6, 3)).astype(np.float32)
    scale = RNG.normal(size=(3,)).astype(np.float32)
    g = Graph([1, 4, 6, 3])
    common = {"padding": "SAME", "data_format": "NHWC", "dilations": [1, 1, 1, 1]}
    g.op(
        "dw",
        "DepthwiseConv2dNative",
        ["x", g.const("k", np.ones((1, 1, 3, 1), np.float32))],
        strides=[1, 1, 1, 1],
        **common,
    )  # moves x into the NCHW layout
    g.op("m", "Mul", ["dw", g.const("s", scale)])
    g.op("a", "Add", [g.const("one", np.array(1, np.float32)), "m"])
    g.op("sub", "Sub", ["a", "x"])  # one NCHW operand, one NHWC
    g.op("sig", "Sigmoid", ["sub"])
    g.op("mean", "Mean", ["sig", g.const("axes", np.array([1, 2], np.int32))], keep_dims=True)
    g.op("se", "Mul", ["sig", "mean"])
    g.op(
        "up",
        "ResizeBilinear",
        ["se", g.const("size", np.array([8, 12], np.int32))],
        align_corners=False,
        half_pixel_centers=False,
    )
    g.op("cat", "ConcatV2", ["up", "up", g.const("axis", np.array(3, np.int32))], N=2)
    g.op("pool", "MaxPool", ["cat"], ksize=[1, 3, 3, 1], strides=[1, 1, 1, 1], padding="SAME", data_format="NHWC")
    g.op("r6", "Relu6", ["pool"])
    g.op("out", "Identity", ["r6"])
    [got] = g.run(tmp_path, x, ["out"])
    sig = 1 / (1 + np.exp(-(1 + x * f16(scale) - x)))
    se = sig * sig.mean(axis=(1, 2), keepdims=True)
    ys, xs = np.arange(8) * 4 / 8, np.arange(12) * 6 / 12  # asymmetric: source = destination * in / out
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, 3), np.minimum(x0 + 1, 5)
    fy, fx = (ys - y0)[None, :, None, None], (xs - x0)[None, None, :, None]
    top = se[:, y0][:, :, x0] * (1 - fx) + se[:, y0][:, :, x1] * fx
    bottom = se[:, y1][:, :, x0] * (1 - fx) + se[:, y1][:, :, x1] * fx
    up = top * (1 - fy) + bottom * fy
    cat = np.concatenate([up, up], axis=3)
    padded = np.pad(cat, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    pool = np.max([padded[:, i : i + 8, j : j + 12] for i in range(3) for j in range(3)], axis=0)
    np.testing.assert_allclose(got, np.clip(pool, 0, 6), atol=1e-5)


def test_top_k_index_arithmetic_slices_and_gathers(tmp_path):
    x = RNG.normal(size=(1, 2, 3, 4)).astype(np.float32)
    g = Graph([1, 2, 3, 4])
    g.op("flat", "Reshape", ["x", g.const("shape", np.array([1, -1], np.int32))])
    g.op("top", "TopKV2", ["flat", g.const("k", np.array(5, np.int32))], sorted=True)
    g.op("shifted", "Sub", ["top:1", g.const("seven", np.array(7, np.int32))])  # negative numbers too
    g.op("div", "FloorDiv", ["shifted", g.const("four", np.array(4, np.int32))], T="DT_INT32")
    g.op("mod", "FloorMod", ["shifted", "four"], T="DT_INT32")
    g.op("both", "Add", ["div", "mod"], T="DT_INT32")
    g.op("fboth", "Cast", ["both"], SrcT="DT_INT32", DstT="DT_FLOAT")
    g.op("cols", "Reshape", ["x", g.const("shape2", np.array([6, 4], np.int32))])
    g.op(
        "picked",
        "GatherV2",
        ["cols", g.const("rows", np.array([5, 0, 2], np.int32)), g.const("gaxis", np.array(0, np.int32))],
        batch_dims=0,
    )
    g.op(
        "sl",
        "StridedSlice",
        [
            "picked",
            g.const("b", np.array([0, 1], np.int32)),
            g.const("e", np.array([0, 3], np.int32)),
            g.const("st", np.array([1, 1], np.int32)),
        ],
        begin_mask=1,
        end_mask=1,
        shrink_axis_mask=0,
        ellipsis_mask=0,
        new_axis_mask=0,
    )
    g.op(
        "last",
        "StridedSlice",
        ["picked", g.const("b2", np.array([0, -1], np.int32)), g.const("e2", np.array([0, 0], np.int32)), "st"],
        begin_mask=1,
        end_mask=1,
        shrink_axis_mask=2,
        ellipsis_mask=0,
        new_axis_mask=0,
    )
    g.op("ex", "ExpandDims", ["last", g.const("d", np.array(-1, np.int32))])
    g.op("peak", "Equal", ["x", "x"])
    g.op("fpeak", "Cast", ["peak"], SrcT="DT_BOOL", DstT="DT_FLOAT")
    outputs = ["top", "fboth", "sl", "ex", "fpeak"]
    top, fboth, sl, ex, fpeak = g.run(tmp_path, x, outputs)
    flat = x.reshape(1, -1)
    order = np.argsort(-flat[0], kind="stable")[:5]
    np.testing.assert_array_equal(top, flat[:, order])
    shifted = order - 7
    np.testing.assert_array_equal(fboth, (shifted // 4 + shifted % 4)[None].astype(np.float32))
    picked = x.reshape(6, 4)[[5, 0, 2]]
    np.testing.assert_array_equal(sl, picked[:, 1:3])
    np.testing.assert_array_equal(ex, picked[:, -1:])
    assert fpeak.shape == x.shape and fpeak.all()


def test_the_same_graph_converts_to_the_same_bytes_and_an_unknown_op_is_named(tmp_path):
    g = Graph([1, 2, 2, 1])
    g.op("out", "Relu", ["x"])
    path = g.write(tmp_path, ["out"])
    tfjs_to_onnx.convert(path, tmp_path / "a.onnx")
    tfjs_to_onnx.convert(path, tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    g.op("odd", "Softplus", ["out"])
    with pytest.raises(tfjs_to_onnx.ConversionError, match="Softplus"):
        tfjs_to_onnx.convert(g.write(tmp_path, ["odd"]), tmp_path / "c.onnx")
