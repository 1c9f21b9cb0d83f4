"""StepVideoEmptyLatent."""

from __future__ import annotations

import comfy.model_management as mm
import torch
from comfy_api.latest import io

from ..stepvideo_core import video_shape
from ..stepvideo_core.pipeline import GenerationSettings
from . import validation


class StepVideoEmptyLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        side, chunk, release = video_shape.SPATIAL_FACTOR, video_shape.FRAMES_PER_CHUNK, GenerationSettings()
        return io.Schema(
            node_id="StepVideoEmptyLatent",
            display_name="Step-Video Empty Latent",
            category="StepVideo/latent",
            description="An empty Step-Video latent [batch, 64, frames/17*3, height/16, width/16]; samplers resize it "
                        "to their model's channels (16 for the built-in Step-Video-Tiny). Official sizes: 992x544 (and "
                        "544x992), 768x768; 204 frames at 25 fps. Step-Video-Tiny: 128x128, 17 frames.",
            inputs=[
                io.Int.Input("width", default=release.width, min=side, max=video_shape.MAX_SIDE, step=side),
                io.Int.Input("height", default=release.height, min=side, max=video_shape.MAX_SIDE, step=side),
                io.Int.Input("frames", default=release.num_frames, min=chunk, max=video_shape.MAX_FRAMES, step=chunk,
                             tooltip="Video frames: a multiple of 17 (17 frames -> 3 latent frames)."),
                io.Int.Input("batch_size", default=1, min=1, max=video_shape.MAX_BATCH),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def validate_inputs(cls, width, height, frames, batch_size):
        # Taking these inputs here makes ComfyUI skip the schema's min/max for them: video_shape checks every limit.
        return validation.validate_video_request(width, height, frames, batch_size)

    @classmethod
    def execute(cls, width, height, frames, batch_size=1) -> io.NodeOutput:
        shape = validation.empty_latent_shape(width, height, frames, batch_size)
        return io.NodeOutput({"samples": torch.zeros(shape, device=mm.intermediate_device())})
