"""GGUF dequantization on CUDA (``stepvideo_core.gguf_quant.dequantize``) against the same bytes on the CPU and
against ``gguf.quants.dequantize`` (the reader llama.cpp publishes, an independent computation), for every type
in ``gguf_quant.SUPPORTED_TYPES``.

The bytes are random with bit 6 of every byte cleared: that keeps every float field finite whatever the type's
layout (the top exponent bit of fp16/bf16/fp32 and e4m3 fields, and e8m0 exponents below 192), while scales,
quant indices and signs still take most values. Dequantization multiplies a scale by small integers; the GPU may
fuse a multiply-add where the CPU rounds twice, so values may differ by a few ulp: 1e-6 of the row's magnitude.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from tests.gpu.helpers import CUDA_ONLY

pytestmark = CUDA_ONLY


def _load():
    """(gguf_quant, gguf, why not): the module arrives with GGUF support (issue 28); the gguf package is carried
    as a wheel to the GPU machine (scripts/gpu_wheels.sh)."""
    try:
        quant = importlib.import_module("stepvideo_core.gguf_quant")
    except ModuleNotFoundError as e:
        if e.name == "stepvideo_core.gguf_quant":
            return None, None, "stepvideo_core.gguf_quant is not in this checkout (GGUF support, issue 28)"
        return None, None, f"stepvideo_core.gguf_quant cannot be imported: {e}"
    try:
        import gguf
    except ModuleNotFoundError:
        return quant, None, "the gguf package is missing: make .wheels with scripts/gpu_wheels.sh and carry it"
    return quant, gguf, ""


gguf_quant, gguf, WHY_NOT = _load()
TYPES = list(getattr(gguf_quant, "SUPPORTED_TYPES", ())) or [None]
SHAPE = (64, 512)  # rows a multiple of every block size (32; 256 for the K-quants)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: getattr(t, "name", "no-types"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dequantize_on_cuda_equals_the_cpu(qtype, dtype, figures):
    if gguf_quant is None:
        pytest.skip(WHY_NOT)
    assert gguf is not None, WHY_NOT
    byte_shape = gguf.quants.quant_shape_to_byte_shape(SHAPE, qtype)
    data = np.random.default_rng(int(qtype)).integers(0, 256, size=byte_shape, dtype=np.uint8) & 0xBF
    cpu = gguf_quant.dequantize(torch.from_numpy(data), qtype, SHAPE, dtype=dtype)
    cuda = gguf_quant.dequantize(torch.from_numpy(data).cuda(), qtype, SHAPE, dtype=dtype)
    reference = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(data, qtype))).float()
    assert cuda.device.type == "cuda" and cuda.dtype == dtype and tuple(cuda.shape) == SHAPE
    got, want = cuda.float().cpu(), cpu.float()
    figures.update(max_abs_diff_vs_cpu=float((got - want).abs().max()), bit_exact=torch.equal(got, want),
                   max_abs=float(reference.abs().max()), finite=bool(torch.isfinite(got).all()))
    assert torch.isfinite(reference).all()
    assert_near(got, want, dtype)
    assert_near(got, reference.to(dtype).float(), dtype)


def assert_near(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """Equal within ``rel`` of each value plus ``rel`` of its row's largest (a fused multiply-add errs relative to
    the terms, not to a result that cancelled); rel is 1e-6 in fp32 and one bf16 rounding (2^-8) in bf16."""
    rel = 1e-6 if dtype == torch.float32 else 2.0**-8
    bound = rel * want.abs() + rel * want.abs().amax(dim=-1, keepdim=True)
    worst = ((got - want).abs() - bound).max()
    assert worst <= 0, f"off by up to {float((got - want).abs().max()):.3g} (bound {rel:g} relative)"
