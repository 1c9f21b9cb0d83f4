"""Video-DPO: the loss on hand-made numbers, and the training step moving a LoRA the right way."""

import math

import pytest
import torch

from stepvideo_core.lora import attach, load_lora
from stepvideo_core.tiny import evaluate
from stepvideo_core.tiny import model as tiny
from stepvideo_core.tiny.dpo import LORA_FILE
from stepvideo_core.training.losses import dpo_loss


def test_dpo_loss_is_log2_when_the_lora_equals_the_reference():
    e = torch.tensor([0.3, 0.7])
    loss, right = dpo_loss(e, e, e + 0.1, e + 0.1, beta=1000.0)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)
    assert right.item() == 0.0


def test_dpo_loss_hand_computed():
    # LoRA fits the winner 0.001 better than the base and the loser 0.0005 worse: margin -0.0015.
    ref_w, ref_l = torch.tensor([0.20]), torch.tensor([0.40])
    lora_w, lora_l = ref_w - 0.001, ref_l + 0.0005
    beta = 2000.0
    loss, right = dpo_loss(lora_w, ref_w, lora_l, ref_l, beta)
    expected = math.log1p(math.exp(-beta * 0.0015))  # -log sigmoid(3)
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)
    assert right.item() == 1.0
    # the same errors with winner and loser swapped cost more
    worse, _ = dpo_loss(lora_l, ref_l, lora_w, ref_w, beta)
    assert worse.item() > loss.item()


def test_dpo_gradient_pushes_winner_error_down_and_loser_error_up():
    lora_w = torch.tensor([0.2], requires_grad=True)
    lora_l = torch.tensor([0.4], requires_grad=True)
    loss, _ = dpo_loss(lora_w, torch.tensor([0.2]), lora_l, torch.tensor([0.4]), beta=500.0)
    loss.backward()
    assert lora_w.grad.item() > 0 and lora_l.grad.item() < 0
    assert math.isclose(lora_w.grad.item(), -lora_l.grad.item())


@pytest.mark.slow  # samples the held-out prompts twice with the shipped model: minutes on 2 cores
def test_shipped_dpo_lora_keeps_the_held_out_scores_and_strength_zero_is_the_base():
    # A floor, not the card's figures: every held-out combination, one seed, both languages together.
    model = tiny.load_tiny()
    prompts = evaluate.held_out_prompts()
    base = evaluate.evaluate(model, prompts, seeds=(0,))
    lora = load_lora(LORA_FILE, model.dit)
    assert lora.matched_modules == 7 * tiny.DIT_CONFIG.num_layers and not lora.unmatched
    handle = attach(model.dit, lora, 1.0)
    tuned = evaluate.evaluate(model, prompts, seeds=(0,))
    handle.set_strength(0.0)
    text = [p.text for p in prompts[:2]]
    at_zero = evaluate.generate_frames(model, text, seed=3)
    handle.detach()
    plain = evaluate.generate_frames(model, text, seed=3)
    assert all((a == b).all() for a, b in zip(at_zero, plain))
    # On the DiT of phase 13 the LoRA no longer adds (the LoRA card): measured here, colour, shape and motion equal
    # to the base's on average over the two languages (shape 0.61 -> 0.67 in English, 0.72 -> 0.67 in Chinese). One
    # clip of 18 is 0.056, so the floor is: no check loses more than a clip on average.
    mean = lambda r, check: (r["en"][check] + r["zh"][check]) / 2  # noqa: E731
    for check in ("colour", "shape", "motion"):
        assert mean(tuned, check) >= mean(base, check) - 0.06, (check, base, tuned)
    assert tuned != base  # the adapter changes the clips


@pytest.mark.slow  # loads the shipped tiny model: a few seconds
def test_the_lab_trains_its_dpo_lora_with_the_pack_trainer(tmp_path):
    from stepvideo_core.tiny.dpo import DPOConfig, train_dpo

    g = torch.Generator().manual_seed(0)
    shape = (2, 3, tiny.DIT_CONFIG.in_channels, 8, 8)
    pairs = {"winners": torch.randn(shape, generator=g), "losers": torch.randn(shape, generator=g),
             "texts": ["a red circle moves left", "一个蓝色的正方形向右移动"]}
    model = tiny.load_tiny()
    config = DPOConfig(steps=3, batch=2)
    result = train_dpo(model, pairs, tmp_path / "dpo.safetensors", config, metadata={"base_model": tiny.NAME})
    assert [r["step"] for r in result.history] == [1, 2, 3]
    assert math.isclose(result.history[0]["loss"], math.log(2), rel_tol=1e-5)  # the adapters start at the base
    lora = load_lora(tmp_path / "dpo.safetensors", model.dit)
    assert lora.matched_modules == 7 * tiny.DIT_CONFIG.num_layers
