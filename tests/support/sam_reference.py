"""A direct ONNX Runtime run of a SAM-family encoder/decoder pair, as segment-anything's own ONNX example does it.

The reference the service's masks are held against: written from segment-anything's
``SamPredictor`` and its ``onnx_model_example`` notebook, not from maskq's adapter, and it uses the
decoder's own ``masks`` output (upscaled inside the graph) rather than maskq's upscaling.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from PIL import Image

MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)
SIZE = 1024


class ReferenceSam:
    def __init__(self, encoder: str, decoder: str):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        self.encoder = ort.InferenceSession(encoder, options, providers=["CPUExecutionProvider"])
        self.decoder = ort.InferenceSession(decoder, options, providers=["CPUExecutionProvider"])

    def embed(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """The encoder's output for an RGB ``uint8`` image, and the image's size in the 1024 frame."""
        h, w = image.shape[:2]
        scale = SIZE / max(h, w)
        new_h, new_w = int(h * scale + 0.5), int(w * scale + 0.5)
        resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR), np.float32)
        frame = np.zeros((SIZE, SIZE, 3), dtype=np.float32)
        frame[:new_h, :new_w] = (resized - MEAN) / STD
        tensor = frame.transpose(2, 0, 1)[np.newaxis]
        name = self.encoder.get_inputs()[0].name
        return self.encoder.run(None, {name: tensor})[0], (new_h, new_w)

    def mask(self, image: np.ndarray, points=(), box=None, embedding=None) -> np.ndarray:
        """The boolean mask for ``points`` (``(x, y, label)``) and an optional ``box`` ``(x0, y0, x1, y1)``."""
        h, w = image.shape[:2]
        if embedding is None:
            embedding, (new_h, new_w) = self.embed(image)
        else:
            scale = SIZE / max(h, w)
            new_h, new_w = int(h * scale + 0.5), int(w * scale + 0.5)
        coords = [(x, y) for x, y, _ in points]
        labels = [float(label) for _, _, label in points]
        if box is not None:
            coords += [(box[0], box[1]), (box[2], box[3])]
            labels += [2.0, 3.0]
        else:
            coords.append((0.0, 0.0))
            labels.append(-1.0)
        coords = np.array(coords, dtype=np.float32) * np.array([new_w / w, new_h / h], dtype=np.float32)
        masks, _iou, _low = self.decoder.run(
            None,
            {
                "image_embeddings": embedding.astype(np.float32),
                "point_coords": coords[np.newaxis],
                "point_labels": np.array(labels, dtype=np.float32)[np.newaxis],
                "mask_input": np.zeros((1, 1, 256, 256), dtype=np.float32),
                "has_mask_input": np.zeros(1, dtype=np.float32),
                "orig_im_size": np.array([h, w], dtype=np.float32),
            },
        )
        return masks[0, 0] > 0.0


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
