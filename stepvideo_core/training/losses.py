"""Training objectives in Step-Video's flow-matching convention: supervised flow matching and Diffusion-DPO.

Supervised: ``scheduler.flow_matching_loss`` (velocity ``data - noise`` at ``x_t = t * data + (1 - t) * noise``,
t = 0 is noise) with times from ``scheduler.sample_training_times``. The release ships no training code and the
paper names no time distribution for its fine-tuning, so the choice is recorded here: every other draw is uniform
in [0, 1], the rest take the sampler's own time shift (dense near noise, where sampling spends its steps; 13 for
the release, 3 for Step-Video-Tiny); the tiny lab trained the built-in model this way.

Video-DPO: Diffusion-DPO (Wallace et al. 2023) on the same velocity errors. For a prompt with a preferred clip
x_w and a rejected one x_l, one time t and one noise draw shared by both,

    err(m, x) = mean over elements of (v_m(x_t, t, c) - (x - e))^2
    margin    = [err(lora, x_w) - err(ref, x_w)] - [err(lora, x_l) - err(ref, x_l)]
    loss      = -log sigmoid(-beta * margin)

with ``ref`` the frozen base (the same DiT with its adapters switched off). Beta convention: ``beta`` multiplies
the margin of per-element mean errors directly. The official Diffusion-DPO code computes
``-logsigmoid(-0.5 * beta_dpo * margin)``, so its ``beta_dpo`` is twice ours (its 5000 for SD1.5 is our 2500).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..scheduler import flow_matching_loss, sample_training_times

__all__ = ["dpo_loss", "flow_matching_loss", "preference_errors", "sample_training_times"]


def dpo_loss(lora_w: torch.Tensor, ref_w: torch.Tensor, lora_l: torch.Tensor, ref_l: torch.Tensor,
             beta: float, reduce: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample flow-matching errors in (adapted and reference, winner and loser); (loss, share of pairs the
    adapter already ranks right) out, both means over the batch unless ``reduce`` is False."""
    margin = (lora_w - ref_w) - (lora_l - ref_l)
    loss, right = -F.logsigmoid(-beta * margin), (margin < 0).float()
    return (loss.mean(), right.mean()) if reduce else (loss, right)


def preference_errors(dit, adapters, winners: torch.Tensor, losers: torch.Tensor, text: dict, t: torch.Tensor,
                      noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(adapted winner, reference winner, adapted loser, reference loser) per-sample errors; the winner and the
    loser of a pair share ``t`` and ``noise``, run as one batch. ``adapters`` are attached LoRAs
    (``lora.AttachedLoras``): the reference is the same DiT with them at strength 0, without gradients."""
    both = torch.cat([winners, losers])
    text2 = {k: torch.cat([v, v]) for k, v in text.items()}
    t2, noise2 = torch.cat([t, t]), torch.cat([noise, noise])
    with torch.no_grad():
        adapters.set_strength(0.0)
        try:
            ref = flow_matching_loss(dit, both, text2, t2, noise2, reduce=False)
        finally:
            adapters.set_strength(1.0)
    err = flow_matching_loss(dit, both, text2, t2, noise2, reduce=False)
    n = len(winners)
    return err[:n], ref[:n], err[n:], ref[n:]
