"""Small models and inputs the tests build on the fly (no downloads): random-weight DiTs and VAEs in the official
layout, DiT text inputs, and checkpoints written as the official sharded files."""

from __future__ import annotations

import json
import math
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
