"""Small models and inputs the tests build on the fly (no downloads): random-weight DiTs and VAEs in the official
layout, DiT text inputs, and checkpoints written as the official sharded files."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from stepvideo_core.dit import DiTConfig, StepVideoDiT
from stepvideo_core.vae import VAEConfig, VideoVAE

# A reduced VAE (every GroupNorm still has 32 groups, 8 latent channels) with the official structure.
SMALL_VAE = VAEConfig(z_channels=8, encoder_channels=32, encoder_channel_mult=(1, 1, 2, 2),
                      decoder_channels=32, decoder_channel_mult=(1, 1, 2, 2))


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> dict[str, torch.Tensor]:
    """Every tensor of the state dict ~ N(0, scale^2): zero-initialised tables or unit norms would hide layout bugs.
    Returns the state dict (the same tensors the model holds)."""
    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    for tensor in sd.values():
        tensor.copy_(torch.randn(tensor.shape, generator=g) * scale)
    return sd


def randomize_fan_in(model: torch.nn.Module, seed: int = 0, scale: float = 1.0) -> torch.nn.Module:
    """Weights that keep activations O(1) through deep stacks: matrices and kernels ~ N(0, scale^2 / fan_in), norm
    weights ~ 1 +- 0.1, everything else ~ N(0, 0.05^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                val = torch.randn(p.shape, generator=g) * scale / math.sqrt(p[0].numel())
            elif "norm" in name and name.endswith("weight"):
                val = 1 + 0.1 * torch.randn(p.shape, generator=g)
            else:
                val = 0.05 * torch.randn(p.shape, generator=g)
            p.copy_(val.to(p.dtype))
    return model


def small_dit(heads=2, head_dim=16, layers=2, channels=4, caption=(24, 12), seed=0, **kw) -> StepVideoDiT:
    """A DiT of the official structure with ``randomize``d weights; ``caption`` = (Step-LLM, CLIP) widths."""
    torch.manual_seed(seed)
    cfg = DiTConfig(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=channels,
                    out_channels=channels, num_layers=layers, caption_channels=caption, **kw)
    model = StepVideoDiT(cfg).eval()
    randomize(model, seed)
    return model


def text_inputs(b, llm_len, caption, valid, seed=1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Step-LLM states, mask, CLIP states) for ``b`` prompts; sample i has ``valid[i]`` real Step-LLM tokens."""
    g = torch.Generator().manual_seed(seed)
    llm = torch.randn(b, llm_len, caption[0], generator=g)
    clip = torch.randn(b, 77, caption[1], generator=g)
    mask = torch.zeros(b, 77 + llm_len)
    for i, n in enumerate(valid):
        mask[i, : 77 + n] = 1
    return llm, mask, clip


def small_vae(seed: int = 0, config: VAEConfig = SMALL_VAE, **kw) -> VideoVAE:
    return randomize_fan_in(VideoVAE(config, **kw), seed).eval()


def write_sharded(folder: Path, state: dict[str, torch.Tensor], stem: str, shards: int = 2) -> Path:
    """Save ``state`` as ``{stem}-0000i-of-0000n.safetensors`` plus ``{stem}.safetensors.index.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(state)
    per = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[i * per:(i + 1) * per]}
        save_file(part, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def vae_latents(b=1, n=6, h=2, w=3, z=8, seed=1) -> torch.Tensor:
    """Seeded latents ``[b, n, z, h, w]`` for a small VAE (``SMALL_VAE`` has z = 8)."""
    return torch.randn(b, n, z, h, w, generator=torch.Generator().manual_seed(seed))


# ---- the node contract: the pack's public interface as workflows, the frontend extension and the locales use it
# (tests/test_workflows_static.py checks the shipped workflows against it, tests/host/test_frontend.py the live
# /object_info of a real ComfyUI) ----------------------------------------------------------------------------------

WORKFLOW_DIR = Path(__file__).resolve().parents[1] / "workflows"
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.json"))
TI2V_START_IMAGE = WORKFLOW_DIR / "inputs" / "step_video_tiny_ti2v_start.png"  # copied to input/ when the pack loads

SEED_MAX = 0xFFFFFFFFFFFFFFFF
DTYPES_DIT = ["default", "bf16", "fp16", "fp32", "fp8_e4m3fn", "fp8_e5m2"]
DTYPES_DIT_LOADER = [*DTYPES_DIT, "fp8_e4m3fn_fast"]
DTYPES_LLM = ["bf16", "fp16", "fp32", "fp8_e4m3fn", "fp8_e5m2"]


def combo(name, options=None, upload=False):
    """options None: the choices are files/folders on the user's disk (any non-empty string). ``upload``: the
    frontend adds an upload button after it whose value ("image") is saved in widgets_values but never sent."""
    return {"name": name, "kind": "combo", "options": options, "upload": upload}


def int_(name, lo, hi, step=None, control=False):
    return {"name": name, "kind": "int", "min": lo, "max": hi, "step": step, "control": control}


def float_(name, lo, hi):
    return {"name": name, "kind": "float", "min": lo, "max": hi}


def bool_(name):
    return {"name": name, "kind": "bool"}


def str_(name):
    return {"name": name, "kind": "string"}


# node id -> sockets (name, type) in order, widgets in order, outputs (name, type) in order
CONTRACT: dict[str, dict] = {
    "StepVideoDiTLoader": {
        "sockets": [],
        "widgets": [combo("model_name"), combo("weight_dtype", DTYPES_DIT_LOADER),
                    combo("attention", ["comfy", "sdpa", "sageattention", "flash-attn"])],
        "outputs": [("MODEL", "MODEL")],
    },
    "StepVideoTextEncoderLoader": {
        "sockets": [],
        "widgets": [combo("step_llm"), combo("hunyuan_clip"), combo("llm_dtype", DTYPES_LLM),
                    combo("device", ["default", "cpu"])],
        "outputs": [("STEPVIDEO_TEXT_ENCODERS", "STEPVIDEO_TEXT_ENCODERS")],
    },
    "StepVideoTextEncode": {
        "sockets": [("text_encoders", "STEPVIDEO_TEXT_ENCODERS")],
        "widgets": [str_("prompt"), str_("negative_prompt"), bool_("positive_magic"), bool_("negative_magic"),
                    bool_("cache"), combo("suffixes", ["t2v", "ti2v", "none"])],
        "outputs": [("positive", "CONDITIONING"), ("negative", "CONDITIONING")],
    },
    "StepVideoVAELoader": {
        "sockets": [],
        "widgets": [combo("vae_name"), combo("dtype", ["bf16", "fp16", "fp32"])],
        "outputs": [("STEPVIDEO_VAE", "STEPVIDEO_VAE")],
    },
    "StepVideoVAEDecode": {
        "sockets": [("vae", "STEPVIDEO_VAE"), ("samples", "LATENT")],
        "widgets": [int_("tile_size", 0, 512), int_("tile_overlap", 0, 256)],
        "outputs": [("IMAGE", "IMAGE")],
    },
    "StepVideoVAEEncode": {
        "sockets": [("vae", "STEPVIDEO_VAE"), ("image", "IMAGE")],
        "widgets": [],
        "outputs": [("LATENT", "LATENT")],
    },
    "StepVideoEmptyLatent": {
        "sockets": [],
        "widgets": [int_("width", 16, 4096, 16), int_("height", 16, 4096, 16), int_("frames", 17, 1700, 17),
                    int_("batch_size", 1, 64)],
        "outputs": [("LATENT", "LATENT")],
    },
    "StepVideoImageToVideo": {
        "sockets": [("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("vae", "STEPVIDEO_VAE"),
                    ("start_image", "IMAGE")],
        "widgets": [int_("width", 16, 4096, 16), int_("height", 16, 4096, 16), int_("frames", 17, 1700, 17),
                    float_("motion_score", 0.0, 100.0), int_("batch_size", 1, 64)],
        "outputs": [("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT")],
    },
    "StepVideoSampler": {
        "sockets": [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                    ("latent_image", "LATENT")],
        "widgets": [combo("preset", ["standard", "turbo", "tiny", "custom"]), int_("steps", 1, 1000),
                    float_("cfg", 0.0, 100.0), float_("shift", 0.01, 100.0), int_("seed", 0, SEED_MAX, control=True),
                    float_("denoise", 0.01, 1.0)],
        "outputs": [("LATENT", "LATENT")],
    },
    "StepVideoSigmas": {
        "sockets": [],
        "widgets": [int_("steps", 1, 1000), float_("shift", 0.01, 100.0), float_("denoise", 0.01, 1.0)],
        "outputs": [("SIGMAS", "SIGMAS")],
    },
    "StepVideoNoise": {
        "sockets": [],
        "widgets": [int_("noise_seed", 0, SEED_MAX, control=True)],
        "outputs": [("NOISE", "NOISE")],
    },
    "StepVideoStepCache": {
        "sockets": [("model", "MODEL")],
        "widgets": [float_("threshold", 0.0, 3.0), float_("start_percent", 0.0, 1.0), float_("end_percent", 0.0, 1.0)],
        "outputs": [("MODEL", "MODEL")],
    },
    "StepVideoCompileBlocks": {
        "sockets": [("model", "MODEL")],
        "widgets": [combo("backend", ["inductor", "cudagraphs"]),
                    combo("mode", ["default", "max-autotune-no-cudagraphs", "reduce-overhead"])],
        "outputs": [("MODEL", "MODEL")],
    },
    "StepVideoLoraLoader": {
        "sockets": [("model", "MODEL")],
        "widgets": [combo("lora_name"), float_("strength", -4.0, 4.0)],
        "outputs": [("MODEL", "MODEL")],
    },
    "StepVideoTrainLora": {
        "sockets": [("model", "MODEL"), ("text_encoders", "STEPVIDEO_TEXT_ENCODERS"), ("vae", "STEPVIDEO_VAE")],
        "widgets": [str_("data_folder"), str_("lora_name"), int_("steps", 1, 100_000), int_("rank", 1, 256),
                    float_("learning_rate", 1e-7, 1.0), int_("batch_size", 1, 64), int_("seed", 0, SEED_MAX, control=True),
                    int_("width", 16, 4096, 16), int_("height", 16, 4096, 16), int_("frames", 17, 1700, 17),
                    float_("shift", 0.01, 100.0), float_("caption_dropout", 0.0, 0.99), bool_("gradient_checkpointing")],
        "outputs": [("MODEL", "MODEL"), ("lora_file", "STRING")],
    },
    "StepVideoParallelDiTLoader": {
        "sockets": [],
        "widgets": [combo("model_name"), combo("weight_dtype", DTYPES_DIT),
                    combo("attention", ["sdpa", "sageattention", "flash-attn"]), str_("devices"), int_("workers", 0, 64),
                    combo("guidance_parallel", ["auto", "on", "off"]), bool_("shard_weights"),
                    int_("ff_chunk_size", 0, 1_000_000, 1024), str_("cluster")],
        "outputs": [("MODEL", "MODEL")],
    },
    # deprecated (kept so that saved graphs open): they do what StepVideoLoraLoader / StepVideoSampler do
    "StepVideoParallelLoraLoader": {
        "sockets": [("parallel_dit", "MODEL")],
        "widgets": [combo("lora_name"), float_("strength", -4.0, 4.0)],
        "outputs": [("parallel_dit", "MODEL")],
    },
    "StepVideoParallelSampler": {
        "sockets": [("parallel_dit", "MODEL"), ("positive", "CONDITIONING"),
                    ("negative", "CONDITIONING"), ("latent_image", "LATENT")],
        "widgets": [combo("preset", ["standard", "turbo", "tiny", "custom"]), int_("steps", 1, 1000),
                    float_("cfg", 0.0, 100.0), float_("shift", 0.01, 100.0), int_("seed", 0, SEED_MAX, control=True),
                    float_("denoise", 0.01, 1.0)],
        "outputs": [("LATENT", "LATENT")],
    },
}

# Core nodes the workflows may use, with the same contract shape (0.3.64).
CORE_CONTRACT: dict[str, dict] = {
    "CreateVideo": {
        "sockets": [("images", "IMAGE"), ("audio", "AUDIO")],
        "widgets": [float_("fps", 1.0, 120.0)],
        "outputs": [("VIDEO", "VIDEO")],
    },
    "SaveVideo": {
        "sockets": [("video", "VIDEO")],
        "widgets": [str_("filename_prefix"), combo("format", ["auto", "mp4"]), combo("codec", ["auto", "h264"])],
        "outputs": [],
    },
    "LoraLoaderModelOnly": {
        "sockets": [("model", "MODEL")],
        "widgets": [combo("lora_name"), float_("strength_model", -100.0, 100.0)],
        "outputs": [("MODEL", "MODEL")],
    },
    "ImageStitch": {
        "sockets": [("image1", "IMAGE"), ("image2", "IMAGE")],
        "widgets": [combo("direction", ["right", "down", "left", "up"]), bool_("match_image_size"),
                    int_("spacing_width", 0, 1024, 2), combo("spacing_color", ["white", "black", "red", "green", "blue"])],
        "outputs": [("IMAGE", "IMAGE")],
    },
    "LoadImage": {
        "sockets": [],
        "widgets": [combo("image", upload=True)],
        "outputs": [("IMAGE", "IMAGE"), ("MASK", "MASK")],
    },
    "MarkdownNote": {"sockets": [], "widgets": [str_("text")], "outputs": []},
    "Note": {"sockets": [], "widgets": [str_("text")], "outputs": []},
}
VIRTUAL_NODES = {"MarkdownNote", "Note"}


def spec(node_type: str) -> dict:
    return CONTRACT.get(node_type) or CORE_CONTRACT[node_type]


def widget_names_with_control(node_type: str) -> list[str]:
    """widgets_values layout: a seed-like INT with control_after_generate is followed by its control value, an image
    combo by its upload button's value."""
    names = []
    for w in spec(node_type)["widgets"]:
        names.append(w["name"])
        if w.get("control"):
            names.append(w["name"] + ".control_after_generate")
        if w.get("upload"):
            names.append(w["name"] + ".upload")
    return names


PACK = "stepvideo_pack_under_test"


def load_pack():
    """The repository root imported as a package, the way ComfyUI loads the pack, so the nodes' relative imports of
    the core resolve (no ComfyUI needed for the modules that do not import it)."""
    if PACK not in sys.modules:
        root = Path(__file__).resolve().parents[1]
        spec = importlib.util.spec_from_file_location(PACK, root / "__init__.py", submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        spec.loader.exec_module(module)
    return sys.modules[PACK]


def pack_nodes_module(name: str):
    """``nodes.<name>`` of the pack imported by ``load_pack``."""
    load_pack()
    return importlib.import_module(f"{PACK}.nodes.{name}")
