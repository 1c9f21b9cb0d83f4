"""ComfyUI's fp8 paths on the Step-Video DiT: ``fp8_e4m3fn_fast`` (fp8 matrix multiplication where the GPU has it)
and scaled-fp8 single-file checkpoints as ComfyUI writes them (fp8 weights, a ``scale_weight`` beside each, a
``scaled_fp8`` marker). On the CPU both run through the cast path; their samples are compared with the bf16-stored
model's (Step-Video-Tiny, 4 steps of the tiny preset)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from stepvideo_core.loading import read_safetensors
from stepvideo_core.tiny import model as tiny

from .conftest import builtin, run, sample_tiny

STEPS = 4
# Measured on the CPU (4 steps, the shipped weights): fp8_e4m3fn (fast or not) 0.104 and scaled fp8 0.150 mean
# relative error against bf16 weights (the first recipe's: 0.046 and 0.048); e4m3's 3 mantissa bits round
# each weight by up to 6%, and a DiT that has learnt motion carries that further through the steps. A scale
# ignored would be off by ~100x.
FP8_TOLERANCE = 0.2


def loaded(host, weight_dtype):
    return run(host.classes["StepVideoDiTLoader"], model_name=builtin("transformer"), weight_dtype=weight_dtype,
               attention="comfy")[0]


def relative_error(a, b) -> float:
    return float((a - b).abs().mean() / b.abs().mean())


def write_scaled_fp8(source, path):
    """What ComfyUI saves for a model loaded as scaled fp8: every Linear weight w as fp8(w / s) with
    ``scale_weight`` s = max|w| / 448 (fp32), other tensors as they are, the marker, ComfyUI's key prefix."""
    out = {"model.diffusion_model.scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for key, value in source.items():
        if key.endswith(".weight") and value.ndim == 2:
            scale = value.float().abs().max() / torch.finfo(torch.float8_e4m3fn).max
            out[f"model.diffusion_model.{key}"] = (value.float() / scale).to(torch.float8_e4m3fn)
            out[f"model.diffusion_model.{key[:-len('weight')]}scale_weight"] = scale.reshape(())
        else:
            out[f"model.diffusion_model.{key}"] = value
    save_file(out, str(path))


@pytest.fixture(scope="module")
def bf16_samples(host, demo):
    return sample_tiny(host, demo, loaded(host, "bf16"), steps=STEPS)


def test_fp8_fast_loads_and_runs_the_cast_path_on_cpu(host, demo, bf16_samples):
    fast = loaded(host, "fp8_e4m3fn_fast")
    assert fast.model.model_config.optimizations["fp8"] is True
    out = sample_tiny(host, demo, fast, steps=STEPS)
    assert torch.equal(out, sample_tiny(host, demo, loaded(host, "fp8_e4m3fn"), steps=STEPS))  # CPU: no fp8 matmul
    error = relative_error(out, bf16_samples)
    print(f"fp8_e4m3fn_fast vs bf16: mean relative error {error:.4f}")
    assert error < FP8_TOLERANCE


def test_scaled_fp8_checkpoint_loads_with_its_scales(host, demo, bf16_samples, tiny_demo, tmp_path):
    source = {}
    for shard in sorted((tiny_demo.root / "transformer").glob("*.safetensors")):
        source.update(read_safetensors(shard))
    path = tmp_path / "step-video-tiny-scaled-fp8.safetensors"
    write_scaled_fp8(source, path)
    model = host.comfy_model.build_model_patcher(str(path), None, host.comfy_model.comfy_attention())
    dit = model.model.diffusion_model
    assert model.model.model_config.scaled_fp8 == torch.float8_e4m3fn
    wqkv = dit.transformer_blocks[0].attn1.wqkv
    assert wqkv.weight.dtype == torch.float8_e4m3fn and wqkv.scale_weight.dtype == torch.float32
    assert float(wqkv.scale_weight) != 1.0
    out = sample_tiny(host, demo, model, steps=STEPS)
    scaled_error = relative_error(out, bf16_samples)
    plain_error = relative_error(sample_tiny(host, demo, loaded(host, "fp8_e4m3fn"), steps=STEPS), bf16_samples)
    print(f"scaled fp8 vs bf16: {scaled_error:.4f}; unscaled fp8 vs bf16: {plain_error:.4f}")
    # Both round every weight to e4m3 once (measured on the current weights: scaled 0.150, plain 0.104); a scale
    # ignored or applied twice would be off by ~100x.
    assert scaled_error < FP8_TOLERANCE and plain_error < FP8_TOLERANCE
    assert tiny.DIT_CONFIG.num_layers == len(dit.transformer_blocks)

