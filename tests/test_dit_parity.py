"""Parity with the official StepVideoModel (set STEPVIDEO_REFERENCE to a Step-Video-T2V checkout)."""

import pytest
import torch

from stepvideo_core.dit import DiTConfig, StepVideoDiT
from tests.builders import randomize, text_inputs
from tests.reference_impl import import_reference


def build_pair(heads, head_dim, layers, channels, caption, patch=1, seed=0):
    ref_module = import_reference("modules.model")
    cfg = DiTConfig(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=channels,
                    out_channels=channels, num_layers=layers, patch_size=patch, caption_channels=caption)
    ours = StepVideoDiT(cfg).eval()
    sd = randomize(ours, seed)
    ref = ref_module.StepVideoModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=channels,
                                    out_channels=channels, num_layers=layers, patch_size=patch,
                                    caption_channels=list(caption), attention_type="torch")
    for block in ref.transformer_blocks:
        # the reference hard-codes the 128-channel split [64, 32, 32]; give it the same proportions
        block.attn1.rope_ch_split = list(cfg.rope_split)
    ref.load_state_dict(sd, strict=True)
    return ours, ref.eval()


def run_ref(ref, x, t, llm, mask, clip):
    return ref(x, encoder_hidden_states=llm, encoder_hidden_states_2=clip, timestep=t,
               encoder_attention_mask=mask, return_dict=False)


CASES = [
    # heads, head_dim, layers, (b, F, h, w), valid LLM tokens per sample, patch
    (2, 128, 2, (1, 3, 4, 6), (7,), 1),
    (2, 128, 2, (2, 5, 3, 5), (3, 10), 1),  # odd frames, non-square, batch 2 with different text lengths
    (3, 64, 3, (2, 1, 6, 4), (10, 1), 1),
    (2, 64, 1, (1, 2, 4, 6), (5,), 2),
]


@pytest.mark.parametrize("heads,head_dim,layers,shape,valid,patch", CASES)
def test_fp32_matches_reference(heads, head_dim, layers, shape, valid, patch):
    caption = (48, 32)
    ours, ref = build_pair(heads, head_dim, layers, 8, caption, patch)
    b, frames, h, w = shape
    x = torch.randn(b, frames, 8, h, w)
    t = torch.rand(b)
    llm, mask, clip = text_inputs(b, 12, caption, valid)
    with torch.no_grad():
        got = ours(x, t, llm, mask, clip)
    want = run_ref(ref, x, t, llm, mask, clip)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_bf16_with_reference_rounding_tracks_reference():
    """The reference's bf16 run (timestep, RoPE angle and mask-sum rounding) against ours with the switch on."""
    caption = (32, 16)
    ours, ref = build_pair(2, 128, 2, 8, caption)
    ours.to(torch.bfloat16).compute_dtype = torch.bfloat16
    ref.to(torch.bfloat16)
    x = torch.randn(2, 3, 8, 4, 4, dtype=torch.bfloat16)
    t = torch.tensor([0.546512, 0.0015674], dtype=torch.float32)
    llm, mask, clip = text_inputs(2, 320, caption, (200, 250))  # > 256 keys: the bf16 mask sum rounds
    llm, mask, clip = llm.bfloat16(), mask.bfloat16(), clip.bfloat16()
    with torch.no_grad():
        got = ours(x, t, llm, mask, clip).float()
        ours.config.reference_rounding = False
        unrounded = ours(x, t, llm, mask, clip).float()
    want = run_ref(ref, x, t.bfloat16(), llm, mask, clip).float()
    err_rounded = (got - want).abs().max().item()
    err_unrounded = (unrounded - want).abs().max().item()
    assert err_rounded <= 1e-2 * want.abs().max().item()
    assert err_rounded < err_unrounded, "the switch must bring us closer to the reference's bf16 output"
