"""Image to video in a real ComfyUI with Step-Video-Tiny TI2V: the node's conditioning drives our sampler exactly as
the core pipeline's image condition does, core KSampler and SamplerCustomAdvanced take it too, the wrong model kind
is a clear error, and the shipped workflow runs end to end on the CPU. With the trained TI2V weights the video is
checked against the start image (first-frame PSNR) and the prompt (the synthetic world's oracle)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from stepvideo_core.dit import load_dit
from stepvideo_core.image_condition import image_condition
from stepvideo_core.pipeline import sample_latents
from stepvideo_core.tiny import model as tiny
from stepvideo_core.tiny import ti2v
from stepvideo_core.vae import load_vae

from ..builders import TI2V_START_IMAGE, WORKFLOW_DIR
from .conftest import api_prompt, builtin, run, video_frames
from .tiny_models import tiny_ti2v as find_or_write_ti2v

WORKFLOW = WORKFLOW_DIR / "step_video_tiny_ti2v.json"
TI2V_DIT = f"stepvideo/{tiny.TI2V_DIR.name}/transformer"


@pytest.fixture(scope="module")
def ti2v_model(base_dir, tiny_demo):
    return find_or_write_ti2v(base_dir / "models", tiny_demo.root)


def start_image() -> torch.Tensor:
    """The shipped start image as IMAGE [1, H, W, 3] in [0, 1]."""
    return torch.from_numpy(ti2v.example_start_image()).float()[None] / 255.0


@pytest.fixture(scope="module")
def parts(host, tiny_demo, ti2v_model):
    c = host.classes
    (enc,) = run(c["StepVideoTextEncoderLoader"], step_llm=builtin("step_llm"), hunyuan_clip=builtin("hunyuan_clip"),
                 llm_dtype="fp32", device="default")
    pos, neg = run(c["StepVideoTextEncode"], text_encoders=enc, prompt=ti2v.EXAMPLE_PROMPT, negative_prompt="",
                   positive_magic=True, negative_magic=True)
    (model,) = run(c["StepVideoDiTLoader"], model_name=TI2V_DIT, weight_dtype="fp32", attention="comfy")
    (vae,) = run(c["StepVideoVAELoader"], vae_name=builtin("vae/vae_v2.safetensors"), dtype="fp32")
    s = tiny.SETTINGS
    ipos, ineg, latent = run(c["StepVideoImageToVideo"], positive=pos, negative=neg, vae=vae, start_image=start_image(),
                             width=s.width, height=s.height, frames=s.num_frames, motion_score=5.0, batch_size=2)
    return dict(text_pos=pos, text_neg=neg, pos=ipos, neg=ineg, latent=latent, model=model, vae=vae)


def test_loader_lists_and_loads_the_ti2v_dit(host, parts):
    assert TI2V_DIT in host.registered_folders.dit_choices()
    dit = parts["model"].model.diffusion_model
    assert dit.config.use_additional_conditions and dit.config.in_channels == 16
    assert parts["model"].get_model_object("latent_format").latent_channels == 16


def test_node_attaches_the_same_condition_to_both_conditionings(host, parts):
    c = host.conversions
    pos, neg = parts["pos"][0][1], parts["neg"][0][1]
    assert torch.equal(pos[c.IMAGE_LATENTS_KEY], neg[c.IMAGE_LATENTS_KEY])
    assert pos[c.MOTION_SCORE_KEY].tolist() == neg[c.MOTION_SCORE_KEY].tolist() == [5.0]
    latents = pos[c.IMAGE_LATENTS_KEY]
    assert latents.shape == (1, 16, 3, 8, 8) and latents[:, :, 0].abs().mean() > 0.1 and not latents[:, :, 1:].any()
    assert parts["latent"]["samples"].shape == (2, 16, 3, 8, 8) and not parts["latent"]["samples"].any()
    # the text part is untouched
    assert torch.equal(parts["pos"][0][0], parts["text_pos"][0][0])


def test_our_sampler_equals_the_core_pipeline_with_the_core_image_condition(host, tiny_demo, ti2v_model, parts):
    (out,) = run(host.classes["StepVideoSampler"], model=parts["model"], positive=parts["pos"],
                 negative=parts["neg"], latent_image=parts["latent"], preset="custom", steps=3, cfg=5.0, shift=3.0,
                 seed=4, denoise=1.0)
    vae = load_vae(tiny_demo.root / "vae" / "vae_v2.safetensors", dtype=torch.float32)
    image = torch.from_numpy(ti2v.example_start_image()).permute(2, 0, 1).float() / 127.5 - 1.0
    s = tiny.SETTINGS
    condition = image_condition(vae, image, s.num_frames, s.height, s.width, motion_score=5.0,
                                generator=torch.Generator().manual_seed(0))
    dit = load_dit(ti2v_model.root / "transformer", weight_dtype=torch.float32)
    pos, neg = (host.conversions.from_conditioning(parts[k]) for k in ("text_pos", "text_neg"))
    pos, neg = (host.conversions.TextConditioning.cat([x, x]) for x in (pos, neg))
    noise = host.conversions.to_core_latent(host.conversions.noise_for(parts["latent"]["samples"], 4))
    ref = sample_latents(dit, pos, neg, replace(s, steps=3, cfg=5.0, shift=3.0), noise=noise, image=condition)
    torch.testing.assert_close(out["samples"], host.conversions.to_comfy_latent(ref), rtol=1e-4, atol=1e-4)
    # without the image the same DiT, noise and text give another video: the condition really arrives
    bare = replace(condition, latents=torch.zeros_like(condition.latents))
    other = sample_latents(dit, pos, neg, replace(s, steps=3, cfg=5.0, shift=3.0), noise=noise, image=bare)
    assert (other - ref).abs().max() > 1e-2


def test_core_samplers_take_the_conditioning(host, parts):
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import SamplerCustomAdvanced

    (ours,) = run(host.classes["StepVideoSampler"], model=parts["model"], positive=parts["pos"], negative=parts["neg"],
                  latent_image=parts["latent"], preset="custom", steps=2, cfg=4.0, shift=3.0, seed=1, denoise=1.0)
    (sigmas,) = run(host.classes["StepVideoSigmas"], steps=2, shift=3.0, denoise=1.0)
    (noise,) = run(host.classes["StepVideoNoise"], noise_seed=1)
    guider = comfy.samplers.CFGGuider(parts["model"])
    guider.set_conds(parts["pos"], parts["neg"])
    guider.set_cfg(4.0)
    sca, _ = SamplerCustomAdvanced().sample(noise, guider, comfy.samplers.sampler_object("euler"), sigmas,
                                            parts["latent"])
    torch.testing.assert_close(sca["samples"], ours["samples"], rtol=1e-5, atol=1e-5)
    (ks,) = host.nodes.KSampler().sample(parts["model"], 1, 2, 4.0, "euler", "simple", parts["pos"], parts["neg"],
                                         parts["latent"])
    assert ks["samples"].shape == (2, 16, 3, 8, 8) and torch.isfinite(ks["samples"]).all()


def test_wrong_model_kind_is_a_clear_error(host, parts):
    c = host.classes
    args = dict(latent_image=parts["latent"], preset="custom", steps=1, cfg=1.0, shift=3.0, seed=0, denoise=1.0)
    with pytest.raises(ValueError, match="Step-Video-TI2V DiT.*needs condition_hidden_states"):
        run(c["StepVideoSampler"], model=parts["model"], positive=parts["text_pos"], negative=parts["text_neg"], **args)
    (t2v,) = run(c["StepVideoDiTLoader"], model_name=builtin("transformer"), weight_dtype="fp32", attention="comfy")
    with pytest.raises(ValueError, match="Step-Video-T2V DiT.*takes no condition_hidden_states"):
        run(c["StepVideoSampler"], model=t2v, positive=parts["pos"], negative=parts["neg"], **args)


def test_shipped_workflow_runs_end_to_end_on_cpu(server, ti2v_model):
    (server.base / "input").mkdir(exist_ok=True)
    assert (server.base / "input" / TI2V_START_IMAGE.name).read_bytes() == TI2V_START_IMAGE.read_bytes(), \
        "the pack copies the example start image into input/ when it loads"
    options = server.get("/object_info")["StepVideoDiTLoader"]["input"]["required"]["model_name"][1]["options"]
    assert TI2V_DIT in options
    prompt = api_prompt(json.loads(WORKFLOW.read_text(encoding="utf-8")))
    entry = server.run(prompt, timeout=600)
    (save,) = [nid for nid, n in prompt.items() if n["class_type"] == "SaveVideo"]
    (item,) = entry["outputs"][save]["images"]
    frames = video_frames(server.base / "output" / item["subfolder"] / item["filename"])
    assert frames.shape == (17, 128, 128, 3), frames.shape
    if not ti2v_model.trained:
        pytest.skip("the workflow ran, but the weights are a random stand-in (training.json records no training), "
                    "so the oracle cannot check the video against its prompt")
    from stepvideo_core.tiny import oracle

    start = ti2v.example_start_image()
    result = oracle.score(frames, ti2v.EXAMPLE.combo)
    print(f"TI2V workflow: first-frame PSNR {ti2v.psnr(frames[0], start):.1f} dB, oracle {result}")
    assert result.colour and result.shape, result.detection  # the image fixes both (motion: see the model card)


def test_user_start_image_is_never_overwritten(host, tmp_path, monkeypatch):
    import folder_paths

    i2v = __import__(host.classes["StepVideoImageToVideo"].__module__, fromlist=["provide_example_image"])
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(tmp_path))
    mine = tmp_path / TI2V_START_IMAGE.name
    mine.write_bytes(b"the user's own file")
    i2v.provide_example_image()
    assert mine.read_bytes() == b"the user's own file"
    mine.unlink()
    i2v.provide_example_image()
    assert mine.read_bytes() == TI2V_START_IMAGE.read_bytes()
