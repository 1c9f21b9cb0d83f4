"""Node logic that runs without ComfyUI (CI). The repository root is imported as a package, the way ComfyUI loads
the pack, so the nodes' relative imports of the core resolve."""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
from pathlib import Path

import pytest
import torch

from stepvideo_core.scheduler import PRESETS, make_noise, sample_euler, step_video_sigmas
from stepvideo_core.tiny import model as tiny
from tests.builders import load_pack, pack_nodes_module

ROOT = Path(__file__).resolve().parents[1]
pack = load_pack()
conversions = pack_nodes_module("conversions")
model_folders = pack_nodes_module("model_folders")
previews = pack_nodes_module("previews")
validation = pack_nodes_module("validation")


def test_pack_root_imports_without_comfyui():
    # ComfyUI serves WEB_DIRECTORY (relative to the pack) to the browser: it must hold the frontend extension
    assert (ROOT / pack.WEB_DIRECTORY / "stepvideo.js").is_file()
    assert inspect.iscoroutinefunction(pack.comfy_entrypoint)
    if importlib.util.find_spec("comfy_api") is None:
        with pytest.raises(ImportError):
            asyncio.run(pack.comfy_entrypoint())


def test_dtype_parsing():
    assert validation.parse_dtype("default") is None
    assert validation.parse_dtype("fp8_e4m3fn") is torch.float8_e4m3fn
    assert validation.parse_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        validation.parse_dtype("int4")
    assert validation.check_choice("dtype", "fp32", validation.VAE_DTYPES) is True
    assert "not one of" in validation.check_choice("dtype", "fp64", validation.VAE_DTYPES)


def test_presets_override_unless_custom():
    assert validation.resolve_preset("standard", 3, 1.0, 2.0) == validation.SamplerPreset(50, 9.0, 13.0)
    t = PRESETS["turbo"]
    assert validation.resolve_preset("turbo", 3, 1.0, 2.0) == validation.SamplerPreset(t.steps, t.cfg, t.shift)
    assert validation.resolve_preset("custom", 3, 1.0, 2.0) == validation.SamplerPreset(3, 1.0, 2.0)
    t = tiny.SETTINGS
    assert validation.resolve_preset("tiny", 3, 1.0, 2.0) == validation.SamplerPreset(t.steps, t.cfg, t.shift) == (
        validation.SamplerPreset(20, 5.0, 3.0))
    assert validation.SAMPLER_PRESETS == ("standard", "turbo", "tiny", "custom")
    assert "tiny (20 steps, cfg 5, shift 3)" in validation.preset_summary()
    assert "standard (50 steps, cfg 9, shift 13)" in validation.preset_summary()
    with pytest.raises(ValueError, match="standard, turbo, tiny, custom"):
        validation.resolve_preset("fast", 3, 1.0, 2.0)


def test_comfy_sigmas_mirror_the_reference_schedule():
    s = conversions.comfy_sigmas(50, 13.0)
    torch.testing.assert_close(s, 1 - step_video_sigmas(50, 13.0))
    assert s[0] == 1 and s[-1] == 0 and bool((s[1:] < s[:-1]).all())
    # denoise 0.5: the last 10 steps of a 20-step schedule, so it starts half way down the noise levels
    part = conversions.comfy_sigmas(10, 13.0, denoise=0.5)
    torch.testing.assert_close(part, conversions.comfy_sigmas(20, 13.0)[10:])


def test_comfy_flow_euler_equals_core_euler():
    """ComfyUI's CONST flow math with the bridge (t = 1 - sigma, output = -v) reproduces the core Euler loop."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 4, generator=g)

    def velocity(x, t):  # any smooth function of (x, t) in the core convention
        return torch.tanh(x * a) * (1 + t.view(-1, 1, 1))

    noise = torch.randn(2, 3, 4, generator=g)
    core = sample_euler(velocity, noise, step_video_sigmas(6, 13.0))
    sigmas = conversions.comfy_sigmas(6, 13.0)
    x = sigmas[0] * noise  # CONST noise_scaling on an empty latent
    for i in range(6):
        sigma = sigmas[i].expand(2)
        out = -velocity(x, 1 - sigma)  # the wrapper's model output
        denoised = x - out * sigma.view(-1, 1, 1)  # CONST.calculate_denoised
        d = (x - denoised) / sigma.view(-1, 1, 1)  # k-diffusion to_d
        x = x + d * (sigmas[i + 1] - sigmas[i])
    torch.testing.assert_close(x, core, rtol=1e-5, atol=1e-5)


def test_latent_layouts_and_noise():
    lat = torch.randn(2, 64, 3, 4, 5)
    core = conversions.to_core_latent(lat)
    for b, c, t in ((0, 0, 0), (1, 63, 2), (1, 5, 1)):  # ComfyUI [B, C, T, H, W] -> core [B, T, C, H, W]
        assert torch.equal(core[b, t, c], lat[b, c, t])
    assert torch.equal(conversions.to_comfy_latent(core), lat)
    with pytest.raises(ValueError, match="5-D"):
        conversions.to_core_latent(torch.zeros(1, 4, 8, 8))
    noise = conversions.noise_for(lat, 42)
    assert noise.shape == lat.shape
    assert torch.equal(conversions.to_core_latent(noise), make_noise((2, 3, 64, 4, 5), 42))


def test_video_image_conversion():
    video = torch.linspace(-1.5, 1.5, 2 * 17 * 3 * 4 * 6).reshape(2, 17, 3, 4, 6)
    images = conversions.video_to_images(video)
    assert images.shape == (34, 4, 6, 3) and images.dtype == torch.float32
    assert float(images.min()) == 0.0 and float(images.max()) == 1.0
    assert torch.equal(images[17], ((video[1, 0].permute(1, 2, 0) + 1) / 2).clamp(0, 1))
    back = conversions.images_to_video(images[:17])
    assert back.shape == (1, 17, 3, 4, 6)
    torch.testing.assert_close(back, video[:1].clamp(-1, 1))
    rgba = torch.rand(5, 4, 6, 4)  # alpha is dropped, the colours kept
    assert torch.equal(conversions.images_to_video(rgba), conversions.images_to_video(rgba[..., :3].clone()))


def test_empty_latent_limits_are_enforced_with_messages_naming_them():
    """validate_inputs takes every input of StepVideoEmptyLatent, so ComfyUI skips the schema's min/max: the upper
    limits must come from video_shape (the one home of the rules, whose message this is)."""
    from stepvideo_core import video_shape

    msg = validation.validate_video_request(8192, 544, 3400, 1000)
    assert msg == video_shape.request_error(8192, 544, 3400, 1000)
    assert f"width 8192 must be at most {video_shape.MAX_SIDE}" in msg
    assert f"frames 3400 must be at most {video_shape.MAX_FRAMES}" in msg
    assert f"batch_size 1000 must be at most {video_shape.MAX_BATCH}" in msg and "height" not in msg
    limits = (video_shape.MAX_SIDE, video_shape.MAX_SIDE, video_shape.MAX_FRAMES, video_shape.MAX_BATCH)
    assert validation.validate_video_request(*limits) is True
    with pytest.raises(ValueError, match="at most"):
        validation.empty_latent_shape(video_shape.MAX_SIDE + 16, 544, 17)


def test_vae_decode_tiling_limits_are_enforced_with_messages_naming_them():
    """The decode node's validate_inputs takes tile_size and tile_overlap, so ComfyUI skips their min/max too."""
    ok = validation.validate_tiling
    assert ok(16, 4) is True and ok(0, 0) is True and ok(0, 200) is True  # 0 = whole frames, the overlap unused
    assert ok(validation.MAX_TILE_SIZE, validation.MAX_TILE_OVERLAP) is True and ok(None, None) is True
    msg = ok(10_000, 4)
    assert f"tile_size 10000 must be 0 (no tiling) or 1 to {validation.MAX_TILE_SIZE}" in msg
    assert "must be 0 (no tiling)" in ok(-1, 0)
    assert f"tile_overlap 300 must be 0 to {validation.MAX_TILE_OVERLAP}" in ok(0, 300)
    assert "tile_overlap -2 must be 0 to" in ok(8, -2)
    assert "tile_overlap 5 must be at most half of tile_size 8 (<= 4)" in ok(8, 5)
    both = ok(-1, 1000)
    assert "tile_size -1" in both and "tile_overlap 1000" in both


def test_empty_latent_rules_and_messages():
    assert validation.empty_latent_shape(992, 544, 204, 1) == (1, 64, 36, 34, 62)
    assert validation.empty_latent_shape(768, 768, 17, 2) == (2, 64, 3, 48, 48)
    assert validation.validate_video_request(992, 544, 204, 1) is True
    msg = validation.validate_video_request(1000, 544, 200, 1)
    assert "width 1000" in msg and "992 or 1008" in msg and "frames 200" in msg and "187 or 204" in msg
    assert "height" not in msg
    assert "at least 17" in validation.validate_video_request(992, 544, 5, 1)
    assert "batch_size" in validation.validate_video_request(992, 544, 17, 0)
    assert validation.validate_video_request(None, None, None, None) is True  # linked inputs are not validated
    with pytest.raises(ValueError, match="multiple of 17"):
        validation.empty_latent_shape(992, 544, 100)


def test_conditioning_round_trip():
    from stepvideo_core.text_encoding import TextConditioning

    text = TextConditioning(torch.randn(1, 320, 8), torch.ones(1, 397), torch.randn(1, 77, 4))
    cond = conversions.to_conditioning(text)
    assert cond[0][0] is text.llm_states and set(cond[0][1]) == {conversions.MASK_KEY, conversions.CLIP_KEY}
    back = conversions.from_conditioning(cond)
    assert back.mask is text.mask and back.clip_states is text.clip_states
    with pytest.raises(ValueError, match="StepVideoTextEncode"):
        conversions.from_conditioning([[torch.zeros(1, 77, 768), {"pooled_output": torch.zeros(1, 768)}]])


def test_model_folder_listing(tmp_path):
    root = tmp_path / "stepvideo"
    (root / "t2v" / "transformer").mkdir(parents=True)
    (root / "t2v" / "vae").mkdir(parents=True)
    (root / "t2v" / "vae" / "vae_v2.safetensors").write_bytes(b"x")
    (root / "t2v" / "step_llm").mkdir()
    (root / "other").mkdir()
    assert model_folders.list_official([str(root), str(tmp_path / "missing")], "transformer") == ["stepvideo/t2v/transformer"]
    import os

    assert model_folders.list_official([str(root)], "vae/vae_v2.safetensors", check=os.path.isfile) == [
        "stepvideo/t2v/vae/vae_v2.safetensors"]
    assert model_folders.resolve_official([str(root)], "stepvideo/t2v/transformer") == str(root / "t2v" / "transformer")
    assert model_folders.resolve_official([str(root)], "stepvideo/../secret") is None
    assert model_folders.resolve_official([str(root)], "t2v/transformer") is None
    enc = tmp_path / "text_encoders"
    (enc / "my_llm").mkdir(parents=True)
    (enc / "my_llm" / model_folders.STEP_LLM_MARKER).write_bytes(b"x")
    (enc / "my_clip" / model_folders.HUNYUAN_CLIP_MARKER).mkdir(parents=True)
    assert model_folders.list_subfolders([str(enc)], model_folders.STEP_LLM_MARKER) == ["my_llm"]
    assert model_folders.list_subfolders([str(enc)], model_folders.HUNYUAN_CLIP_MARKER) == ["my_clip"]
    assert model_folders.resolve_subfolder([str(enc)], "my_clip") == str(enc / "my_clip")
    assert model_folders.resolve_subfolder([str(enc)], "../x") is None
    assert "not found in models/vae" in validation.not_found("VAE", "a.safetensors", "models/vae")


def _official_layout(download: Path) -> None:
    for part in ("transformer", "step_llm", "hunyuan_clip", "vae"):
        (download / part).mkdir(parents=True)
    (download / "vae" / "vae_v2.safetensors").write_bytes(b"x")


def test_builtin_models_are_listed_without_a_user_folder(tmp_path):
    """The pack's own models/ is one more stepvideo root: its Step-Video-Tiny is listed (and resolves) even when
    the user has no models/stepvideo folder at all."""
    assert Path(model_folders.BUILTIN_MODELS_DIR) == ROOT / "models" == tiny.TINY_DIR.parent
    builtin = tmp_path / "pack_models"
    _official_layout(builtin / tiny.NAME)
    roots = [str(tmp_path / "no_such_user_folder"), str(builtin)]
    expect = {part: f"stepvideo/{tiny.NAME}/{part}" for part in ("transformer", "step_llm", "hunyuan_clip")}
    for part, value in expect.items():
        assert model_folders.list_official(roots, part) == [value]
        assert model_folders.resolve_official(roots, value) == str(builtin / tiny.NAME / part)
    import os

    assert model_folders.list_official(roots, "vae/vae_v2.safetensors", check=os.path.isfile) == [
        f"stepvideo/{tiny.NAME}/vae/vae_v2.safetensors"]
    # a user's own download of the same name comes first (the built-in root is registered last)
    user = tmp_path / "user"
    _official_layout(user / tiny.NAME)
    assert model_folders.resolve_official([str(user), str(builtin)], expect["transformer"]) == str(user / tiny.NAME / "transformer")


@pytest.mark.skipif(not (tiny.TINY_DIR / "transformer").is_dir(), reason="Step-Video-Tiny's weights are not in models/")
def test_shipped_tiny_model_is_listed():
    import os

    roots = [model_folders.BUILTIN_MODELS_DIR]
    for part in ("step_llm", "hunyuan_clip"):
        assert model_folders.list_official(roots, part) == [f"stepvideo/{tiny.NAME}/{part}"]
    # the image-to-video DiT ships beside it, sharing the rest
    assert model_folders.list_official(roots, "transformer") == [f"stepvideo/{tiny.TI2V_DIR.name}/transformer",
                                                                 f"stepvideo/{tiny.NAME}/transformer"]
    assert model_folders.list_official(roots, "vae/vae_v2.safetensors", check=os.path.isfile) == [
        f"stepvideo/{tiny.NAME}/vae/vae_v2.safetensors"]


def test_latent_channel_check_names_both_counts():
    conversions.check_latent_channels(torch.zeros(1, 16, 3, 2, 2), 16, "this VAE")
    with pytest.raises(ValueError, match="has 64 channels but this VAE takes 16.*Step-Video-Tiny"):
        conversions.check_latent_channels(torch.zeros(1, 64, 3, 2, 2), 16, "this VAE")


def test_preview_tables_fit_the_channel_count():
    assert previews.preview_rgb(tiny.VAE_CONFIG.z_channels) == previews.TINY_PREVIEW_RGB  # the fitted table
    for channels in (64, 8):
        factors, bias = previews.preview_rgb(channels)
        assert previews.preview_rgb(channels) == (factors, bias), "the same table every time (seeded)"
        table = torch.tensor(factors)
        assert table.shape == (channels, 3) and bias == [0.0, 0.0, 0.0]
        # three different projections, so a preview shows structure in colour rather than grey
        assert torch.linalg.matrix_rank(table) == 3


def test_fit_preview_rgb_recovers_a_linear_map():
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 3, 4, 4, generator=g)
    true_factors, true_bias = torch.randn(16, 3, generator=g) * 0.1, torch.tensor([0.1, -0.2, 0.3])
    rgb = latents.movedim(1, -1) @ true_factors + true_bias  # [B, T, h, w, 3]
    # each latent's colour over its 16x16 patch and its span of frames (6 frames each here)
    video = rgb.movedim(-1, 1).repeat_interleave(6, 2).repeat_interleave(16, 3).repeat_interleave(16, 4)
    factors, bias = previews.fit_preview_rgb(latents, video)
    torch.testing.assert_close(torch.tensor(factors), true_factors, rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.tensor(bias), true_bias, rtol=0, atol=1e-4)
    assert previews.preview_rgb_error(factors, bias, latents, video) < 1e-4
    assert previews.preview_rgb_error(*previews.preview_rgb(16), latents, video) > 0.1


@pytest.mark.slow
@pytest.mark.skipif(not (tiny.TINY_DIR / "vae" / "vae_v2.safetensors").is_file(),
                    reason="Step-Video-Tiny's weights are not in models/")
def test_tiny_preview_table_fits_the_shipped_vae():
    """The table in previews.TINY_PREVIEW_RGB previews the shipped VAE's latents as well as a fresh fit does."""
    import random

    from stepvideo_core.tiny import synthetic
    from stepvideo_core.vae import load_vae

    vae = load_vae(tiny.TINY_DIR / "vae" / "vae_v2.safetensors", dtype=torch.float32)
    rng = random.Random(0)
    scenes = [synthetic.make_scene(rng, synthetic.training_combos()) for _ in range(6)]
    clips = torch.stack([torch.from_numpy(synthetic.to_model_range(synthetic.render(s))) for s in scenes])
    with torch.no_grad():
        latents = vae.encode(clips.movedim(1, 2), sample=False)  # [b, T, C, h, w]
        video = vae.decode(latents).movedim(2, 1)  # what the latents really show, [b, 3, F, H, W]
    latents = conversions.to_comfy_latent(latents)
    refit = previews.fit_preview_rgb(latents, video)
    best = previews.preview_rgb_error(*refit, latents, video)
    table = "TINY_PREVIEW_RGB = (" + repr([[round(v, 4) for v in row] for row in refit[0]]) + ", " + repr(
        [round(v, 4) for v in refit[1]]) + ")"
    shipped = previews.preview_rgb_error(*previews.TINY_PREVIEW_RGB, latents, video)
    assert shipped < best * 1.25 + 0.01, f"the table no longer fits the VAE ({shipped:.3f} vs {best:.3f}):\n{table}"


def test_lora_patch_keys():
    from stepvideo_core.lora import LoraPair

    pairs = {"transformer_blocks.0.attn1.wqkv": LoraPair(torch.zeros(6, 2), torch.zeros(2, 4))}
    keys = conversions.lora_patch_keys(pairs)
    assert list(keys) == ["diffusion_model.transformer_blocks.0.attn1.wqkv.weight"]
