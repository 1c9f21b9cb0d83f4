"""The attention back-ends on CUDA (``stepvideo_core/attention.py``) against a float64 reference computed from the
same (rounded) inputs, at the release's head size (128) and Step-Video-Tiny's (32).

Bounds are relative L2 errors of the output. Half-precision outputs are rounded once (bf16 keeps 8 bits: about
0.2% per value), so sdpa and math get 1e-2 in bf16 and 2e-3 in fp16; fp32 (no TF32) gets 1e-4. SageAttention
quantises Q and K to int8 per block and computes PV in fp16; its paper reports near-lossless end-to-end metrics,
and 5e-2 here fails on a wrong scale or layout (errors of order 1) while allowing its quantisation. At head size
32 SageAttention's kernels do not exist and the back-end falls back to SDPA: that case must equal SDPA exactly.
"""

from __future__ import annotations

import math

import pytest
import torch

from stepvideo_core.attention import SAGE_HEAD_DIMS, get_attention, is_available, sdpa_attention
from tests.gpu.helpers import CUDA_ONLY, exact_fp32, relative_errors

pytestmark = CUDA_ONLY

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HALF_BOUND = {"bf16": 1e-2, "fp16": 2e-3, "fp32": 1e-4}
BOUNDS = {"sdpa": HALF_BOUND, "math": HALF_BOUND, "flash-attn": HALF_BOUND,
          "sageattention": {"bf16": 5e-2, "fp16": 5e-2, "fp32": 5e-2}}
# (heads, head size, query tokens, key tokens): self-attention at both head sizes, and the release's
# cross-attention shape (397 text keys, masked).
SHAPES = {"release-128": (8, 128, 4096, 4096), "tiny-32": (4, 32, 4096, 4096)}


def reference(q, k, v, mask=None) -> torch.Tensor:
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v.double()


def inputs(heads, head_dim, nq, nk, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(2, heads, n, head_dim, generator=g, device="cuda").to(dtype) for n in (nq, nk, nk)]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("backend", ["sdpa", "math", "sageattention", "flash-attn"])
def test_attention_backend_error_against_a_float64_reference(backend, shape, dtype, figures):
    if not is_available(backend):
        pytest.skip(f"{backend} is not installed")
    heads, head_dim, nq, nk = SHAPES[shape]
    q, k, v = inputs(heads, head_dim, nq, nk, DTYPES[dtype])
    want = reference(q, k, v)
    fn = get_attention(backend)
    with exact_fp32(), torch.no_grad():
        got = fn(q.clone(), k.clone(), v.clone())  # clones: sageattn changes k in place
        sdpa = sdpa_attention(q, k, v)
    assert got.shape == q.shape and got.dtype == q.dtype
    errors = relative_errors(got, want)
    bound = BOUNDS[backend][dtype]
    figures.update(errors, bound_rel_l2=bound)
    if backend == "sageattention" and head_dim not in SAGE_HEAD_DIMS:
        figures["falls_back_to_sdpa"] = True
        assert torch.equal(got, sdpa)
    assert errors["rel_l2"] <= bound, errors


@pytest.mark.parametrize("backend", ["sdpa", "sageattention", "flash-attn"])
def test_masked_cross_attention_against_a_float64_reference(backend, figures):
    """Cross-attention's shape in the DiT: 397 text keys, of which each sample attends to its own count."""
    if not is_available(backend):
        pytest.skip(f"{backend} is not installed")
    q, k, v = inputs(8, 128, 4096, 397, torch.bfloat16, seed=1)
    mask = torch.zeros(2, 1, 1, 397, dtype=torch.bool, device="cuda")
    mask[0, ..., :197] = mask[1, ..., :377] = True
    with torch.no_grad():
        got = get_attention(backend)(q, k, v, mask)
    errors = relative_errors(got, reference(q, k, v, mask))
    figures.update(errors, bound_rel_l2=HALF_BOUND["bf16"])
    assert errors["rel_l2"] <= HALF_BOUND["bf16"], errors
