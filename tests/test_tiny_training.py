"""The Step-Video-Tiny recipe's phases resume where they stopped: an interrupted phase, run again, ends with the
weights an unbroken run ends with."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from stepvideo_core.tiny import synthetic
from stepvideo_core.tiny import train as train_tiny
from stepvideo_core.vae import VAEConfig

# The smallest VAE of the v2 structure (top width x 8 = 32 x z): seconds per step on a 32-pixel crop.
MINI_VAE = VAEConfig(z_channels=4, encoder_channels=8, encoder_channel_mult=(1, 1, 1, 2), encoder_num_res_blocks=1,
                     decoder_channels=8, decoder_channel_mult=(1, 1, 1, 2), decoder_num_res_blocks=1, norm_groups=2)


def interrupt_at(monkeypatch, name: str, call: int) -> None:
    """Make ``train_tiny.<name>`` raise KeyboardInterrupt on its ``call``-th call (1-based), once."""
    original, calls = getattr(train_tiny, name), []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(train_tiny, name, wrapped)


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_interrupted_vae_phase_resumes_to_the_unbroken_result(tmp_path, monkeypatch):
    phase = train_tiny.VAEPhase("vae_mini", steps=3, lr=1e-3, batch=1, frames=9, crop=32, edge_weight=0.5,
                                recolour=0.5, warmup=1)
    unbroken, resumed = tmp_path / "unbroken", tmp_path / "resumed"
    unbroken.mkdir()
    resumed.mkdir()
    train_tiny.train_vae(unbroken, phase, MINI_VAE, save_every=0)

    with monkeypatch.context() as m:
        interrupt_at(m, "clip_batch", call=3)  # during the third step, after two were checkpointed
        with pytest.raises(KeyboardInterrupt):
            train_tiny.train_vae(resumed, phase, MINI_VAE, save_every=0)
    assert torch.load(resumed / "vae_mini.ckpt.pt", weights_only=True)["step"] == 2
    assert (resumed / "vae_mini.latest.safetensors").exists()  # scoreable while the phase is unfinished
    train_tiny.train_vae(resumed, phase, MINI_VAE, save_every=0)

    a, b = (load_file(str(d / "vae_mini.safetensors")) for d in (unbroken, resumed))
    assert same_tensors(a, b)
    assert not same_tensors(a, train_tiny.VideoVAE(MINI_VAE).state_dict())  # it trained
    assert not (resumed / "vae_mini.ckpt.pt").exists() and not (resumed / "vae_mini.latest.safetensors").exists()
    assert json.loads((resumed / "vae_mini.json").read_text())["steps"] == 3


def test_the_clips_of_a_shorter_phase_are_the_first_frames_of_the_whole_clip():
    import random

    short, _ = train_tiny.clip_batch(random.Random(3), 2, frames=9)
    whole, _ = train_tiny.clip_batch(random.Random(3), 2)
    assert short.shape[2] == 9 and torch.equal(short, whole[:, :, :9])


@pytest.fixture(scope="module")
def dit_work(tmp_path_factory):
    """Tokenizers and a few random 'latents' with world captions: what the DiT stage reads."""
    import random

    work = tmp_path_factory.mktemp("dit_work")
    train_tiny.train_tokenizers(work)
    torch.manual_seed(0)
    count = 4
    save_file({"mean": torch.randn(count, 3, 16, 8, 8)}, str(work / "latents.safetensors"))
    rng = random.Random(0)
    scenes = [synthetic.make_scene(rng, synthetic.training_combos()) for _ in range(count)]
    (work / "captions.json").write_text(json.dumps([{k: list(v) for k, v in s.captions.items()} for s in scenes]))
    return work


@pytest.mark.slow  # ~10 s: two short DiT runs with the shipped model's sizes
def test_an_interrupted_dit_phase_resumes_to_the_unbroken_result(dit_work, tmp_path, monkeypatch):
    import shutil

    runs = {}
    for name in ("unbroken", "resumed"):
        runs[name] = tmp_path / name
        shutil.copytree(dit_work, runs[name])
    kwargs = dict(steps=3, batch=2, warmup=1, save_every=0)
    train_tiny.train_dit(runs["unbroken"], **kwargs)
    with monkeypatch.context() as m:
        interrupt_at(m, "flow_matching_loss", call=3)
        with pytest.raises(KeyboardInterrupt):
            train_tiny.train_dit(runs["resumed"], **kwargs)
    assert torch.load(runs["resumed"] / "dit_phase1.ckpt.pt", weights_only=True)["step"] == 2
    train_tiny.train_dit(runs["resumed"], **kwargs)
    for part in ("dit", "llm", "bert"):
        a, b = (load_file(str(runs[n] / f"{part}_phase1.safetensors")) for n in ("unbroken", "resumed"))
        assert same_tensors(a, b), part
    assert json.loads((runs["resumed"] / "dit_phase1.json").read_text())["steps"] == 3


def test_a_deepened_dit_computes_what_the_shallow_one_did_and_its_new_blocks_learn():
    from dataclasses import replace

    from stepvideo_core.scheduler import flow_matching_loss
    from stepvideo_core.tiny import model as tiny

    torch.manual_seed(1)
    shallow = train_tiny.StepVideoDiT(replace(tiny.DIT_CONFIG, num_layers=2))
    with torch.no_grad():  # a trained model's output layers are not zero; random ones make the check meaningful
        shallow.proj_out.weight.normal_(0, 0.1)
        shallow.adaln_single.linear.weight.normal_(0, 0.1)
    deep = train_tiny.deepen_dit(shallow.state_dict(), 4)
    assert len(deep.transformer_blocks) == 4
    g = torch.Generator().manual_seed(2)
    latents, noise = torch.randn(2, 3, 16, 8, 8, generator=g), torch.randn(2, 3, 16, 8, 8, generator=g)
    text = dict(encoder_hidden_states=torch.randn(2, 5, 128, generator=g),
                encoder_attention_mask=train_tiny.combined_mask(torch.ones(2, 5, dtype=torch.long)),
                encoder_hidden_states_2=torch.randn(2, 77, 128, generator=g))
    t = torch.tensor([0.3, 0.8])
    shallow_loss = flow_matching_loss(shallow.eval(), latents, text, t, noise)
    deep_loss = flow_matching_loss(deep.eval(), latents, text, t, noise)
    torch.testing.assert_close(deep_loss, shallow_loss, rtol=1e-6, atol=0)
    deep_loss.backward()
    for block in deep.transformer_blocks[2:]:  # the zeroed projections get gradients, so the new blocks train
        assert all(m.weight.grad.abs().sum() > 0 for m in (block.attn1.wo, block.attn2.wo, block.ff.net[2]))
    with pytest.raises(ValueError, match="cannot deepen"):
        train_tiny.deepen_dit({**shallow.state_dict(), "stray.weight": torch.zeros(1)}, 4)


def test_object_cell_weights_boost_exactly_the_cells_an_object_covers():
    g = torch.Generator().manual_seed(0)
    background = torch.randn(2, 3, 4, 1, 1, generator=g)  # one latent per clip and frame, channel by channel
    latents = background.expand(2, 3, 4, 8, 8).clone() + 0.01 * torch.randn(2, 3, 4, 8, 8, generator=g)
    covered = torch.zeros(2, 3, 1, 8, 8, dtype=torch.bool)
    covered[0, :, :, 2:4, 3:6] = True  # clip 0: a 2 x 3 object in every frame
    covered[1, :, :, 5:8, 0:2] = True  # clip 1: a 3 x 2 object
    latents = latents + 2.0 * covered
    weights = train_tiny.object_cell_weights(latents, boost=4.0)
    for clip in range(2):
        w, c = weights[clip], covered[clip]
        assert torch.allclose(w.mean(), torch.tensor(1.0))
        rest = w[~c][0]
        torch.testing.assert_close(w[~c], torch.full_like(w[~c], rest.item()))
        torch.testing.assert_close(w[c], torch.full_like(w[c], 5.0 * rest.item()))
    assert torch.equal(train_tiny.object_cell_weights(latents, boost=0.0), torch.ones_like(weights))


def test_swapping_shape_words_gives_the_captions_of_the_next_shape():
    """A circle scene's captions with their shape words swapped are the captions the world writes for the same
    scene with a square (and a square's for a triangle's), in both languages and every phrasing."""
    import random
    from dataclasses import replace

    order = list(synthetic.SHAPES)
    for colour in synthetic.COLOURS:
        for motion in synthetic.MOTIONS:
            for i, shape in enumerate(order):
                scene = synthetic.scene_for(colour, shape, motion, random.Random(5))
                following = replace(scene.objects[0], shape=order[(i + 1) % len(order)])
                expected = synthetic.captions(replace(scene, objects=[following]))
                for language in ("en", "zh"):
                    swapped = [synthetic.swap_shapes(c) for c in scene.captions[language]]
                    if language == "zh" and shape == "triangle":  # 三角形 is also the short form: it becomes 圆形
                        swapped = [c.replace("圆形", "圆") for c in swapped]
                        expected = {language: [c.replace("圆形", "圆") for c in expected[language]]}
                    assert swapped == list(expected[language])
    two = synthetic.make_scene(random.Random(2), synthetic.training_combos(), two_objects=1.0).captions["en"][0]
    assert synthetic.swap_shapes(synthetic.swap_shapes(synthetic.swap_shapes(two))) == two != synthetic.swap_shapes(two)


def test_the_shape_contrast_is_flow_matching_plus_a_hinge_on_swapped_captions():
    """Checked against the two errors computed apart: the hinge asks a swapped caption's error to be
    (1 + margin) times the true one's; a DiT that cannot read text pays exactly strength * margin per clip."""
    from dataclasses import replace

    from stepvideo_core.scheduler import flow_matching_loss
    from stepvideo_core.tiny import model as tiny

    torch.manual_seed(3)
    dit = train_tiny.StepVideoDiT(replace(tiny.DIT_CONFIG, num_layers=1)).eval()
    with torch.no_grad():
        dit.proj_out.weight.normal_(0, 0.1)
    g = torch.Generator().manual_seed(4)
    latents, noise = torch.randn(4, 3, 16, 8, 8, generator=g), torch.randn(4, 3, 16, 8, 8, generator=g)
    texts = ["a red circle moves left", train_tiny.NEGATIVE_MAGIC, "a blue square grows", "a green triangle shrinks"]
    t = torch.tensor([0.2, 0.3, 0.5, 0.9])  # clip 1 is unconditional and clip 3 too clean: neither is contrasted
    words = {w: torch.randn(128, generator=g) for w in " ".join(texts).split()}

    def encode(captions):  # a stand-in text encoder: one state per word
        states = torch.stack([torch.stack([words.get(w, words["a"]) for w in (c.split() + ["a"] * 5)[:5]])
                              for c in captions])
        return dict(encoder_hidden_states=states, encoder_hidden_states_2=states.mean(1, keepdim=True).expand(-1, 77, -1),
                    encoder_attention_mask=train_tiny.combined_mask(torch.ones(len(captions), 5, dtype=torch.long)))

    words.update({w: torch.randn(128, generator=g) for w in ("square", "triangle", "circle")})
    loss, ratio = train_tiny.shape_contrast_loss(dit, latents, texts, t, noise, encode, object_boost=0.0, strength=0.5)
    true = flow_matching_loss(dit, latents, encode(texts), t, noise, reduce=False)
    swapped = flow_matching_loss(dit, latents[[0, 2]], encode([synthetic.swap_shapes(texts[k]) for k in (0, 2)]),
                                 t[[0, 2]], noise[[0, 2]], reduce=False)
    hinge = torch.relu(1.5 * true[[0, 2]] - swapped) / true[[0, 2]]
    torch.testing.assert_close(loss, true.mean() + 0.5 * hinge.mean() * 2 / 4)
    assert ratio == pytest.approx((swapped / true[[0, 2]]).mean().item()) and ratio != 1.0
    with torch.no_grad():
        for block in dit.transformer_blocks:
            block.attn2.wo.weight.zero_()  # the DiT no longer reads text
    loss, ratio = train_tiny.shape_contrast_loss(dit, latents, texts, t, noise, encode, object_boost=0.0, strength=0.5)
    true = flow_matching_loss(dit, latents, encode(texts), t, noise)
    torch.testing.assert_close(loss, true + 0.5 * train_tiny.CONTRAST_MARGIN * 2 / 4)
    assert ratio == pytest.approx(1.0)


@pytest.mark.slow  # ~10 s: a short phase, then a deeper one with the text encoders frozen
def test_a_deeper_phase_with_frozen_text_keeps_the_text_encoders(dit_work, tmp_path):
    import shutil

    work = tmp_path / "work"
    shutil.copytree(dit_work, work)
    train_tiny.train_dit(work, steps=2, batch=2, warmup=1, save_every=0, layers=2)
    train_tiny.train_dit(work, steps=2, batch=2, warmup=1, save_every=0, phase=2, layers=3, text_frozen=True)
    for part in ("llm", "bert"):
        before, after = (load_file(str(work / f"{part}_phase{i}.safetensors")) for i in (1, 2))
        assert same_tensors(before, after), part
    dit = load_file(str(work / "dit_phase2.safetensors"))
    assert "transformer_blocks.2.attn2.wo.weight" in dit and dit["transformer_blocks.2.attn2.wo.weight"].abs().sum() > 0
    record = json.loads((work / "dit_phase2.json").read_text())
    assert record["layers"] == 3 and record["text_frozen"] is True
    train_tiny.train_dit(work, steps=2, batch=2, warmup=1, save_every=0, phase=3, layers=3, text_frozen=True,
                         shape_contrast=0.5)  # the shape-contrast phase trains the DiT alone, and says so
    assert not same_tensors(dit, load_file(str(work / "dit_phase3.safetensors")))
    assert same_tensors(*(load_file(str(work / f"llm_phase{i}.safetensors")) for i in (2, 3)))
    assert json.loads((work / "dit_phase3.json").read_text())["shape_contrast"] == 0.5
    with pytest.raises(ValueError, match="text_frozen"):
        train_tiny.train_dit(work, steps=1, batch=2, phase=4, layers=3, shape_contrast=0.5)


@pytest.mark.slow  # ~60 s: the text pretraining stage, short
def test_text_pretraining_separates_the_words_of_held_out_captions(dit_work, tmp_path):
    """Linear probes on the pooled states of both encoders read colour, shape and motion of captions of the
    held-out combinations, which pretraining never saw, far above chance (1/6, 1/3, 1/7); and the DiT stage
    starts from the pretrained encoders."""
    import shutil

    work = shutil.copytree(dit_work, tmp_path / "work")
    report = train_tiny.pretrain_text(work, steps=120)
    for encoder in ("llm", "bert"):
        for attribute in train_tiny.CAPTION_ATTRIBUTES:
            assert report["accuracy"][f"held_out {encoder}_{attribute}"] >= 0.9, report
    train_tiny.train_dit(work, steps=0)  # no step: the phase's weights are its starting point
    for part in ("llm", "bert"):
        assert same_tensors(load_file(str(work / f"{part}_text.safetensors")),
                            load_file(str(work / f"{part}_phase1.safetensors"))), part


def test_a_decoder_only_phase_keeps_the_encoder_and_weights_objects_outlines(tmp_path):
    phase = train_tiny.VAEPhase("vae_start", steps=1, lr=1e-3, batch=1, frames=9, crop=32, warmup=1)
    train_tiny.train_vae(tmp_path, phase, MINI_VAE, save_every=0)
    decoder = train_tiny.VAEPhase("vae_decoder", steps=2, lr=1e-3, batch=1, frames=9, crop=32, warmup=1,
                                  boundary_weight=10.0, init="vae_start", decoder_only=True)
    train_tiny.train_vae(tmp_path, decoder, MINI_VAE, save_every=0)
    before, after = (load_file(str(tmp_path / f"{name}.safetensors")) for name in ("vae_start", "vae_decoder"))
    for key in before:
        changed = not torch.equal(before[key], after[key])
        if key.startswith("encoder."):
            assert not changed, key  # the latents a DiT learnt stay what they were
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    assert json.loads((tmp_path / "vae_decoder.json").read_text())["decoder_only"] is True


def test_the_outline_band_is_the_pixels_whose_neighbourhood_holds_object_and_background():
    import numpy as np

    rng = np.random.default_rng(0)
    masks = (rng.random((2, 1, 3, 12, 12)) < 0.4).astype(np.float32)
    masks[0, 0, 0] = 1  # a frame all object: no outline at all, not even at the frame's edge
    band = train_tiny.outline(torch.from_numpy(masks)).numpy()
    expected = np.zeros_like(masks)
    for index in np.ndindex(masks.shape):
        *lead, y, x = index
        window = masks[tuple(lead)][max(0, y - 1):y + 2, max(0, x - 1):x + 2]
        expected[index] = float(window.max() > window.min())
    assert np.array_equal(band, expected) and not band[0, 0, 0].any()


@pytest.mark.slow  # ~15 s: seeds a work folder from the shipped weights and exports it again
def test_a_work_folder_seeded_from_the_shipped_model_exports_it_again_unchanged(tmp_path):
    """The fp16 weights go to fp32 and back exactly, so seeding loses nothing the export had; the recipe then
    sees every recorded stage as done and goes on at the next DiT phase."""
    from stepvideo_core.tiny import model as tiny

    work, out = tmp_path / "work", tmp_path / "out"
    phase = train_tiny.seed_from_export(work)
    records = json.loads((tiny.TINY_DIR / "training.json").read_text())
    assert phase == train_tiny.last_dit_phase(work) == max(int(k[9:]) for k in records if k.startswith("dit_phase"))
    vae_phases = [p.name for p in train_tiny.VAE_PHASES if p.name in records]
    assert all((work / f"{name}.json").exists() for name in vae_phases)
    assert (work / f"{vae_phases[-1]}.safetensors").exists()  # where a later VAE phase starts
    assert not any((work / f"{p.name}.json").exists() for p in train_tiny.VAE_PHASES if p.name not in records)
    train_tiny.export(work, out)
    for shipped in tiny.TINY_DIR.rglob("*.safetensors"):
        exported = out / shipped.relative_to(tiny.TINY_DIR)
        assert same_tensors(load_file(str(shipped)), load_file(str(exported))), shipped.name
    for name in ("step_llm/step1_chat_tokenizer.model", "hunyuan_clip/tokenizer/vocab.txt",
                 "hunyuan_clip/clip_text_encoder/config.json", "transformer/config.json"):
        assert (out / name).read_bytes() == (tiny.TINY_DIR / name).read_bytes(), name
    exported = json.loads((out / "training.json").read_text())
    assert exported["seeded"]["dit_phase"] == phase and "latents" not in exported  # encoded again when needed
    assert exported["seeded"].get("earlier") == records.get("seeded")  # a seeded export's own seeding is kept
    kept = [k for k in records if k not in ("latents", "seeded")]
    assert {k: exported[k] for k in kept} == {k: records[k] for k in kept}
    used = tmp_path / "used"
    used.mkdir()
    (used / "dit_phase1.json").write_text("{}")
    with pytest.raises(SystemExit, match="empty --work"):
        train_tiny.main(["--work", str(used), "--resume-from-shipped", "--stage", "export"])


def test_a_deepened_decoder_decodes_what_the_shallow_one_did_and_its_new_blocks_learn():
    torch.manual_seed(3)
    shallow = train_tiny.VideoVAE(MINI_VAE).eval()
    deep = train_tiny.deepen_decoder(shallow, 2).eval()
    assert all(len(stage.block) == 2 for stage in deep.decoder.up)
    z = torch.randn(1, MINI_VAE.z_channels, 2, 2, 2)
    with torch.no_grad():
        torch.testing.assert_close(deep.decoder(z), shallow.decoder(z), rtol=0, atol=1e-6)
    deep.decoder(z).square().mean().backward()
    for stage in deep.decoder.up:  # the zeroed convolutions get gradients, so the new blocks train
        assert stage.block[1].conv2.conv.weight.grad.abs().sum() > 0
    reloaded = VAEConfig.from_shapes({k: tuple(v.shape) for k, v in deep.state_dict().items()})
    assert reloaded.decoder_num_res_blocks == 2 and reloaded.encoder_num_res_blocks == 1
