import math

import pytest
import torch

from stepvideo_core.attention import math_attention
from stepvideo_core.dit import DiTConfig, Rope3D, StepVideoDiT, timestep_sinusoid
from tests.builders import small_dit, text_inputs
from tests.naive_dit import naive_forward, rotate


def test_full_config_state_dict_matches_official_checkpoint():
    with torch.device("meta"):
        model = StepVideoDiT(DiTConfig())
    sd = model.state_dict()
    assert len(sd) == 785
    assert sum(t.numel() for t in sd.values()) == 29_342_478_400
    expected = {
        "pos_embed.proj.weight": (6144, 64, 1, 1),
        "adaln_single.linear.weight": (36864, 6144),
        "caption_projection.linear_1.weight": (6144, 6144),
        "clip_projection.weight": (6144, 1024),
        "scale_shift_table": (2, 6144),
        "proj_out.weight": (64, 6144),
        "transformer_blocks.47.scale_shift_table": (6, 6144),
        "transformer_blocks.47.attn1.wqkv.weight": (18432, 6144),
        "transformer_blocks.0.attn1.q_norm.weight": (128,),
        "transformer_blocks.0.attn2.wkv.weight": (12288, 6144),
        "transformer_blocks.0.ff.net.0.proj.weight": (24576, 6144),
        "transformer_blocks.0.ff.net.2.weight": (6144, 24576),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith(("norm_out", "caption_norm")) for k in sd), "these LayerNorms have no affine params"
    assert not any(k.endswith(".bias") and ".attn" in k for k in sd), "no biases inside attention"
    assert DiTConfig.from_shapes({k: tuple(v.shape) for k, v in sd.items()}) == DiTConfig()


def test_timestep_sinusoid_is_cos_then_sin_without_shift():
    t = torch.tensor([0.0, 123.5])
    emb = timestep_sinusoid(t)
    k = 5
    freq = math.exp(-math.log(10000) * k / 128)
    assert emb[1, k].item() == pytest.approx(math.cos(123.5 * freq), abs=1e-5)
    assert emb[1, 128 + k].item() == pytest.approx(math.sin(123.5 * freq), abs=1e-5)
    assert torch.equal(emb[0, :128], torch.ones(128)) and torch.equal(emb[0, 128:], torch.zeros(128))


def test_rope_rotates_frame_row_column_slices_in_order():
    grid = (3, 2, 5)  # all different, so a swapped axis cannot pass
    head_dim = 16
    rope = Rope3D(grid, (8, 4, 4), torch.float32, "cpu", reference_rounding=True)
    x = torch.randn(1, 30, 1, head_dim, dtype=torch.float32)
    got = rope(x)
    positions = [(f, y, c) for f in range(3) for y in range(2) for c in range(5)]
    want = torch.stack([rotate(x[0, j, 0].double(), positions[j]).float() for j in range(30)])
    torch.testing.assert_close(got[0, :, 0], want, atol=1e-5, rtol=1e-5)


def test_rope_depends_only_on_relative_position():
    rope = Rope3D((4, 4, 4), (8, 4, 4), torch.float64, "cpu", reference_rounding=True)
    q = torch.randn(1, 1, 1, 16, dtype=torch.float64).expand(1, 64, 1, 16)
    k = torch.randn(1, 1, 1, 16, dtype=torch.float64).expand(1, 64, 1, 16)
    rq, rk = rope(q)[0, :, 0], rope(k)[0, :, 0]
    index = {(f, y, c): f * 16 + y * 4 + c for f in range(4) for y in range(4) for c in range(4)}
    # same offset (1, 2, -1) from two different origins gives the same score
    a = rq[index[(0, 0, 2)]] @ rk[index[(1, 2, 1)]]
    b = rq[index[(2, 1, 3)]] @ rk[index[(3, 3, 2)]]
    assert a.item() == pytest.approx(b.item(), rel=1e-6)  # angles are computed in fp32


@pytest.mark.parametrize("frames,h,w,valid", [(1, 2, 3, (5,)), (3, 2, 3, (4, 9))])
def test_forward_matches_independent_naive_implementation(frames, h, w, valid):
    caption = (24, 12)
    model = small_dit(caption=caption)
    b = len(valid)
    x = torch.randn(b, frames, 4, h, w)
    t = torch.tensor([0.25, 0.9][:b])
    llm, mask, clip = text_inputs(b, 10, caption, valid)
    with torch.no_grad():
        got = model(x, t, llm, mask, clip)
    want = naive_forward(model.state_dict(), model.config.num_attention_heads, x, t, llm, mask, clip)
    torch.testing.assert_close(got, want, atol=2e-5 * want.abs().max().item(), rtol=0)


def test_text_beyond_each_samples_length_is_ignored_and_samples_are_independent():
    caption = (24, 12)
    model = small_dit(caption=caption, layers=1)
    x = torch.randn(2, 2, 4, 2, 2)
    t = torch.tensor([0.5, 0.5])
    llm, mask, clip = text_inputs(2, 12, caption, (3, 8))
    with torch.no_grad():
        out = model(x, t, llm, mask, clip)
        garbage = llm.clone()
        garbage[:, 3:] = torch.randn_like(garbage[:, 3:]) * 100  # beyond sample 0's 3 valid tokens, inside sample 1's 8
        out_garbage = model(x, t, garbage, mask, clip)
        alone = model(x[:1], t[:1], llm[:1], mask[:1], clip[:1])
    torch.testing.assert_close(out_garbage[0], out[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out_garbage[1], out[1]), "sample 1 does see those tokens"
    torch.testing.assert_close(alone[0], out[0], atol=1e-5, rtol=1e-5)


def test_fused_qkv_is_split_per_head_interleaved():
    """Permuting wqkv rows from per-head [q|k|v] into block [Q;K;V] order must change the output."""
    model = small_dit(layers=1)
    x = torch.randn(1, 1, 4, 2, 2)
    llm, mask, clip = text_inputs(1, 4, (24, 12), (4,))
    t = torch.tensor([0.3])
    with torch.no_grad():
        ref = model(x, t, llm, mask, clip)
        w = model.transformer_blocks[0].attn1.wqkv.weight
        heads, d = 2, 16
        blocks = w.view(heads, 3, d, -1).transpose(0, 1).reshape(3 * heads * d, -1).clone()
        w.copy_(blocks)
        changed = model(x, t, llm, mask, clip)
    assert (changed - ref).abs().max() > 1e-3


def test_attention_function_is_pluggable_and_math_matches_sdpa():
    model = small_dit(layers=1)
    x = torch.randn(2, 2, 4, 2, 3)
    llm, mask, clip = text_inputs(2, 6, (24, 12), (2, 6))
    t = torch.tensor([0.1, 0.7])
    calls = []

    def spy(q, k, v, m, transformer_options):
        calls.append(m is None)
        return math_attention(q, k, v, m)

    with torch.no_grad():
        ref = model(x, t, llm, mask, clip)
        model.set_attention(spy)
        got = model(x, t, llm, mask, clip)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert calls == [True, False], "self-attention unmasked, cross-attention masked"


def test_feed_forward_chunking_is_exact():
    model = small_dit(layers=1)
    x = torch.randn(1, 3, 4, 3, 3)
    llm, mask, clip = text_inputs(1, 4, (24, 12), (4,))
    t = torch.tensor([0.4])
    with torch.no_grad():
        ref = model(x, t, llm, mask, clip)
        model.config.ff_chunk_size = 5
        got = model(x, t, llm, mask, clip)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


def test_patch_size_two_matches_the_naive_patch_layout():
    """Each 2x2 patch is one token (RoPE over the patch grid) and each token's outputs go back to its own patch
    in the official (row, column, channel) order: a swapped or transposed layout does not match the naive loop."""
    model = small_dit(layers=1, patch_size=2)
    x = torch.randn(1, 2, 4, 4, 6)  # a 2 x 3 patch grid, not square
    llm, mask, clip = text_inputs(1, 4, (24, 12), (3,))
    t = torch.tensor([0.5])
    with torch.no_grad():
        out = model(x, t, llm, mask, clip)
    want = naive_forward(model.state_dict(), model.config.num_attention_heads, x, t, llm, mask, clip)
    torch.testing.assert_close(out, want, atol=2e-5 * want.abs().max().item(), rtol=0)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        model(torch.randn(1, 1, 4, 3, 4), torch.tensor([0.5]), llm, mask, clip)


def test_bf16_reference_rounding_switch():
    """bf16 rounding of the timestep, RoPE angles and >256-key mask sums happens only with the switch on."""
    model = small_dit(layers=1, caption=(8, 8)).to(torch.bfloat16)
    model.compute_dtype = torch.bfloat16
    llm, mask, clip = text_inputs(1, 320, (8, 8), (200,))  # 77 + 200 = 277 keys: bf16 rounds the sum to 276
    _, key_mask = model.embed_text(llm, mask, clip, torch.bfloat16)
    assert key_mask.shape[-1] == 276
    model.config.reference_rounding = False
    _, key_mask = model.embed_text(llm, mask, clip, torch.bfloat16)
    assert key_mask.shape[-1] == 277
    # the spec's example: sigma 0.546512 reaches the network as 548 with rounding, 546.512 without
    exact_548, _ = model.embed_timestep(torch.tensor([0.548]), torch.bfloat16)
    unrounded, _ = model.embed_timestep(torch.tensor([0.546512]), torch.bfloat16)
    model.config.reference_rounding = True
    rounded, _ = model.embed_timestep(torch.tensor([0.546512]), torch.bfloat16)
    torch.testing.assert_close(rounded, exact_548, atol=0, rtol=0)
    assert not torch.equal(rounded, unrounded)
