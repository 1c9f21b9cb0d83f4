"""Torch dequantization of every supported GGUF type against the gguf package's own numpy code on the same bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.gguf_support import require_gguf

gguf = require_gguf()

from stepvideo_core import gguf_quant  # noqa: E402

Q = gguf.GGMLQuantizationType


def _finite_f16(rng, n, scale=0.05):
    return (rng.standard_normal(n) * scale).astype(np.float16).view(np.uint8).reshape(n, 2)


def synthetic_blocks(qtype, rows, row_len, seed=0) -> np.ndarray:
    """Random bytes for every field, with finite float16 scales (random bytes would give NaN/inf scales, and NaN
    never equals NaN)."""
    rng = np.random.default_rng(seed)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = rows * row_len // block
    raw = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    f16_fields = {Q.Q8_0: [0], Q.Q4_0: [0], Q.Q5_0: [0], Q.Q4_1: [0, 2], Q.Q5_1: [0, 2], Q.Q4_K: [0, 2],
                  Q.Q5_K: [0, 2], Q.Q6_K: [208]}[qtype]
    for start in f16_fields:
        raw[:, start:start + 2] = _finite_f16(rng, n)
    return raw.reshape(rows, row_len // block * size)


def reference(raw: np.ndarray, qtype, shape) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32)).reshape(shape)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q5_1, Q.Q5_0, Q.Q4_1, Q.Q4_0, Q.Q6_K, Q.Q5_K, Q.Q4_K])
@pytest.mark.parametrize("row_len", [256, 512])
def test_block_types_equal_gguf_on_synthetic_blocks(qtype, row_len):
    raw = synthetic_blocks(qtype, rows=6, row_len=row_len, seed=row_len)
    ours = gguf_quant.dequantize(torch.from_numpy(raw), qtype, (6, row_len))
    ref = reference(raw, qtype, (6, row_len))
    assert ours.dtype == torch.float32 and ours.shape == (6, row_len)
    assert torch.isfinite(ref).all()
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("qtype", list(gguf_quant.WRITABLE_TYPES))
def test_quantized_weights_round_trip_exactly_like_gguf(qtype):
    """Bytes from gguf's own quantizer (what the converter writes), 3-D shape, rows of 96 (3 blocks of 32)."""
    weights = torch.randn(4, 5, 96, generator=torch.Generator().manual_seed(1))
    raw = gguf_quant.quantize(weights, qtype)
    ours = gguf_quant.dequantize(torch.from_numpy(raw), qtype, (4, 5, 96))
    assert torch.equal(ours, reference(raw, qtype, (4, 5, 96)))
    # and the quantization error is that of the format (~1/127 of a block's range for Q8_0, ~1/8 for Q4_0)
    error = (ours - weights).abs().max() / weights.abs().max()
    assert error < {Q.Q8_0: 0.01, Q.Q5_1: 0.06, Q.Q5_0: 0.07, Q.Q4_1: 0.12, Q.Q4_0: 0.14}[qtype]


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16])
def test_float_types_equal_gguf(qtype):
    values = np.random.default_rng(3).standard_normal((3, 64)).astype(np.float32)
    raw = gguf.quants.quantize(values, qtype) if qtype == Q.BF16 else values.astype(
        np.float16 if qtype == Q.F16 else np.float32)
    raw = np.ascontiguousarray(raw).view(np.uint8)
    ours = gguf_quant.dequantize(torch.from_numpy(raw), qtype, (3, 64))
    assert torch.equal(ours, reference(raw, qtype, (3, 64)))


def test_other_dtypes_round_once_and_chunks_match(monkeypatch):
    """bf16 output = the float32 result rounded once, also when the weight is dequantized in slices."""
    raw = synthetic_blocks(Q.Q6_K, rows=8, row_len=512, seed=5)
    ref = reference(raw, Q.Q6_K, (8, 512))
    monkeypatch.setattr(gguf_quant, "CHUNK_ELEMENTS", 700)  # not a multiple of the block: slices of 2 blocks
    ours = gguf_quant.dequantize(torch.from_numpy(raw), Q.Q6_K, (8, 512), dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, ref.to(torch.bfloat16))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="IQ2_XXS is not supported"):
        gguf_quant.dequantize(torch.zeros(66, dtype=torch.uint8), Q.IQ2_XXS, (256,))
    with pytest.raises(ValueError, match="do not hold a tensor of shape"):
        gguf_quant.dequantize(torch.zeros(33, dtype=torch.uint8), Q.Q8_0, (32,))
    with pytest.raises(ValueError, match="unknown type 99"):
        gguf_quant.dequantize(torch.zeros(4, dtype=torch.uint8), 99, (1,))


def test_supported_types_cover_the_issue_list():
    names = {t.name for t in gguf_quant.SUPPORTED_TYPES}
    assert names == {"Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q5_1", "Q4_K", "Q4_0", "Q4_1", "F16", "BF16", "F32"}
