"""Parity with the official Step-Video-TI2V StepVideoModel (set STEPVIDEO_TI2V_REFERENCE to its checkout)."""

import pytest
import torch

from stepvideo_core.dit import DiTConfig, StepVideoDiT
from tests.builders import randomize, text_inputs
from tests.reference_impl import TI2V_ENV_VAR, import_reference


def build_pair(heads, head_dim, layers, channels, caption, patch=1, seed=0):
    ref_module = import_reference("modules.model", TI2V_ENV_VAR)
    cfg = DiTConfig(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=channels,
                    out_channels=channels, num_layers=layers, patch_size=patch, caption_channels=caption,
                    use_additional_conditions=True)
    ours = StepVideoDiT(cfg).eval()
    sd = randomize(ours, seed)
    ref = ref_module.StepVideoModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=channels,
                                    out_channels=channels, num_layers=layers, patch_size=patch,
                                    caption_channels=list(caption), attention_type="torch",
                                    use_additional_conditions=True)
    for block in ref.transformer_blocks:
        block.attn1.rope_ch_split = list(cfg.rope_split)  # the reference hard-codes the split for 128 channels
    ref.load_state_dict(sd, strict=True)
    return ours, ref.eval()


CASES = [
    # heads, head_dim, layers, (b, F, h, w), valid LLM tokens per sample, patch, motion score
    (2, 128, 2, (1, 3, 4, 6), (7,), 1, 5.0),
    (2, 128, 2, (2, 5, 3, 5), (3, 10), 1, 2.0),  # odd frames, non-square, batch 2 with different text lengths
    (3, 64, 3, (2, 1, 6, 4), (10, 1), 1, 20.0),
    (2, 64, 1, (1, 2, 4, 6), (5,), 2, 10.0),
]


@pytest.mark.parametrize("heads,head_dim,layers,shape,valid,patch,score", CASES)
def test_fp32_matches_reference(heads, head_dim, layers, shape, valid, patch, score):
    caption = (48, 32)
    ours, ref = build_pair(heads, head_dim, layers, 8, caption, patch)
    b, frames, h, w = shape
    x = torch.randn(b, frames, 8, h, w)
    condition = torch.zeros_like(x)
    condition[:, 0] = torch.randn(b, 8, h, w)  # the start image's latent frame, zeros after it
    t = torch.rand(b)
    llm, mask, clip = text_inputs(b, 12, caption, valid)
    with torch.no_grad():
        got = ours(x, t, llm, mask, clip, condition_hidden_states=condition, motion_score=score)
        other_score = ours(x, t, llm, mask, clip, condition_hidden_states=condition, motion_score=score + 3)
    want = ref(x, encoder_hidden_states=llm, encoder_hidden_states_2=clip, timestep=t, encoder_attention_mask=mask,
               condition_hidden_states=condition, motion_score=score, return_dict=False)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert (other_score - want).abs().max() > 1e-3 * want.abs().max(), "the motion score must change the output"


def test_bf16_tracks_reference():
    """The reference's bf16 run (score built in bf16, timestep and RoPE rounding) against ours with the switch on."""
    caption = (32, 16)
    ours, ref = build_pair(2, 128, 2, 8, caption)
    ours.to(torch.bfloat16).compute_dtype = torch.bfloat16
    ref.to(torch.bfloat16)
    x = torch.randn(2, 3, 8, 4, 4, dtype=torch.bfloat16)
    condition = torch.cat([torch.randn(2, 1, 8, 4, 4), torch.zeros(2, 2, 8, 4, 4)], 1).bfloat16()
    t = torch.tensor([0.546512, 0.0015674], dtype=torch.float32)
    llm, mask, clip = (v.bfloat16() for v in text_inputs(2, 40, caption, (20, 30)))
    with torch.no_grad():
        got = ours(x, t, llm, mask, clip, condition_hidden_states=condition, motion_score=5.0).float()
    want = ref(x, encoder_hidden_states=llm, encoder_hidden_states_2=clip, timestep=t.bfloat16(),
               encoder_attention_mask=mask, condition_hidden_states=condition, motion_score=5.0,
               return_dict=False).float()
    assert (got - want).abs().max() <= 1e-2 * want.abs().max()
