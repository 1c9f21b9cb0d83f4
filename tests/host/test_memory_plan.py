"""ComfyUI-managed text encoders, the text cache and the memory plan, inside a real ComfyUI (in process, CPU)."""

from __future__ import annotations

import pytest
import torch

from stepvideo_core import memory

from .conftest import ENCODE_PROMPT, encode, loader, run, states

PROMPT = ENCODE_PROMPT


def assert_same(a, b, tol=0.0):
    for x, y in zip(states(a), states(b)):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


def test_step_llm_is_built_from_comfy_ops_layers(host):
    import comfy.ops

    enc = loader(host)
    assert enc.encoders is None  # lazy: nothing is read until a prompt needs encoding
    encoders = enc.load()
    linears = [m for m in encoders.step_llm.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, comfy.ops.CastWeightBiasOp) for m in linears)
    assert isinstance(encoders.step_llm.tok_embeddings.word_embeddings, comfy.ops.CastWeightBiasOp)
    assert enc.llm_patcher.model is encoders.step_llm and enc.clip_patcher.model is encoders.clip


def test_fp8_step_llm_uses_comfy_manual_cast(host):
    import comfy.ops

    enc = loader(host, "fp8_e4m3fn")
    llm = enc.load().step_llm
    layer = llm.transformer.layers[0].attention.wqkv
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.comfy_cast_weights  # cast to bf16 at call time
    assert isinstance(layer, comfy.ops.manual_cast.Linear)
    pos, _ = encode(host, enc)
    assert states(pos)[0].dtype == torch.bfloat16 and torch.isfinite(states(pos)[0]).all()


def test_partial_low_vram_load_of_step_llm_gives_the_same_states(host, monkeypatch):
    """Force ComfyUI's low-VRAM path on Step-LLM (a budget of a quarter of its size): the layers that do not fit
    stay on the offload device and are cast per call; the states must not change."""
    import comfy.model_management as mm
    import comfy.model_patcher

    enc = loader(host)
    full = encode(host, enc)
    mm.unload_all_models()
    budget = enc.llm_patcher.model_size() // 4
    original = comfy.model_patcher.ModelPatcher.load
    seen = {}

    def partial_load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        if self is not enc.llm_patcher:
            return original(self, device_to, lowvram_model_memory, force_patch_weights, full_load)
        result = original(self, device_to, lowvram_model_memory=budget, force_patch_weights=False, full_load=False)
        seen["lowvram"] = self.model.model_lowvram
        seen["streamed"] = sum(1 for m in self.model.modules() if getattr(m, "comfy_cast_weights", False))
        return result

    monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "load", partial_load)
    partial = encode(host, enc)
    monkeypatch.undo()
    mm.unload_all_models()
    assert seen["lowvram"] and seen["streamed"] > 0, seen
    for a, b in zip(full, partial):
        assert_same(a, b, tol=1e-6)


def test_a_cached_prompt_never_loads_the_encoders(host):
    first = loader(host)
    miss = encode(host, first, prompt=PROMPT + " (cache test)", cache=True)
    assert first.encoders is not None
    later = loader(host)  # a later run: a new loader output, nothing loaded yet
    hit = encode(host, later, prompt=PROMPT + " (cache test)", cache=True)
    assert later.encoders is None
    for a, b in zip(miss, hit):
        assert_same(a, b)
    encode(host, later, prompt=PROMPT + " (another prompt)", cache=True)
    assert later.encoders is not None  # a miss loads them


def test_loading_reserves_the_planned_memory(host, monkeypatch):
    """ComfyUI's sampler asks our BaseModel for the activation memory of a guided step, and the text and VAE nodes
    pass their plans to load_models_gpu: the figures are the formulas of stepvideo_core.memory."""
    import comfy.model_management as mm

    c = host.classes
    calls = []
    original = mm.load_models_gpu

    def recording(models, memory_required=0, *a, **k):
        calls.append((type(models[0].model).__name__, memory_required))
        return original(models, memory_required, *a, **k)

    monkeypatch.setattr(mm, "load_models_gpu", recording)
    enc = loader(host)
    pos, neg = encode(host, enc)
    (model,) = run(c["StepVideoDiTLoader"], model_name="stepvideo/tiny/transformer", weight_dtype="fp32",
                   attention="sdpa")
    (latent,) = run(c["StepVideoEmptyLatent"], width=64, height=32, frames=17, batch_size=1)
    run(c["StepVideoSampler"], model=model, positive=pos, negative=neg, latent_image=latent, preset="custom", steps=1,
        cfg=5.0, shift=13.0, seed=1, denoise=1.0)
    (vae,) = run(c["StepVideoVAELoader"], vae_name="stepvideo/tiny/vae/vae_v2.safetensors", dtype="fp32")
    run(c["StepVideoVAEDecode"], vae=vae, samples=latent, tile_size=2, tile_overlap=1)
    monkeypatch.undo()
    by_model = dict(calls)
    llm = enc.encoders.step_llm
    assert by_model["StepLLM"] == memory.step_llm_activation_bytes(llm.config, 2, 320, torch.float32, streamed=True)
    dit = model.model.diffusion_model
    guided = memory.dit_activation_bytes(dit.config, 2, 3 * 2 * 4, dit.compute_dtype, streamed=True)
    assert by_model["StepVideoModel"] == pytest.approx(guided)
    assert model.model.memory_required([2, 64, 3, 2, 4]) == guided
    core_vae = vae.vae
    assert by_model["_VAEModule"] == memory.vae_decode_bytes(core_vae.config, 1, 3, 2, 4, torch.float32, 2)
