"""The parallel DiT in a real ComfyUI: 2 CPU Ray actors (gloo) on a local Ray started by the loader, the built-in
Step-Video-Tiny, and the single-device graph as the reference. The parallel MODEL gives the same latents as the
single-device MODEL (fp32, within 1e-5 x max) for T2V, TI2V, core LoRAs and the Step Cache (with the same skip
counts), under the Step-Video Sampler, core KSampler and the deprecated Parallel Sampler; Cancel stops a run and
leaves the actors loaded; a killed actor is named and the next run starts fresh ones; freeing ComfyUI's models and
node cache releases the actors."""

from __future__ import annotations

import gc
import logging
import os
import re
import signal
import time

import pytest
import torch

from stepvideo_core.tiny import model as tiny

from .conftest import builtin, run
from .tiny_models import tiny_ti2v as find_or_write_ti2v

pytestmark = pytest.mark.slow

TI2V_DIT = f"stepvideo/{tiny.TI2V_DIR.name}/transformer"
PROMPT = "a red circle moves left"
SAMPLER = dict(preset="custom", steps=3, cfg=5.0, shift=3.0, seed=4, denoise=1.0)


@pytest.fixture(scope="module", autouse=True)
def ray_on_loopback():
    """Ray on 127.0.0.1 only; every cluster the loader starts is shut down after the module."""
    if os.environ.get("CI") == "true":
        import ray  # noqa: F401  (CI installs the ray extra: a missing Ray fails there)
    else:
        pytest.importorskip("ray")
    saved = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    yield
    import ray

    owner = _owner()
    if owner is not None:
        for engine in list(owner.engines.values()):
            engine.close()
    ray.shutdown()
    if saved is None:
        os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)


def _owner():
    import sys

    for name, module in sys.modules.items():
        if name.endswith(".nodes.parallel_nodes"):
            return module.ENGINE_OWNER
    return None


def loader_inputs(model_name: str) -> dict:
    return dict(model_name=model_name, weight_dtype="fp32", attention="sdpa", devices="cpu", workers=2,
                guidance_parallel="auto", shard_weights=False, ff_chunk_size=0, cluster="local")


@pytest.fixture(scope="module")
def text(host, tiny_demo):
    c = host.classes
    (enc,) = run(c["StepVideoTextEncoderLoader"], step_llm=builtin("step_llm"), hunyuan_clip=builtin("hunyuan_clip"),
                 llm_dtype="fp32", device="default")
    pos, neg = run(c["StepVideoTextEncode"], text_encoders=enc, prompt=PROMPT, negative_prompt="", positive_magic=True,
                   negative_magic=True)
    s = tiny.SETTINGS
    (latent,) = run(c["StepVideoEmptyLatent"], width=s.width, height=s.height, frames=s.num_frames, batch_size=1)
    return dict(pos=pos, neg=neg, latent=latent)


@pytest.fixture(scope="module")
def single(host, tiny_demo):
    (model,) = run(host.classes["StepVideoDiTLoader"], model_name=builtin("transformer"), weight_dtype="fp32",
                   attention="sdpa")
    return model


@pytest.fixture(scope="module")
def parallel(host, tiny_demo):
    (model,) = run(host.classes["StepVideoParallelDiTLoader"], **loader_inputs(builtin("transformer")))
    return model


def sample(host, model, text, **overrides) -> torch.Tensor:
    (out,) = run(host.classes["StepVideoSampler"], model=model, positive=text["pos"], negative=text["neg"],
                 latent_image=text["latent"], **{**SAMPLER, **overrides})
    return out["samples"]


def assert_matches(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (got - want).abs().max()


def rank_pids(model) -> list[int]:
    return [info["pid"] for info in model.model.engine.ranks]


@pytest.mark.parametrize("cfg", [5.0, 1.0], ids=["guided-split-over-ranks", "unguided-sequence-parallel"])
def test_t2v_same_frames_as_one_device(host, text, single, parallel, cfg):
    assert parallel.model.diffusion_model.transformer_blocks[0].attn1.wqkv.weight.is_meta  # no weights in ComfyUI
    got = sample(host, parallel, text, cfg=cfg)
    assert got.shape == (1, 16, 3, 8, 8)
    assert_matches(got, sample(host, single, text, cfg=cfg))
    assert parallel.model.engine.running and len(rank_pids(parallel)) == 2


def test_core_samplers_and_the_deprecated_parallel_sampler_take_the_parallel_model(host, text, single, parallel):
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import SamplerCustomAdvanced

    import nodes

    def ksampler(model):
        (out,) = nodes.KSampler().sample(model, 7, 3, 4.0, "euler", "simple", text["pos"], text["neg"], text["latent"])
        return out["samples"]

    def custom_advanced(model):
        (sigmas,) = run(host.classes["StepVideoSigmas"], steps=3, shift=3.0, denoise=1.0)
        (noise,) = run(host.classes["StepVideoNoise"], noise_seed=7)
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(text["pos"], text["neg"])
        guider.set_cfg(4.0)
        out, _ = SamplerCustomAdvanced().sample(noise, guider, comfy.samplers.sampler_object("euler"), sigmas,
                                                text["latent"])
        return out["samples"]

    assert_matches(ksampler(parallel), ksampler(single))
    assert_matches(custom_advanced(parallel), custom_advanced(single))
    (old,) = run(host.classes["StepVideoParallelSampler"], parallel_dit=parallel, positive=text["pos"],
                 negative=text["neg"], latent_image=text["latent"], **SAMPLER)
    assert_matches(old["samples"], sample(host, single, text))


def test_core_lora_reaches_the_actors_without_reloading_the_dit(host, base_dir, tiny_demo, text, single, parallel):
    import nodes

    from .tiny_models import DPO_LORA_NAME, dpo_lora

    dpo_lora(base_dir / "models", tiny_demo.root)
    pids = rank_pids(parallel) if parallel.model.engine.running else None
    lora = nodes.LoraLoaderModelOnly()
    (single_lora,) = lora.load_lora_model_only(single, DPO_LORA_NAME, 0.8)
    (parallel_lora,) = lora.load_lora_model_only(parallel, DPO_LORA_NAME, 0.8)
    assert parallel_lora.patches  # ComfyUI matched the LoRA's keys on the meta-device twin
    want = sample(host, single_lora, text)
    assert_matches(sample(host, parallel_lora, text), want)
    assert not torch.allclose(want, sample(host, single, text), atol=1e-3)
    assert_matches(sample(host, parallel, text), sample(host, single, text))  # the LoRA came off again
    ours = host.classes["StepVideoLoraLoader"]  # the pack's loader (and the deprecated parallel one, which is it)
    (single_ours,) = run(ours, model=single, lora_name=DPO_LORA_NAME, strength=0.5)
    (parallel_ours,) = run(host.classes["StepVideoParallelLoraLoader"], parallel_dit=parallel, lora_name=DPO_LORA_NAME,
                           strength=0.5)
    assert_matches(sample(host, parallel_ours, text), sample(host, single_ours, text))
    if pids is not None:
        assert rank_pids(parallel) == pids  # the same actors: the DiT was not reloaded


def test_step_cache_keeps_its_state_across_steps_in_the_actors(host, text, single, parallel, caplog):
    cache = host.classes["StepVideoStepCache"]
    inputs = dict(threshold=2.0, start_percent=0.0, end_percent=1.0)
    steps = dict(steps=8)

    def cached(model) -> tuple[torch.Tensor, str]:
        (patched,) = run(cache, model=model, **inputs)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="stepvideo"):
            out = sample(host, patched, text, **steps)
        lines = [r.getMessage() for r in caplog.records if "step cache:" in r.getMessage()]
        assert len(lines) == 1, lines
        return out, lines[0]

    want, single_line = cached(single)
    got, parallel_line = cached(parallel)
    skipped = int(re.search(r"\((\d+) reused\)", single_line).group(1))
    assert skipped > 0, single_line  # the cache engaged on one device...
    assert parallel_line == single_line  # ...and took the same decisions in the actors
    assert_matches(got, want)


def test_core_easycache_runs_in_comfyui_and_skips_the_same_steps(host, text, single, parallel, caplog):
    """EasyCache wraps the diffusion model's call in ComfyUI, so on the parallel MODEL it decides there and a
    skipped step never reaches the actors: the same skips and latents as on one device."""
    node = host.nodes.NODE_CLASS_MAPPINGS["EasyCache"]

    def cached(model) -> tuple[torch.Tensor, str]:
        (patched,) = run(node, model=model, reuse_threshold=0.2, start_percent=0.15, end_percent=0.95, verbose=False)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            out = sample(host, patched, text, steps=20, cfg=5.0)
        (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("EasyCache - skipped")]
        return out, line

    want, single_line = cached(single)
    got, parallel_line = cached(parallel)
    skipped = int(re.search(r"skipped (\d+)/", single_line).group(1))
    assert skipped > 0 and parallel_line == single_line, (single_line, parallel_line)
    assert_matches(got, want)


@pytest.fixture(scope="module")
def ti2v_parts(host, base_dir, tiny_demo, text):
    from stepvideo_core.tiny import ti2v  # here: it needs OpenCV (the lab extra), which the other tests do not

    find_or_write_ti2v(base_dir / "models", tiny_demo.root)
    c = host.classes
    (vae,) = run(c["StepVideoVAELoader"], vae_name=builtin("vae/vae_v2.safetensors"), dtype="fp32")
    s = tiny.SETTINGS
    image = torch.from_numpy(ti2v.example_start_image()).float()[None] / 255.0
    pos, neg, latent = run(c["StepVideoImageToVideo"], positive=text["pos"], negative=text["neg"], vae=vae,
                           start_image=image, width=s.width, height=s.height, frames=s.num_frames, motion_score=5.0,
                           batch_size=1)
    (model,) = run(c["StepVideoDiTLoader"], model_name=TI2V_DIT, weight_dtype="fp32", attention="sdpa")
    return dict(pos=pos, neg=neg, latent=latent, model=model)


def test_ti2v_conditioning_reaches_the_actors(host, ti2v_parts, parallel):
    (par,) = run(host.classes["StepVideoParallelDiTLoader"], **loader_inputs(TI2V_DIT))
    assert not parallel.model.engine.running  # a loader with other settings stopped the previous actors
    try:
        assert_matches(sample(host, par, ti2v_parts), sample(host, ti2v_parts["model"], ti2v_parts))
    finally:
        par.model.engine.close()


def test_cancel_stops_the_run_and_the_actors_stay_loaded(host, text, single, parallel, monkeypatch):
    import comfy.model_management as mm
    import comfy.utils

    sample(host, parallel, text, steps=1)  # started
    pids = rank_pids(parallel)
    steps = []

    def hook(value, total, preview, node_id=None):
        steps.append(value)
        if value == 1:
            mm.interrupt_current_processing(True)

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            sample(host, parallel, text)
    finally:
        mm.interrupt_current_processing(False)
    assert steps == [1]
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", None)
    assert_matches(sample(host, parallel, text), sample(host, single, text))
    assert rank_pids(parallel) == pids


def test_a_killed_actor_is_named_and_the_next_run_starts_fresh_ones(host, text, single, parallel, monkeypatch):
    import comfy.utils

    sample(host, parallel, text, steps=1)
    victim = rank_pids(parallel)[1]

    def hook(value, total, preview, node_id=None):
        if value == 1:
            os.kill(victim, signal.SIGKILL)

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    with pytest.raises(RuntimeError, match=rf"rank 1 on the CPU of .+ \(.+\), pid {victim} died while computing a "
                                           r"DiT step: .* next run starts fresh ones"):
        sample(host, parallel, text)
    assert not parallel.model.engine.running
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", None)
    assert_matches(sample(host, parallel, text), sample(host, single, text))
    assert victim not in rank_pids(parallel)


def test_comfyui_models_on_a_gpu_an_actor_shares_are_offloaded_first(host, text, single, parallel, monkeypatch):
    """When an actor computes on ComfyUI's own GPU (decided by the card's UUID, which a CPU run cannot show, so it
    is stated here), ComfyUI's other models there are unloaded before sampling, and the parallel MODEL stays."""
    import comfy.model_management as mm

    mm.load_models_gpu([single])
    assert any(m.model is single for m in mm.current_loaded_models)
    monkeypatch.setattr(type(parallel.model), "shares_comfy_gpu", lambda self: True)
    sample(host, parallel, text, steps=1)
    assert not any(m.model is single for m in mm.current_loaded_models)
    assert any(m.model is parallel for m in mm.current_loaded_models) and parallel.model.engine.running


def test_freeing_models_and_node_cache_releases_the_actors(host, tiny_demo, text):
    import comfy.model_management as mm

    (model,) = run(host.classes["StepVideoParallelDiTLoader"], **loader_inputs(builtin("transformer")))
    sample(host, model, text, steps=1)
    engine = model.model.engine
    assert engine.running
    mm.unload_all_models()  # what "free model and node cache" does, then the node cache drops the loader's output
    del model
    gc.collect()
    assert not engine.running


def test_builtin_ti2v_graph_with_the_parallel_loader_gives_the_same_frames(server, base_dir, tiny_demo):
    """The issue's bar: the shipped tiny TI2V workflow queued on a real ComfyUI server, once as shipped and once with
    the Parallel DiT Loader (cpu, 2 workers, local Ray, started inside the server) in place of the DiT loader."""
    import json

    from safetensors.torch import load_file

    from ..test_workflows_static import WORKFLOW_DIR
    from .conftest import api_prompt

    find_or_write_ti2v(base_dir / "models", tiny_demo.root)
    prompt = api_prompt(json.loads((WORKFLOW_DIR / "step_video_tiny_ti2v.json").read_text(encoding="utf-8")))
    (loader,) = [k for k, n in prompt.items() if n["class_type"] == "StepVideoDiTLoader"]
    (sampler,) = [k for k, n in prompt.items() if n["class_type"] == "StepVideoSampler"]
    model_name = prompt[loader]["inputs"]["model_name"]
    latents = {}
    for kind in ("single", "parallel"):
        if kind == "parallel":
            prompt[loader] = {"class_type": "StepVideoParallelDiTLoader",
                              "inputs": {**loader_inputs(model_name), "weight_dtype": "default"}}
        prompt["save_latent"] = {"class_type": "SaveLatent",
                                 "inputs": {"samples": [sampler, 0], "filename_prefix": f"ti2v_{kind}/latent"}}
        entry = server.run(prompt, timeout=600)
        (item,) = entry["outputs"]["save_latent"]["latents"]
        latents[kind] = load_file(str(server.base / "output" / item["subfolder"] / item["filename"]))["latent_tensor"]
    assert latents["single"].shape[1] == 16  # the tiny TI2V DiT's channels
    assert_matches(latents["parallel"], latents["single"])
    assert "DiT loaded on 2 Ray actor(s)" in server.log_text()
    # "Free model and node cache": the actors go, and with them the local Ray the loader started
    status, _ = server.post("/free", {"unload_models": True, "free_memory": True})
    assert status == 200
    deadline = time.monotonic() + 60
    while "shut down the local Ray" not in server.log_text():
        assert time.monotonic() < deadline, server.log_text()[-3000:]
        time.sleep(0.2)  # waits for the server's log line (an event), not for a duration


@pytest.mark.parametrize("shard_weights", [False, True], ids=["replicated", "sharded"])
def test_gguf_dit_on_the_actors_gives_the_single_gguf_loaders_frames(host, base_dir, tiny_demo, text, shard_weights):
    """The built-in tiny DiT converted to Q8_0: the parallel loader lists it (the single loader's list), its actors
    hold the quantized bytes (whole or sharded), and the Step-Video Sampler gives the single GGUF loader's latents,
    also with a core LoRA, which the actors apply to the dequantized weights as GGUFModelPatcher does here."""
    if os.environ.get("CI") != "true":
        pytest.importorskip("gguf")
    import nodes
    from stepvideo_core.quantize import convert

    from .tiny_models import DPO_LORA_NAME, dpo_lora

    name = "tiny_q8_parallel.gguf"
    path = base_dir / "models" / "diffusion_models" / name
    if not path.exists():
        convert(tiny.TINY_DIR / "transformer", "Q8_0", path)
    (choices,) = [i.options for i in host.classes["StepVideoParallelDiTLoader"].define_schema().inputs
                  if i.id == "model_name"]
    assert name in choices and choices == host.registered_folders.dit_choices()
    dpo_lora(base_dir / "models", tiny_demo.root)
    (single,) = run(host.classes["StepVideoDiTLoader"], model_name=name, weight_dtype="fp32", attention="sdpa")
    (par,) = run(host.classes["StepVideoParallelDiTLoader"], **{**loader_inputs(name), "shard_weights": shard_weights})
    try:
        want = sample(host, single, text)
        assert_matches(sample(host, par, text), want)
        info = par.model.engine.model_info
        assert info["gguf_type"] == "Q8_0" and info["quantized_layers"] > 0
        lora = nodes.LoraLoaderModelOnly()
        (single_lora,) = lora.load_lora_model_only(single, DPO_LORA_NAME, 0.8)
        (par_lora,) = lora.load_lora_model_only(par, DPO_LORA_NAME, 0.8)
        want_lora = sample(host, single_lora, text)
        assert not torch.allclose(want_lora, want, atol=1e-3)
        assert_matches(sample(host, par_lora, text), want_lora)
        assert_matches(sample(host, par, text), want)  # the LoRA came off again
    finally:
        par.model.engine.close()
