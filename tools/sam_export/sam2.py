"""SAM 2 / SAM 2.1: a transformers ``Sam2Model`` folder to the two ONNX graphs maskq's SAM adapter serves.

The image part of the model only (a ``sam2_video`` checkpoint's memory modules
are not read). The layout is segment-anything's official one, with the
high-resolution features SAM 2's decoder takes passed from one graph to the
other by name (as ``samexporter``'s SAM 2 export names them):

* ``encoder.onnx``: ``image`` float32 ``[1, 3, S, S]`` (RGB resized to ``S`` x ``S``
  = 1024 x 1024 *without* keeping the aspect ratio, as ``Sam2ImageProcessor`` does,
  normalised with the ImageNet mean and std, which are SAM's) ->
  ``image_embeddings`` ``[1, C, S/16, S/16]`` (with SAM 2's "no memory" embedding
  added, as ``Sam2Model.get_image_embeddings`` does), ``high_res_feats_0``
  ``[1, C/8, S/4, S/4]`` and ``high_res_feats_1`` ``[1, C/4, S/8, S/8]`` (already
  through the decoder's ``conv_s0``/``conv_s1``).
* ``decoder.onnx``: ``image_embeddings``, ``point_coords`` float32 ``[B, N, 2]`` in
  the ``S`` x ``S`` frame, ``point_labels`` float32 ``[B, N]`` (1 foreground, 0
  background, 2/3 a box's corners, -1 not a point), ``mask_input`` ``[1, 1, S/4,
  S/4]`` logits, ``has_mask_input`` ``[1]``, ``orig_im_size`` float32 ``[2]``
  (h, w), ``high_res_feats_0``, ``high_res_feats_1`` -> ``iou_predictions``
  ``[B, 4]``, ``low_res_masks`` ``[B, 4, S/4, S/4]``, ``masks`` ``[B, 4, h, w]``
  (the low-res logits resized straight to the original size, as
  ``Sam2ImageProcessor.post_process_masks`` does) and ``object_score_logits``
  ``[B, 1]``. ``B`` prompt sets of the same size on one image (one mask input for
  all) are decoded in one run (segment everything's grid); ``B`` = 1 is
  segment-anything's layout.

The decoder appends SAM 2's padding point (label -1) to every prompt set itself,
as SAM 2's prompt encoder always does, so the adapter sends none
(``decoder_adds_padding_point``). Mask 0 is ``Sam2Model(multimask_output=False)``'s
mask: the single-mask token's, unless its stability score is below the
threshold, then the best of the three multimask ones (SAM 2's "dynamic
multimask"); masks 1-3 are ``multimask_output=True``'s. The object score is
passed through as transformers returns it: its image model does not apply it
to the masks (only the video model hides a frame's object with it).

Run through ``tools/export_sam.py`` (which reads the folder's family from its ``config.json``).
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

OPSET = 17
HIGH_RES = ("high_res_feats_0", "high_res_feats_1")
DECODER_INPUTS = ["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size"]
DECODER_OUTPUTS = ["iou_predictions", "low_res_masks", "masks", "object_score_logits"]
# Any number of prompt sets (segment everything batches its grid) of any number of points.
DECODER_AXES = {
    "point_coords": {0: "prompts", 1: "num_points"},
    "point_labels": {0: "prompts", 1: "num_points"},
    **{name: {0: "prompts"} for name in DECODER_OUTPUTS},
    "masks": {0: "prompts", 2: "height", 3: "width"},
}
# The tiny random model: SAM 2's architecture at its real 1024 frame with a 5-block, 16-wide Hiera
# (encoder ~0.3 s on a CPU core); the neck, prompt encoder and mask decoder keep their real sizes.
# The second block of stage 3 is the global one: a global block that also pools would divide by zero.
TINY_BACKBONE = {
    "hidden_size": 16,
    "num_attention_heads": 1,
    "blocks_per_stage": [1, 1, 2, 1],
    "embed_dim_per_stage": [16, 32, 64, 128],
    "num_attention_heads_per_stage": [1, 1, 2, 2],
    "window_size_per_stage": [8, 4, 4, 4],
    "global_attention_blocks": [3],
}


class ImageEncoder(nn.Module):
    """Hiera, the FPN neck and the decoder's high-resolution projections: ``Sam2Model.get_image_embeddings``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    @torch.no_grad()
    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats_0, feats_1, embeddings = self.model.get_image_embeddings(image)
        return embeddings, feats_0, feats_1


class PromptDecoder(nn.Module):
    """SAM 2's prompt encoder and mask decoder with the official export's inputs and outputs.

    ``Sam2MaskDecoder.forward`` keeping every mask token, on transformers' own
    modules, so one run gives both of its ``multimask_output`` answers.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def _sparse(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # The padding point's coordinates do not matter: its label makes it the not-a-point embedding.
        coords = torch.cat([coords, torch.zeros_like(coords[:, :1])], dim=1)
        labels = torch.cat([labels, -torch.ones_like(labels[:, :1])], dim=1).to(torch.int64)
        return self.model.prompt_encoder._embed_points(coords[:, None], labels[:, None], pad=False)

    def _dense(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        encoder = self.model.prompt_encoder
        no_mask = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return has_mask_input * encoder.mask_embed(mask_input) + (1 - has_mask_input) * no_mask

    def _decode(self, embeddings, sparse, dense, feats_0, feats_1):
        decoder = self.model.mask_decoder
        tokens = torch.cat([decoder.obj_score_token.weight, decoder.iou_token.weight, decoder.mask_tokens.weight])
        # Each prompt set is a batch item of its own (transformers' attention takes its batch from the
        # queries), with the one image's embedding repeated for it.
        prompts = sparse.shape[0]
        tokens = torch.cat([tokens[None, None].expand(prompts, 1, -1, -1), sparse], dim=2)
        _, channels, height, width = embeddings.shape
        queries, keys = decoder.transformer(
            point_embeddings=tokens,
            image_embeddings=(embeddings + dense).expand(prompts, -1, -1, -1),
            image_positional_embeddings=self.model.get_image_wide_positional_embeddings(),
            attention_similarity=None,
            target_embedding=None,
        )
        mask_tokens = queries[:, :, 2 : 2 + decoder.num_mask_tokens, :]
        image = keys.transpose(2, 3).reshape(-1, channels, height, width)
        upscaled = decoder.activation(decoder.upscale_layer_norm(decoder.upscale_conv1(image) + feats_1))
        upscaled = decoder.activation(decoder.upscale_conv2(upscaled) + feats_0)
        hyper = torch.stack(
            [mlp(mask_tokens[:, :, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=2
        )
        _, up_channels, up_height, up_width = upscaled.shape
        masks = (hyper @ upscaled.reshape(-1, 1, up_channels, up_height * up_width)).reshape(
            -1, 1, decoder.num_mask_tokens, up_height, up_width
        )
        iou = decoder.iou_prediction_head(queries[:, :, 1, :])
        object_score = decoder.pred_obj_score_head(queries[:, :, 0, :])
        return masks, iou, object_score

    @torch.no_grad()
    def forward(
        self, image_embeddings, point_coords, point_labels, mask_input, has_mask_input, orig_im_size, feats_0, feats_1
    ):
        sparse = self._sparse(point_coords, point_labels)
        dense = self._dense(mask_input, has_mask_input)
        masks, iou, object_score = self._decode(image_embeddings, sparse, dense, feats_0, feats_1)
        decoder = self.model.mask_decoder
        if decoder.dynamic_multimask_via_stability:
            single, single_iou = decoder._dynamic_multimask_via_stability(masks, iou)
        else:
            single, single_iou = masks[:, :, :1], iou[:, :, :1]
        low_res_masks = torch.cat([single, masks[:, :, 1:]], dim=2)[:, 0]
        iou_predictions = torch.cat([single_iou, iou[:, :, 1:]], dim=2)[:, 0]
        original = orig_im_size.to(torch.int64)
        upscaled = F.interpolate(low_res_masks, size=(original[0], original[1]), mode="bilinear", align_corners=False)
        return iou_predictions, low_res_masks, upscaled, object_score[:, 0]


def tiny_random_model(seed: int = 0):
    """A randomly initialised ``Sam2Model`` of the real architecture with a small Hiera."""
    from transformers import Sam2Config, Sam2Model

    torch.manual_seed(seed)
    config = Sam2Config(vision_config={"backbone_config": TINY_BACKBONE, "backbone_channel_list": [128, 64, 32, 16]})
    model = Sam2Model(config).eval()
    # These start at zero; random values make a graph that forgot one differ from PyTorch.
    for parameter in (
        model.no_memory_embedding,
        model.vision_encoder.backbone.pos_embed,
        model.vision_encoder.backbone.pos_embed_window,
    ):
        parameter.data.normal_(std=0.02)
    return model


def load_model(checkpoint: Path):
    from transformers import Sam2Model

    # A sam2_video checkpoint's config and weights hold the image model's; its memory parts are left out.
    return Sam2Model.from_pretrained(str(checkpoint)).eval()


def frame_size(model) -> int:
    return int(model.config.prompt_encoder_config.image_size)


def encoder_example(model) -> torch.Tensor:
    return torch.randn(1, 3, frame_size(model), frame_size(model))


def decoder_example(encoded, size: int, orig=(480.0, 640.0), box: bool = False, mask: bool = False):
    """Decoder inputs after ``encoded`` (the encoder's three outputs): a point (or a point and a box), a mask."""
    embeddings, feats_0, feats_1 = encoded
    if box:
        coords = torch.tensor([[[size * 0.3, size * 0.2], [size * 0.1, size * 0.1], [size * 0.6, size * 0.5]]])
        labels = torch.tensor([[1.0, 2.0, 3.0]])
    else:
        coords, labels = torch.tensor([[[size * 0.3, size * 0.2]]]), torch.tensor([[1.0]])
    side = 4 * embeddings.shape[-1]
    mask_input = torch.randn(1, 1, side, side) * 10 if mask else torch.zeros(1, 1, side, side)
    return (embeddings, coords, labels, mask_input, torch.ones(1) * mask, torch.tensor(orig), feats_0, feats_1)


def export(model, out_dir: Path, opset: int = OPSET) -> dict[str, Path]:
    """Write ``encoder.onnx`` and ``decoder.onnx`` for ``model`` into ``out_dir``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"encoder": out_dir / "encoder.onnx", "decoder": out_dir / "decoder.onnx"}
    # Evaluation mode on the wrappers too: the exporter puts a module back in its own mode afterwards, and
    # a wrapper left in training mode would turn the model's dynamic multimask off for the checks.
    encoder = ImageEncoder(model).eval()
    example = encoder_example(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python values are expected here
        torch.onnx.export(
            encoder,
            (example,),
            str(paths["encoder"]),
            input_names=["image"],
            output_names=["image_embeddings", *HIGH_RES],
            opset_version=opset,
            dynamo=False,
        )
        torch.onnx.export(
            PromptDecoder(model).eval(),
            decoder_example(encoder(example), frame_size(model)),
            str(paths["decoder"]),
            input_names=[*DECODER_INPUTS, *HIGH_RES],
            output_names=DECODER_OUTPUTS,
            dynamic_axes=DECODER_AXES,
            opset_version=opset,
            dynamo=False,
        )
    return paths


def check(model, paths: dict[str, Path], atol: float = 1e-3) -> dict[str, float]:
    """Run both graphs in ONNX Runtime against PyTorch, and the decoder wrapper against ``Sam2Model.forward``."""
    import onnxruntime as ort

    quiet = ort.SessionOptions()
    # Errors only: ORT's shape inference warns about a Concat in Hiera's window padding that it then merges fine.
    quiet.log_severity_level = 3
    encoder = ort.InferenceSession(str(paths["encoder"]), quiet, providers=["CPUExecutionProvider"])
    image = encoder_example(model)
    started = time.perf_counter()
    encoded = encoder.run(None, {"image": image.numpy()})
    timings = {"encoder": time.perf_counter() - started}
    want = ImageEncoder(model).eval()(image)
    for name, got, expected in zip(["image_embeddings", *HIGH_RES], encoded, want):
        np.testing.assert_allclose(got, expected.numpy(), atol=atol, rtol=1e-3, err_msg=name)

    timings["decoder"] = check_decoder(paths["decoder"], model, tuple(torch.from_numpy(a) for a in encoded), atol)
    return timings


def check_decoder(path: Path, model, encoded, atol: float) -> float:
    """The decoder graph in ONNX Runtime against its wrapper (a point, a box, a mask; then three prompts in one
    run), and the wrapper against the model's own forward; the seconds of its first run. Any SAM 2-style model
    (``Sam2Model``, SAM 3's ``Sam3TrackerModel``) with ``encoded`` its encoder's three outputs."""
    import onnxruntime as ort

    quiet = ort.SessionOptions()
    quiet.log_severity_level = 3
    decoder = ort.InferenceSession(str(path), quiet, providers=["CPUExecutionProvider"])
    names = [i.name for i in decoder.get_inputs()]
    wrapper = PromptDecoder(model).eval()
    size = frame_size(model)
    first_run: float | None = None
    # A portrait size unlike the export's landscape dummy, a box, a mask: nothing frozen at trace time.
    for box, mask in ((False, False), (True, False), (False, True)):
        inputs = decoder_example(encoded, size, orig=(700.0, 333.0), box=box, mask=mask)
        started = time.perf_counter()
        outputs = decoder.run(DECODER_OUTPUTS, dict(zip(names, (t.numpy() for t in inputs))))
        first_run = first_run if first_run is not None else time.perf_counter() - started
        for name, got, expected in zip(DECODER_OUTPUTS, outputs, wrapper(*inputs)):
            if got.shape != tuple(expected.shape):
                raise AssertionError(f"decoder {name} shape {got.shape}, PyTorch gives {tuple(expected.shape)}")
            np.testing.assert_allclose(got, expected.numpy(), atol=atol, rtol=1e-3, err_msg=name)
    check_against_forward(model, wrapper, encoded, atol)
    check_batch(decoder, names, encoded, size, atol)
    return first_run or 0.0


def check_batch(decoder, names: list[str], encoded, size: int, atol: float) -> None:
    """Three prompt sets in one run give what one run each gives (segment everything batches its grid)."""
    inputs = [decoder_example(encoded, size, orig=(700.0, 333.0)) for _ in range(3)]
    coords = torch.cat([inputs[0][1] * scale for scale in (1.0, 0.5, 1.7)])
    batched = (inputs[0][0], coords, torch.ones(3, 1), *inputs[0][3:])
    together = decoder.run(DECODER_OUTPUTS, dict(zip(names, (t.numpy() for t in batched))))
    for i in range(3):
        alone = (inputs[0][0], coords[i : i + 1], torch.ones(1, 1), *inputs[0][3:])
        for name, got, want in zip(
            DECODER_OUTPUTS, together, decoder.run(DECODER_OUTPUTS, dict(zip(names, (t.numpy() for t in alone))))
        ):
            np.testing.assert_allclose(got[i : i + 1], want, atol=atol, rtol=1e-3, err_msg=f"batched {name}")


def check_against_forward(model, wrapper: PromptDecoder, encoded, atol: float) -> None:
    """The wrapper's mask 0 is ``Sam2Model(multimask_output=False)``'s, masks 1-3 its ``multimask_output=True``."""
    embeddings, feats_0, feats_1 = encoded
    inputs = decoder_example(encoded, frame_size(model), box=True)
    iou, low_res, _, object_score = wrapper(*inputs)
    coords, labels = inputs[1], inputs[2]
    for multimask, chosen in ((False, slice(0, 1)), (True, slice(1, None))):
        out = model(
            image_embeddings=[feats_0, feats_1, embeddings],
            input_points=coords[:, None, :1],
            input_labels=labels[:, None, :1].to(torch.int64),
            input_boxes=coords[:, 1:].reshape(1, 1, 4),
            multimask_output=multimask,
        )
        np.testing.assert_allclose(low_res[:, chosen].numpy(), out.pred_masks[:, 0].numpy(), atol=atol, rtol=1e-3)
        np.testing.assert_allclose(iou[:, chosen].numpy(), out.iou_scores[:, 0].numpy(), atol=atol, rtol=1e-3)
        np.testing.assert_allclose(object_score.numpy(), out.object_score_logits[:, 0].numpy(), atol=atol)


def tiny_random_checkpoint(folder: Path, seed: int = 0) -> None:
    """Save the tiny random SAM 2 as a hub download would look (the tests export it back)."""
    tiny_random_model(seed).save_pretrained(str(folder))


def export_checkpoint(checkpoint: Path, out_dir: Path, options: ExportOptions) -> Exported:
    """Read ``checkpoint``, write ``encoder.onnx`` and ``decoder.onnx``, check them unless told not to."""
    try:
        model = load_model(checkpoint)
    except Exception as exc:  # transformers and safetensors raise many kinds for a bad file
        raise load_error(checkpoint, exc) from exc
    paths = export(model, out_dir, options.opset)
    timings = check(model, paths) if options.check else {}
    return Exported(
        adapter="models.adapters.sam:SamAdapter",
        files=dict(paths),
        options={
            "frame": "stretched",
            "decoder_adds_padding_point": True,
            "multimask": False,
            "mask_threshold": 0.0,
            "embedding_cache_mb": 256,
        },
        timings=timings,
        memory_mb=2048,
    )
