"""StepVideoTextEncoderLoader and StepVideoTextEncode."""

from __future__ import annotations

import logging
import os

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import folder_paths
import torch
from comfy_api.latest import io

from ..stepvideo_core import memory
from ..stepvideo_core.loading import is_gguf
from ..stepvideo_core.ops import FP8_DTYPES
from ..stepvideo_core.step_llm import TOKENIZER_FILE, tokenizer_folder
from ..stepvideo_core.text_cache import TextEmbeddingCache, encode_prompts_cached, encoder_identity
from ..stepvideo_core.text_encoding import MAGIC_SETS, TextEncoders, load_text_encoders, magic_suffixes
from . import conversions, registered_folders, validation

log = logging.getLogger("stepvideo")

TextEncodersType = io.Custom("STEPVIDEO_TEXT_ENCODERS")


def cache_folder() -> str:
    """Encoded prompts live in the ComfyUI user directory (kept across restarts, unlike temp/)."""
    return os.path.join(folder_paths.get_user_directory(), "stepvideo", "text_cache")


class StepVideoTextEncoders:
    """What flows through a STEPVIDEO_TEXT_ENCODERS socket: where the encoders are and how to load them.

    Nothing is read from disk until ``load()``, which the encode node calls only when a prompt is not in the text
    cache. Step-LLM is built from ``comfy.ops`` layers inside its own ModelPatcher, so ComfyUI can load it
    partially and stream the rest layer by layer; Hunyuan-CLIP (a ``transformers`` BERT of plain torch layers,
    0.4 GB) has its own patcher and is always loaded whole, right before it runs.
    """

    def __init__(self, llm_dir: str, clip_dir: str, weight_dtype: torch.dtype, load_device, offload_device):
        self.llm_dir, self.clip_dir = llm_dir, clip_dir
        self.weight_dtype = weight_dtype
        self.compute_dtype = torch.bfloat16 if weight_dtype in FP8_DTYPES else weight_dtype
        self.load_device, self.offload_device = load_device, offload_device
        self.encoders: TextEncoders | None = None
        self.llm_patcher = self.clip_patcher = None

    def identity(self) -> str:
        # A GGUF Step-LLM is one file: its tokenizer (beside it) is part of what the states depend on.
        tokenizer = [os.path.join(tokenizer_folder(self.llm_dir), TOKENIZER_FILE)] if is_gguf(self.llm_dir) else []
        return encoder_identity([self.llm_dir, *tokenizer, self.clip_dir], llm_dtype=self.weight_dtype)

    def load(self) -> TextEncoders:
        if self.encoders is None:
            # A GGUF's unquantized tensors are stored in the compute dtype (its quantized layers dequantize to it).
            stored = self.compute_dtype if is_gguf(self.llm_dir) else self.weight_dtype
            operations = comfy.ops.pick_operations(stored, self.compute_dtype, load_device=self.load_device)
            log.info("StepVideo: loading text encoders %s + %s (%s, computing in %s on %s)", self.llm_dir,
                     self.clip_dir, self.weight_dtype, self.compute_dtype, self.load_device)
            encoders = load_text_encoders(self.llm_dir, self.clip_dir, weight_dtype=self.weight_dtype,
                                          device=self.offload_device, operations=operations)
            self.llm_patcher = comfy.model_patcher.ModelPatcher(encoders.step_llm, load_device=self.load_device,
                                                                offload_device=self.offload_device)
            self.clip_patcher = comfy.model_patcher.ModelPatcher(encoders.clip, load_device=self.load_device,
                                                                 offload_device=self.offload_device)
            self.encoders = encoders
        return self.encoders

    def prepare(self, stage: str) -> None:
        """Bring the encoder about to run to the load device (``text_encoding.PrepareHook``)."""
        if stage == "step_llm":
            batch, length = memory.prompt_pair_tokens()
            llm = self.encoders.step_llm
            needed = memory.step_llm_activation_bytes(llm.config, batch, length, self.compute_dtype,
                                                      weight_dtype=getattr(llm, "weight_format", self.weight_dtype),
                                                      streamed=True)
            mm.load_models_gpu([self.llm_patcher], memory_required=needed)
        else:
            mm.load_models_gpu([self.clip_patcher], force_full_load=True)
        mm.throw_exception_if_processing_interrupted()


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
                               tooltip="Storage dtype of Step-LLM's weights (fp8 computes in bf16 layer by layer). "
                                       "For a .gguf: the dtype it computes in (its weights stay quantized)."),
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
        weight_dtype = validation.parse_dtype(llm_dtype)
        if load_device.type == "cpu" and weight_dtype in (torch.float16,):
            weight_dtype = torch.float32  # fp16 matmuls are slow or missing on CPU
        # Lazy: the weights load on the first prompt that is not in the text cache.
        return io.NodeOutput(StepVideoTextEncoders(llm_dir, clip_dir, weight_dtype, load_device,
                                                   mm.text_encoder_offload_device()))


class StepVideoTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StepVideoTextEncode",
            display_name="Step-Video Text Encode",
            category="StepVideo/conditioning",
            description="Encodes a prompt (Chinese or English) and a negative prompt for the Step-Video DiT. The magic "
                        "switches append the official quality strings, as the reference pipeline does: the "
                        "text-to-video pair (t2v), Step-Video-TI2V's pair (ti2v) or none.",
            inputs=[
                TextEncodersType.Input("text_encoders"),
                io.String.Input("prompt", multiline=True, default="", dynamic_prompts=True),
                io.String.Input("negative_prompt", multiline=True, default=""),
                io.Boolean.Input("positive_magic", default=True),
                io.Boolean.Input("negative_magic", default=True),
                io.Boolean.Input("cache", default=True, optional=True,  # optional: older API prompts lack it
                                 tooltip="Keep the encoded prompt on disk (ComfyUI user folder, stepvideo/text_cache, "
                                         "at most 1 GiB, least recently used first out): a cached prompt runs "
                                         "without loading Step-LLM at all."),
                # Appended last and optional: saved graphs and API prompts from before it keep their values.
                io.Combo.Input("suffixes", options=list(MAGIC_SETS), default="t2v", optional=True,
                               tooltip="Which official quality strings the magic switches append: t2v (Step-Video-T2V "
                                       "and Turbo), ti2v (the official Step-Video-TI2V model) or none."),
            ],
            outputs=[io.Conditioning.Output("positive"), io.Conditioning.Output("negative")],
        )

    @classmethod
    def validate_inputs(cls, suffixes="t2v"):
        return validation.check_choice("suffixes", suffixes, MAGIC_SETS)

    @classmethod
    def execute(cls, text_encoders, prompt, negative_prompt="", positive_magic=True, negative_magic=True,
                cache=True, suffixes="t2v") -> io.NodeOutput:
        if not isinstance(text_encoders, StepVideoTextEncoders):
            raise ValueError("text_encoders must come from StepVideoTextEncoderLoader")
        positive_magic, negative_magic = magic_suffixes(suffixes, positive_magic, negative_magic)
        store = TextEmbeddingCache(cache_folder()) if cache else None
        pos, neg, hit = encode_prompts_cached(store, text_encoders.identity(), text_encoders.load, prompt,
                                              negative_prompt or None, positive_magic=positive_magic,
                                              negative_magic=negative_magic, device=text_encoders.load_device,
                                              after="keep", prepare=text_encoders.prepare)
        if hit:
            log.info("StepVideo: prompt found in the text cache; the text encoders were not needed")
        out = mm.intermediate_device()
        pos, neg = pos.to(device=out), neg.to(device=out)
        return io.NodeOutput(conversions.to_conditioning(pos), conversions.to_conditioning(neg))
