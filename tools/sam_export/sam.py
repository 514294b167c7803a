"""SAM (the first one): a transformers ``SamModel`` folder to the two ONNX graphs maskq's SAM adapter serves.

The layout is the one of segment-anything's official ONNX export (and of
``samexporter``):

* ``encoder.onnx``: ``image`` float32 ``[1, 3, S, S]`` (RGB resized so its longest
  side is ``S`` = 1024, normalised with SAM's pixel mean and std, zero-padded at the
  bottom and right) -> ``image_embeddings`` ``[1, 256, S/16, S/16]``.
* ``decoder.onnx``: ``image_embeddings``, ``point_coords`` float32 ``[1, N, 2]`` (in
  the encoder's ``S`` frame), ``point_labels`` float32 ``[1, N]`` (1 foreground, 0
  background, 2 and 3 a box's top-left and bottom-right corners, -1 the padding
  point), ``mask_input`` ``[1, 1, S/4, S/4]`` logits, ``has_mask_input`` ``[1]``,
  ``orig_im_size`` float32 ``[2]`` (h, w) -> ``masks`` ``[1, 4, h, w]`` logits at the
  original size, ``iou_predictions`` ``[1, 4]``, ``low_res_masks`` ``[1, 4, S/4, S/4]``.
  Mask 0 is SAM's single-mask output, masks 1-3 its multimask outputs.

Run through ``tools/export_sam.py`` (which reads the folder's family from its ``config.json``).
Any folder ``transformers.SamModel.from_pretrained`` reads works (``facebook/sam-vit-base``
and friends once downloaded, or a converted MobileSAM/SAM checkpoint).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from tools.sam_export.checkpoint import load_error
from tools.sam_export.common import Exported, ExportOptions

# The tiny random model: real SAM architecture, a small ViT (see FIELD-NOTES "A tiny SAM for
# tests"); the prompt encoder and mask decoder keep their real sizes. SamVisionConfig's default
# initializer_range (1e-10) would leave the random encoder's output at ~1e-20, so the image
# would not matter to the masks and the tests could not see a wrong frame.
TINY_VISION = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "mlp_dim": 128,
    "output_channels": 256,
    "global_attn_indexes": [1],
    "window_size": 4,
    "initializer_range": 0.02,
}
OPSET = 17
PIXEL_MEAN = (123.675, 116.28, 103.53)  # SAM's, on 0-255 RGB
PIXEL_STD = (58.395, 57.12, 57.375)


class ImageEncoder(nn.Module):
    """SAM's ViT image encoder over the preprocessed ``[1, 3, S, S]`` tensor."""

    def __init__(self, model):
        super().__init__()
        self.vision_encoder = model.vision_encoder

    @torch.no_grad()
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.vision_encoder(image)[0]


class PreprocessingImageEncoder(nn.Module):
    """The encoder with normalisation and padding inside: ``input_image`` ``[h, w, 3]`` RGB 0-255, resized only.

    samexporter's ``--use-preprocess`` layout (the adapter's ``encoder_input = "resized"``).
    """

    def __init__(self, model):
        super().__init__()
        self.encoder = ImageEncoder(model)
        self.size = model.config.vision_config.image_size
        self.register_buffer("mean", torch.tensor(PIXEL_MEAN).reshape(3, 1, 1))
        self.register_buffer("std", torch.tensor(PIXEL_STD).reshape(3, 1, 1))

    @torch.no_grad()
    def forward(self, input_image: torch.Tensor) -> torch.Tensor:
        x = (input_image.permute(2, 0, 1) - self.mean) / self.std
        h, w = x.shape[-2:]
        return self.encoder(F.pad(x, (0, self.size - w, 0, self.size - h)).unsqueeze(0))


class PromptDecoder(nn.Module):
    """SAM's prompt encoder, mask decoder and mask upscaling with the official export's inputs and outputs.

    Mirrors segment-anything's ``SamOnnxModel`` (return_single_mask=False) on top of
    ``transformers``' modules, with one difference: the crop of the padded frame is
    traced with tensor ops, so ``masks`` stays right for any aspect ratio (the
    official wrapper freezes the crop to the dummy input's shape while tracing).
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.image_size = model.config.prompt_encoder_config.image_size

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        encoder = self.model.prompt_encoder
        embedding = encoder.shared_embedding((coords + 0.5) / self.image_size)  # pixel centres
        labels = labels.unsqueeze(-1)
        embedding = embedding * (labels != -1) + encoder.not_a_point_embed.weight * (labels == -1)
        for i, point_embed in enumerate(encoder.point_embed):
            embedding = embedding + point_embed.weight * (labels == i)
        return embedding

    def _embed_mask(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        encoder = self.model.prompt_encoder
        no_mask = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return has_mask_input * encoder.mask_embed(mask_input) + (1 - has_mask_input) * no_mask

    def _decode(self, image_embeddings, sparse, dense) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' ``SamMaskDecoder.forward`` for one image and one prompt set, keeping all mask tokens."""
        decoder = self.model.mask_decoder
        tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat([tokens[None, None], sparse[:, None]], dim=2)
        _, channels, height, width = image_embeddings.shape
        queries, keys = decoder.transformer(
            point_embeddings=tokens,
            image_embeddings=image_embeddings + dense,
            image_positional_embeddings=self.model.get_image_wide_positional_embeddings(),
            attention_similarity=None,
        )
        iou_token = queries[:, :, 0, :]
        mask_tokens = queries[:, :, 1 : 1 + decoder.num_mask_tokens, :]
        image = keys.transpose(2, 3).reshape(1, channels, height, width)
        upscaled = decoder.activation(decoder.upscale_layer_norm(decoder.upscale_conv1(image)))
        upscaled = decoder.activation(decoder.upscale_conv2(upscaled))
        hyper = torch.stack(
            [mlp(mask_tokens[:, :, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=2
        )
        _, up_channels, up_height, up_width = upscaled.shape
        masks = hyper @ upscaled.reshape(1, 1, up_channels, up_height * up_width)
        masks = masks.reshape(1, decoder.num_mask_tokens, up_height, up_width)
        return masks, decoder.iou_prediction_head(iou_token)[:, 0, :]

    def _upscale(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        size = self.image_size
        masks = F.interpolate(masks, size=(size, size), mode="bilinear", align_corners=False)
        scale = size / torch.max(orig_im_size)
        prepadded = torch.floor(orig_im_size * scale + 0.5).to(torch.int64)
        # index_select with arange keeps the crop a graph op; slicing would bake in the dummy's shape.
        masks = masks.index_select(2, torch.arange(prepadded[0])).index_select(3, torch.arange(prepadded[1]))
        original = orig_im_size.to(torch.int64)
        return F.interpolate(masks, size=(original[0], original[1]), mode="bilinear", align_corners=False)

    @torch.no_grad()
    def forward(self, image_embeddings, point_coords, point_labels, mask_input, has_mask_input, orig_im_size):
        sparse = self._embed_points(point_coords, point_labels)
        dense = self._embed_mask(mask_input, has_mask_input)
        low_res_masks, iou_predictions = self._decode(image_embeddings, sparse, dense)
        return self._upscale(low_res_masks, orig_im_size), iou_predictions, low_res_masks


def tiny_random_model(seed: int = 0):
    """A randomly initialised ``SamModel`` of the real architecture with a 2-layer, 64-wide ViT."""
    from transformers import SamConfig, SamModel, SamVisionConfig

    torch.manual_seed(seed)
    config = SamConfig(vision_config=SamVisionConfig(**TINY_VISION).to_dict())
    return SamModel(config).eval()


def load_model(checkpoint: Path):
    from transformers import SamModel

    return SamModel.from_pretrained(str(checkpoint)).eval()


def export(model, out_dir: Path, opset: int = OPSET, encoder_input: str = "normalized") -> dict[str, Path]:
    """Write ``encoder.onnx`` and ``decoder.onnx`` for ``model`` into ``out_dir``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"encoder": out_dir / "encoder.onnx", "decoder": out_dir / "decoder.onnx"}
    export_encoder(model, paths["encoder"], opset, encoder_input)
    export_decoder(model, paths["decoder"], opset)
    return paths


def export_encoder(model, path: Path, opset: int = OPSET, encoder_input: str = "normalized") -> Path:
    """The image encoder: ``image`` ``[1, 3, S, S]`` preprocessed, or (``"resized"``) ``input_image`` ``[h, w, 3]``."""
    size = model.config.vision_config.image_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python values are expected here
        if encoder_input == "resized":
            torch.onnx.export(
                PreprocessingImageEncoder(model),
                (torch.rand(size, int(size * 0.75), 3) * 255,),
                str(path),
                input_names=["input_image"],
                output_names=["image_embeddings"],
                dynamic_axes={"input_image": {0: "height", 1: "width"}},
                opset_version=opset,
                dynamo=False,
            )
        else:
            torch.onnx.export(
                ImageEncoder(model),
                (torch.randn(1, 3, size, size),),
                str(path),
                input_names=["image"],
                output_names=["image_embeddings"],
                opset_version=opset,
                dynamo=False,
            )
    return path


def export_decoder(model, path: Path, opset: int = OPSET) -> Path:
    """The prompt decoder in the official layout (see the module docstring)."""
    size = model.config.prompt_encoder_config.image_size
    embedding_size = model.config.prompt_encoder_config.image_embedding_size
    channels = model.config.vision_config.output_channels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            PromptDecoder(model),
            decoder_inputs(channels, embedding_size, size),
            str(path),
            input_names=[
                "image_embeddings",
                "point_coords",
                "point_labels",
                "mask_input",
                "has_mask_input",
                "orig_im_size",
            ],
            output_names=["masks", "iou_predictions", "low_res_masks"],
            dynamic_axes={
                "point_coords": {1: "num_points"},
                "point_labels": {1: "num_points"},
                "masks": {2: "height", 3: "width"},
            },
            opset_version=opset,
            dynamo=False,
        )
    return path


def decoder_inputs(channels: int, embedding_size: int, size: int, orig=(480.0, 640.0)) -> tuple[torch.Tensor, ...]:
    """Example decoder inputs: one foreground point, one padding point, no mask."""
    return (
        torch.randn(1, channels, embedding_size, embedding_size),
        torch.tensor([[[size * 0.3, size * 0.2], [0.0, 0.0]]]),
        torch.tensor([[1.0, -1.0]]),
        torch.zeros(1, 1, 4 * embedding_size, 4 * embedding_size),
        torch.zeros(1),
        torch.tensor(orig),
    )


def check(model, paths: dict[str, Path], atol: float = 1e-3) -> dict[str, float]:
    """Run both graphs in ONNX Runtime against PyTorch; return their timings in seconds."""
    import onnxruntime as ort

    size = model.config.prompt_encoder_config.image_size
    encoder = ort.InferenceSession(str(paths["encoder"]), providers=["CPUExecutionProvider"])
    if encoder.get_inputs()[0].name == "input_image":
        image, torch_encoder = torch.rand(size // 2, size, 3) * 255, PreprocessingImageEncoder(model)
    else:
        image, torch_encoder = torch.randn(1, 3, size, size), ImageEncoder(model)
    started = time.perf_counter()
    embeddings = encoder.run(None, {encoder.get_inputs()[0].name: image.numpy()})[0]
    timings = {"encoder_s": time.perf_counter() - started}
    np.testing.assert_allclose(embeddings, torch_encoder(image).numpy(), atol=atol, rtol=1e-3)

    decoder = ort.InferenceSession(str(paths["decoder"]), providers=["CPUExecutionProvider"])
    names = [i.name for i in decoder.get_inputs()]
    # A portrait size unlike the export's landscape dummy: catches a crop frozen at trace time.
    inputs = decoder_inputs(embeddings.shape[1], embeddings.shape[2], size, orig=(700.0, 333.0))
    inputs = (torch.from_numpy(embeddings), *inputs[1:])
    started = time.perf_counter()
    outputs = decoder.run(None, dict(zip(names, (t.numpy() for t in inputs))))
    timings["decoder_s"] = time.perf_counter() - started
    for got, want in zip(outputs, PromptDecoder(model)(*inputs)):
        if got.shape != tuple(want.shape):
            raise AssertionError(f"decoder output shape {got.shape}, PyTorch gives {tuple(want.shape)}")
        np.testing.assert_allclose(got, want.numpy(), atol=atol, rtol=1e-3)
    return timings


def tiny_random_checkpoint(folder: Path, seed: int = 0) -> None:
    """Save the tiny random SAM as a hub download would look (the tests export it back)."""
    tiny_random_model(seed).save_pretrained(str(folder))


def export_checkpoint(checkpoint: Path, out_dir: Path, options: ExportOptions) -> Exported:
    """Read ``checkpoint``, write ``encoder.onnx`` and ``decoder.onnx``, check them unless told not to."""
    try:
        model = load_model(checkpoint)
    except Exception as exc:  # transformers and safetensors raise many kinds for a bad file
        raise load_error(checkpoint, exc) from exc
    paths = export(model, out_dir, options.opset, options.encoder_input)
    timings = check(model, paths) if options.check else {}
    return Exported(
        adapter="models.adapters.sam:SamAdapter",
        files=dict(paths),
        options={"multimask": False, "mask_threshold": 0.0, "embedding_cache_mb": 256},
        timings={"encoder": timings.get("encoder_s", 0.0), "decoder": timings.get("decoder_s", 0.0)} if timings else {},
        memory_mb=2048,
    )
