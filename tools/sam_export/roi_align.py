"""``torchvision.ops.roi_align`` for SAM 3's exemplar boxes, without torchvision, exporting to ONNX's ``RoiAlign``.

transformers' SAM 3 geometry encoder pools each exemplar box's image features
with ``torchvision.ops.roi_align`` (``aligned=False``, adaptive sampling). No
CPU build of torchvision matches the CPU torch these machines install
(FIELD-NOTES), so :func:`install` puts this one in its place: the same
arithmetic in plain torch (torchvision's CPU kernel, read from its source:
``output_half_pixel`` coordinates, ``ceil(roi / bins)`` samples per bin, a
zero outside ``[-1, size]``), and traced as ONNX ``RoiAlign`` (opset 16+,
``coordinate_transformation_mode = "output_half_pixel"``, ``sampling_ratio =
0``), which ONNX Runtime computes the same way. The export's check compares the
two on every run.
"""

from __future__ import annotations

import importlib
import math
from types import SimpleNamespace
from typing import Any

import torch


def _bilinear(features: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``features`` ``[C, H, W]`` at the points ``y`` ``[P]``, ``x`` ``[Q]`` (a grid): ``[C, P, Q]``."""
    _, height, width = features.shape

    def axis(v: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        outside = (v < -1.0) | (v > size)
        v = v.clamp(min=0.0)
        low = v.floor().long().clamp(max=size - 1)
        high = (low + 1).clamp(max=size - 1)
        v = torch.where(low >= size - 1, low.to(v.dtype), v)
        frac = v - low.to(v.dtype)
        return low, high, frac, outside

    y_low, y_high, ly, y_out = axis(y, height)
    x_low, x_high, lx, x_out = axis(x, width)
    hy, hx = 1.0 - ly, 1.0 - lx
    value = (
        features[:, y_low][:, :, x_low] * (hy[:, None] * hx[None, :])
        + features[:, y_low][:, :, x_high] * (hy[:, None] * lx[None, :])
        + features[:, y_high][:, :, x_low] * (ly[:, None] * hx[None, :])
        + features[:, y_high][:, :, x_high] * (ly[:, None] * lx[None, :])
    )
    return value * ~(y_out[:, None] | x_out[None, :])


def _roi_align(features: torch.Tensor, rois: torch.Tensor, batch: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    out_h, out_w = size
    pooled = []
    for roi, index in zip(rois, batch):
        x0, y0, x1, y1 = (float(v) for v in roi)
        roi_w, roi_h = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
        bin_w, bin_h = roi_w / out_w, roi_h / out_h
        grid_w, grid_h = math.ceil(roi_w / out_w), math.ceil(roi_h / out_h)
        # Every sample point of every bin, bin by bin: bins x samples, then averaged per bin.
        ys = y0 + (torch.arange(out_h)[:, None] * bin_h + (torch.arange(grid_h)[None, :] + 0.5) * bin_h / grid_h)
        xs = x0 + (torch.arange(out_w)[:, None] * bin_w + (torch.arange(grid_w)[None, :] + 0.5) * bin_w / grid_w)
        samples = _bilinear(features[int(index)], ys.reshape(-1).to(features.dtype), xs.reshape(-1).to(features.dtype))
        samples = samples.reshape(-1, out_h, grid_h, out_w, grid_w)
        pooled.append(samples.mean(dim=(2, 4)))
    return torch.stack(pooled) if pooled else features.new_zeros(0, features.shape[1], out_h, out_w)


class RoiAlign(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, features: torch.Tensor, rois: torch.Tensor, batch: torch.Tensor, out_h: int, out_w: int):
        return _roi_align(features, rois, batch, (out_h, out_w))

    @staticmethod
    def symbolic(g: Any, features: Any, rois: Any, batch: Any, out_h: int, out_w: int) -> Any:
        return g.op(
            "RoiAlign",
            features,
            rois,
            batch,
            mode_s="avg",
            output_height_i=out_h,
            output_width_i=out_w,
            sampling_ratio_i=0,
            spatial_scale_f=1.0,
            coordinate_transformation_mode_s="output_half_pixel",
        )


def roi_align(
    features: torch.Tensor, boxes: list[torch.Tensor] | tuple[torch.Tensor, ...], output_size: Any
) -> torch.Tensor:
    """torchvision's signature for the call SAM 3 makes: ``boxes`` one ``[K, 4]`` xyxy tensor per image."""
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    rois = torch.cat(list(boxes), dim=0)
    # Each image has as many boxes (SAM 3 unbinds one [B, K, 4] tensor): written with shapes, not Python
    # numbers, so the traced graph takes any K.
    batch = torch.div(torch.arange(rois.shape[0]), boxes[0].shape[0], rounding_mode="floor")
    return RoiAlign.apply(features, rois, batch, int(out_h), int(out_w))


def install() -> None:
    """Give transformers' SAM 3 this roi_align where torchvision is missing (a no-op where it is there)."""
    # The module itself: transformers' lazy package hands out a placeholder for it when torchvision is missing.
    modeling_sam3 = importlib.import_module("transformers.models.sam3.modeling_sam3")
    if "torchvision" not in vars(modeling_sam3):
        setattr(modeling_sam3, "torchvision", SimpleNamespace(ops=SimpleNamespace(roi_align=roi_align)))  # noqa: B010
