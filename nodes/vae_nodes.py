"""StepVideoVAELoader, StepVideoVAEDecode (tiled, chunked) and StepVideoVAEEncode."""

from __future__ import annotations

import logging

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import torch
from comfy_api.latest import io

from ..stepvideo_core import memory
from ..stepvideo_core.vae import load_vae
from . import conversions, registered_folders, validation

log = logging.getLogger("stepvideo")

VAEType = io.Custom("STEPVIDEO_VAE")


class _VAEModule(torch.nn.Module):
    """Holder for the core VAE: ModelPatcher sets ``.device`` on its model, which VideoVAE exposes read-only."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae


class StepVideoVAEHandle:
    """What flows through a STEPVIDEO_VAE socket: the core VAE and its ModelPatcher."""

    def __init__(self, vae, patcher):
        self.vae = vae
        self.patcher = patcher

    def load(self, memory_required: int = 0) -> None:
        """``memory_required``: activation bytes of the coming call, which ComfyUI frees room for besides the weights.
        The core VAE reads its weights directly in places, so it is always loaded whole."""
        mm.load_models_gpu([self.patcher], memory_required=memory_required, force_full_load=True)


def _progress_callback():
    state = {}

    def callback(done: int, total: int) -> None:
        # ProgressBar.update_absolute also raises when the user pressed Cancel (the server's progress hook checks).
        if "bar" not in state:
            state["bar"] = comfy.utils.ProgressBar(total)
        state["bar"].update_absolute(done, total)
        mm.throw_exception_if_processing_interrupted()

    return callback


class StepVideoVAELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StepVideoVAELoader",
            display_name="Step-Video VAE Loader",
            category="StepVideo/loaders",
            description="Loads the Step-Video Video-VAE v2 (vae_v2.safetensors: 16x16 spatial, 17 frames -> 3 latents; "
                        "64 latent channels, 16 for the built-in Step-Video-Tiny).",
            inputs=[
                io.Combo.Input("vae_name", options=registered_folders.vae_choices(), tooltip=f"From {registered_folders.VAE_WHERE}."),
                io.Combo.Input("dtype", options=list(validation.VAE_DTYPES), default="bf16"),
            ],
            outputs=[VAEType.Output("vae")],
        )

    @classmethod
    def validate_inputs(cls, vae_name, dtype):
        if vae_name is not None and registered_folders.vae_path(vae_name) is None:
            return validation.not_found("VAE", vae_name, registered_folders.VAE_WHERE)
        return validation.check_choice("dtype", dtype, validation.VAE_DTYPES)

    @classmethod
    def execute(cls, vae_name, dtype) -> io.NodeOutput:
        path = registered_folders.vae_path(vae_name)
        if path is None:
            raise FileNotFoundError(validation.not_found("VAE", vae_name, registered_folders.VAE_WHERE))
        load_device, offload_device = mm.vae_device(), mm.vae_offload_device()
        torch_dtype = validation.parse_dtype(dtype)
        if load_device.type == "cpu" and torch_dtype != torch.float32:
            # Half-precision 3D convolutions run about 30x slower than fp32 on CPUs (measured here), and a CPU has
            # the memory to spare: decode in fp32 there whatever the GPU-oriented setting says.
            log.info("StepVideo: the VAE runs on the CPU, so it computes in float32 instead of %s", torch_dtype)
            torch_dtype = torch.float32
        log.info("StepVideo: loading VAE %s (%s)", path, torch_dtype)
        vae = load_vae(path, dtype=torch_dtype, device=offload_device)
        patcher = comfy.model_patcher.ModelPatcher(_VAEModule(vae), load_device=load_device, offload_device=offload_device)
        return io.NodeOutput(StepVideoVAEHandle(vae, patcher))


class StepVideoVAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StepVideoVAEDecode",
            display_name="Step-Video VAE Decode",
            category="StepVideo/latent",
            description="Decodes Step-Video latents to frames, 3 latent frames (17 video frames) at a time, optionally "
                        "in overlapping spatial tiles to bound memory.",
            inputs=[
                VAEType.Input("vae"),
                io.Latent.Input("samples"),
                io.Int.Input("tile_size", default=16, min=0, max=validation.MAX_TILE_SIZE, step=1,
                             tooltip="Tile size in latent units (1 = 16 pixels); 0 decodes whole frames."),
                io.Int.Input("tile_overlap", default=4, min=0, max=validation.MAX_TILE_OVERLAP, step=1,
                             tooltip="Overlap between tiles in latent units (at most half a tile)."),
            ],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def validate_inputs(cls, tile_size, tile_overlap):
        # Taking these inputs here makes ComfyUI skip the schema's min/max for them: validate_tiling checks both.
        return validation.validate_tiling(tile_size, tile_overlap)

    @classmethod
    def execute(cls, vae, samples, tile_size=16, tile_overlap=4) -> io.NodeOutput:
        latents = conversions.to_core_latent(samples["samples"])
        conversions.check_latent_channels(samples["samples"], vae.vae.config.z_channels, "this VAE")
        tile = None
        if tile_size and (tile_size < latents.shape[-2] or tile_size < latents.shape[-1]):
            tile = int(tile_size)
        b, num_latents, _, lh, lw = latents.shape
        vae.load(memory.vae_decode_bytes(vae.vae.config, b, num_latents, lh, lw, vae.vae.compute_dtype, tile))
        video = vae.vae.decode(latents.to(vae.vae.compute_dtype), tile_size=tile, tile_overlap=int(tile_overlap),
                               callback=_progress_callback())
        return io.NodeOutput(conversions.video_to_images(video).to(mm.intermediate_device()))


class StepVideoVAEEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StepVideoVAEEncode",
            display_name="Step-Video VAE Encode",
            category="StepVideo/latent",
            description="Encodes frames (17 per 3 latent frames; 1, or 17q, 17q+1, 17q+9 frames) to Step-Video latents "
                        "(the posterior mean).",
            inputs=[VAEType.Input("vae"), io.Image.Input("image")],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, vae, image) -> io.NodeOutput:
        video = conversions.images_to_video(image)
        vae.load()
        latents = vae.vae.encode(video, sample=False, callback=_progress_callback())
        return io.NodeOutput({"samples": conversions.to_comfy_latent(latents.float()).contiguous().to(mm.intermediate_device())})
