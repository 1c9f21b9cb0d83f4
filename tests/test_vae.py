"""Stand-alone tests of the Video-VAE: frame rules, blend, causality, tiling, cancellation, loading, dtypes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from stepvideo_core import ops as ops_module
from stepvideo_core.loading import CheckpointError
from stepvideo_core.vae import (
    NORM_GROUPS_KEY,
    VAEConfig,
    VideoVAE,
    blend_chunk_borders,
    load_vae,
    norm_frames,
    tile_starts,
)
from tests.builders import SMALL_VAE, small_vae
from tests.builders import vae_latents as latents


@pytest.fixture(scope="module")
def vae() -> VideoVAE:
    return small_vae()


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 2.0) -> float:
    mse = (a.float() - b.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(peak**2 / mse)


# ---- frame and size rules (the rules themselves: tests/test_video_shape.py) ----------------------------------


def test_encode_rejects_bad_shapes_before_running(vae):
    with pytest.raises(ValueError, match=r"frames 20 must be a multiple of 17 \(nearest valid: 17 or 34\)"):
        vae.encode(torch.zeros(1, 20, 3, 32, 32))
    with pytest.raises(ValueError, match=r"height 40 must be .* \(nearest valid: 32 or 48\); frames 20 must be"):
        vae.encode(torch.zeros(1, 20, 3, 40, 32))
    with pytest.raises(ValueError, match=r"height 40 must be a multiple of 16 \(nearest valid: 32 or 48\)"):
        vae.encode(torch.zeros(1, 17, 3, 40, 32))
    with pytest.raises(ValueError, match=r"\[b, L, 8, h, w\]"):
        vae.decode(torch.zeros(1, 3, 16, 2, 2))


# ---- building blocks ----------------------------------------------------------------------------------------


def test_norm_frames_is_per_frame_groupnorm_with_zero_frames_in_front():
    torch.manual_seed(0)
    x = torch.randn(2, 64, 5, 6, 7) * torch.arange(1, 6).view(1, 1, 5, 1, 1)  # very different frame statistics
    norm = torch.nn.GroupNorm(32, 64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    out = norm_frames(x, norm, per_frame=True, silu=True, front_pad=2)
    expected = F.silu(F.group_norm(x.transpose(1, 2).reshape(10, 64, 6, 7), 32, norm.weight, norm.bias))
    assert torch.equal(out[:, :, :2], torch.zeros_like(out[:, :, :2]))
    torch.testing.assert_close(out[:, :, 2:], expected.view(2, 5, 64, 6, 7).transpose(1, 2))
    clip = norm_frames(x, norm, per_frame=False, silu=False)
    torch.testing.assert_close(clip, F.group_norm(x, 32, norm.weight, norm.bias))
    assert (clip - out[:, :, 2:]).abs().max() > 0.1  # the option really changes the statistics


def test_blend_matches_hand_computation():
    v = torch.arange(40, dtype=torch.float64).view(1, 40, 1, 1, 1).repeat(1, 1, 3, 2, 2) + 1.0
    out = blend_chunk_borders(v.clone(), keep=0.6)
    ref = v.clone()
    for last in (16, 33):  # borders after frames 16 and 33; the third chunk is 6 frames long
        f, g = v[:, last].clone(), v[:, last + 1].clone()
        g_new = 0.6 * g + 0.4 * f
        ref[:, last + 1] = g_new
        ref[:, last] = 0.6 * f + 0.4 * g_new  # uses the updated g: 0.76 f + 0.24 g
        assert torch.allclose(ref[:, last], 0.76 * f + 0.24 * g)
    torch.testing.assert_close(out, ref)


# ---- decoding behaviour ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_decode_is_chunked_and_blended(vae):
    z = latents(n=4, h=1, w=2)  # chunks of 3 and 1 latents -> 17 + 1 frames
    video = vae.decode(z)
    assert video.shape == (1, 18, 3, 16, 32)
    parts = [vae.decoder(z[:, s:s + 3].permute(0, 2, 1, 3, 4).contiguous()).permute(0, 2, 1, 3, 4)
             for s in (0, 3)]
    assert [p.shape[1] for p in parts] == [17, 1]
    expected = torch.cat(parts, dim=1)
    for last in (16,):
        f, g = expected[:, last].clone(), expected[:, last + 1].clone()
        expected[:, last + 1] = 0.6 * g + 0.4 * f
        expected[:, last] = 0.76 * f + 0.24 * g
    torch.testing.assert_close(video, expected, rtol=1e-5, atol=1e-5)
    # The first chunk alone gives the same frames, except the border frame that the blend changes.
    torch.testing.assert_close(vae.decode(z[:, :3])[:, :16], video[:, :16], rtol=0, atol=0)


def test_decoder_is_causal_in_time(vae):
    z = latents(n=3, h=1, w=2)
    full = vae.decode(z)
    z2 = z.clone()
    z2[:, 2] += 3.0  # change only the last latent frame
    changed = vae.decode(z2)
    # Latent 0 -> frame 0, latent 1 -> frames 1..8, latent 2 -> frames 9..16 (zero causal padding, causal mask).
    torch.testing.assert_close(changed[:, :9], full[:, :9], rtol=0, atol=0)
    assert (changed[:, 9:] - full[:, 9:]).abs().amax(dim=(0, 2, 3, 4)).min() > 1e-3
    torch.testing.assert_close(vae.decode(z[:, :1])[:, 0], full[:, 0], rtol=1e-5, atol=1e-5)


def test_batch_items_are_independent(vae):
    # GroupNorm statistics are per sample and per frame: a batch decodes exactly like its items one by one,
    # even when the items have very different scales.
    z = torch.cat([latents(n=2, h=1, w=2, seed=8), 5.0 * latents(n=2, h=1, w=2, seed=9)])
    both = vae.decode(z)
    torch.testing.assert_close(both[1:], vae.decode(z[1:]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[:1], vae.decode(z[:1]), rtol=1e-5, atol=1e-5)


def test_tile_starts_cover_with_overlap():
    assert tile_starts(34, 18, 2) == [0, 16]
    assert tile_starts(62, 18, 2) == [0, 16, 32, 44]
    assert tile_starts(10, 18, 2) == [0]
    for length, tile, ov in [(34, 16, 4), (62, 20, 6), (7, 3, 1)]:
        s = tile_starts(length, tile, ov)
        assert s[0] == 0 and s[-1] + tile == length
        assert all(b - a <= tile - ov for a, b in zip(s, s[1:]))


@pytest.mark.slow
def test_tiled_decode_agrees_with_untiled(vae):
    z = latents(n=3, h=4, w=6, seed=3)
    full = vae.decode(z)
    # One tile covering everything is exactly the untiled decode.
    torch.testing.assert_close(vae.decode(z, tile_size=(4, 6), tile_overlap=2), full, rtol=0, atol=0)
    tiled = vae.decode(z, tile_size=4, tile_overlap=2)  # 2 x 2 tiles of 64 x 64 pixels, 32-pixel overlaps
    value = psnr(tiled, full, peak=float(full.max() - full.min()))
    # Measured 31.6 dB with these random weights: tiles see only their own neighbourhood, the mid-level
    # attention included, and tiles this small (4 latents) are the worst case. See bench/bench_vae.py for
    # the default tile size at full resolution.
    assert value > 28, value
    # No seams: blended tiles never leave a pixel far from the untiled value.
    assert (tiled - full).abs().max() < 0.25 * (full.max() - full.min())


@pytest.mark.slow
def test_callback_progress_and_cancel_leave_model_usable(vae):
    z = latents(n=4, h=1, w=3, seed=4)  # chunks of 3 latents and 1: two chunks, the second one cheap
    tiles = dict(tile_size=2, tile_overlap=1)
    baseline = vae.decode(z, **tiles)
    calls = []
    vae.decode(z, **tiles, callback=lambda d, t: calls.append((d, t)))
    assert calls == [(i, 4) for i in range(1, 5)]  # 2 chunks x 2 tiles

    class Cancelled(Exception):
        pass

    def cancel(done, total):
        if done == 3:
            raise Cancelled

    with pytest.raises(Cancelled):
        vae.decode(z, **tiles, callback=cancel)
    torch.testing.assert_close(vae.decode(z, **tiles), baseline, rtol=0, atol=0)
    untiled_calls = []
    vae.decode(z, callback=lambda d, t: untiled_calls.append((d, t)))
    assert untiled_calls == [(1, 2), (2, 2)]


# ---- encoding ----------------------------------------------------------------------------------------------------


def test_encode_sample_and_mean(vae):
    video = torch.rand(1, 18, 3, 16, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    moments = vae.encode_moments(video)
    assert moments.shape == (1, 4, 16, 1, 2)
    mean, logvar = moments.chunk(2, dim=2)
    torch.testing.assert_close(vae.encode(video, sample=False), mean)
    s = vae.encode(video, generator=torch.Generator().manual_seed(7))
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(s, mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * eps)
    # Chunks are independent: the first 17 frames alone give the first 3 latents.
    torch.testing.assert_close(vae.encode_moments(video[:, :17]), moments[:, :3], rtol=1e-5, atol=1e-5)


# ---- operations, dtypes, loading ---------------------------------------------------------------------------------


def test_operations_namespace_builds_every_layer():
    made = []

    def recording(base):
        class Rec(base):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                made.append(self)
        return Rec

    class Ops(ops_module.CastOps):
        Conv2d = recording(ops_module.Conv2d)
        Conv3d = recording(ops_module.Conv3d)
        GroupNorm = recording(ops_module.GroupNorm)

    model = VideoVAE(SMALL_VAE, operations=Ops, device="meta")
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.GroupNorm))]
    assert len(layers) == len(made) and all(any(m is x for x in made) for m in layers)


def test_bf16_weights_decode_close_to_fp32(vae):
    z = latents(n=1, h=1, w=2, seed=6)
    ref = vae.decode(z)
    bf = small_vae(dtype=torch.bfloat16)
    out = bf.decode(z)
    assert out.dtype == torch.bfloat16
    assert psnr(out, ref, peak=float(ref.max() - ref.min())) > 25


def _save_official_layout(model: VideoVAE, path) -> dict[str, torch.Tensor]:
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path))
    return sd


def test_load_roundtrip_with_conv_out_quirk(vae, tmp_path):
    path = tmp_path / "vae_v2.safetensors"
    sd = _save_official_layout(vae, path)
    assert "decoder.conv_out.weight" in sd and "decoder.conv_out.conv.weight" not in sd
    loaded = load_vae(path, dtype=torch.float32)
    assert loaded.config == SMALL_VAE
    for k, v in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    z = latents(n=1, h=1, w=1)
    torch.testing.assert_close(loaded.decode(z), vae.decode(z), rtol=0, atol=0)
    assert load_vae(path).compute_dtype == torch.bfloat16


def test_the_files_own_keys_load_strictly_into_the_module():
    """No renaming anywhere: a VAE file in the release's layout is the module's state dict (the shipped tiny VAE
    here; the full-size module has the release's 262 tensors and 498,818,819 parameters, per the model notes)."""
    from safetensors.torch import load_file

    from stepvideo_core.tiny import model as tiny

    state = load_file(str(tiny.paths()["vae"]))
    assert "decoder.conv_out.weight" in state and "decoder.conv_out.bias" in state
    vae = VideoVAE(tiny.VAE_CONFIG)
    assert vae.load_state_dict(state, strict=True).missing_keys == []
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in state.items())
    with torch.device("meta"):
        full = VideoVAE().state_dict()
    assert len(full) == 262 and sum(t.numel() for t in full.values()) == 498_818_819
    assert full["decoder.conv_out.weight"].shape == (3, 128, 3, 3, 3)


def test_load_errors(vae, tmp_path):
    good = tmp_path / "vae_v2.safetensors"
    _save_official_layout(vae, good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated|download"):
        load_vae(truncated)
    # v1 layout: no (un)patchify convs, 16 latent channels.
    v1 = {"encoder.conv_in.conv.weight": torch.zeros(32, 3, 3, 3, 3),
          "encoder.conv_out.conv.weight": torch.zeros(32, 512, 3, 3, 3),
          "decoder.conv_in.conv.weight": torch.zeros(512, 16, 3, 3, 3),
          "decoder.conv_out.weight": torch.zeros(3, 128, 3, 3, 3)}
    save_file(v1, str(tmp_path / "vae.safetensors"))
    with pytest.raises(CheckpointError, match=r"version-1.*16 latent channels.*vae_v2\.safetensors"):
        load_vae(tmp_path / "vae.safetensors")
    save_file({"patch_embedding.weight": torch.zeros(2, 2), "blocks.0.self_attn.q.weight": torch.zeros(2, 2)},
              str(tmp_path / "wan.safetensors"))
    with pytest.raises(CheckpointError, match="Wan"):
        load_vae(tmp_path / "wan.safetensors")
    sd = {k: v for k, v in _save_official_layout(vae, good).items() if "mid.attn_1.q" not in k}
    save_file(sd, str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointError, match=r"Missing 4 key.*mid\.attn_1\.q"):
        load_vae(tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match="fp8"):
        load_vae(good, dtype=torch.float8_e4m3fn)


def test_load_reads_norm_groups_from_metadata(tmp_path):
    """GroupNorm's group count is in no tensor shape: a reduced VAE (as Step-Video-Tiny's) names it in metadata."""
    config = VAEConfig(z_channels=8, encoder_channels=8, encoder_channel_mult=(1, 4, 8, 8), encoder_num_res_blocks=1,
                       decoder_channels=8, decoder_channel_mult=(1, 4, 8, 8), decoder_num_res_blocks=1, norm_groups=2)
    model = small_vae(config=config)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / "vae_v2.safetensors"
    save_file(sd, str(path), metadata={NORM_GROUPS_KEY: "2"})
    loaded = load_vae(path, dtype=torch.float32)
    assert loaded.config == config
    z = latents(n=1, h=1, w=1)
    torch.testing.assert_close(loaded.decode(z), model.decode(z), rtol=0, atol=0)
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match="not divisible by the 32 GroupNorm groups.*metadata.*'norm_groups'"):
        load_vae(path)
    save_file(sd, str(path), metadata={NORM_GROUPS_KEY: "two"})
    with pytest.raises(CheckpointError, match="not an integer"):
        load_vae(path)
