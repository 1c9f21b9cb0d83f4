"""StepVideoTextEncoderLoader and StepVideoTextEncode."""

from __future__ import annotations

import logging

import comfy.model_management as mm
import comfy.model_patcher
import torch
from comfy_api.latest import io

from ..stepvideo_core.text_encoding import TextEncoders, encode_prompts, load_text_encoders
from . import conversions, registered_folders, validation

log = logging.getLogger("stepvideo")

TextEncodersType = io.Custom("STEPVIDEO_TEXT_ENCODERS")


class _EncoderModules(torch.nn.Module):
    """Both encoders under one module so one ModelPatcher (and ComfyUI's memory manager) moves them together."""

    def __init__(self, encoders: TextEncoders):
        super().__init__()
        self.step_llm = encoders.step_llm
        self.clip = encoders.clip


class StepVideoTextEncoders:
    """What flows through a STEPVIDEO_TEXT_ENCODERS socket: the core encoders and their ModelPatcher."""

    def __init__(self, encoders: TextEncoders, patcher):
        self.encoders = encoders
        self.patcher = patcher


class StepVideoTextEncoderLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StepVideoTextEncoderLoader",
            display_name="Step-Video Text Encoder Loader",
            category="StepVideo/loaders",
            description="Loads Step-LLM (bilingual, 6144-d) and Hunyuan-CLIP, the two text encoders of Step-Video-T2V.",
            inputs=[
                io.Combo.Input("step_llm", options=registered_folders.step_llm_choices(), tooltip=f"From {registered_folders.STEP_LLM_WHERE}."),
                io.Combo.Input("hunyuan_clip", options=registered_folders.hunyuan_clip_choices(), tooltip=f"From {registered_folders.CLIP_WHERE}."),
                io.Combo.Input("llm_dtype", options=list(validation.LLM_DTYPES), default="bf16",
                               tooltip="Storage dtype of Step-LLM's weights (fp8 computes in bf16 layer by layer)."),
                io.Combo.Input("device", options=["default", "cpu"], default="default",
                               tooltip="'cpu' keeps the 39 GB encoder off the GPU (slower, saves VRAM)."),
            ],
            outputs=[TextEncodersType.Output("text_encoders")],
        )

    @classmethod
    def validate_inputs(cls, step_llm, hunyuan_clip, llm_dtype, device):
        if step_llm is not None and registered_folders.text_encoder_path(step_llm) is None:
            return validation.not_found("Step-LLM folder", step_llm, registered_folders.STEP_LLM_WHERE)
        if hunyuan_clip is not None and registered_folders.text_encoder_path(hunyuan_clip) is None:
            return validation.not_found("Hunyuan-CLIP folder", hunyuan_clip, registered_folders.CLIP_WHERE)
        for name, value, choices in (("llm_dtype", llm_dtype, validation.LLM_DTYPES), ("device", device, ("default", "cpu"))):
            msg = validation.check_choice(name, value, choices)
            if msg is not True:
                return msg
        return True

    @classmethod
    def execute(cls, step_llm, hunyuan_clip, llm_dtype, device) -> io.NodeOutput:
        llm_dir, clip_dir = registered_folders.text_encoder_path(step_llm), registered_folders.text_encoder_path(hunyuan_clip)
        if llm_dir is None:
            raise FileNotFoundError(validation.not_found("Step-LLM folder", step_llm, registered_folders.STEP_LLM_WHERE))
        if clip_dir is None:
            raise FileNotFoundError(validation.not_found("Hunyuan-CLIP folder", hunyuan_clip, registered_folders.CLIP_WHERE))
        load_device = torch.device("cpu") if device == "cpu" else mm.text_encoder_device()
        offload_device = mm.text_encoder_offload_device()
        weight_dtype = validation.parse_dtype(llm_dtype)
        if load_device.type == "cpu" and weight_dtype in (torch.float16,):
            weight_dtype = torch.float32  # fp16 matmuls are slow or missing on CPU
        log.info("StepVideo: loading text encoders %s + %s (%s, on %s)", llm_dir, clip_dir, weight_dtype, load_device)
        encoders = load_text_encoders(llm_dir, clip_dir, weight_dtype=weight_dtype, device=offload_device)
        patcher = comfy.model_patcher.ModelPatcher(_EncoderModules(encoders), load_device=load_device,
                                                   offload_device=offload_device)
        return io.NodeOutput(StepVideoTextEncoders(encoders, patcher))


class StepVideoTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StepVideoTextEncode",
            display_name="Step-Video Text Encode",
            category="StepVideo/conditioning",
            description="Encodes a prompt (Chinese or English) and a negative prompt for the Step-Video DiT. The magic "
                        "switches append the official quality strings, as the reference pipeline does.",
            inputs=[
                TextEncodersType.Input("text_encoders"),
                io.String.Input("prompt", multiline=True, default="", dynamic_prompts=True),
                io.String.Input("negative_prompt", multiline=True, default=""),
                io.Boolean.Input("positive_magic", default=True),
                io.Boolean.Input("negative_magic", default=True),
            ],
            outputs=[io.Conditioning.Output("positive"), io.Conditioning.Output("negative")],
        )

    @classmethod
    def execute(cls, text_encoders, prompt, negative_prompt="", positive_magic=True, negative_magic=True) -> io.NodeOutput:
        if not isinstance(text_encoders, StepVideoTextEncoders):
            raise ValueError("text_encoders must come from StepVideoTextEncoderLoader")
        patcher = text_encoders.patcher
        mm.load_models_gpu([patcher])
        mm.throw_exception_if_processing_interrupted()
        pos, neg = encode_prompts(text_encoders.encoders, prompt, negative_prompt or None, positive_magic=positive_magic,
                                  negative_magic=negative_magic, device=patcher.load_device, after="keep")
        out = mm.intermediate_device()
        pos, neg = pos.to(device=out), neg.to(device=out)
        return io.NodeOutput(conversions.to_conditioning(pos), conversions.to_conditioning(neg))
