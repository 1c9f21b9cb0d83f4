"""Tiny Step-Video models in the official download layout, written on the fly for host tests.

``<models>/stepvideo/tiny/{transformer/, vae/vae_v2.safetensors, step_llm/, hunyuan_clip/}`` plus two LoRAs in
``<models>/loras``: one in PEFT style with separate q/k/v, one in ComfyUI style.

``tiny_demo`` makes the built-in Step-Video-Tiny reachable as ``stepvideo/step-video-tiny/<part>``: the shipped
weights when the pack has them, otherwise a random-weight stand-in of the same architecture, exported by the
training code itself into ``<models>/stepvideo/step-video-tiny``. ``dpo_lora`` does the same for its Video-DPO LoRA,
``step-video-tiny-dpo.safetensors``.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from stepvideo_core.dit import DiTConfig, StepVideoDiT
from stepvideo_core.step_llm import StepLLMTokenizer
from stepvideo_core.vae import VAEConfig, VideoVAE

from ..builders import randomize_fan_in, write_sharded
from ..text_fixtures import (
    random_step_llm,
    small_llm_config,
    write_hunyuan_clip,
    write_sentencepiece,
    write_step_llm_folder,
)

LLM_HIDDEN, CLIP_HIDDEN = 96, 32  # what text_fixtures' tiny encoders produce
DIT_CONFIG = DiTConfig(num_attention_heads=2, attention_head_dim=16, in_channels=64, out_channels=64, num_layers=2,
                       caption_channels=(LLM_HIDDEN, CLIP_HIDDEN))
VAE_CONFIG = VAEConfig(z_channels=64, encoder_channels=32, encoder_channel_mult=(1, 1, 2, 8), encoder_num_res_blocks=1,
                       decoder_channels=32, decoder_channel_mult=(1, 1, 2, 8), decoder_num_res_blocks=1)  # top width * 8 = 4 * 64 * 8


def write_dit(folder: Path, seed: int = 0, shards: int = 2) -> StepVideoDiT:
    torch.manual_seed(seed)
    model = StepVideoDiT(DIT_CONFIG).eval()
    randomize_fan_in(model, seed, scale=0.5)
    write_sharded(folder, model.state_dict(), "diffusion_pytorch_model", shards)
    return model


def write_vae(path: Path, seed: int = 0) -> VideoVAE:
    model = VideoVAE(VAE_CONFIG).eval()
    randomize_fan_in(model, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k.replace("decoder.conv_out.conv.", "decoder.conv_out."): v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path))
    return model


def write_loras(folder: Path, seed: int = 0) -> dict[str, Path]:
    """``tiny_peft_qkv.safetensors`` (separate q/k/v on attn1, PEFT keys) and ``tiny_comfy.safetensors``
    (ComfyUI keys on the fused layers), plus ``not_stepvideo.safetensors`` that matches nothing."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    dim, rank = DIT_CONFIG.inner_dim, 4
    peft = {}
    for block in range(DIT_CONFIG.num_layers):
        for proj in ("to_q", "to_k", "to_v"):
            base = f"base_model.model.transformer_blocks.{block}.attn1.{proj}"
            peft[f"{base}.lora_A.weight"] = torch.randn(rank, dim, generator=g) * 0.3
            peft[f"{base}.lora_B.weight"] = torch.randn(dim, rank, generator=g) * 0.3
    comfy = {}
    for block in range(DIT_CONFIG.num_layers):
        base = f"diffusion_model.transformer_blocks.{block}.ff.net.2"
        comfy[f"{base}.lora_down.weight"] = torch.randn(rank, 4 * dim, generator=g) * 0.3
        comfy[f"{base}.lora_up.weight"] = torch.randn(dim, rank, generator=g) * 0.3
        comfy[f"{base}.alpha"] = torch.tensor(2.0)
    foreign = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)}
    paths = {"peft": folder / "tiny_peft_qkv.safetensors", "comfy": folder / "tiny_comfy.safetensors",
             "foreign": folder / "not_stepvideo.safetensors"}
    save_file(peft, str(paths["peft"]))
    save_file(comfy, str(paths["comfy"]))
    save_file(foreign, str(paths["foreign"]))
    return paths


def write_all(models: Path) -> Path:
    """Write every tiny model under ``models``; returns the official download folder."""
    root = models / "stepvideo" / "tiny"
    write_dit(root / "transformer")
    write_vae(root / "vae" / "vae_v2.safetensors")
    write_sentencepiece(root / "step_llm")
    n_vocab = StepLLMTokenizer(root / "step_llm").sp.get_piece_size()
    write_step_llm_folder(root / "step_llm", random_step_llm(small_llm_config(n_vocab, num_layers=1)))
    write_hunyuan_clip(root / "hunyuan_clip")
    write_loras(models / "loras")
    return root


@dataclass
class TinyDemo:
    root: Path  # the step-video-tiny folder the loaders' stepvideo/step-video-tiny/<part> values resolve to
    trained: bool  # the shipped, trained weights (not the random stand-in): their videos show the prompt
    builtin: bool  # read from the pack's own models/ folder


def is_trained(root: Path) -> bool:
    """The training code records its stages in training.json (``dit_phase1``, ...); a stand-in exported without
    training records none."""
    info = root / "training.json"
    return info.is_file() and any(stage.startswith("dit") for stage in json.loads(info.read_text()))


def write_tiny_standin(out: Path) -> Path:
    """Random weights of Step-Video-Tiny's architecture, exported exactly as the trained model is."""
    from stepvideo_core.dit import StepVideoDiT
    from stepvideo_core.tiny import model as tiny
    from stepvideo_core.tiny import train as train_tiny
    from stepvideo_core.vae import VideoVAE

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train_tiny.train_tokenizers(work)
        vae = VideoVAE(tiny.VAE_CONFIG)
        save_file({k: v.contiguous() for k, v in train_tiny.vae_official_state(vae).items()}, str(work / "vae.safetensors"))
        save_file({k: v.contiguous() for k, v in StepVideoDiT(tiny.DIT_CONFIG).state_dict().items()},
                  str(work / "dit_phase1.safetensors"))
        _, llm, _, bert = train_tiny.new_text_encoders(work)
        save_file({k: v.contiguous() for k, v in llm.state_dict().items()}, str(work / "llm_phase1.safetensors"))
        save_file({k: v.contiguous() for k, v in bert.state_dict().items()}, str(work / "bert_phase1.safetensors"))
        bert.config.to_json_file(str(work / "bert_config.json"))
        train_tiny.export(work, out=out, phase=1)
    return out


def tiny_demo(models: Path) -> TinyDemo:
    """The built-in Step-Video-Tiny if the pack ships it, else a stand-in under ``<models>/stepvideo``."""
    from stepvideo_core.tiny import model as tiny

    if (tiny.TINY_DIR / "transformer").is_dir():
        return TinyDemo(tiny.TINY_DIR, is_trained(tiny.TINY_DIR), builtin=True)
    root = models / "stepvideo" / tiny.NAME
    if not (root / "transformer").is_dir():
        write_tiny_standin(root)
    return TinyDemo(root, trained=False, builtin=False)


@dataclass
class DpoLora:
    path: Path  # the file the loaders' lora_name "step-video-tiny-dpo.safetensors" resolves to
    shipped: bool  # the pack's trained Video-DPO LoRA (not the random stand-in)


DPO_LORA_NAME = "step-video-tiny-dpo.safetensors"


def dpo_lora(models: Path, dit_root: Path) -> DpoLora:
    """The Video-DPO LoRA the pack ships in ``models/loras``, else a stand-in written to ``<models>/loras``: the
    adapters training starts from (``new_trainable_lora``, rank 8, every target layer of the tiny DiT in
    ``dit_root``) with random ``up`` factors, so that, unlike a fresh adapter, it changes the video."""
    from stepvideo_core.dit import load_dit
    from stepvideo_core.lora import new_trainable_lora, save_lora
    from stepvideo_core.tiny import model as tiny

    shipped = tiny.TINY_DIR.parent / "loras" / DPO_LORA_NAME
    if shipped.is_file():
        return DpoLora(shipped, shipped=True)
    path = models / "loras" / DPO_LORA_NAME
    if not path.is_file():
        dit = load_dit(dit_root / "transformer", weight_dtype=torch.float32)
        lora = new_trainable_lora(dit, rank=8, seed=11)
        g = torch.Generator().manual_seed(12)
        with torch.no_grad():
            for pair in lora.pairs.values():
                pair.up.copy_(torch.randn(pair.up.shape, generator=g) * 0.2)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_lora(lora, path, metadata={"base_model": tiny.NAME, "stand_in": "random up factors (tests only)"})
    return DpoLora(path, shipped=False)


@dataclass
class TinyTI2V:
    root: Path  # the step-video-tiny-ti2v folder stepvideo/step-video-tiny-ti2v/transformer resolves to
    trained: bool  # the shipped, fine-tuned TI2V DiT (not the random stand-in)


def tiny_ti2v(models: Path, dit_root: Path) -> TinyTI2V:
    """The built-in Step-Video-Tiny TI2V DiT if the pack ships it, else a stand-in under ``<models>/stepvideo``: the
    DiT in ``dit_root`` widened as training widens it, with random condition channels and motion embedding (a
    freshly widened DiT ignores both, which would hide a condition that never arrives)."""
    from stepvideo_core.dit import load_dit
    from stepvideo_core.tiny import model as tiny
    from stepvideo_core.tiny import ti2v

    if (tiny.TI2V_DIR / "transformer").is_dir():
        info = tiny.TI2V_DIR / "training.json"
        trained = info.is_file() and any(k.startswith("ti2v_dit_phase") for k in json.loads(info.read_text()))
        return TinyTI2V(tiny.TI2V_DIR, trained=trained)
    root = models / "stepvideo" / tiny.TI2V_DIR.name
    if not (root / "transformer").is_dir():
        dit = ti2v.widen_for_image(load_dit(dit_root / "transformer", weight_dtype=torch.float32))
        g = torch.Generator().manual_seed(21)
        with torch.no_grad():
            weight = dit.pos_embed.proj.weight
            weight[:, dit.config.in_channels:] = torch.randn(weight[:, dit.config.in_channels:].shape, generator=g) * 0.2
            for p in dit.adaln_single.emb.motion_score_embedder.linear_2.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        write_sharded(root / "transformer", dit.state_dict(), "diffusion_pytorch_model", shards=1)
    return TinyTI2V(root, trained=False)
