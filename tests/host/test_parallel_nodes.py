"""The parallel node path in a real ComfyUI, with 2 CPU worker processes joined by gloo and the built-in
Step-Video-Tiny: the same latents as StepVideoSampler (and the core pipeline), LoRAs that reach the workers, ComfyUI's
interrupt that stops every worker and leaves the pool usable, a killed worker named and replaced, and a graph queued
on the server that runs end to end."""

from __future__ import annotations

import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stepvideo_core.dit import load_dit
from stepvideo_core.lora import attach, load_lora
from stepvideo_core.pipeline import sample_latents
from stepvideo_core.tiny import model as tiny

from .conftest import builtin, run
from .tiny_models import DPO_LORA_NAME, dpo_lora

PROMPT = "a red circle moves left"
SEED = 3


@pytest.fixture(scope="module")
def parts(host, tiny_demo, base_dir):
    c = host.classes
    (enc,) = run(c["StepVideoTextEncoderLoader"], step_llm=builtin("step_llm"), hunyuan_clip=builtin("hunyuan_clip"),
                 llm_dtype="fp32", device="default")
    pos, neg = run(c["StepVideoTextEncode"], text_encoders=enc, prompt=PROMPT, negative_prompt="", positive_magic=True,
                   negative_magic=True)
    s = tiny.SETTINGS
    (latent,) = run(c["StepVideoEmptyLatent"], width=s.width, height=s.height, frames=s.num_frames, batch_size=1)
    (model,) = run(c["StepVideoDiTLoader"], model_name=builtin("transformer"), weight_dtype="fp32", attention="sdpa")
    lora = dpo_lora(base_dir / "models", tiny_demo.root)
    return dict(pos=pos, neg=neg, latent=latent, model=model, lora=lora)


@pytest.fixture(scope="module")
def parallel_dit(host, tiny_demo):
    (handle,) = run(host.classes["StepVideoParallelDiTLoader"], model_name=builtin("transformer"), weight_dtype="fp32",
                    attention="sdpa", devices="cpu", workers=2, guidance_parallel="auto", shard_weights=False,
                    ff_chunk_size=0)
    yield handle
    handle.pool.close()


def sampler_inputs(parts: dict, seed: int = SEED) -> dict:
    return dict(positive=parts["pos"], negative=parts["neg"], latent_image=parts["latent"], preset="tiny", steps=1,
                cfg=1.0, shift=1.0, seed=seed, denoise=1.0)


def parallel_sample(host, handle, parts, seed: int = SEED) -> torch.Tensor:
    (out,) = run(host.classes["StepVideoParallelSampler"], parallel_dit=handle, **sampler_inputs(parts, seed))
    return out["samples"]


def core_reference(host, tiny_demo, parts, seed: int = SEED, loras=()) -> torch.Tensor:
    dit = load_dit(tiny_demo.root / "transformer", weight_dtype=torch.float32)
    for path, strength in loras:
        attach(dit, load_lora(path, dit), strength)
    pos, neg = (host.conversions.from_conditioning(parts[k]) for k in ("pos", "neg"))
    with torch.no_grad():
        return host.conversions.to_comfy_latent(sample_latents(dit, pos, neg, replace(tiny.SETTINGS, seed=seed)))


def assert_matches(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (got - want).abs().max()


def test_parallel_sampler_equals_the_single_device_sampler(host, tiny_demo, parts, parallel_dit):
    ours = parallel_sample(host, parallel_dit, parts)
    assert ours.shape == (1, 16, 3, 8, 8)  # the 64-channel empty latent resized to the tiny DiT, as StepVideoSampler
    (single,) = run(host.classes["StepVideoSampler"], model=parts["model"], **sampler_inputs(parts))
    torch.testing.assert_close(ours, single["samples"], rtol=1e-4, atol=1e-4)  # ComfyUI's Euler/CFG vs the core's
    assert_matches(ours, core_reference(host, tiny_demo, parts))


def test_loras_chosen_in_the_graph_reach_the_workers(host, tiny_demo, parts, parallel_dit):
    (with_lora,) = run(host.classes["StepVideoParallelLoraLoader"], parallel_dit=parallel_dit, lora_name=DPO_LORA_NAME,
                       strength=0.8)
    assert with_lora.pool is parallel_dit.pool  # the LoRA variant shares the loaded workers
    ours = parallel_sample(host, with_lora, parts)
    want = core_reference(host, tiny_demo, parts, loras=[(str(parts["lora"].path), 0.8)])
    assert_matches(ours, want)
    assert not torch.allclose(want, core_reference(host, tiny_demo, parts), atol=1e-3)
    assert_matches(parallel_sample(host, parallel_dit, parts), core_reference(host, tiny_demo, parts))


@pytest.mark.parametrize("raise_in_hook", [True, False], ids=["server-hook-raises", "flag-only"])
def test_interrupt_stops_every_worker_and_the_next_run_works(host, tiny_demo, parts, parallel_dit, monkeypatch,
                                                            raise_in_hook):
    """ComfyUI's server hook raises the interrupt from inside the progress bar; without a server only the flag is
    set. Both stop the workers after the step and leave them loaded."""
    import comfy.model_management as mm
    import comfy.utils

    steps = []

    def hook(value, total, preview, node_id=None):
        steps.append(value)
        if value == 2:
            mm.interrupt_current_processing(True)
            if raise_in_hook:
                mm.throw_exception_if_processing_interrupted()

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    with pytest.raises(mm.InterruptProcessingException):
        parallel_sample(host, parallel_dit, parts)
    assert steps == [1, 2] and not mm.processing_interrupted()
    assert parallel_dit.pool.running
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", None)
    assert_matches(parallel_sample(host, parallel_dit, parts), core_reference(host, tiny_demo, parts))


def test_rank_0_drives_the_progress_bar_with_live_previews(host, parts, parallel_dit, monkeypatch):
    import comfy.utils
    import latent_preview
    from comfy.cli_args import LatentPreviewMethod

    monkeypatch.setattr(latent_preview.args, "preview_method", LatentPreviewMethod.Latent2RGB)
    calls = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK",
                        lambda value, total, preview, node_id=None: calls.append((value, total, preview)))
    parallel_sample(host, parallel_dit, parts)
    assert [(v, t) for v, t, _ in calls] == [(i, tiny.SETTINGS.steps) for i in range(1, tiny.SETTINGS.steps + 1)]
    for _, _, preview in calls:
        kind, image, _ = preview
        assert kind == "JPEG" and image.size == (8, 8)  # one latent frame of the 128x128 video, one pixel per latent


def test_a_killed_worker_is_named_and_the_next_run_restarts_the_pool(host, tiny_demo, parts, parallel_dit,
                                                                     monkeypatch):
    import comfy.utils

    pool = parallel_dit.pool
    victim = pool._workers[1].process

    def hook(value, total, preview, node_id=None):
        if value == 1:
            os.kill(victim.pid, signal.SIGKILL)

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    with pytest.raises(RuntimeError, match=r"worker 1 \(device cpu, pid \d+\) was killed by SIGKILL.*next run starts "
                                           r"fresh workers"):
        parallel_sample(host, parallel_dit, parts)
    assert not pool.running
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", None)
    assert_matches(parallel_sample(host, parallel_dit, parts), core_reference(host, tiny_demo, parts))
    assert pool.running and pool._workers[1].process.pid != victim.pid


def test_bad_devices_are_refused_before_anything_starts(host):
    loader = host.classes["StepVideoParallelDiTLoader"]
    msg = loader.validate_inputs(builtin("transformer"), "fp32", "sdpa", "0,1", 0, "auto", False, 0)
    assert "GPU 0 does not exist" in msg or torch.cuda.device_count() >= 2
    assert "not one of" in loader.validate_inputs(builtin("transformer"), "fp32", "comfy", "cpu", 2, "auto", False, 0)


def graph(seed: int = SEED, ff_chunk_size: int = 0) -> dict:
    """The single-GPU text-to-video graph with the parallel DiT loader and sampler, plus SaveLatent."""
    s = tiny.SETTINGS
    return {
        "1": {"class_type": "StepVideoTextEncoderLoader",
              "inputs": {"step_llm": builtin("step_llm"), "hunyuan_clip": builtin("hunyuan_clip"), "llm_dtype": "fp32",
                         "device": "default"}},
        "2": {"class_type": "StepVideoTextEncode",
              "inputs": {"text_encoders": ["1", 0], "prompt": PROMPT, "negative_prompt": "", "positive_magic": True,
                         "negative_magic": True}},
        "3": {"class_type": "StepVideoParallelDiTLoader",
              "inputs": {"model_name": builtin("transformer"), "weight_dtype": "fp32", "attention": "sdpa",
                         "devices": "cpu", "workers": 2, "guidance_parallel": "auto", "shard_weights": False,
                         "ff_chunk_size": ff_chunk_size}},
        "4": {"class_type": "StepVideoEmptyLatent",
              "inputs": {"width": s.width, "height": s.height, "frames": s.num_frames, "batch_size": 1}},
        "5": {"class_type": "StepVideoParallelSampler",
              "inputs": {"parallel_dit": ["3", 0], "positive": ["2", 0], "negative": ["2", 1], "latent_image": ["4", 0],
                         "preset": "tiny", "steps": 1, "cfg": 1.0, "shift": 1.0, "seed": seed, "denoise": 1.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "parallel/tiny"}},
        "7": {"class_type": "StepVideoVAELoader", "inputs": {"vae_name": builtin("vae/vae_v2.safetensors"),
                                                              "dtype": "fp32"}},
        "8": {"class_type": "StepVideoVAEDecode", "inputs": {"vae": ["7", 0], "samples": ["5", 0], "tile_size": 0,
                                                              "tile_overlap": 4}},
        "9": {"class_type": "CreateVideo", "inputs": {"images": ["8", 0], "fps": 25.0}},
        "10": {"class_type": "SaveVideo", "inputs": {"video": ["9", 0], "filename_prefix": "parallel/tiny",
                                                     "format": "auto", "codec": "auto"}},
    }


def pool_workers(server) -> set[int]:
    """Process ids of the worker processes the test server started (its children running pool_worker)."""
    def cmdline(pid: str) -> str:
        try:
            return (Path("/proc") / pid / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return ""

    def parent(pid: str) -> str:
        try:
            return (Path("/proc") / pid / "stat").read_text().rsplit(")", 1)[1].split()[1]
        except (OSError, IndexError):
            return ""

    pids = [p.name for p in Path("/proc").iterdir() if p.name.isdigit()]
    servers = {p for p in pids if "main.py" in cmdline(p) and str(server.base) in cmdline(p)}
    return {int(p) for p in pids if parent(p) in servers and "stepvideo_core.pool_worker" in cmdline(p)}


def test_parallel_graph_runs_end_to_end_in_the_server(server, host, tiny_demo, parts):
    """Text encoders, empty latent, VAE and video nodes as in the single-GPU graph; only the DiT loader and the sampler
    are the parallel ones. The saved latents equal the core pipeline's. The workers stay between runs, and a changed
    loader replaces them (the old ones are gone, so two copies of the DiT never share a device)."""
    prompt = graph()
    entry = server.run(prompt, timeout=600)
    (item,) = entry["outputs"]["6"]["latents"]
    saved = load_file(str(server.base / "output" / item["subfolder"] / item["filename"]))["latent_tensor"]
    assert_matches(saved, core_reference(host, tiny_demo, parts))
    (video,) = entry["outputs"]["10"]["images"]
    assert (server.base / "output" / video["subfolder"] / video["filename"]).stat().st_size > 0
    first = pool_workers(server)
    assert len(first) == 2
    server.run(graph(seed=SEED + 1), timeout=600)  # a new seed: the same workers sample again
    assert pool_workers(server) == first
    server.run(graph(ff_chunk_size=1024), timeout=600)  # a changed loader: new workers, the old ones stopped
    second = pool_workers(server)
    assert len(second) == 2 and not second & first
