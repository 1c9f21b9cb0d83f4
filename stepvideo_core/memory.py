"""The memory plan: activation bytes (beyond the weights) of one DiT forward, one VAE decode and one Step-LLM encoding.

ComfyUI asks a model how much memory a run needs before it decides how many weights to load onto the GPU
(``BaseModel.memory_required``, ``load_models_gpu(memory_required=...)``); a figure that is too small makes
``--lowvram`` and partial loading keep too many weights on the GPU and the run then dies out of memory inside a
step. The figures here are peaks of live tensors, counted phase by phase through the code, with the constants
measured at the official widths (``bench/bench_memory_plan.py``: torch.profiler's allocation records during one
forward, weights and inputs excluded; the same script checks every formula within +-20% at token counts and
tile sizes it was not fitted on). The unit of most terms is one activation: ``batch x tokens x width`` elements
in the compute dtype.
"""

from __future__ import annotations

import torch

from .dit import DiTConfig
from .step_llm import MAX_LENGTH as LLM_TOKENS
from .step_llm import StepLLMConfig
from .text_encoding import CLIP_TOKENS
from .vae import FRAME_GROUP_ELEMENTS, VAEConfig
from .video_shape import LATENTS_PER_CHUNK, SPATIAL_FACTOR, video_frames


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def stored_element_bytes(weight_format) -> float:
    """Bytes per weight of a storage format: a torch dtype, or a GGUF block type (``gguf.GGMLQuantizationType``:
    block bytes / block weights, e.g. 34/32 for Q8_0)."""
    if isinstance(weight_format, torch.dtype):
        return element_size(weight_format)
    from .gguf_quant import block_sizes

    block, size = block_sizes(weight_format)
    return size / block


def _cast_bytes(elements: int, dtype: torch.dtype, weight_dtype, streamed: bool) -> int:
    """Bytes of one layer's weight in flight: a compute-dtype copy when the stored dtype differs (fp8 -> bf16 layer
    by layer, or a GGUF block type dequantized, plus its float32 slice), plus the stored copy when the weight is
    streamed from the offload device (ComfyUI's partial loading moves it first, then casts)."""
    weight_dtype = weight_dtype or dtype
    total = elements * element_size(dtype) if weight_dtype != dtype else 0
    if not isinstance(weight_dtype, torch.dtype):
        from .gguf_quant import CHUNK_ELEMENTS

        total += 4 * min(elements, CHUNK_ELEMENTS) if dtype != torch.float32 else 0
    return int(total + (elements * stored_element_bytes(weight_dtype) if streamed else 0))


# ---- DiT -------------------------------------------------------------------------------------------------------
#
# Live activations inside one transformer block, in units of one activation (batch x tokens x width), counted
# from the code in dit.py and confirmed by the profiler (the measured peak is within 1% of these at 6144 wide):
#   self-attention: h (1) + fused qkv (3) + roped q (1), then the key's RMSNorm: a 2-byte input is normalised in
#     fp32, so an fp32 copy (2) + the fp32 product (2) + the cast-back result (1) live at once -> 10 units.
#     In fp32 the norm makes no copy and the rotary embedding of k is the peak: x*cos, x[perm], *sin (3) -> 9.
#   feed-forward over a fraction f of the tokens at a time (f = 1 without ``ff_chunk_size``): the block's
#     attention result (1) + h (1) + finished chunks (1 - f) + up-projection (4f) + GELU output (4f) -> 3 + 7f;
#     chunked, the final concatenation holds parts + result -> 4.
#   cross-attention: the attention result (1) + h, still bound (1) + the queries (1) while the text's keys and
#     values are projected.
# Outside the block, the block's input (1) and the patchified tokens that ``forward`` keeps referenced while
# the blocks run (1, the same tensor when there is a single block).
# Weight copies: fp8 weights are cast to the compute dtype one layer at a time (see ``_cast_bytes``). And on CPUs
# torch 2.13's linear copies its weight first when the input is a view of a larger tensor (measured, 2-byte
# dtypes: the text keys cut to the longest prompt, the feed-forward chunks), once per sample when the view cannot
# be folded into one matrix (the text keys of a batch of 2: two copies, measured). The plan counts these copies on
# every device, which costs a GPU at most 0.6 GB of headroom at the official width, and only when it is the peak.
ATTENTION_UNITS_HALF = 10.0
ATTENTION_UNITS_FP32 = 9.0
QKV_UNITS, QKV_WEIGHT = 4.0, 3  # while the fused qkv weight (3 D^2 elements) may be a cast copy
FF_CAT_UNITS = 4.0
CROSS_UNITS, KV_WEIGHT = 3.0, 2  # while the text's fused key/value weight (2 D^2 elements) is projected
FF_WEIGHT = 4  # the feed-forward weights are 4 D^2 elements each
MODULATION_WEIGHT = 6  # the timestep's modulation projection (D -> 6 D), the largest layer, runs before the blocks


def dit_activation_bytes(config: DiTConfig, batch: int, tokens: int, dtype: torch.dtype,
                         weight_dtype: torch.dtype | None = None, streamed: bool = False) -> int:
    """Peak bytes of one DiT forward over ``batch`` samples of ``tokens`` video tokens each (weights excluded).

    ``weight_dtype`` other than ``dtype`` (fp8 storage, or a GGUF block type) adds the compute-dtype copy of the layer
    being cast;
    ``streamed`` adds the stored copy of a layer brought from the offload device (ComfyUI's partial loading).
    """
    es = element_size(dtype)
    dim = config.inner_dim
    unit = batch * tokens * dim * es
    chunk = config.ff_chunk_size
    f = chunk / tokens if 0 < chunk < tokens else 1.0
    keys = CLIP_TOKENS + LLM_TOKENS
    view_copy = es < 4  # the CPU's 2-byte linear on a view copies the weight (see above)
    ff_weight = _cast_bytes(FF_WEIGHT * dim * dim, dtype, weight_dtype, streamed)
    ff_up_weight = ff_weight + (FF_WEIGHT * dim * dim * es if view_copy and f < 1 else 0)
    qkv_weight = _cast_bytes(QKV_WEIGHT * dim * dim, dtype, weight_dtype, streamed)
    kv_copies = batch if batch > 1 else int(view_copy)
    kv_weight = _cast_bytes(KV_WEIGHT * dim * dim, dtype, weight_dtype, streamed) + KV_WEIGHT * dim * dim * es * kv_copies
    block = max(
        (ATTENTION_UNITS_HALF if es < 4 else ATTENTION_UNITS_FP32) * unit,
        QKV_UNITS * unit + qkv_weight,
        CROSS_UNITS * unit + kv_weight + batch * keys * KV_WEIGHT * dim * es,
        (3 + 3 * f) * unit + ff_up_weight,  # up-projection of the last chunk, its weight cast
        (3 + 7 * f) * unit,  # its GELU
        (3 + 4 * f) * unit + ff_weight,  # down-projection of the last chunk
        FF_CAT_UNITS * unit if f < 1 else 0,
    )
    outside = (2 if config.num_layers > 1 else 1) * unit
    text = batch * keys * dim * es  # projected text states, read by every block
    rope = 2 * tokens * config.attention_head_dim * es  # cos and signed sin tables
    # Before the blocks only the patchified tokens are alive, but the modulation weight may be a cast copy.
    prepare = unit + _cast_bytes(MODULATION_WEIGHT * dim * dim, dtype, weight_dtype, streamed)
    return int(max(block + outside, prepare) + text + rope)


def dit_tokens(latent_shape, patch_size: int = 1) -> tuple[int, int]:
    """(batch, video tokens per sample) of a latent shape ``[b, c, t, h, w]``."""
    b, _, t, h, w = latent_shape
    return int(b), int(t * (h // patch_size) * (w // patch_size))


# ---- VAE decode ------------------------------------------------------------------------------------------------
#
# One decoder call (a 3-latent chunk of one tile) is walked level by level, counting the tensors alive in each
# phase of each block as vae.py allocates them (positions = frames x pixels at that level):
#   ResnetBlock: its input x; GroupNorm+SiLU output with 2 causal zero frames; the conv output; a second padded
#     norm output; a 1x1 shortcut output when the width changes; the per-frame norm's group buffer (frames grouped
#     up to FRAME_GROUP_ELEMENTS, or one frame).
#   Upsample3D: its input, the 2x nearest copy with 2 zero frames, then a ResnetBlock-like refinement on it.
#   Upsample2D: input, output, and one frame group's 2x copy and convolution output.
#   The head: the 2x2x2 unpatchify of the latents (a few small activations) and, on CPUs, a copy of the head
#     convolution's weight in the kernel's own layout (0.9 GB at the official widths, measured).
# The largest phase is the peak; for the official decoder it is the first full-resolution block (256 -> 128 wide).


def _group_elements(channels: int, pixels: int, frames: int) -> int:
    frame = channels * pixels
    return frame * min(frames, max(1, FRAME_GROUP_ELEMENTS // frame))


def _resnet_peak(cin: int, cout: int, frames: int, pixels: int) -> int:
    n, padded = frames * pixels, (frames + 2) * pixels
    shortcut = cout * n if cin != cout else 0
    return max(
        cin * n + cin * padded + _group_elements(cin, pixels, frames),  # first norm
        cin * n + cin * padded + cout * n,  # first conv
        cin * n + cout * n + cout * padded + _group_elements(cout, pixels, frames),  # second norm
        cin * n + cout * padded + cout * n,  # second conv
        cin * n + cout * n + shortcut,  # shortcut and sum
    )


def decoder_peak_elements(config: VAEConfig, tile_h: int, tile_w: int) -> int:
    """Elements alive at the peak of one decoder call on a 3-latent chunk of a ``tile_h x tile_w`` latent tile."""
    pixels, frames = 4 * tile_h * tile_w, 2 * LATENTS_PER_CHUNK - 1  # after the 2x2x2 unpatchify
    top = config.decoder_channels * config.decoder_channel_mult[-1]
    latent_n = LATENTS_PER_CHUNK * tile_h * tile_w
    head_weight = config.patch_channels * top * 8 * 27
    phases = [head_weight + config.patch_channels * latent_n + 2 * top * frames * pixels,
              config.patch_channels * latent_n + top * 8 * latent_n * 2 + 2 * top * frames * pixels]
    phases += [_resnet_peak(top, top, frames, pixels), 4 * top * frames * pixels]  # mid blocks; attention q, k, v, out
    cin = top
    for level in reversed(range(len(config.decoder_channel_mult))):
        cout = config.decoder_channels * config.decoder_channel_mult[level]
        for j in range(config.decoder_num_res_blocks):
            phases.append(_resnet_peak(cin if j == 0 else cout, cout, frames, pixels))
        cin = cout
        if level == 0:
            break
        x = cout * frames * pixels
        if level in config.decoder_temporal_levels:
            frames, pixels = 2 * frames, 4 * pixels
            buf = cout * (frames + 2) * pixels
            phases.append(x + buf + _resnet_peak(cout, cout, frames, pixels) - cout * frames * pixels)
        else:
            group = _group_elements(cout, pixels, frames)
            pixels *= 4
            phases.append(x + cout * frames * pixels + 2 * 4 * group)
    n = frames * pixels
    phases.append(cin * n + cin * (n + 2 * pixels) + _group_elements(cin, pixels, frames))  # output norm
    return max(phases)


def vae_tile_bytes(config: VAEConfig, tile_h: int, tile_w: int, dtype: torch.dtype) -> int:
    """Peak bytes of one decoder call on a 3-latent chunk of a ``tile_h x tile_w`` latent tile."""
    return decoder_peak_elements(config, tile_h, tile_w) * element_size(dtype)


def vae_decode_bytes(config: VAEConfig, batch: int, latent_frames: int, latent_h: int, latent_w: int,
                     dtype: torch.dtype, tile_size: int | tuple[int, int] | None = None) -> int:
    """Peak bytes of ``VideoVAE.decode``: the output video, the fp32 blend buffers of a tiled chunk and one tile."""
    if tile_size is None:
        th, tw = latent_h, latent_w
    else:
        th, tw = (tile_size, tile_size) if isinstance(tile_size, int) else tile_size
        th, tw = min(th, latent_h), min(tw, latent_w)
    height, width = latent_h * SPATIAL_FACTOR, latent_w * SPATIAL_FACTOR
    es = element_size(dtype)
    video = batch * video_frames(latent_frames) * config.out_channels * height * width * es
    tiled = (th, tw) != (latent_h, latent_w)
    chunk_frames = video_frames(LATENTS_PER_CHUNK)
    blend = (batch * config.out_channels * chunk_frames + 1) * height * width * 4 if tiled else 0
    return video + blend + batch * vae_tile_bytes(config, th, tw, dtype)


# ---- Step-LLM encoding -----------------------------------------------------------------------------------------
#
# Per layer, in units of batch x length x hidden elements, with r = ffn / hidden (2.75 in the release): the layer's
# input (1), kept by the caller, and the attention's result added to it (1); the normed input (1); then the
# feed-forward's gate|up projection (2r), SiLU of the gate (r) and its product with the up half (r): 3 + 4r, the
# peak at the official width (14 units, measured exactly). The attention phase (input, attention result slot,
# normed input, fused q|k|v, output buffer, per-group fp32 work) only wins for narrow models with long prompts.


def step_llm_activation_bytes(config: StepLLMConfig, batch: int, length: int, dtype: torch.dtype,
                              weight_dtype: torch.dtype | None = None, streamed: bool = False) -> int:
    """Peak bytes of one Step-LLM forward over ``batch`` sequences of ``length`` tokens (weights excluded)."""
    es = element_size(dtype)
    hidden, ffn = config.hidden_size, config.ffn_dim
    r = ffn / hidden
    unit = batch * length * hidden * es
    qkv = 1 + 2 * config.num_attention_groups * config.head_dim / hidden
    # One key group at a time: its queries and output in fp32, its fp32 scores and probabilities, and (from the
    # second group on) the previous group's two, still bound to their names when the next scores are made.
    scores = batch * config.heads_per_group * length * length * 4 * (3 if config.num_attention_groups > 1 else 2)
    group = 2 * unit * 4 / es / config.num_attention_groups + scores
    attention = (4 + qkv) * unit + group
    ff = (3 + 4 * r) * unit
    gate_up = (3 + 2 * r) * unit + _cast_bytes(2 * ffn * hidden, dtype, weight_dtype, streamed)
    # A streamed embedding table is brought over whole before the lookup (ComfyUI casts the whole weight).
    table = unit + _cast_bytes(config.vocab_size * hidden, dtype, weight_dtype, streamed) if streamed else 0
    distance = length * length * 4  # the shared [L, L] position penalty
    return int(max(attention, ff, gate_up, table) + distance)


def prompt_pair_tokens() -> tuple[int, int]:
    """(batch, length) of one ``encode_prompts`` call for one prompt: the prompt and the negative, 320 tokens."""
    return 2, LLM_TOKENS


def allocation_peak(fn) -> tuple[int, int]:
    """(peak, net) bytes that ``fn()`` allocates on the CPU, from torch's own allocator records.

    ``torch.profiler`` with ``profile_memory=True`` logs every allocation and free that goes through torch's
    allocator, each with its size and time; the running sum of those records, in time order, is the bytes held
    by tensors created during the call, and its maximum is the peak. Tensors that existed before the call
    (weights, inputs) are not counted; kernel scratch buffers that torch allocates are.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                     key=lambda e: e.start_ns())
    held = peak = 0
    for record in records:
        held += record.nbytes()
        peak = max(peak, held)
    return peak, held
