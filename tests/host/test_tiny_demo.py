"""The built-in Step-Video-Tiny in a real ComfyUI: listed by every loader without a download, sampled through
ComfyUI's own machinery exactly as the core pipeline samples it, and the shipped demo workflow run end to end on
the CPU at full size. With the trained weights in ``models/step-video-tiny`` the demo's video is checked against
its prompt by the synthetic world's oracle; the random stand-in used until then only has to run."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest
import torch

from stepvideo_core.dit import load_dit
from stepvideo_core.pipeline import sample_latents
from stepvideo_core.tiny import model as tiny
from stepvideo_core.vae import load_vae

from ..builders import WORKFLOW_DIR
from .conftest import api_prompt, builtin, run, video_frames

DEMO = WORKFLOW_DIR / "step_video_tiny_demo.json"
PROMPT = "a blue square moves right"
PARTS = {"transformer": "StepVideoDiTLoader", "step_llm": "StepVideoTextEncoderLoader",
         "hunyuan_clip": "StepVideoTextEncoderLoader", "vae/vae_v2.safetensors": "StepVideoVAELoader"}
CHOICES = {"StepVideoDiTLoader": ["model_name"], "StepVideoTextEncoderLoader": ["step_llm", "hunyuan_clip"],
           "StepVideoVAELoader": ["vae_name"]}


# ---- listing ------------------------------------------------------------------------------------------------------


def test_builtin_models_folder_is_a_stepvideo_root(host):
    import folder_paths

    roots = folder_paths.get_folder_paths("stepvideo")
    assert host.model_folders.BUILTIN_MODELS_DIR in roots
    assert roots.index(host.model_folders.BUILTIN_MODELS_DIR) > 0  # after ComfyUI's models/stepvideo: a user's copy wins


def test_loaders_list_the_tiny_model_without_a_user_stepvideo_folder(host, tiny_demo, tmp_path, monkeypatch):
    """A user with no models/stepvideo folder still gets stepvideo/step-video-tiny/<part> in every loader, and it
    validates and resolves into the pack's own models/ folder."""
    import folder_paths

    pack_models = tmp_path / "pack_models"
    pack_models.mkdir()
    (pack_models / tiny.NAME).symlink_to(tiny_demo.root, target_is_directory=True)
    loras, lora_exts = folder_paths.folder_names_and_paths["loras"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", (list(loras), lora_exts))  # restored afterwards
    exts = folder_paths.folder_names_and_paths["stepvideo"][1]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "stepvideo", ([str(tmp_path / "no_models_stepvideo")], exts))
    monkeypatch.setattr(host.model_folders, "BUILTIN_MODELS_DIR", str(pack_models))
    p = host.registered_folders
    p.register_folders()  # what loading the pack does (once), here with the pack's models/ at pack_models
    assert builtin("transformer") in p.dit_choices()
    assert builtin("step_llm") in p.step_llm_choices()
    assert builtin("hunyuan_clip") in p.hunyuan_clip_choices()
    assert builtin("vae/vae_v2.safetensors") in p.vae_choices()
    assert p.dit_path(builtin("transformer")) == str(pack_models / tiny.NAME / "transformer")
    c = host.classes
    assert c["StepVideoDiTLoader"].validate_inputs(builtin("transformer"), "fp32", "comfy") is True
    assert c["StepVideoTextEncoderLoader"].validate_inputs(builtin("step_llm"), builtin("hunyuan_clip"), "fp32",
                                                           "default") is True
    assert c["StepVideoVAELoader"].validate_inputs(builtin("vae/vae_v2.safetensors"), "fp32") is True


# ---- 16-channel latents through ComfyUI ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_parts(host, tiny_demo):
    c = host.classes
    (enc,) = run(c["StepVideoTextEncoderLoader"], step_llm=builtin("step_llm"), hunyuan_clip=builtin("hunyuan_clip"),
                 llm_dtype="fp32", device="default")
    pos, neg = run(c["StepVideoTextEncode"], text_encoders=enc, prompt=PROMPT, negative_prompt="", positive_magic=True,
                   negative_magic=True)
    (model,) = run(c["StepVideoDiTLoader"], model_name=builtin("transformer"), weight_dtype="fp32", attention="comfy")
    (vae,) = run(c["StepVideoVAELoader"], vae_name=builtin("vae/vae_v2.safetensors"), dtype="fp32")
    s = tiny.SETTINGS
    (latent,) = run(c["StepVideoEmptyLatent"], width=s.width, height=s.height, frames=s.num_frames, batch_size=1)
    return dict(pos=pos, neg=neg, model=model, vae=vae, latent=latent)


def test_latent_format_follows_the_loaded_dit(tiny_parts):
    fmt = tiny_parts["model"].get_model_object("latent_format")
    assert fmt.latent_channels == tiny.DIT_CONFIG.in_channels == 16 and fmt.latent_dimensions == 3
    assert len(fmt.latent_rgb_factors) == 16 and len(fmt.latent_rgb_factors_bias) == 3
    assert tiny_parts["latent"]["samples"].shape[1] == 64  # the empty latent node makes the 30B model's channels


def test_tiny_preset_in_comfyui_equals_the_core_pipeline(host, tiny_demo, tiny_parts):
    """StepVideoSampler (preset tiny) resizes the 64-channel empty latent to 16 channels and samples exactly what
    the core pipeline samples from the same conditioning and seed; the VAE node decodes it like the core VAE."""
    c = host.classes
    (out,) = run(c["StepVideoSampler"], model=tiny_parts["model"], positive=tiny_parts["pos"],
                 negative=tiny_parts["neg"], latent_image=tiny_parts["latent"], preset="tiny", steps=1, cfg=1.0,
                 shift=1.0, seed=0, denoise=1.0)
    ours = out["samples"]
    assert ours.shape == (1, 16, 3, 8, 8)
    dit = load_dit(tiny_demo.root / "transformer", weight_dtype=torch.float32)
    pos, neg = (host.conversions.from_conditioning(tiny_parts[k]) for k in ("pos", "neg"))
    ref = sample_latents(dit, pos, neg, replace(tiny.SETTINGS, seed=0))
    torch.testing.assert_close(ours, host.conversions.to_comfy_latent(ref), rtol=1e-4, atol=1e-4)
    (images,) = run(c["StepVideoVAEDecode"], vae=tiny_parts["vae"], samples=out, tile_size=0, tile_overlap=4)
    assert images.shape == (17, 128, 128, 3)
    vae = load_vae(tiny_demo.root / "vae" / "vae_v2.safetensors", dtype=torch.float32)
    with torch.no_grad():
        expected = host.conversions.video_to_images(vae.decode(ref))
    torch.testing.assert_close(images, expected, rtol=1e-4, atol=1e-4)
    (encoded,) = run(c["StepVideoVAEEncode"], vae=tiny_parts["vae"], image=images)
    assert encoded["samples"].shape == (1, 16, 3, 8, 8)


def test_core_ksampler_resizes_our_empty_latent_for_the_tiny_model(host, tiny_parts):
    (out,) = host.nodes.KSampler().sample(tiny_parts["model"], 0, 2, 5.0, "euler", "simple", tiny_parts["pos"],
                                          tiny_parts["neg"], tiny_parts["latent"])
    assert out["samples"].shape == (1, 16, 3, 8, 8) and torch.isfinite(out["samples"]).all()


def test_live_preview_maps_16_channels_to_rgb(tiny_parts):
    import latent_preview

    fmt = tiny_parts["model"].get_model_object("latent_format")
    previewer = latent_preview.Latent2RGBPreviewer(fmt.latent_rgb_factors, fmt.latent_rgb_factors_bias)
    image = previewer.decode_latent_to_preview(torch.randn(1, 16, 3, 8, 8))
    assert image.size == (8, 8)


def test_mismatched_latents_get_a_clear_message(host, tiny_parts):
    c = host.classes
    with pytest.raises(ValueError, match="has 64 channels but this VAE takes 16"):
        run(c["StepVideoVAEDecode"], vae=tiny_parts["vae"], samples=tiny_parts["latent"], tile_size=0, tile_overlap=4)
    full = {"samples": torch.randn(1, 64, 3, 8, 8)}  # a 30B latent (not empty): never silently resized
    with pytest.raises(ValueError, match="has 64 channels but this model takes 16"):
        run(c["StepVideoSampler"], model=tiny_parts["model"], positive=tiny_parts["pos"], negative=tiny_parts["neg"],
            latent_image=full, preset="tiny", steps=1, cfg=1.0, shift=1.0, seed=0, denoise=0.5)


# ---- the shipped demo workflow ------------------------------------------------------------------------------------


def test_demo_workflow_runs_end_to_end_on_cpu(server, tiny_demo):
    info = server.get("/object_info")
    for node, inputs in CHOICES.items():
        for name in inputs:
            options = info[node]["input"]["required"][name][1]["options"]
            assert any(o.startswith(f"stepvideo/{tiny.NAME}/") for o in options), (node, name, options)
    prompt = api_prompt(json.loads(DEMO.read_text(encoding="utf-8")))
    start = time.perf_counter()
    entry = server.run(prompt, timeout=600)
    seconds = time.perf_counter() - start
    (save,) = [nid for nid, n in prompt.items() if n["class_type"] == "SaveVideo"]
    (item,) = entry["outputs"][save]["images"]
    path = server.base / "output" / item["subfolder"] / item["filename"]
    frames = video_frames(path)
    assert frames.shape == (17, 128, 128, 3), frames.shape
    print(f"Step-Video-Tiny demo ({'trained' if tiny_demo.trained else 'random stand-in'}, "
          f"{'built in' if tiny_demo.builtin else 'test folder'}): {seconds:.1f} s on the CPU -> {path}")
    if not tiny_demo.trained:
        pytest.skip("the workflow ran, but the weights are a random stand-in (training.json records no training), "
                    "so the oracle cannot check the video against its prompt")
    from stepvideo_core.tiny import oracle

    result = oracle.score(frames, ("blue", "square", "right"))
    print("oracle:", result)
    assert result.colour, f"the demo video does not show a blue object: {result.detection}"
    assert result.motion, f"the demo video's object does not move right: {result.detection}"
