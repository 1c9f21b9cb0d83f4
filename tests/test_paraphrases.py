"""The evaluation paraphrases (new phrasings of held-out prompts in the world's own words, never a training
caption) and the check of the README's demo prompt."""

import random
import re
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from stepvideo_core import generate
from stepvideo_core.step_llm import StepLLMTokenizer
from stepvideo_core.tiny import evaluate, synthetic
from stepvideo_core.tiny import model as tiny
from stepvideo_core.tiny import train as train_tiny

HAN = re.compile(r"[\u4e00-\u9fff]")
# Words that name each motion (English) and the characters that do (Chinese, "上" alone is also "on" in 背景上).
EN_MOTION_WORDS = {"left": {"left"}, "right": {"right"}, "up": {"up", "upward", "rises"},
                   "down": {"down", "downward", "falls"}, "grow": {"grows", "bigger", "larger"},
                   "shrink": {"shrinks", "smaller"}, "still": {"still", "not"}}
ZH_MOTION_WORDS = {"left": ("左",), "right": ("右",), "up": ("向上", "往上"), "down": ("向下", "往下"),
                   "grow": ("大",), "shrink": ("小",), "still": ("静止", "不动", "原地")}


def one_object_scenes():
    return [synthetic.Scene((synthetic.SceneObject(c, s, m, x=0, y=0, half=0),), background)
            for c in synthetic.COLOURS for s in synthetic.SHAPES for m in synthetic.MOTIONS
            for background in synthetic.BACKGROUNDS]


@pytest.fixture(scope="module")
def corpus():
    return train_tiny.caption_corpus()


@pytest.fixture(scope="module")
def paraphrases():
    return [(scene.objects[0], lang, text) for scene in one_object_scenes()
            for lang, texts in synthetic.paraphrase_captions(scene).items() for text in texts]


def test_paraphrases_use_only_the_words_of_the_training_captions(corpus, paraphrases):
    captions = [line for line in corpus if line not in (train_tiny.POSITIVE_MAGIC, train_tiny.NEGATIVE_MAGIC)]
    en_words = {w for line in captions if not HAN.search(line) for w in line.split()}
    zh_chars = {ch for line in captions if HAN.search(line) for ch in line}
    for _, lang, text in paraphrases:
        unknown = set(text) - zh_chars if lang == "zh" else set(text.split()) - en_words
        assert not unknown, (text, unknown)
    # ... so the shipped tokenizers read every one without [UNK] (BERT) and without byte fallback (SentencePiece).
    from transformers import BertTokenizer

    bert = BertTokenizer.from_pretrained(str(tiny.paths()["hunyuan_clip"] / "tokenizer"), local_files_only=True)
    sp = StepLLMTokenizer(tiny.paths()["step_llm"]).sp
    for _, _, text in paraphrases:
        assert "[UNK]" not in bert.tokenize(text), text
        assert not [i for i in sp.encode_as_ids(text) if sp.is_byte(i) or i == sp.unk_id()], text


def test_no_paraphrase_is_a_training_caption(corpus, paraphrases):
    # The corpus holds every caption of every one-object scene (held-out combinations too), so this covers them all.
    training = set(corpus)
    assert not [text for _, _, text in paraphrases if text in training]
    # Each frame gives a different sentence: a scene's paraphrases are all distinct.
    for scene in one_object_scenes()[:21]:
        for texts in synthetic.paraphrase_captions(scene).values():
            assert len(set(texts)) == len(texts) == 4


def test_each_paraphrase_names_the_colour_shape_and_motion_and_no_other(paraphrases):
    for obj, lang, text in paraphrases:
        if lang == "en":
            words = set(text.split())
            assert obj.colour in words and obj.shape in words, text
            named = {m for m, cues in EN_MOTION_WORDS.items() if cues & words}
            assert not ({c for c in synthetic.COLOURS if c in words} - {obj.colour}), text
        else:
            colour = synthetic.COLOURS[obj.colour][1]
            assert colour in text or colour[0] + synthetic.ZH_SHAPE_SHORT[obj.shape] in text, text
            assert synthetic.SHAPES[obj.shape] in text or synthetic.ZH_SHAPE_SHORT[obj.shape] in text, text
            named = {m for m, cues in ZH_MOTION_WORDS.items() if any(c in text for c in cues)}
        assert named == {obj.motion}, (text, named)


def test_paraphrase_prompts_ask_for_every_held_out_combination_in_every_frame():
    prompts = evaluate.paraphrase_prompts()
    assert len(prompts) == 2 * len(synthetic.HELD_OUT)
    for lang in evaluate.LANGUAGES:
        mine = [p for p in prompts if p.language == lang]
        assert {p.target for p in mine} == synthetic.HELD_OUT
        # Each prompt is one of its own combination's paraphrases; the frames rotate, so every frame is used.
        frames_used = set()
        for p in mine:
            found = [i for background in synthetic.BACKGROUNDS
                     for i, text in enumerate(synthetic.paraphrase_captions(synthetic.Scene(
                         (synthetic.SceneObject(*p.target, x=0, y=0, half=0),), background))[lang]) if text == p.text]
            assert found, p
            frames_used |= set(found)
        assert frames_used == set(range(len(synthetic.PARAPHRASE_FRAMES[lang])))


def test_paraphrases_take_one_object_scenes():
    two = synthetic.make_scene(random.Random(0), synthetic.training_combos(), two_objects=1.0)
    with pytest.raises(ValueError, match="one-object scenes"):
        synthetic.paraphrase_captions(two)


@pytest.mark.slow
def test_the_demo_check_samples_the_readme_prompt_as_the_generate_command_does(tmp_path):
    # "Reads right for seeds 0-3" must be about the clips a newcomer gets: the CLI's latents for a seed are the
    # demo check's, bit for bit (2 steps to keep it fast).
    model = tiny.load_tiny()
    settings = replace(tiny.SETTINGS, steps=2)
    generate.main([evaluate.DEMO_PROMPT.text, "--seed", "3", "--steps", "2", "--out", str(tmp_path),
                   "--out-latents", str(tmp_path / "latents.safetensors")])
    ours, _ = evaluate.sample_clips(model, [evaluate.DEMO_PROMPT.text], 3, settings)
    torch.testing.assert_close(ours, load_file(tmp_path / "latents.safetensors")["latents"], rtol=0, atol=0)
    report = evaluate.demo_check(model, seeds=(3,), settings=settings)
    assert list(report["seeds"]) == [3] and report["summary"]["samples"] == 1
    assert report["all_right"] == int(report["seeds"][3]["right"])
