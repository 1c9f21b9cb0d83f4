"""StepVideoImageToVideo: the start image as Step-Video-TI2V's condition, carried in the CONDITIONING."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import comfy.model_management as mm
import folder_paths
import node_helpers
import torch
from comfy_api.latest import io

from ..stepvideo_core import video_shape
from ..stepvideo_core.image_condition import (
    DEFAULT_MOTION_SCORE,
    MOTION_SCORE_RANGE,
    OFFICIAL_TI2V_FRAMES,
    image_condition,
)
from ..stepvideo_core.pipeline import GenerationSettings
from . import conversions, validation
from .vae_nodes import VAEType

log = logging.getLogger("stepvideo")

# The start image of the shipped TI2V workflow, rendered by the synthetic world (stepvideo_core/tiny/ti2v.py).
EXAMPLE_START_IMAGE = Path(__file__).resolve().parents[1] / "workflows" / "inputs" / "step_video_tiny_ti2v_start.png"

# The reference draws the image latent from the VAE posterior with no seed of its own; a fixed seed here keeps the
# node's output (and ComfyUI's cache of it) the same from run to run.
POSTERIOR_SEED = 0


class StepVideoImageToVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        side, chunk, release = video_shape.SPATIAL_FACTOR, video_shape.FRAMES_PER_CHUNK, GenerationSettings()
        return io.Schema(
            node_id="StepVideoImageToVideo",
            display_name="Step-Video Image to Video",
            category="StepVideo/conditioning",
            description="Image to video with Step-Video-TI2V: the start image is scaled to cover width x height, "
                        "centre-cropped, encoded as the first latent frame (zeros after it) and attached, with the "
                        "motion score, to both conditionings. Returns them with an empty latent for any sampler. "
                        f"Official: {release.width}x{release.height} (or {release.height}x{release.width}), "
                        f"{OFFICIAL_TI2V_FRAMES} frames, {release.steps} steps, cfg {release.cfg:g}, shift "
                        f"{release.shift:g}. Step-Video-Tiny TI2V: 128x128, 17 frames.",
            inputs=[
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                VAEType.Input("vae"),
                io.Image.Input("start_image", tooltip="The video's first frame (the first image of a batch)."),
                io.Int.Input("width", default=release.width, min=side, max=video_shape.MAX_SIDE, step=side),
                io.Int.Input("height", default=release.height, min=side, max=video_shape.MAX_SIDE, step=side),
                io.Int.Input("frames", default=OFFICIAL_TI2V_FRAMES, min=chunk, max=video_shape.MAX_FRAMES, step=chunk,
                             tooltip=f"Video frames: a multiple of {chunk} ({chunk} frames -> "
                                     f"{video_shape.LATENTS_PER_CHUNK} latent frames)."),
                io.Float.Input("motion_score", default=DEFAULT_MOTION_SCORE, min=MOTION_SCORE_RANGE[0],
                               max=MOTION_SCORE_RANGE[1], step=0.5,
                               tooltip="How much moves: 2 = stable, 5 = the official default, 10 = strong camera "
                                       "motion, 20 = intense."),
                io.Int.Input("batch_size", default=1, min=1, max=video_shape.MAX_BATCH),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive"),
                io.Conditioning.Output(display_name="negative"),
                io.Latent.Output(display_name="latent"),
            ],
        )

    @classmethod
    def validate_inputs(cls, width, height, frames, batch_size):
        return validation.validate_video_request(width, height, frames, batch_size)

    @classmethod
    def execute(cls, positive, negative, vae, start_image, width, height, frames, motion_score,
                batch_size=1) -> io.NodeOutput:
        image = conversions.images_to_video(start_image[:1])[0, 0]  # [3, H, W] in [-1, 1]
        vae.load()
        condition = image_condition(vae.vae, image, int(frames), int(height), int(width), batch=1,
                                    motion_score=float(motion_score),
                                    generator=torch.Generator(device=vae.vae.device).manual_seed(POSTERIOR_SEED))
        values = {k: v.to(mm.intermediate_device()) for k, v in conversions.image_condition_values(condition).items()}
        positive = node_helpers.conditioning_set_values(positive, values)
        negative = node_helpers.conditioning_set_values(negative, values)
        _, channels, latent_frames, h, w = values[conversions.IMAGE_LATENTS_KEY].shape
        latent = torch.zeros((int(batch_size), channels, latent_frames, h, w), device=mm.intermediate_device())
        return io.NodeOutput(positive, negative, {"samples": latent})


def provide_example_image() -> None:
    """Copy the TI2V workflow's start image into ComfyUI's input folder, where LoadImage finds it; a file of that
    name already there (the user's) is left alone."""
    target = Path(folder_paths.get_input_directory()) / EXAMPLE_START_IMAGE.name
    if target.exists() or not EXAMPLE_START_IMAGE.is_file():
        return
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(EXAMPLE_START_IMAGE, target)
    except OSError as e:
        log.warning("StepVideo: could not copy the example start image to %s (%s); load %s by hand", target, e,
                    EXAMPLE_START_IMAGE)
