"""The Step-Video DiT as a native ComfyUI MODEL: a ``BaseModel`` subclass inside a ``ModelPatcher``.

Flow sampling (``ModelType.FLOW``) with the Step-Video shift, so core samplers, ``ModelSamplingSD3`` and the
core LoRA loaders work. See ``conversions.py`` for the convention bridge (t = 1 - sigma, output = -velocity).
"""

from __future__ import annotations

import logging

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.patcher_extension
import comfy.supported_models_base
import torch

from ..stepvideo_core.attention import install_hint
from ..stepvideo_core.dit import load_dit
from ..stepvideo_core.loading import Checkpoint, is_gguf, scaled_fp8_dtype
from ..stepvideo_core.memory import dit_activation_bytes, dit_tokens
from ..stepvideo_core.ops import FP8_DTYPES
from ..stepvideo_core.scheduler import DEFAULT_PRESET, PRESETS
from .conversions import CLIP_KEY, IMAGE_LATENTS_KEY, LATENT_CHANNELS, MASK_KEY, MOTION_SCORE_KEY
from .previews import preview_rgb

log = logging.getLogger("stepvideo")

class StepVideoLatentFormat(comfy.latent_formats.LatentFormat):
    """Per model: the channel count is the loaded DiT's (64 for Step-Video-T2V, 16 for Step-Video-Tiny), which
    ComfyUI's samplers use to resize an empty latent and the previewer to map latents to RGB."""

    latent_dimensions = 3
    scale_factor = 1.0  # the DiT consumes the VAE's latents as they are (no scale, no shift)

    def __init__(self, channels: int = LATENT_CHANNELS):
        self.latent_channels = channels
        self.latent_rgb_factors, self.latent_rgb_factors_bias = preview_rgb(channels)


class StepVideoModelConfig(comfy.supported_models_base.BASE):
    unet_config = {"disable_unet_model_creation": True}
    unet_extra_config = {}
    latent_format = StepVideoLatentFormat
    # The default preset's shift for samplers that take the model's own (KSampler); multiplier: ComfyUI's flow scale.
    sampling_settings = {"shift": PRESETS[DEFAULT_PRESET].shift, "multiplier": 1000}
    # No memory_usage_factor: StepVideoModel.memory_required replaces ComfyUI's generic estimate with the measured plan.
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]


class StepVideoModel(comfy.model_base.BaseModel):
    """Wraps ``StepVideoDiT``; the DiT is ``self.diffusion_model`` so weights are ``diffusion_model.<official name>``."""

    def __init__(self, model_config, dit, device=None):
        super().__init__(model_config, model_type=comfy.model_base.ModelType.FLOW, device=device)
        self.diffusion_model = dit

    def get_dtype(self):
        return self.diffusion_model.dtype

    def extra_conds(self, **kwargs):
        out = {}
        cross = kwargs.get("cross_attn")
        if cross is not None:
            # CONDRegular, not CONDCrossAttn: the states are fixed length (320) and must never be repeat-padded.
            out["c_crossattn"] = comfy.conds.CONDRegular(cross)
        for key in (MASK_KEY, CLIP_KEY, IMAGE_LATENTS_KEY, MOTION_SCORE_KEY):
            if kwargs.get(key) is not None:
                out[key] = comfy.conds.CONDRegular(kwargs[key])
        return out

    def memory_required(self, input_shape, cond_shapes=None):
        """Activation bytes of one DiT call on latents of ``input_shape`` (``[b, c, t, h, w]``), from the measured
        plan in ``stepvideo_core.memory``. ComfyUI reserves this before loading weights (so partial loading leaves
        room for it) and compares it with free memory to decide whether cond and uncond run as one batch.
        ``streamed``: weights may be brought layer by layer from the offload device, one layer in flight."""
        dit = self.diffusion_model
        batch, tokens = dit_tokens(input_shape, dit.config.patch_size)
        # A GGUF DiT's layers are in flight as their quantized bytes plus the dequantized weight.
        return dit_activation_bytes(dit.config, batch, tokens, dit.compute_dtype,
                                    weight_dtype=getattr(dit, "weight_format", self.get_dtype()), streamed=True)

    def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        sigma = t
        mask, clip = kwargs.get(MASK_KEY), kwargs.get(CLIP_KEY)
        if c_crossattn is None or mask is None or clip is None:
            raise ValueError("The Step-Video model needs conditioning from StepVideoTextEncode (Step-LLM + CLIP states "
                             "and their mask); other text encoders' CONDITIONING does not fit it.")
        image, score = kwargs.get(IMAGE_LATENTS_KEY), kwargs.get(MOTION_SCORE_KEY)  # TI2V (StepVideoImageToVideo)
        options = {} if transformer_options is None else transformer_options
        dtype = self.diffusion_model.compute_dtype
        xc = self.model_sampling.calculate_input(sigma, x).to(dtype)
        if xc.data_ptr() == x.data_ptr():
            # The wrappers get latents of their own: a step cache may add to them in place (core EasyCache does),
            # and ``x`` is still needed for the denoised result below.
            xc = xc.clone()
        device = xc.device
        b = xc.shape[0]
        t_ref = (1.0 - sigma.reshape(-1).float()).to(device)
        if t_ref.numel() == 1 and b > 1:
            t_ref = t_ref.expand(b)
        # Core video models run their forward through the DIFFUSION_MODEL wrappers (EasyCache and other step caches
        # hook there); the executor sits here because the core DiT imports nothing from ComfyUI.
        model_output = comfy.patcher_extension.WrapperExecutor.new_class_executor(
            self._diffusion_forward,
            self.diffusion_model,
            comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, options),
        ).execute(xc, t_ref, c_crossattn.to(device=device, dtype=dtype), mask.to(device=device),
                  clip.to(device=device, dtype=dtype), options,
                  condition=None if image is None else image.to(device=device, dtype=dtype),
                  motion_score=None if score is None else score.to(device))
        return self.model_sampling.calculate_denoised(sigma, model_output.float(), x)

    def _diffusion_forward(self, x, t_ref, llm_states, mask, clip_states, transformer_options, condition=None,
                           motion_score=None):
        """The DiT as ComfyUI's wrappers see a core video model: latents ``[B, C, T, H, W]`` in, flow output
        (noise - x0, ComfyUI's sign) out in the same layout, ``transformer_options`` last; TI2V's condition
        latents (same layout) and motion score as keywords."""
        v = self.diffusion_model(x.movedim(1, 2), t_ref, llm_states, mask, clip_states,
                                 transformer_options=transformer_options,
                                 condition_hidden_states=None if condition is None else condition.movedim(1, 2),
                                 motion_score=motion_score)
        return -v.movedim(2, 1)  # the DiT gives x0 - noise


# The DiT loader's explicit choices, as names in ComfyUI's attention registry ("comfy" = ComfyUI's own choice).
COMFY_ATTENTION_NAMES = {"comfy": "optimized", "sdpa": "pytorch", "sageattention": "sage", "flash-attn": "flash"}


def comfy_attention(choice: str = "comfy"):
    """The DiT's attention through ComfyUI's attention functions: by default the one ComfyUI picked from its
    command line (--use-sage-attention, --use-flash-attention, ...), or the loader's explicit choice. Every call
    passes ``transformer_options``, so an ``optimized_attention_override`` set by a node applies. Masked calls
    (text cross-attention, at most 397 keys) use ComfyUI's PyTorch attention, the one that takes a boolean mask."""
    from comfy.ldm.modules import attention as comfy_attn

    name = COMFY_ATTENTION_NAMES[choice]
    unmasked = comfy_attn.get_attention_function(name, None)
    if unmasked is None:
        raise ValueError(f"Attention '{choice}' was chosen but ComfyUI has no '{name}' attention function: its package "
                         f"is not installed ({install_hint(choice)}). Or choose 'comfy' (ComfyUI's choice) or 'sdpa'.")
    masked = comfy_attn.attention_pytorch

    def fn(q, k, v, mask=None, transformer_options=None):
        attention = unmasked if mask is None else masked
        return attention(q, k, v, q.shape[1], mask=mask, skip_reshape=True, skip_output_reshape=True,
                         transformer_options=transformer_options)

    return fn


def choose_dtypes(weight_dtype: torch.dtype | None, load_device) -> tuple[torch.dtype, torch.dtype | None]:
    """(storage dtype, manual-cast compute dtype or None) the way ComfyUI picks them for its own DiTs."""
    supported = [torch.bfloat16, torch.float32]
    if weight_dtype is None:
        weight_dtype = mm.unet_dtype(device=load_device, supported_dtypes=supported)
    manual_cast = mm.unet_manual_cast(weight_dtype, load_device, supported)
    if weight_dtype in FP8_DTYPES and manual_cast is None:
        manual_cast = torch.bfloat16 if mm.should_use_bf16(load_device) else torch.float32
    return weight_dtype, manual_cast


def build_gguf_model_patcher(path: str, weight_dtype: torch.dtype | None, attention) -> comfy.model_patcher.ModelPatcher:
    """A GGUF DiT as a MODEL: block-type weights stay quantized (on the offload device until ComfyUI loads them,
    at their quantized size) and are dequantized per layer in the compute dtype; ``weight_dtype`` names that dtype
    (fp8 names compute in bf16; default: ComfyUI's choice for the device)."""
    from .gguf_patcher import GGUFModelPatcher

    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    if weight_dtype in FP8_DTYPES:
        weight_dtype = torch.bfloat16
    compute_dtype, manual_cast = choose_dtypes(weight_dtype, load_device)
    compute_dtype = manual_cast or compute_dtype
    # Unquantized tensors of the file are stored in the compute dtype; ComfyUI's ops cast them when offloaded.
    operations = comfy.ops.pick_operations(compute_dtype, None, load_device=load_device)
    log.info("StepVideo: loading DiT from %s (GGUF, compute %s)", path, compute_dtype)
    dit = load_dit(path, weight_dtype=compute_dtype, compute_dtype=compute_dtype, device=offload_device,
                   operations=operations)
    dit.dtype = compute_dtype
    dit.set_attention(attention)
    config = StepVideoModelConfig(dict(StepVideoModelConfig.unet_config))
    config.latent_format = StepVideoLatentFormat(dit.config.in_channels)
    config.set_inference_dtype(compute_dtype, None)
    model = StepVideoModel(config, dit, device=offload_device)
    return GGUFModelPatcher(model, load_device=load_device, offload_device=offload_device)


def build_model_patcher(path: str, weight_dtype: torch.dtype | None, attention,
                        fp8_fast: bool = False) -> comfy.model_patcher.ModelPatcher:
    """The DiT at ``path`` as a MODEL. ``fp8_fast``: ComfyUI's fp8 matrix multiplication where the device supports
    it (the cast path elsewhere). A scaled-fp8 file (ComfyUI's format) keeps its fp8 dtype and per-tensor scales.
    A ``.gguf`` goes to ``build_gguf_model_patcher``."""
    if is_gguf(path):
        return build_gguf_model_patcher(path, weight_dtype, attention)
    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    scaled = scaled_fp8_dtype(Checkpoint(path))
    if scaled is not None and weight_dtype != scaled:
        log.info("StepVideo: %s is a scaled-fp8 checkpoint; its weights stay in %s with their scales", path, scaled)
        weight_dtype = scaled
    weight_dtype, manual_cast = choose_dtypes(weight_dtype, load_device)
    compute_dtype = manual_cast or weight_dtype
    if scaled is not None:
        # Without input scales (ComfyUI writes none unless a model was saved in fast mode): the file has none.
        operations = comfy.ops.scaled_fp8_ops(fp8_matrix_mult=fp8_fast and mm.supports_fp8_compute(load_device),
                                              scale_input=False, override_dtype=scaled)
    else:
        operations = comfy.ops.pick_operations(weight_dtype, manual_cast, load_device=load_device,
                                               fp8_optimizations=fp8_fast)
    # One line per read from disk: the host tests count them to prove that LoRA swaps reuse the loaded DiT.
    log.info("StepVideo: loading DiT from %s (weights %s, compute %s, ops %s)", path, weight_dtype, compute_dtype,
             getattr(operations, "__name__", operations))
    dit = load_dit(path, weight_dtype=weight_dtype, compute_dtype=compute_dtype, device=offload_device,
                   operations=operations)
    dit.dtype = weight_dtype  # BaseModel.get_dtype / ModelPatcher.model_dtype read this
    dit.set_attention(attention)
    config = StepVideoModelConfig(dict(StepVideoModelConfig.unet_config))
    config.latent_format = StepVideoLatentFormat(dit.config.in_channels)
    config.set_inference_dtype(weight_dtype, manual_cast)
    config.scaled_fp8 = scaled  # ComfyUI's model savers then write the marker back
    config.optimizations = {"fp8": fp8_fast}
    model = StepVideoModel(config, dit, device=offload_device)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
