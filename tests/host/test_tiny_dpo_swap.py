"""The shipped Video-DPO swap workflow in a real ComfyUI: the built-in Step-Video-Tiny renders one prompt and seed
without and with ``step-video-tiny-dpo.safetensors`` and Image Stitch puts the two clips side by side in one video.

Run end to end on the CPU as the frontend converts it (``api_prompt``), once as shipped (LoRA strength 1) and once
with the LoRA at strength 0. Next to the workflow's own SaveVideo a SaveImage probe stores the stitched frames as
PNG, so the halves can be compared exactly: H.264 codes the two halves of a frame differently even when they are
the same picture. Nothing here depends on what the model draws:
the weights in ``models/`` are used when the pack has them, else random stand-ins of the same architecture (the
LoRA: ``new_trainable_lora`` with random ``up`` factors, see ``tiny_models.dpo_lora``)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from stepvideo_core.lora import TARGET_MODULES
from stepvideo_core.tiny import model as tiny

from ..builders import WORKFLOW_DIR
from .conftest import api_prompt
from .tiny_models import DPO_LORA_NAME, dpo_lora

SWAP = WORKFLOW_DIR / "step_video_tiny_dpo_swap.json"
CLIP = (tiny.SETTINGS.num_frames, tiny.SETTINGS.height, tiny.SETTINGS.width)  # (17, 128, 128)
HALF = CLIP[2]


@pytest.fixture(scope="session")
def dpo(base_dir, tiny_demo):
    """The shipped LoRA, or a stand-in in the test server's models/loras (written before the server starts)."""
    return dpo_lora(base_dir / "models", tiny_demo.root)


def _ids(prompt: dict, class_type: str) -> list[str]:
    return [nid for nid, n in prompt.items() if n["class_type"] == class_type]


def _files(server, entry: dict, node_id: str) -> list[Path]:
    items = entry["outputs"][node_id]["images"]
    return [server.base / "output" / i["subfolder"] / i["filename"] for i in items]


def _video(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _pngs(paths: list[Path]) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(paths)])


def _render(server, prompt: dict, tag: str) -> dict:
    (stitch,) = _ids(prompt, "ImageStitch")
    probe = copy.deepcopy(prompt)
    probe["probe"] = {"class_type": "SaveImage",
                      "inputs": {"images": [stitch, 0], "filename_prefix": f"dpo_swap_probe/{tag}"}}
    entry = server.run(probe, timeout=900)
    (save,) = _ids(prompt, "SaveVideo")
    (video,) = _files(server, entry, save)
    (lora,) = _ids(prompt, "StepVideoLoraLoader")
    return {"video_path": video, "video": _video(video), "frames": _pngs(_files(server, entry, "probe")),
            "lora_report": entry["outputs"].get(lora, {}).get("text", [""])[0]}


@pytest.fixture(scope="module")
def renders(dpo, server, tiny_demo):
    info = server.get("/object_info/StepVideoLoraLoader")["StepVideoLoraLoader"]
    assert DPO_LORA_NAME in info["input"]["required"]["lora_name"][1]["options"]
    prompt = api_prompt(json.loads(SWAP.read_text(encoding="utf-8")))
    (lora,) = _ids(prompt, "StepVideoLoraLoader")
    assert prompt[lora]["inputs"]["lora_name"] == DPO_LORA_NAME and prompt[lora]["inputs"]["strength"] == 1.0
    full = _render(server, prompt, "strength1")
    zero = copy.deepcopy(prompt)
    zero[lora]["inputs"]["strength"] = 0.0
    off = _render(server, zero, "strength0")
    print(f"DPO swap ({'shipped' if dpo.shipped else 'stand-in'} LoRA, "
          f"{'trained' if tiny_demo.trained else 'stand-in'} model): {full['video_path']}")
    if dpo.shipped and tiny_demo.trained:  # for the record only: what the oracle makes of the two halves
        from stepvideo_core.tiny import oracle

        for name, half in (("base", full["frames"][:, :, :HALF]), ("DPO", full["frames"][:, :, HALF:])):
            print(f"oracle, {name}:", oracle.score(half, ("purple", "triangle", "left")))
    return {"full": full, "zero": off}


def _mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def test_one_video_with_two_clips_side_by_side(renders):
    for run in ("full", "zero"):
        r = renders[run]
        assert r["video_path"].is_file() and r["video_path"].parent.name == "video"
        assert r["video_path"].name.startswith("step_video_tiny_dpo_swap_")
        assert r["video"].shape == (CLIP[0], CLIP[1], 2 * HALF, 3), (run, r["video"].shape)
        assert r["frames"].shape == r["video"].shape, run
        # the MP4 is the stitched frames up to H.264's loss (about 25 dB on the stand-in's noise, the worst case;
        # the same frames shifted by half a clip score about 15 dB)
        assert _psnr(r["video"], r["frames"]) > 20.0, run


def test_the_lora_patches_every_target_layer_of_the_tiny_dit(renders):
    n = len(TARGET_MODULES) * tiny.DIT_CONFIG.num_layers
    report = renders["full"]["lora_report"]
    assert f"{n} of {n} DiT layer(s) patched from {3 * n} tensor(s)" in report, report
    assert "matched no layer" not in report, report


def test_base_and_lora_halves_differ_at_strength_1(renders):
    frames = renders["full"]["frames"]
    diff = _mean_abs(frames[:, :, :HALF], frames[:, :, HALF:])
    print(f"strength 1: base vs LoRA half differ by {diff:.2f}/255 on average")
    assert diff > 1.0


def test_lora_strength_0_gives_the_base_clip_on_both_sides(renders):
    zero, full = renders["zero"], renders["full"]
    # the frames SaveVideo encodes: right half == left half, bit for bit, and the left half is the same base clip
    np.testing.assert_array_equal(zero["frames"][:, :, HALF:], zero["frames"][:, :, :HALF])
    np.testing.assert_array_equal(zero["frames"][:, :, :HALF], full["frames"][:, :, :HALF])
    # the MP4 itself cannot be bit-exact (H.264 predicts each half from different neighbours), but its halves are
    # closer at strength 0 than at strength 1
    halves = {run: _mean_abs(r["video"][:, :, :HALF], r["video"][:, :, HALF:]) for run, r in renders.items()}
    print("MP4 halves, mean difference:", halves)
    assert halves["zero"] < halves["full"]
