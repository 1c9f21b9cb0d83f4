"""What the CUDA checks share: the skip rule, error measures, TF32 control, and random models made on the GPU."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch

from stepvideo_core.ops import is_weight_layer

HAS_CUDA = torch.cuda.is_available()
# Every module of tests/gpu sets ``pytestmark = CUDA_ONLY``: marked ``gpu`` (``pytest -m gpu`` selects them) and
# skipped at once where there is no CUDA device, so the CPU run and CI only pay for the collection.
CUDA_ONLY = [pytest.mark.gpu,
             pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (scripts/gpu_check.sh runs these on one)")]


def relative_errors(got: torch.Tensor, want: torch.Tensor) -> dict[str, float]:
    """max |got - want| / max |want| and ||got - want|| / ||want||, in float64 on the CPU."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    diff = got - want
    return {"rel_max": float(diff.abs().max() / want.abs().max().clamp_min(1e-30)),
            "rel_l2": float(diff.norm() / want.norm().clamp_min(1e-30))}


def psnr(got: torch.Tensor, want: torch.Tensor) -> float:
    """PSNR in dB with the reference's value range as the peak."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    mse = float((got - want).pow(2).mean())
    peak = float(want.max() - want.min())
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


@contextmanager
def exact_fp32():
    """fp32 matmuls and convolutions in full fp32 (no TF32), so CUDA fp32 can be held to the CPU's fp32."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def materialise(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, weight_dtype: torch.dtype,
                seed: int = 0) -> torch.nn.Module:
    """Give a meta-device model random values made on ``device``, one tensor at a time, as ``tests.builders.
    randomize_fan_in`` does on the CPU: matrices and kernels ~ N(0, 1/fan_in) (activations stay O(1) through the
    blocks), norm weights ~ 1 +- 0.1, everything else ~ N(0, 0.05^2). Weight layers' weights are stored in
    ``weight_dtype`` (fp8 storage), the rest in ``dtype``."""
    g = torch.Generator(device=device).manual_seed(seed)
    for module_name, module in model.named_modules():
        for name, p in list(module.named_parameters(recurse=False)):
            data = torch.randn(p.shape, generator=g, device=device, dtype=torch.float32)
            if p.ndim > 1:
                data /= math.sqrt(p[0].numel())
            elif "norm" in module_name.rsplit(".", 1)[-1] and name == "weight":
                data = 1 + 0.1 * data
            else:
                data *= 0.05
            store = weight_dtype if name == "weight" and is_weight_layer(module) else dtype
            setattr(module, name, torch.nn.Parameter(data.to(store), requires_grad=False))
    return model.eval()


def dit_inputs(config, batch: int, frames: int, height: int, width: int, device, dtype, seed: int = 1):
    """Latents [b, F, C, h, w], timesteps, and the DiT's text inputs (320 Step-LLM tokens, 77 CLIP tokens; the
    samples have 120 and 300 valid Step-LLM tokens)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, frames, config.in_channels, height, width, generator=g, device=device, dtype=dtype)
    t = torch.linspace(0.3, 0.7, batch, device=device)
    llm = torch.randn(batch, 320, config.caption_channels[0], generator=g, device=device, dtype=dtype)
    clip = torch.randn(batch, 77, config.caption_channels[1], generator=g, device=device, dtype=dtype)
    mask = torch.zeros(batch, 397, device=device, dtype=dtype)
    for i in range(batch):
        mask[i, :77 + (120 if i % 2 == 0 else 300)] = 1
    return x, t, llm, mask, clip
