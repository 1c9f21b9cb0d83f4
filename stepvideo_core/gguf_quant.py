"""GGML block formats in torch: dequantize raw GGUF bytes on the tensor's own device (CPU or GPU), and quantize
with the ``gguf`` package's reference quantizers for the converter.

A GGUF tensor of a block type is a row-major run of blocks; each block holds ``block_size`` weights in
``type_size`` bytes (``gguf.GGML_QUANT_SIZES``): a float16 scale (and for the ``_1`` and K types a minimum) then
packed integers. :func:`dequantize` unpacks them with torch integer ops and computes the weights in float32 with
the same operation order as ``gguf.quants.dequantize`` (numpy), so the two agree bit for bit (integers meet the
float32 scales directly: type promotion converts them exactly inside the multiply, one pass less); the result is then
rounded once to the requested dtype. A weight is dequantized in slices of at most ``CHUNK_ELEMENTS`` when the
output is not float32, so the float32 intermediate stays small next to the layer (64 MiB, not 2x the layer).
"""

from __future__ import annotations

from collections.abc import Callable

import gguf
import numpy as np
import torch

Q = gguf.GGMLQuantizationType
QK_K = gguf.QK_K  # 256 weights per K-quant super-block
K_SCALE_SIZE = 12  # packed 6-bit scales and minimums of a Q4_K / Q5_K super-block

# What other tools write for diffusion models (ComfyUI-GGUF, llama-quantize) and what the converter writes.
SUPPORTED_TYPES: tuple[gguf.GGMLQuantizationType, ...] = (
    Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q6_K, Q.Q5_K, Q.Q5_1, Q.Q5_0, Q.Q4_K, Q.Q4_1, Q.Q4_0,
)
# Types whose bytes are plain floats: stored as ordinary tensors, not kept quantized.
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
# Types the converter can write: gguf's numpy quantizers exist for these (none for the K-quants).
WRITABLE_TYPES = (Q.Q8_0, Q.Q5_1, Q.Q5_0, Q.Q4_1, Q.Q4_0)

CHUNK_ELEMENTS = 1 << 24


def type_name(qtype: gguf.GGMLQuantizationType | int) -> str:
    try:
        return Q(qtype).name
    except ValueError:
        return f"unknown type {int(qtype)}"


def block_sizes(qtype: gguf.GGMLQuantizationType) -> tuple[int, int]:
    """(weights per block, bytes per block)."""
    return gguf.GGML_QUANT_SIZES[qtype]


def stored_bytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    """Bytes of a tensor of logical ``shape`` stored as ``qtype``."""
    block, size = block_sizes(qtype)
    elements = int(np.prod(shape, dtype=np.int64))
    return elements // block * size


def bits_per_weight(qtype: gguf.GGMLQuantizationType) -> float:
    block, size = block_sizes(qtype)
    return 8.0 * size / block


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 field at byte ``start`` of every block, as float32 [n, 1]."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[n, k] bytes -> [n, 2k]: all low nibbles, then all high nibbles (ggml's order within a block)."""
    return torch.cat([packed & 0x0F, packed >> 4], dim=-1)


def _high_bits(qh: torch.Tensor, count: int) -> torch.Tensor:
    """[n, 4] bytes read as one little-endian uint32 per block -> its low ``count`` bits, bit i at column i."""
    word = qh.contiguous().view(torch.int32)  # [n, 1]
    shifts = torch.arange(count, device=qh.device, dtype=torch.int32)
    return ((word >> shifts) & 1).to(torch.uint8)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].contiguous().view(torch.int8) * _f16(b, 0)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 2:]).to(torch.int8) - 8
    return _f16(b, 0) * q


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * _nibbles(b[:, 4:]) + _f16(b, 2)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    q = (_nibbles(b[:, 6:]) | (_high_bits(b[:, 2:6], 32) << 4)).to(torch.int8) - 16
    return _f16(b, 0) * q


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 8:]) | (_high_bits(b[:, 4:8], 32) << 4)
    return _f16(b, 0) * q + _f16(b, 2)


def _k_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit scales and eight 6-bit minimums of a Q4_K / Q5_K super-block ([n, 12] bytes): the first
    four of each sit in the low 6 bits of bytes 0-3 / 4-7; the last four take their low nibble from bytes 8-11 and
    their top two bits from the spare bits of bytes 0-3 / 4-7."""
    d, m, md = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mins = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return scales, mins


def _k_quant_4_5(b: torch.Tensor, high: torch.Tensor | None, qs: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, mins = _k_scales(b[:, 4:16])
    d = (_f16(b, 0) * scales.float()).view(n, 8, 1)
    dm = (_f16(b, 2) * mins.float()).view(n, 8, 1)
    # 32-byte groups: the low nibbles are sub-block 2j, the high nibbles sub-block 2j + 1.
    q = torch.stack([qs.view(n, 4, 32) & 0x0F, qs.view(n, 4, 32) >> 4], dim=2).view(n, 8, 32)
    if high is not None:  # Q5_K: bit j of byte i is the fifth bit of weight i of sub-block j
        shifts = torch.arange(8, device=b.device, dtype=torch.uint8).view(1, 8, 1)
        q = q | (((high.view(n, 1, 32) >> shifts) & 1) << 4)
    return (d * q - dm).view(n, QK_K)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    return _k_quant_4_5(b, None, b[:, 16:])


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    return _k_quant_4_5(b, b[:, 16:48], b[:, 48:])


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(b, 208) * scales).view(n, 16, 1)
    # Two halves of 128 weights: 64 low-nibble bytes give weights 0-63, their high nibbles 64-127; each qh byte
    # holds the top two bits of four weights 32 apart.
    low = ql.reshape(n, 2, 1, 64) >> torch.tensor([0, 4], device=b.device, dtype=torch.uint8).view(1, 1, 2, 1)
    low = (low & 0x0F).reshape(n, 8, 32)
    top = qh.reshape(n, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], device=b.device, dtype=torch.uint8).view(1, 1, 4, 1)
    top = (top & 0x03).reshape(n, 8, 32)
    q = ((low | (top << 4)).to(torch.int8) - 32).view(n, 16, 16)
    return (d * q).view(n, QK_K)


def _bf16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.bfloat16).float()


def _f16_all(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float()


def _f32(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float32)


_BLOCK_FNS: dict[gguf.GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    Q.F32: _f32, Q.F16: _f16_all, Q.BF16: _bf16, Q.Q8_0: _q8_0, Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q5_0: _q5_0,
    Q.Q5_1: _q5_1, Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k,
}


class UnsupportedTypeError(ValueError):
    pass


def dequantize(data: torch.Tensor, qtype: gguf.GGMLQuantizationType, shape: tuple[int, ...],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weights of ``shape`` stored in ``data`` (uint8 raw bytes of ``qtype``, any shape, any device), as
    ``dtype`` on ``data``'s device. Equal to ``gguf.quants.dequantize`` on the same bytes, rounded to ``dtype``."""
    try:
        fn = _BLOCK_FNS[Q(qtype)]
    except (KeyError, ValueError):
        raise UnsupportedTypeError(f"GGUF type {type_name(qtype)} is not supported; supported: "
                                   f"{', '.join(t.name for t in SUPPORTED_TYPES)}") from None
    if data.dtype != torch.uint8:
        raise TypeError(f"dequantize takes the raw bytes as uint8, not {data.dtype}")
    block, size = block_sizes(qtype)
    elements = int(np.prod(shape, dtype=np.int64))
    if elements % block or data.numel() != elements // block * size:
        raise ValueError(f"{data.numel()} bytes of {type_name(qtype)} do not hold a tensor of shape {tuple(shape)} "
                         f"({elements} weights in blocks of {block} -> {elements // block * size} bytes)")
    blocks = data.reshape(-1, size)
    if dtype == torch.float32 or elements <= CHUNK_ELEMENTS:
        return fn(blocks).to(dtype).reshape(shape)
    out = torch.empty(elements, dtype=dtype, device=data.device)
    step = max(1, CHUNK_ELEMENTS // block)
    for start in range(0, blocks.shape[0], step):
        part = blocks[start:start + step]
        out[start * block:(start + part.shape[0]) * block] = fn(part).reshape(-1)
    return out.reshape(shape)


def quantize(tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """``tensor`` (any float dtype) as ``qtype`` bytes (uint8, rows of packed blocks) or plain floats for F32/F16/
    BF16, with gguf's reference quantizers (the same rounding as ggml's C code)."""
    return gguf.quants.quantize(tensor.detach().float().cpu().numpy(), qtype)
