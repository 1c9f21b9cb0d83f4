"""StepVideoParallelDiTLoader, StepVideoParallelLoraLoader and StepVideoParallelSampler: one generation split over
several GPUs of this machine by persistent worker processes (``stepvideo_core.worker_pool``).

The rest of the graph stays as it is: the text encoders, the empty latent and the VAE are the single-device nodes;
the sampler takes the same CONDITIONING and LATENT as StepVideoSampler and returns a LATENT. The workers load the
DiT themselves from its file, keep it loaded between runs, and stop when the loader's output is dropped (its inputs
change, or ComfyUI exits).
"""

from __future__ import annotations

import logging

import comfy.model_management as mm
import comfy.utils
import latent_preview
import torch
from comfy_api.latest import io

from ..stepvideo_core.attention import AttentionBackendUnavailable, get_attention, is_available
from ..stepvideo_core.pipeline import GenerationSettings
from ..stepvideo_core.worker_pool import (
    DiTSpec,
    PoolConfig,
    SampleJob,
    SamplingCancelled,
    WorkerPool,
    check_engine,
    default_weight_dtype,
    parse_devices,
)
from . import conversions, registered_folders, validation
from .comfy_model import StepVideoLatentFormat
from .sampler_nodes import StepVideoSampler

log = logging.getLogger("stepvideo")

ParallelDiTType = io.Custom("STEPVIDEO_PARALLEL_DIT")
# The workers run without ComfyUI, so its own attention ("comfy") is not among their choices.
WORKER_ATTENTION = tuple(a for a in validation.ATTENTION_CHOICES if a != "comfy")
GUIDANCE_PARALLEL = {"auto": None, "on": True, "off": False}


class ParallelDiT:
    """What flows through a STEPVIDEO_PARALLEL_DIT socket: the worker pool (shared by every LoRA variant of it) and
    the LoRAs to apply, as (file, strength)."""

    def __init__(self, pool: WorkerPool, loras: tuple[tuple[str, float], ...] = ()):
        self.pool, self.loras = pool, loras

    def with_lora(self, path: str, strength: float) -> ParallelDiT:
        return ParallelDiT(self.pool, (*self.loras, (path, float(strength))))


class StepVideoParallelDiTLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StepVideoParallelDiTLoader",
            display_name="Step-Video Parallel DiT Loader",
            category="StepVideo/loaders",
            description="The Step-Video DiT on several GPUs of this machine: one worker process per GPU loads it from "
                        "the file and keeps it between runs; the Step-Video Parallel Sampler splits each generation "
                        "over them (guidance parallel, sequence parallel, optionally sharded weights).",
            inputs=[
                io.Combo.Input("model_name", options=registered_folders.dit_choices(),
                               tooltip=f"From {registered_folders.DIT_WHERE}."),
                io.Combo.Input("weight_dtype", options=list(validation.WEIGHT_DTYPES), default="default",
                               tooltip="Storage dtype on each worker; default: bf16 on GPUs, fp32 on the CPU."),
                io.Combo.Input("attention", options=list(WORKER_ATTENTION), default="sdpa",
                               tooltip="Attention inside the workers (they run without ComfyUI)."),
                io.String.Input("devices", default="all",
                                tooltip="'all' (every GPU), GPU indices like '0,1', or 'cpu' (slow, for testing)."),
                io.Int.Input("workers", default=0, min=0, max=64,
                             tooltip="0: one worker per listed GPU; N: the first N (with 'cpu': N CPU workers)."),
                io.Combo.Input("guidance_parallel", options=list(GUIDANCE_PARALLEL), default="auto",
                               tooltip="auto: cond/uncond on separate workers when their number is even and cfg != 1."),
                io.Boolean.Input("shard_weights", default=False,
                                 tooltip="Split the DiT blocks' weights over the workers (FSDP2) so that each holds "
                                         "1/N of them: for GPUs too small for a whole copy."),
                io.Int.Input("ff_chunk_size", default=0, min=0, max=1_000_000, step=1024,
                             tooltip="Run the feed-forward over at most this many tokens at a time (0: all at once): "
                                     "less activation memory, the same result."),
            ],
            outputs=[ParallelDiTType.Output(display_name="parallel_dit")],
        )

    @classmethod
    def validate_inputs(cls, model_name, weight_dtype, attention, devices, workers, guidance_parallel, shard_weights,
                        ff_chunk_size):
        if model_name is not None and registered_folders.dit_path(model_name) is None:
            return validation.not_found("DiT", model_name, registered_folders.DIT_WHERE)
        for name, value, choices in (("weight_dtype", weight_dtype, validation.WEIGHT_DTYPES),
                                     ("attention", attention, WORKER_ATTENTION),
                                     ("guidance_parallel", guidance_parallel, GUIDANCE_PARALLEL)):
            msg = validation.check_choice(name, value, choices)
            if msg is not True:
                return msg
        if attention is not None and not is_available(attention):
            try:
                get_attention(attention)
            except AttentionBackendUnavailable as e:
                return str(e)
        if devices is not None and workers is not None:
            try:
                parse_devices(devices, workers)
            except ValueError as e:
                return str(e)
        return True

    @classmethod
    def execute(cls, model_name, weight_dtype, attention, devices, workers, guidance_parallel, shard_weights,
                ff_chunk_size) -> io.NodeOutput:
        path = registered_folders.dit_path(model_name)
        if path is None:
            raise FileNotFoundError(validation.not_found("DiT", model_name, registered_folders.DIT_WHERE))
        config = PoolConfig(parse_devices(devices, workers), guidance_parallel=GUIDANCE_PARALLEL[guidance_parallel],
                            shard_weights=bool(shard_weights))
        check_engine(config)
        dtype = validation.parse_dtype(weight_dtype) or default_weight_dtype(config.devices)
        # Started by the first sampler run, not here: a changed loader's old workers are gone by then, so two
        # copies of the DiT never share a GPU.
        pool = WorkerPool(config, DiTSpec(path, weight_dtype=dtype, attention=attention,
                                          ff_chunk_size=int(ff_chunk_size)))
        log.info("StepVideo: parallel DiT %s on %s (%s)", model_name, ", ".join(config.devices), dtype)
        return io.NodeOutput(ParallelDiT(pool))


class StepVideoParallelLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StepVideoParallelLoraLoader",
            display_name="Step-Video Parallel LoRA Loader",
            category="StepVideo/loaders",
            description="Adds a LoRA to a parallel Step-Video DiT: each worker reads the file and applies it for the "
                        "runs that use this output, without reloading the DiT. Chainable.",
            inputs=[
                ParallelDiTType.Input("parallel_dit"),
                io.Combo.Input("lora_name", options=registered_folders.lora_choices(),
                               tooltip=f"From {registered_folders.LORA_WHERE}."),
                io.Float.Input("strength", default=1.0, min=validation.LORA_STRENGTH_RANGE[0],
                               max=validation.LORA_STRENGTH_RANGE[1], step=0.01),
            ],
            outputs=[ParallelDiTType.Output(display_name="parallel_dit")],
        )

    @classmethod
    def validate_inputs(cls, lora_name, strength):
        return registered_folders.lora_input_error(lora_name, strength)

    @classmethod
    def execute(cls, parallel_dit, lora_name, strength) -> io.NodeOutput:
        path = registered_folders.lora_file(lora_name)
        return io.NodeOutput(parallel_dit.with_lora(path, strength))


def fit_channels(latents: torch.Tensor, channels: int) -> torch.Tensor:
    """Core latents ``[B, T, C, H, W]`` with the DiT's channel count: an all-zero (empty) latent is resized, as
    StepVideoSampler does through ComfyUI; anything else must already match."""
    if latents.shape[2] != channels and not latents.any():
        return latents.new_zeros((*latents.shape[:2], channels, *latents.shape[3:]))
    conversions.check_latent_channels(latents.movedim(2, 1), channels, "this DiT")
    return latents


class StepVideoParallelSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        single = StepVideoSampler.define_schema()
        return io.Schema(
            node_id="StepVideoParallelSampler",
            display_name="Step-Video Parallel Sampler",
            category="StepVideo/sampling",
            description="StepVideoSampler on the workers of a Step-Video Parallel DiT Loader: the same inputs, the "
                        "same latents, one generation split over several GPUs. The first run starts the workers "
                        "(they load the DiT); later runs reuse them.",
            inputs=[ParallelDiTType.Input("parallel_dit"), *single.inputs[1:]],  # the single-device sampler's own
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def validate_inputs(cls, preset):
        return StepVideoSampler.validate_inputs(preset)

    @classmethod
    def execute(cls, parallel_dit, positive, negative, latent_image, preset, steps, cfg, shift, seed,
                denoise) -> io.NodeOutput:
        s = validation.resolve_preset(preset, steps, cfg, shift)
        if latent_image.get("noise_mask") is not None:
            raise ValueError("The Step-Video Parallel Sampler does not take a masked latent (noise_mask); use "
                             "StepVideoSampler for inpainting-style masks.")
        latents = conversions.to_core_latent(latent_image["samples"])
        pool = parallel_dit.pool
        try:
            if not pool.running:
                pool.start(should_cancel=mm.processing_interrupted)
            pbar = comfy.utils.ProgressBar(s.steps)
            # The previewer ComfyUI's own samplers use (per --preview-method), fed rank 0's first latent frame.
            previewer = latent_preview.get_previewer(mm.intermediate_device(), StepVideoLatentFormat(pool.in_channels))

            def progress(step: int, total: int, preview: torch.Tensor | None) -> None:
                image = None
                if previewer is not None and preview is not None:
                    image = previewer.decode_latent_to_preview_image("JPEG", conversions.to_comfy_latent(preview))
                pbar.update_absolute(step, total, image)

            job = SampleJob(conversions.from_conditioning(positive), conversions.from_conditioning(negative),
                            GenerationSettings(steps=s.steps, cfg=s.cfg, shift=s.shift, seed=int(seed),
                                               denoise=float(denoise)),
                            fit_channels(latents, pool.in_channels), parallel_dit.loras, preview=previewer is not None)
            # ComfyUI's interrupt arrives either as the flag (polled after each step) or as the exception its
            # progress hook raises; both stop every worker after the step, and the pool stays loaded.
            out = pool.sample(job, on_progress=progress, should_cancel=mm.processing_interrupted)
        except SamplingCancelled:
            mm.throw_exception_if_processing_interrupted()
            raise
        result = {k: v for k, v in latent_image.items() if k != "noise_mask"}
        result["samples"] = conversions.to_comfy_latent(out).to(mm.intermediate_device())
        return io.NodeOutput(result)
