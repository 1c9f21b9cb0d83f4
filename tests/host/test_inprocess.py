"""The MODEL wrapper, sampler, LoRA and low-VRAM paths, run inside this process against real ComfyUI code."""

from __future__ import annotations

import pytest
import torch

from stepvideo_core.dit import load_dit
from stepvideo_core.lora import attach, load_lora
from stepvideo_core.pipeline import GenerationSettings, sample_latents
from stepvideo_core.text_encoding import TextConditioning

from .conftest import CFG, SAMPLER_PROMPT, SEED, SHIFT, STEPS, our_sampler, run

PROMPT = SAMPLER_PROMPT


def core_reference(host, parts, lora=None, strength=1.0, denoise=1.0):
    dit = load_dit(host.tiny / "transformer", weight_dtype=torch.float32)
    if lora is not None:
        attach(dit, load_lora(lora, dit), strength)
    pos, neg = (host.conversions.from_conditioning(parts[k]) for k in ("pos", "neg"))
    settings = GenerationSettings(num_frames=17, height=32, width=64, steps=STEPS, cfg=CFG, shift=SHIFT, seed=SEED,
                                  denoise=denoise)
    return host.conversions.to_comfy_latent(sample_latents(dit, pos, neg, settings))


def test_latent_and_conditioning_shapes(parts):
    assert parts["latent"]["samples"].shape == (1, 64, 3, 2, 4)
    states, extra = parts["pos"][0]
    assert states.shape == (1, 320, 96) and extra["stepvideo_mask"].shape == (1, 397)
    assert extra["stepvideo_clip"].shape == (1, 77, 32)


def test_sampler_matches_core_pipeline(host, parts):
    """Convention bridge: ComfyUI flow sampling through our BaseModel equals the core Euler loop."""
    ours = our_sampler(host, parts["model"], parts)
    ref = core_reference(host, parts)
    assert ours.shape == ref.shape == (1, 64, 3, 2, 4)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert ours.abs().mean() > 0.1


def test_sampler_custom_advanced_with_our_sigmas_and_noise_is_identical(host, parts):
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import SamplerCustomAdvanced

    (sigmas,) = run(host.classes["StepVideoSigmas"], steps=STEPS, shift=SHIFT, denoise=1.0)
    (noise,) = run(host.classes["StepVideoNoise"], noise_seed=SEED)
    guider = comfy.samplers.CFGGuider(parts["model"])
    guider.set_conds(parts["pos"], parts["neg"])
    guider.set_cfg(CFG)
    out, _ = SamplerCustomAdvanced().sample(noise, guider, comfy.samplers.sampler_object("euler"), sigmas, parts["latent"])
    torch.testing.assert_close(out["samples"], our_sampler(host, parts["model"], parts), rtol=1e-5, atol=1e-5)


def test_ksampler_euler_simple_with_model_sampling_sd3_uses_the_reference_schedule(host, parts):
    """KSampler(euler, simple) + ModelSamplingSD3(shift) walks the same sigmas as ours whenever 1000 % steps == 0;
    it draws ComfyUI's noise (not ours), so compare with SamplerCustomAdvanced(RandomNoise) on our sigmas."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    nodes = host.nodes
    (m13,) = ModelSamplingSD3().patch(parts["model"], SHIFT)
    sim = comfy.samplers.calculate_sigmas(m13.get_model_object("model_sampling"), "simple", STEPS)
    torch.testing.assert_close(sim.float(), host.conversions.comfy_sigmas(STEPS, SHIFT), rtol=0, atol=1e-6)
    (ks,) = nodes.KSampler().sample(m13, SEED, STEPS, CFG, "euler", "simple", parts["pos"], parts["neg"], parts["latent"])
    guider = comfy.samplers.CFGGuider(parts["model"])
    guider.set_conds(parts["pos"], parts["neg"])
    guider.set_cfg(CFG)
    (sigmas,) = run(host.classes["StepVideoSigmas"], steps=STEPS, shift=SHIFT, denoise=1.0)
    out, _ = SamplerCustomAdvanced().sample(Noise_RandomNoise(SEED), guider, comfy.samplers.sampler_object("euler"), sigmas,
                                            parts["latent"])
    torch.testing.assert_close(ks["samples"], out["samples"], rtol=1e-4, atol=1e-4)


def test_presets_override_widgets(host, parts):
    from stepvideo_core.scheduler import PRESETS

    assert host.validation.resolve_preset("turbo", 3, 1.0, 1.0).steps == PRESETS["turbo"].steps


def test_partial_denoise_matches_core(host, parts):
    start = core_reference(host, parts)
    lat = {"samples": start}
    ours = our_sampler(host, parts["model"], dict(parts, latent=lat), denoise=0.5)
    dit = load_dit(host.tiny / "transformer", weight_dtype=torch.float32)
    pos, neg = (host.conversions.from_conditioning(parts[k]) for k in ("pos", "neg"))
    settings = GenerationSettings(num_frames=17, height=32, width=64, steps=STEPS, cfg=CFG, shift=SHIFT, seed=SEED, denoise=0.5)
    ref = sample_latents(dit, pos, neg, settings, latents=host.conversions.to_core_latent(start))
    torch.testing.assert_close(ours, host.conversions.to_comfy_latent(ref), rtol=1e-4, atol=1e-4)


def test_lora_fused_qkv_matches_core_hooks_and_strength_zero_is_base(host, parts):
    lora_cls = host.classes["StepVideoLoraLoader"]
    out = lora_cls.execute(model=parts["model"], lora_name="tiny_peft_qkv.safetensors", strength=0.7)
    patched = out.result[0]
    assert "2 of 2 DiT layer(s) patched" in out.ui.as_dict()["text"][0]
    assert len(patched.patches) == 2 and not parts["model"].patches  # the base MODEL stays unpatched
    with_lora = our_sampler(host, patched, parts)
    ref = core_reference(host, parts, lora=host.loras / "tiny_peft_qkv.safetensors", strength=0.7)
    torch.testing.assert_close(with_lora, ref, rtol=1e-4, atol=1e-4)
    base = our_sampler(host, parts["model"], parts)
    assert (with_lora - base).abs().max() > 1e-3
    zero = lora_cls.execute(model=parts["model"], lora_name="tiny_peft_qkv.safetensors", strength=0.0).result[0]
    torch.testing.assert_close(our_sampler(host, zero, parts), base, rtol=0, atol=1e-6)


def test_core_lora_loader_model_only_reads_comfy_style_files(host, parts):
    nodes = host.nodes
    (core,) = nodes.LoraLoaderModelOnly().load_lora_model_only(parts["model"], "tiny_comfy.safetensors", 1.0)
    ours = host.classes["StepVideoLoraLoader"].execute(model=parts["model"], lora_name="tiny_comfy.safetensors",
                                                         strength=1.0).result[0]
    assert set(core.patches) == set(ours.patches) and len(core.patches) == 2
    torch.testing.assert_close(our_sampler(host, core, parts), our_sampler(host, ours, parts), rtol=1e-5, atol=1e-5)


def test_foreign_lora_is_an_error_naming_keys(host, parts):
    with pytest.raises(ValueError, match="lora_unet_down_blocks_0"):
        host.classes["StepVideoLoraLoader"].execute(model=parts["model"], lora_name="not_stepvideo.safetensors", strength=1.0)


def test_partial_low_vram_load_gives_the_same_output(host, parts, monkeypatch):
    """Force ComfyUI's low-VRAM path (a budget far below the DiT's size): layers that do not fit stay on the offload
    device and are cast per layer, LoRA patches become LowVramPatch; the output must not change."""
    import comfy.model_management as mm
    import comfy.model_patcher

    lora = host.classes["StepVideoLoraLoader"].execute(model=parts["model"], lora_name="tiny_peft_qkv.safetensors",
                                                        strength=1.0).result[0]
    full = our_sampler(host, lora, parts)
    mm.unload_all_models()
    budget = lora.model_size() // 4
    original = comfy.model_patcher.ModelPatcher.load
    seen = {}

    def partial_load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        seen["budget"] = budget
        result = original(self, device_to, lowvram_model_memory=budget, force_patch_weights=False, full_load=False)
        seen["lowvram"] = self.model.model_lowvram
        seen["streamed"] = sum(1 for m in self.model.modules() if getattr(m, "comfy_cast_weights", False))
        seen["lowvram_patches"] = sum(len(getattr(m, "weight_function", [])) for m in self.model.modules())
        return result

    monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "load", partial_load)
    partial = our_sampler(host, lora, parts)
    monkeypatch.undo()
    mm.unload_all_models()
    assert seen["lowvram"] and seen["streamed"] > 0 and seen["lowvram_patches"] > 0, seen
    torch.testing.assert_close(partial, full, rtol=1e-5, atol=1e-5)


def test_cancel_mid_sampling_leaves_model_usable(host, parts):
    import comfy.model_management as mm

    calls = {"n": 0}
    dit = parts["model"].model.diffusion_model
    original_forward = dit.forward

    def counting_forward(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            mm.interrupt_current_processing(True)
        return original_forward(*a, **k)

    dit.forward = counting_forward
    try:
        with pytest.raises(mm.InterruptProcessingException):
            our_sampler(host, parts["model"], parts, steps=20)
    finally:
        del dit.forward
        mm.interrupt_current_processing(False)
    assert calls["n"] == 2  # stopped at the next step
    torch.testing.assert_close(our_sampler(host, parts["model"], parts), core_reference(host, parts), rtol=1e-4, atol=1e-4)


def test_vae_decode_and_encode_nodes(host, parts):
    c = host.classes
    (vae,) = run(c["StepVideoVAELoader"], vae_name="stepvideo/tiny/vae/vae_v2.safetensors", dtype="fp32")
    samples = {"samples": torch.randn(1, 64, 3, 2, 4, generator=torch.Generator().manual_seed(5))}
    (images,) = run(c["StepVideoVAEDecode"], vae=vae, samples=samples, tile_size=0, tile_overlap=4)
    assert images.shape == (17, 32, 64, 3) and 0 <= float(images.min()) and float(images.max()) <= 1
    # one tile covering the frame is the untiled decode exactly
    (whole,) = run(c["StepVideoVAEDecode"], vae=vae, samples=samples, tile_size=4, tile_overlap=1)
    torch.testing.assert_close(whole, images, rtol=0, atol=0)
    (tiled,) = run(c["StepVideoVAEDecode"], vae=vae, samples=samples, tile_size=2, tile_overlap=1)
    assert tiled.shape == images.shape
    (lat,) = run(c["StepVideoVAEEncode"], vae=vae, image=images)
    assert lat["samples"].shape == (1, 64, 3, 2, 4)


def test_conditioning_round_trip(host):
    text = TextConditioning(torch.randn(1, 320, 8), torch.ones(1, 397), torch.randn(1, 77, 4))
    back = host.conversions.from_conditioning(host.conversions.to_conditioning(text))
    assert back.llm_states is text.llm_states and back.mask is text.mask


def test_text_encode_suffix_sets_match_the_core_and_old_graphs_get_t2v(host):
    """The suffix choice appends the named pair (compared with the core encoder given the strings themselves); a
    graph or API prompt saved before the choice existed (no 'suffixes') gets t2v, as before."""
    from stepvideo_core.text_encoding import MAGIC_SETS, encode_prompts

    c = host.classes
    (enc,) = run(c["StepVideoTextEncoderLoader"], step_llm="stepvideo/tiny/step_llm",
                 hunyuan_clip="stepvideo/tiny/hunyuan_clip", llm_dtype="fp32", device="default")
    common = dict(text_encoders=enc, prompt=PROMPT, negative_prompt="blurry", positive_magic=True,
                  negative_magic=True, cache=False)
    got = {name: run(c["StepVideoTextEncode"], **common, suffixes=name) for name in MAGIC_SETS}
    got["saved before the choice"] = run(c["StepVideoTextEncode"], **common)
    for name, (pos_magic, neg_magic) in [*MAGIC_SETS.items(), ("saved before the choice", MAGIC_SETS["t2v"])]:
        want = encode_prompts(enc.load(), PROMPT, "blurry", positive_magic=pos_magic, negative_magic=neg_magic,
                              after="keep")
        for cond, expected in zip(got[name], want, strict=True):
            ours = host.conversions.from_conditioning(cond)
            for field in ("llm_states", "mask", "clip_states"):
                assert torch.equal(getattr(ours, field), getattr(expected, field).to(getattr(ours, field).dtype)), \
                    (name, field)
    firsts = {name: host.conversions.from_conditioning(pos).llm_states for name, (pos, _) in got.items()}
    assert not torch.equal(firsts["t2v"], firsts["ti2v"]) and not torch.equal(firsts["t2v"], firsts["none"])
    # only one switch on: that side's suffix of the chosen set
    pos, _ = run(c["StepVideoTextEncode"], **{**common, "negative_magic": False}, suffixes="ti2v")
    assert torch.equal(host.conversions.from_conditioning(pos).llm_states, firsts["ti2v"])
    assert c["StepVideoTextEncode"].validate_inputs(suffixes="t2v") is True
    assert "suffixes 'i2v' is not one of: t2v, ti2v, none" in c["StepVideoTextEncode"].validate_inputs(suffixes="i2v")


def test_tiled_decode_node_matches_untiled_within_the_seam_tolerance(host, tiny_demo):
    """The trained Step-Video-Tiny VAE on latents of a real clip of its world: 2 x 2 tiles of 6 latents sharing 4
    stay within the seam tolerance of tests/test_vae.py of the untiled decode (a tile put in the wrong place, or
    unblended overlaps, breaks it), and are not simply the untiled decode. Measured with the core VAE (fp32, CPU):
    39.7 dB, largest difference 0.23 of the value range. (Tiles of 4 latents give 18 dB there: the mid-level
    attention sees only its tile, and the tiny decoder leans on it near the right edge.)"""
    import random

    from stepvideo_core.tiny import synthetic

    c = host.classes
    (vae,) = run(c["StepVideoVAELoader"], vae_name="stepvideo/step-video-tiny/vae/vae_v2.safetensors", dtype="fp32")
    clip = synthetic.render(synthetic.scene_for("red", "circle", "right", random.Random(3)))
    (latent,) = run(c["StepVideoVAEEncode"], vae=vae, image=torch.from_numpy(clip).float() / 255.0)
    (untiled,) = run(c["StepVideoVAEDecode"], vae=vae, samples=latent, tile_size=0, tile_overlap=2)
    (tiled,) = run(c["StepVideoVAEDecode"], vae=vae, samples=latent, tile_size=6, tile_overlap=2)
    assert tiled.shape == untiled.shape == (17, 128, 128, 3)
    span = float(untiled.max() - untiled.min())
    error = (tiled - untiled).abs()
    assert float(error.max()) < 0.25 * span, f"a seam: {float(error.max()):.3f} of a {span:.3f} range"
    psnr = 10 * torch.log10(span**2 / error.pow(2).mean())
    assert psnr > 35, f"tiled decode only {float(psnr):.1f} dB from the untiled one"
    assert float(error.max()) > 0, "the tiles were never used"
