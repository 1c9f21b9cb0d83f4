"""The pack inside a real ComfyUI server: loading, /object_info, validation, end-to-end prompts, cancel, LoRA swap."""

from __future__ import annotations

import shutil

import numpy as np
from safetensors.numpy import load_file

NODE_INPUTS = {
    "StepVideoDiTLoader": ["model_name", "weight_dtype", "attention"],
    "StepVideoTextEncoderLoader": ["step_llm", "hunyuan_clip", "llm_dtype", "device"],
    "StepVideoTextEncode": ["text_encoders", "prompt", "negative_prompt", "positive_magic", "negative_magic", "cache",
                            "suffixes"],
    "StepVideoVAELoader": ["vae_name", "dtype"],
    "StepVideoVAEDecode": ["vae", "samples", "tile_size", "tile_overlap"],
    "StepVideoVAEEncode": ["vae", "image"],
    "StepVideoEmptyLatent": ["width", "height", "frames", "batch_size"],
    "StepVideoSampler": ["model", "positive", "negative", "latent_image", "preset", "steps", "cfg", "shift", "seed", "denoise"],
    "StepVideoLoraLoader": ["model", "lora_name", "strength"],
    "StepVideoSigmas": ["steps", "shift", "denoise"],
    "StepVideoNoise": ["noise_seed"],
}
OUTPUTS = {
    "StepVideoDiTLoader": ["MODEL"], "StepVideoTextEncoderLoader": ["STEPVIDEO_TEXT_ENCODERS"],
    "StepVideoTextEncode": ["CONDITIONING", "CONDITIONING"], "StepVideoVAELoader": ["STEPVIDEO_VAE"],
    "StepVideoVAEDecode": ["IMAGE"], "StepVideoVAEEncode": ["LATENT"], "StepVideoEmptyLatent": ["LATENT"],
    "StepVideoSampler": ["LATENT"], "StepVideoLoraLoader": ["MODEL"],
}


def graph(steps=3, seed=1, width=64, height=32, frames=17, lora=None, strength=1.0, prompt="一只猫 a cat", save="video"):
    g = {
        "dit": {"class_type": "StepVideoDiTLoader", "inputs": {"model_name": "stepvideo/tiny/transformer",
                                                              "weight_dtype": "fp32", "attention": "comfy"}},
        "te": {"class_type": "StepVideoTextEncoderLoader", "inputs": {"step_llm": "stepvideo/tiny/step_llm",
               "hunyuan_clip": "stepvideo/tiny/hunyuan_clip", "llm_dtype": "fp32", "device": "cpu"}},
        "enc": {"class_type": "StepVideoTextEncode", "inputs": {"text_encoders": ["te", 0], "prompt": prompt,
                "negative_prompt": "", "positive_magic": True, "negative_magic": True}},
        "vae": {"class_type": "StepVideoVAELoader", "inputs": {"vae_name": "stepvideo/tiny/vae/vae_v2.safetensors", "dtype": "fp32"}},
        "lat": {"class_type": "StepVideoEmptyLatent", "inputs": {"width": width, "height": height, "frames": frames, "batch_size": 1}},
        "smp": {"class_type": "StepVideoSampler", "inputs": {"model": ["dit", 0], "positive": ["enc", 0], "negative": ["enc", 1],
                "latent_image": ["lat", 0], "preset": "custom", "steps": steps, "cfg": 5.0, "shift": 13.0, "seed": seed, "denoise": 1.0}},
        "dec": {"class_type": "StepVideoVAEDecode", "inputs": {"vae": ["vae", 0], "samples": ["smp", 0], "tile_size": 0, "tile_overlap": 4}},
    }
    if lora:
        g["lora"] = {"class_type": "StepVideoLoraLoader", "inputs": {"model": ["dit", 0], "lora_name": lora, "strength": strength}}
        g["smp"]["inputs"]["model"] = ["lora", 0]
    if save == "video":
        g["vid"] = {"class_type": "CreateVideo", "inputs": {"images": ["dec", 0], "fps": 25.0}}
        g["save"] = {"class_type": "SaveVideo", "inputs": {"video": ["vid", 0], "filename_prefix": "stepvideo/test",
                                                         "format": "auto", "codec": "auto"}}
    elif save == "images":
        g["save"] = {"class_type": "SaveImage", "inputs": {"images": ["dec", 0], "filename_prefix": f"stepvideo/frames_{seed}"}}
    return g


def test_pack_loads_without_import_errors(server):
    log = server.log_text()
    assert "comfyui-stepvideo" in log
    for line in log.splitlines():
        assert not ("IMPORT FAILED" in line and "stepvideo" in line), line
    assert "Cannot import" not in log or "comfyui-stepvideo" not in log.split("Cannot import", 1)[1][:400]


def test_object_info_lists_every_node_with_inputs(server):
    info = server.get("/object_info")
    for node, inputs in NODE_INPUTS.items():
        assert node in info, node
        d = info[node]
        assert d["category"].startswith("StepVideo/"), d["category"]
        order = d["input_order"]["required"] + d["input_order"].get("optional", [])
        assert order == inputs, (node, order)
        if node in OUTPUTS:
            assert d["output"] == OUTPUTS[node], (node, d["output"])
    dit = info["StepVideoDiTLoader"]["input"]["required"]
    assert "stepvideo/tiny/transformer" in dit["model_name"][1]["options"]
    assert dit["attention"][1]["options"] == ["comfy", "sdpa", "sageattention", "flash-attn"]
    assert "tiny_peft_qkv.safetensors" in info["StepVideoLoraLoader"]["input"]["required"]["lora_name"][1]["options"]
    lat = info["StepVideoEmptyLatent"]["input"]["required"]
    assert lat["frames"][1]["default"] == 204 and lat["frames"][1]["step"] == 17 and lat["width"][1]["default"] == 992


def test_validation_messages(server):
    g = graph(frames=20, width=70)
    status, body = server.post("/prompt", {"prompt": g})
    assert status == 400
    text = str(body["node_errors"])
    assert "frames 20" in text and "17 or 34" in text and "width 70" in text and "64 or 80" in text
    g = graph()
    g["dit"]["inputs"]["model_name"] = "missing.safetensors"
    status, body = server.post("/prompt", {"prompt": g})
    assert status == 400 and "not found" in str(body["node_errors"]) and "diffusion_models" in str(body["node_errors"])


def test_end_to_end_video(server):
    entry = server.run(graph(steps=3, seed=1))
    saved = entry["outputs"]["save"]["images"][0]
    path = server.base / "output" / saved["subfolder"] / saved["filename"]
    assert path.is_file() and path.stat().st_size > 0
    log = server.log_text()
    assert "StepVideo: loading DiT" in log


def test_interrupt_mid_sampling_then_run_again(server):
    # The interrupt goes out once the sampler reports its first step, so it lands inside the sampler; 1000 steps
    # on a 128x128x34 latent leave it far from done then. A short run first caches the loaders.
    server.run(graph(steps=1, seed=10, save="images"))
    pid = server.queue_and_wait_for_progress(graph(steps=1000, seed=11, width=128, height=128, frames=34,
                                                   save="images"), node="smp")
    status, _ = server.post("/interrupt")
    assert status == 200
    entry = server.wait(pid, timeout=120)
    messages = dict((m[0], m[1]) for m in entry["status"]["messages"])
    assert "execution_interrupted" in messages, entry["status"]
    assert messages["execution_interrupted"]["node_id"] == "smp"  # stopped inside the sampler, at a step boundary
    server.run(graph(steps=2, seed=12, save="images"))  # models still usable


def test_lora_swap_does_not_reload_the_dit(server):
    server.run(graph(steps=2, seed=3, save="images"))
    loads = server.log_text().count("StepVideo: loading DiT")
    server.run(graph(steps=2, seed=3, lora="tiny_peft_qkv.safetensors", strength=1.0, save="images"))
    server.run(graph(steps=2, seed=3, lora="tiny_peft_qkv.safetensors", strength=0.5, save="images"))
    server.run(graph(steps=2, seed=3, lora="tiny_comfy.safetensors", strength=1.0, save="images"))
    log = server.log_text()
    assert log.count("StepVideo: loading DiT") == loads
    assert log.count("Step-Video LoRA: 2 of 2 DiT layer(s) patched") >= 3


def test_core_ksampler_and_custom_advanced_accept_our_model(server):
    g = graph(steps=2, seed=5, save="none")
    del g["dec"]
    g["msd3"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["dit", 0], "shift": 13.0}}
    g["ks"] = {"class_type": "KSampler", "inputs": {"model": ["msd3", 0], "seed": 5, "steps": 2, "cfg": 5.0,
               "sampler_name": "euler", "scheduler": "simple", "positive": ["enc", 0], "negative": ["enc", 1],
               "latent_image": ["lat", 0], "denoise": 1.0}}
    g["sig"] = {"class_type": "StepVideoSigmas", "inputs": {"steps": 2, "shift": 13.0, "denoise": 1.0}}
    g["noise"] = {"class_type": "StepVideoNoise", "inputs": {"noise_seed": 5}}
    g["guider"] = {"class_type": "CFGGuider", "inputs": {"model": ["dit", 0], "positive": ["enc", 0], "negative": ["enc", 1], "cfg": 5.0}}
    g["ssel"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    g["sca"] = {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["noise", 0], "guider": ["guider", 0],
                "sampler": ["ssel", 0], "sigmas": ["sig", 0], "latent_image": ["lat", 0]}}
    for name, src in (("s_ks", "ks"), ("s_sca", "sca"), ("s_ours", "smp")):
        g[name] = {"class_type": "SaveLatent", "inputs": {"samples": [src, 0], "filename_prefix": f"latents/{name}"}}
    entry = server.run(g)
    out = {}
    for name in ("s_ks", "s_sca", "s_ours"):
        item = entry["outputs"][name]["latents"][0]
        out[name] = load_file(str(server.base / "output" / item["subfolder"] / item["filename"]))["latent_tensor"]
    assert out["s_ours"].shape == out["s_ks"].shape == (1, 64, 3, 2, 4)
    np.testing.assert_allclose(out["s_sca"], out["s_ours"], rtol=1e-5, atol=1e-5)  # same noise, sigmas, euler
    assert np.isfinite(out["s_ks"]).all()


def test_save_latent_load_latent_round_trip(server):
    g = graph(steps=2, seed=8, save="images")
    g["sl"] = {"class_type": "SaveLatent", "inputs": {"samples": ["smp", 0], "filename_prefix": "latents/rt"}}
    entry = server.run(g)
    item = entry["outputs"]["sl"]["latents"][0]
    shutil.copy(server.base / "output" / item["subfolder"] / item["filename"], server.base / "input" / "rt.latent")
    direct = entry["outputs"]["save"]["images"]
    g2 = {k: v for k, v in g.items() if k in ("vae",)}
    g2["ll"] = {"class_type": "LoadLatent", "inputs": {"latent": "rt.latent"}}
    g2["dec"] = {"class_type": "StepVideoVAEDecode", "inputs": {"vae": ["vae", 0], "samples": ["ll", 0], "tile_size": 0, "tile_overlap": 4}}
    g2["save"] = {"class_type": "SaveImage", "inputs": {"images": ["dec", 0], "filename_prefix": "stepvideo/roundtrip"}}
    loaded = server.run(g2)["outputs"]["save"]["images"]
    assert len(loaded) == len(direct) == 17
    a = (server.base / "output" / direct[0]["subfolder"] / direct[0]["filename"]).read_bytes()
    b = (server.base / "output" / loaded[0]["subfolder"] / loaded[0]["filename"]).read_bytes()
    from io import BytesIO

    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(BytesIO(a))), np.asarray(Image.open(BytesIO(b))))
