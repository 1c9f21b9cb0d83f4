"""The fault catalogue's common ground: the shipped Step-Video-Tiny loaded once, and a probe of every model in it.

Each fault test takes the ``tiny`` fixture (defined in each ``test_faults_*.py`` from :func:`tiny_fixture`): it hands
out the loaded models, and after the test re-runs the probe and requires every output to be bit-identical to the
one computed before any fault, with no hook left behind on any module. So a fault that is handled with a clear
message but leaves a model patched, moved or half-loaded still fails.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import pytest
import torch

from stepvideo_core.text_encoding import encode_texts
from stepvideo_core.tiny import model as tiny_model

PROBE_PROMPT = "a red circle moves left"


def probe(model: tiny_model.TinyModel) -> dict[str, torch.Tensor]:
    """One output of each model: both text encoders, one DiT call, a VAE decode and a VAE encode."""
    with torch.no_grad():
        text = encode_texts(model.text, [PROBE_PROMPT])
        latents = torch.randn(1, 3, model.dit.config.in_channels, 4, 4, generator=torch.Generator().manual_seed(0))
        velocity = model.dit(latents, torch.tensor([0.4]), **text.dit_kwargs())
        # one latent frame of 2x2 runs every VAE layer at a tenth of the cost of a 17-frame chunk
        video = model.vae.decode(latents[:, :1, :, :2, :2])
        encoded = model.vae.encode(video, sample=False)
    return {"step_llm": text.llm_states, "clip": text.clip_states, "dit": velocity, "vae_decode": video,
            "vae_encode": encoded}


def hook_count(model: tiny_model.TinyModel) -> int:
    modules = [*model.dit.modules(), *model.vae.modules(), *model.text.step_llm.modules(), *model.text.clip.modules()]
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)


@functools.cache
def loaded() -> tuple[tiny_model.TinyModel, dict[str, torch.Tensor], int]:
    """The tiny model, its probe outputs and its hook count, computed once per test session."""
    model = tiny_model.load_tiny()
    return model, probe(model), hook_count(model)


def assert_usable(model: tiny_model.TinyModel, before: dict[str, torch.Tensor], hooks: int) -> None:
    assert model.text.step_llm is not None and model.text.clip is not None, "the text encoders were released"
    assert hook_count(model) == hooks, "a hook (LoRA, interrupt, OOM probe) was left on a model"
    after = probe(model)
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert not changed, f"models no longer give their earlier output after the fault: {changed}"


def tiny_fixture():
    """A function-scoped fixture: the loaded tiny model, checked to be unchanged after the test."""

    @pytest.fixture
    def tiny():
        model, before, hooks = loaded()
        yield model
        assert_usable(model, before, hooks)

    return tiny


def copy_part(part: str, dest: Path) -> Path:
    """A private copy of one part of the shipped model (``transformer``, ``vae``, ``step_llm``...) to damage."""
    src = tiny_model.paths()[part]
    target = dest / src.name
    if src.is_dir():
        shutil.copytree(src, target)
    else:
        shutil.copy(src, target)
    return target
