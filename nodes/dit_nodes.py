"""StepVideoDiTLoader and StepVideoLoraLoader."""

from __future__ import annotations

import logging

import comfy.utils
from comfy.weight_adapter.lora import LoRAAdapter
from comfy_api.latest import io, ui

from ..stepvideo_core.lora import LoraError, parse_lora
from . import conversions, registered_folders, validation
from .comfy_model import build_model_patcher, comfy_attention

log = logging.getLogger("stepvideo")


class StepVideoDiTLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StepVideoDiTLoader",
            display_name="Step-Video DiT Loader",
            category="StepVideo/loaders",
            description="Loads the Step-Video-T2V or -TI2V (image to video) diffusion transformer (one .safetensors "
                        "file, the official transformer/ folder, or a .gguf whose weights stay quantized and are "
                        "dequantized layer by layer) as a MODEL managed by ComfyUI's memory manager.",
            inputs=[
                io.Combo.Input("model_name", options=registered_folders.dit_choices(),
                               tooltip=f"From {registered_folders.DIT_WHERE}."),
                io.Combo.Input("weight_dtype", options=list(validation.DIT_WEIGHT_DTYPES), default="default",
                               tooltip="Storage dtype of the weights. fp8 halves memory; layers are cast to bf16 one at a time; "
                                       "fp8_e4m3fn_fast multiplies in fp8 where the GPU can. For a .gguf: the dtype "
                                       "it computes in (its weights stay quantized; fp8 computes in bf16)."),
                io.Combo.Input("attention", options=list(validation.ATTENTION_CHOICES), default="comfy",
                               tooltip="'comfy' uses ComfyUI's choice (--use-sage-attention, --use-flash-attention, "
                                       "...); the others override it with that ComfyUI attention function."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def validate_inputs(cls, model_name, weight_dtype, attention):
        if model_name is not None and registered_folders.dit_path(model_name) is None:
            return validation.not_found("DiT", model_name, registered_folders.DIT_WHERE)
        for name, value, choices in (("weight_dtype", weight_dtype, validation.DIT_WEIGHT_DTYPES),
                                     ("attention", attention, validation.ATTENTION_CHOICES)):
            msg = validation.check_choice(name, value, choices)
            if msg is not True:
                return msg
        if attention is not None:
            try:
                comfy_attention(attention)
            except ValueError as e:
                return str(e)
        return True

    @classmethod
    def execute(cls, model_name, weight_dtype, attention) -> io.NodeOutput:
        path = registered_folders.dit_path(model_name)
        if path is None:
            raise FileNotFoundError(validation.not_found("DiT", model_name, registered_folders.DIT_WHERE))
        return io.NodeOutput(build_model_patcher(path, validation.parse_dtype(weight_dtype), comfy_attention(attention),
                                                 fp8_fast=weight_dtype == validation.FAST_FP8))


class StepVideoLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StepVideoLoraLoader",
            display_name="Step-Video LoRA Loader",
            category="StepVideo/loaders",
            description="Adds a LoRA to a Step-Video MODEL (PEFT, kohya or ComfyUI keys; separate q/k/v are fused into "
                        "the DiT's wqkv/wkv). Chainable; changing it re-patches weights without reloading the model.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("lora_name", options=registered_folders.lora_choices(), tooltip=f"From {registered_folders.LORA_WHERE}."),
                io.Float.Input("strength", default=1.0, min=validation.LORA_STRENGTH_RANGE[0],
                               max=validation.LORA_STRENGTH_RANGE[1], step=0.01),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def validate_inputs(cls, lora_name, strength):
        return registered_folders.lora_input_error(lora_name, strength)

    @classmethod
    def execute(cls, model, lora_name, strength) -> io.NodeOutput:
        path = registered_folders.lora_file(lora_name)
        dit = getattr(model.model, "diffusion_model", None)
        if not hasattr(dit, "transformer_blocks") or not hasattr(dit, "config"):
            raise ValueError("StepVideoLoraLoader needs a MODEL from StepVideoDiTLoader.")
        state = comfy.utils.load_torch_file(path, safe_load=True)
        try:
            lora = parse_lora(state, dit)
        except LoraError as e:
            raise ValueError(f"{lora_name}: {e}") from None
        patches = {key: LoRAAdapter(set(), (up, down, None, None, None, None))
                   for key, (up, down) in conversions.lora_patch_keys(lora.pairs).items()}
        patched = model.clone()
        accepted = patched.add_patches(patches, float(strength))
        report = lora.summary(len(accepted))
        log.info("%s (%s, strength %s)", report, lora_name, strength)
        return io.NodeOutput(patched, ui=ui.PreviewText(report))
