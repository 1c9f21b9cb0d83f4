"""The shipped LoRA-training workflow in a real ComfyUI: Step-Video Train LoRA trains Step-Video-Tiny on the six
cyan clips the pack ships, writes the LoRA into models/loras, and the stitched video shows base | trained.

Run as the frontend converts it (``api_prompt``) with fewer steps than shipped (the shipped 300 take minutes on a
busy CPU); then once more with more steps, which goes on from the checkpoint of the first run."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from safetensors import safe_open

from stepvideo_core.lora import TARGET_MODULES
from stepvideo_core.tiny import model as tiny

from ..test_workflows_static import WORKFLOW_DIR
from .test_tiny_demo import api_prompt
from .test_tiny_dpo_swap import HALF, _files, _ids, _mean_abs, _pngs

WORKFLOW = WORKFLOW_DIR / "step_video_tiny_train_lora.json"


def _run(server, prompt: dict, tag: str) -> dict:
    (stitch,) = _ids(prompt, "ImageStitch")
    probe = copy.deepcopy(prompt)
    probe["probe"] = {"class_type": "SaveImage", "inputs": {"images": [stitch, 0], "filename_prefix": f"train/{tag}"}}
    entry = server.run(probe, timeout=900)
    (train,) = _ids(prompt, "StepVideoTrainLora")
    return {"frames": _pngs(_files(server, entry, "probe")), "report": entry["outputs"][train]["text"][0]}


@pytest.fixture(scope="module")
def trained(server, tiny_demo):
    prompt = api_prompt(json.loads(WORKFLOW.read_text(encoding="utf-8")))
    (train,) = _ids(prompt, "StepVideoTrainLora")
    prompt[train]["inputs"].update(steps=20, lora_name="host_test_cyan")
    first = _run(server, prompt, "20")
    prompt[train]["inputs"]["steps"] = 30
    longer = _run(server, prompt, "30")
    # the same file through core LoraLoaderModelOnly in place of the node's MODEL output
    core = copy.deepcopy(prompt)
    (dit,) = _ids(prompt, "StepVideoDiTLoader")
    core["core_lora"] = {"class_type": "LoraLoaderModelOnly",
                         "inputs": {"model": [dit, 0], "lora_name": "host_test_cyan.safetensors", "strength_model": 1.0}}
    for nid in _ids(prompt, "StepVideoSampler"):
        if core[nid]["inputs"]["model"] == [train, 0]:
            core[nid]["inputs"]["model"] = ["core_lora", 0]
    core_run = _run(server, core, "core")
    return {"first": first, "longer": longer, "core": core_run,
            "lora": server.base / "models" / "loras" / "host_test_cyan.safetensors"}


def test_the_node_writes_a_lora_that_the_loaders_read(trained):
    with safe_open(str(trained["lora"]), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert meta["steps"] == "30" and meta["data_size"] == "6" and meta["method"] == "sft"
    n = len(TARGET_MODULES) * tiny.DIT_CONFIG.num_layers
    assert sum(k.endswith(".lora_up.weight") and k.startswith("diffusion_model.transformer_blocks.") for k in keys) == n
    assert "skipped" in trained["first"]["report"] and "6 clip(s)" in trained["first"]["report"]
    assert "resumed from 20" in trained["longer"]["report"], trained["longer"]["report"]
    assert (trained["lora"].parent / "host_test_cyan.loss.png").is_file()


def test_core_lora_loader_reads_the_trained_file_to_the_same_clip(trained):
    ours, core = trained["longer"]["frames"][:, :, HALF:], trained["core"]["frames"][:, :, HALF:]
    assert _mean_abs(ours, core) < 0.5, _mean_abs(ours, core)  # float rounding of two patch paths, in uint8 frames


def test_the_video_shows_base_and_trained_side_by_side(trained):
    for run in ("first", "longer"):
        frames = trained[run]["frames"]
        assert frames.shape == (tiny.SETTINGS.num_frames, HALF, 2 * HALF, 3)
        assert _mean_abs(frames[:, :, :HALF], frames[:, :, HALF:]) > 1.0, run
    # the base half is the same clip in both runs: only the LoRA branch changed
    np.testing.assert_array_equal(trained["first"]["frames"][:, :, :HALF], trained["longer"]["frames"][:, :, :HALF])
