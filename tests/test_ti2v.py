"""Step-Video-TI2V without a reference checkout: the official layout, the condition path, the image condition."""

import pytest
import torch
import torch.nn.functional as F

from stepvideo_core.dit import DiTConfig, StepVideoDiT, load_dit
from stepvideo_core.image_condition import ImageCondition, image_condition, resize_and_crop
from stepvideo_core.pipeline import GenerationSettings, sample_latents
from stepvideo_core.text_encoding import TextConditioning
from stepvideo_core.vae import VAEConfig, VideoVAE
from tests.builders import small_dit, text_inputs, write_sharded
from tests.naive_dit import naive_forward


def small_ti2v(**kw) -> StepVideoDiT:
    return small_dit(use_additional_conditions=True, **kw)


def test_full_official_ti2v_config_keys_and_shapes():
    with torch.device("meta"):
        model = StepVideoDiT(DiTConfig(use_additional_conditions=True))
    sd = model.state_dict()
    extra = {
        "adaln_single.emb.motion_score_embedder.linear_1.weight": (6144, 256),
        "adaln_single.emb.motion_score_embedder.linear_1.bias": (6144,),
        "adaln_single.emb.motion_score_embedder.linear_2.weight": (6144, 6144),
        "adaln_single.emb.motion_score_embedder.linear_2.bias": (6144,),
    }
    # the T2V model's 785 tensors and 29,342,478,400 weights, plus the motion MLP and 64 more input channels
    assert len(sd) == 785 + len(extra)
    assert sum(t.numel() for t in sd.values()) == 29_342_478_400 + 6144 * 64 + (256 + 1) * 6144 + (6144 + 1) * 6144
    for key, shape in extra.items():
        assert tuple(sd[key].shape) == shape, key
    assert tuple(sd["pos_embed.proj.weight"].shape) == (6144, 128, 1, 1)  # latents + condition, 64 each
    config = DiTConfig.from_shapes({k: tuple(v.shape) for k, v in sd.items()})
    assert config == DiTConfig(use_additional_conditions=True) and config.in_channels == 64


@pytest.mark.slow
def test_forward_matches_independent_naive_implementation():
    model = small_ti2v()
    b, frames, h, w = 2, 3, 2, 3
    x = torch.randn(b, frames, 4, h, w)
    condition = torch.cat([torch.randn(b, 1, 4, h, w), torch.zeros(b, frames - 1, 4, h, w)], dim=1)
    t = torch.tensor([0.3, 0.8])
    score = torch.tensor([2.0, 10.0])
    llm, mask, clip = text_inputs(b, 6, (24, 12), (4, 6))
    with torch.no_grad():
        got = model(x, t, llm, mask, clip, condition_hidden_states=condition, motion_score=score)
    want = naive_forward(model.state_dict(), 2, x, t, llm, mask, clip, condition=condition, motion_score=score)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_condition_of_batch_one_and_a_float_score_serve_the_whole_batch():
    model = small_ti2v()
    x = torch.randn(2, 3, 4, 2, 2)
    condition = torch.randn(1, 3, 4, 2, 2)
    llm, mask, clip = text_inputs(2, 6, (24, 12), (4, 6))
    t = torch.tensor([0.5, 0.5])
    with torch.no_grad():
        broadcast = model(x, t, llm, mask, clip, condition_hidden_states=condition, motion_score=5.0)
        explicit = model(x, t, llm, mask, clip, condition_hidden_states=condition.expand(2, -1, -1, -1, -1),
                         motion_score=torch.tensor([5.0, 5.0]))
    assert torch.equal(broadcast, explicit)


def test_wrong_model_kind_or_shape_is_a_clear_error():
    t2v = StepVideoDiT(DiTConfig(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                 num_layers=1, caption_channels=(24, 12))).eval()
    ti2v = small_ti2v(layers=1)
    x = torch.randn(1, 3, 4, 2, 2)
    args = (x, torch.tensor([0.5]), *text_inputs(1, 6, (24, 12), (4,)))
    with pytest.raises(ValueError, match="Step-Video-T2V DiT.*condition_hidden_states"):
        t2v(*args, condition_hidden_states=torch.zeros_like(x), motion_score=5.0)
    with pytest.raises(ValueError, match="Step-Video-TI2V DiT.*condition_hidden_states and motion_score"):
        ti2v(*args)
    with pytest.raises(ValueError, match="Step-Video-TI2V DiT.*needs motion_score"):
        ti2v(*args, condition_hidden_states=torch.zeros_like(x))
    with pytest.raises(ValueError, match="must have the latents' shape"):
        ti2v(*args, condition_hidden_states=torch.zeros(1, 2, 4, 2, 2), motion_score=5.0)


def test_official_layout_checkpoint_is_recognised_and_loaded_strictly(tmp_path):
    model = small_ti2v(channels=8)
    sd = model.state_dict()
    write_sharded(tmp_path / "transformer", sd, "diffusion_pytorch_model", shards=3)
    loaded = load_dit(tmp_path / "transformer", weight_dtype=torch.float32)
    assert loaded.config == model.config and loaded.config.in_channels == 8
    assert loaded.state_dict().keys() == sd.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())
    # a TI2V file missing the motion embedder's output layer is incomplete, not silently a T2V model
    del sd["adaln_single.emb.motion_score_embedder.linear_2.weight"]
    write_sharded(tmp_path / "broken", sd, "diffusion_pytorch_model", shards=1)
    with pytest.raises(Exception, match="motion_score_embedder.linear_2.weight"):
        load_dit(tmp_path / "broken", weight_dtype=torch.float32)


def test_resize_and_crop_covers_the_size_and_keeps_the_centre():
    # A 40x20 (h x w) image into 16x16: scale by width (x0.8) to 32x16, crop 8 rows top and bottom.
    image = torch.rand(3, 40, 20) * 2 - 1
    got = resize_and_crop(image, 16, 16)
    scaled = F.interpolate(image[None], size=(32, 16), mode="bilinear", align_corners=False, antialias=True)[0]
    assert torch.equal(got, scaled[:, 8:24])
    # Wider than the target: fit the height, crop columns (odd excess: the extra column goes on the right).
    wide = torch.rand(3, 16, 37)
    assert torch.equal(resize_and_crop(wide, 16, 32), wide[:, :, 2:34])
    # Already the right size: untouched.
    same = torch.rand(3, 16, 32)
    assert torch.equal(resize_and_crop(same, 16, 32), same)


def tiny_vae():
    torch.manual_seed(0)
    cfg = VAEConfig(z_channels=4, encoder_channels=4, encoder_channel_mult=(1, 2, 2, 4), encoder_num_res_blocks=1,
                    decoder_channels=4, decoder_channel_mult=(1, 2, 2, 4), decoder_num_res_blocks=1, norm_groups=2)
    return VideoVAE(cfg).eval()


@pytest.mark.slow
def test_image_condition_is_the_image_latent_then_zeros():
    vae = tiny_vae()
    image = torch.rand(3, 48, 40) * 2 - 1
    cond = image_condition(vae, image, num_frames=34, height=32, width=32, batch=2, motion_score=7, sample=False)
    assert cond.latents.shape == (2, 6, 4, 2, 2) and cond.motion_score == 7.0
    alone = vae.encode(resize_and_crop(image, 32, 32)[None, None], sample=False)
    assert torch.equal(cond.latents[0, :1], alone[0]) and torch.equal(cond.latents[1], cond.latents[0])
    assert not cond.latents[:, 1:].any()
    sampled = [image_condition(vae, image, 17, 32, 32, generator=torch.Generator().manual_seed(s)).latents
               for s in (0, 0, 1)]
    assert torch.equal(sampled[0], sampled[1]) and not torch.equal(sampled[0], sampled[2])
    with pytest.raises(ValueError, match="one RGB image"):
        image_condition(vae, image[None], 17, 32, 32)


def test_sampling_gives_both_guidance_branches_the_same_condition():
    model = small_ti2v()
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs), with_kwargs=True)
    llm, mask, clip = text_inputs(2, 6, (24, 12), (4, 6))
    positive, negative = TextConditioning(llm, mask, clip), TextConditioning(llm.flip(0), mask.flip(0), clip.flip(0))
    latents = torch.randn(2, 3, 4, 2, 2)
    image = ImageCondition(latents, motion_score=3.0)
    settings = GenerationSettings(num_frames=17, height=32, width=32, steps=2, cfg=4.0, shift=1.0)
    out = sample_latents(model, positive, negative, settings, image=image)
    assert out.shape == (2, 3, 4, 2, 2) and len(seen) == 2
    for kwargs in seen:
        assert torch.equal(kwargs["condition_hidden_states"], torch.cat([latents, latents]))
        assert kwargs["motion_score"] == 3.0


def test_cli_image_picks_the_builtin_ti2v_dit_and_the_ti2v_magic():
    from stepvideo_core import generate
    from stepvideo_core.text_encoding import TI2V_POSITIVE_MAGIC, build_prompts
    from stepvideo_core.tiny import model as tiny

    paths = generate.ModelPaths.from_args(generate.build_parser().parse_args(["x", "--image", "start.png"]))
    assert paths.dit == tiny.TI2V_DIR / "transformer" and paths.vae == tiny.paths()["vae"]
    paths = generate.ModelPaths.from_args(generate.build_parser().parse_args(["x"]))
    assert paths.dit == tiny.TINY_DIR / "transformer"
    (positive,), _ = build_prompts("a cat", positive_magic=TI2V_POSITIVE_MAGIC)
    assert positive == "a cat" + TI2V_POSITIVE_MAGIC


@pytest.mark.slow
def test_cli_image_to_video_is_the_pipelines(tmp_path):
    """``--image`` conditions on the start image exactly as the core function does (posterior seeded by --seed);
    a T2V DiT given --image is a clear error."""
    from dataclasses import replace

    from stepvideo_core import generate
    from stepvideo_core.text_encoding import TI2V_NEGATIVE_MAGIC, TI2V_POSITIVE_MAGIC, encode_prompts
    from stepvideo_core.tiny import model as tiny
    from stepvideo_core.tiny import ti2v
    from stepvideo_core.video_io import load_image, save_png
    from tests.builders import randomize

    start = save_png(ti2v.example_start_image(), tmp_path / "start.png")
    dit = StepVideoDiT(tiny.TI2V_DIT_CONFIG).eval()
    randomize(dit, seed=3, scale=0.1)
    write_sharded(tmp_path / "transformer", dit.state_dict(), "diffusion_pytorch_model", shards=1)
    latents_file = tmp_path / "latents.safetensors"
    # A DiT from a folder of its own is taken for a release DiT: the standard preset at the release's size
    # (992x544, 204 frames) and the TI2V prompt magic, unless told otherwise. Ask for the tiny model's size and
    # preset; the magic stays the release's TI2V pair.
    argv = ["a red circle moves to the right", "--image", str(start), "--dit", str(tmp_path / "transformer"),
            "--width", "128", "--height", "128", "--frames", "17", "--preset", "tiny", "--steps", "2", "--seed", "5", "--motion-score", "2", "--out", str(tmp_path), "--out-latents",
            str(latents_file)]
    written = generate.run(generate.build_parser().parse_args(argv))
    assert written["mp4"].is_file()
    model = tiny.load_tiny()
    with torch.no_grad():
        pos, neg = encode_prompts(model.text, argv[0], after="release", positive_magic=TI2V_POSITIVE_MAGIC,
                                  negative_magic=TI2V_NEGATIVE_MAGIC)
        condition = image_condition(model.vae, load_image(start), 17, 128, 128, motion_score=2.0,
                                    generator=torch.Generator().manual_seed(5))
        want = sample_latents(dit, pos, neg, replace(tiny.SETTINGS, steps=2, seed=5), image=condition)
    torch.testing.assert_close(written["latents"], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="Step-Video-T2V DiT"):
        generate.run(generate.build_parser().parse_args([*argv[:3], "--dit", str(tiny.TINY_DIR / "transformer"),
                                                         *argv[5:13], "--steps", "1", "--out", str(tmp_path)]))


def test_widened_t2v_dit_starts_as_the_t2v_dit_and_can_learn_the_new_inputs():
    from stepvideo_core.tiny import ti2v

    t2v = small_dit()
    widened = ti2v.widen_for_image(t2v)
    assert widened.config.use_additional_conditions and widened.config.in_channels == t2v.config.in_channels
    x = torch.randn(2, 3, 4, 2, 2)
    args = (x, torch.tensor([0.2, 0.7]), *text_inputs(2, 6, (24, 12), (4, 6)))
    condition = torch.randn_like(x)
    with torch.no_grad():
        torch.testing.assert_close(widened(*args, condition_hidden_states=condition,
                                           motion_score=torch.tensor([2.0, 5.0])), t2v(*args), rtol=0, atol=1e-6)
    # the new inputs get gradients (the motion MLP's input layer is not zero, so its output layer can move)
    out = widened(*args, condition_hidden_states=condition, motion_score=torch.tensor([2.0, 5.0]))
    out.square().mean().backward()
    assert widened.pos_embed.proj.weight.grad[:, 4:].abs().sum() > 0
    assert widened.adaln_single.emb.motion_score_embedder.linear_2.weight.grad.abs().sum() > 0
    assert ti2v.motion_score_for(["still", "still"]) == 2.0 and ti2v.motion_score_for(["still", "left"]) == 5.0


def test_shipped_tiny_ti2v_loads_as_ti2v_within_the_size_budget():
    from stepvideo_core.tiny import model as tiny

    files = [p for root in (tiny.TINY_DIR, tiny.TI2V_DIR, tiny.TINY_DIR.parent / "loras") for p in root.rglob("*")
             if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 40 * 2**20, "all tiny weights stay within 40 MB"
    dit = load_dit(tiny.TI2V_DIR / "transformer", weight_dtype=torch.float32)
    assert dit.config == tiny.TI2V_DIT_CONFIG


@pytest.mark.slow
def test_shipped_tiny_ti2v_keeps_the_start_images_object_and_moves_it():
    """The oracle finds the start image's colour and shape in the clip, moving as the prompt says."""
    from stepvideo_core.tiny import model as tiny
    from stepvideo_core.tiny import oracle, ti2v

    frames = ti2v.generate_from_image(tiny.load_tiny_ti2v(), ti2v.EXAMPLE_PROMPT, ti2v.example_start_image(), seed=0)
    assert frames.shape == (17, 128, 128, 3)
    result = oracle.score(frames, ti2v.EXAMPLE.combo)
    assert result.colour and result.shape and result.motion, result.detection
