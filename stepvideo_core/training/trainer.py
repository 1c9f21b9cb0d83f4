"""The second stage of training: a LoRA on the frozen DiT, trained on the cached latents and text.

The adapters are ``stepvideo_core.lora``'s forward hooks (the base weights are never written, so the frozen base
may be bf16, fp8 or sharded); only their factors are in the optimizer. Every draw of a step comes from a
generator seeded by the run's seed and the step (which samples) or the sample's number in the run (its time, its
noise, whether its caption is dropped), never from a running generator. So:

- a resumed run goes on exactly as an unbroken one would: the checkpoint (every ``checkpoint_every`` steps, and
  when a run is interrupted) holds the adapters, the optimizer's moments and the step, and nothing else matters;
- several processes (``torchrun``) draw the same samples as one process does: each computes its share of the
  batch, the adapters' gradients are summed over the processes, and the frozen base may be sharded over them.

Outputs beside the LoRA file ``NAME.safetensors``: ``NAME.ckpt.safetensors`` (the last checkpoint, kept so a
finished run can be extended with more ``steps``), ``NAME.loss.csv`` and ``NAME.loss.png``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint

from ..lora import TARGET_MODULES, LoraSet, attach, new_trainable_lora, save_lora
from ..text_encoding import TextConditioning
from ..video_io import save_png
from .cache import TrainingSet
from .losses import dpo_loss, flow_matching_loss, preference_errors, sample_training_times

METHODS = ("sft", "dpo")


@dataclass(frozen=True)
class TrainConfig:
    method: str = "sft"  # "sft": flow matching on clips; "dpo": Diffusion-DPO on preference pairs
    steps: int = 200
    rank: int = 16
    alpha: float | None = None  # the adapters add alpha / rank * up @ down; None = rank (scale 1)
    lr: float = 1e-3
    batch_size: int = 1
    micro_batch: int = 0  # samples per forward pass (gradients accumulate over them); 0 = a process's whole share
    seed: int = 0
    targets: tuple[str, ...] = TARGET_MODULES
    shift: float = 3.0  # the sampler's time shift, used by every other time draw (see losses)
    caption_dropout: float = 0.1  # SFT: share of captions replaced by the negative prompt (trains guidance's other branch)
    beta: float = 2000.0  # DPO: see losses for the convention (half the official Diffusion-DPO code's beta_dpo)
    grad_clip: float = 1.0
    checkpoint_every: int = 50
    gradient_checkpointing: bool = False  # recompute each block's activations in the backward pass
    motion_score: float = 5.0  # TI2V DiTs: the motion score every clip trains with (the release's default)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} must be one of {', '.join(METHODS)}")
        for name, low in (("steps", 1), ("rank", 1), ("batch_size", 1), ("micro_batch", 0), ("checkpoint_every", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be a whole number of at least {low}, got {value!r}")
        for name in ("lr", "beta", "shift"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout {self.caption_dropout!r} must be in [0, 1)")

    def fingerprint(self) -> dict:
        """What a resumed run must share with the run it continues (everything but the step count and the
        checkpoint interval)."""
        d = asdict(self)
        d.pop("steps"), d.pop("checkpoint_every")
        d["targets"] = list(self.targets)
        return d


def output_paths(out: str | Path) -> dict[str, Path]:
    out = Path(out)
    stem = out.with_suffix("")
    return {"lora": out, "checkpoint": Path(f"{stem}.ckpt.safetensors"), "csv": Path(f"{stem}.loss.csv"),
            "plot": Path(f"{stem}.loss.png")}


def _seed(seed: int, *parts) -> int:
    """A 63-bit seed from the run's seed and the parts naming one draw."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, (seed, *parts))).encode()).digest()[:8], "little") >> 1


def step_indices(data: TrainingSet, config: TrainConfig, step: int) -> list[int]:
    """The samples of one step: one shape group (in proportion to its size), then ``batch_size`` of its samples,
    without repeats while the group is large enough."""
    g = torch.Generator().manual_seed(_seed(config.seed, "batch", step))
    groups = data.groups()
    group = groups[int(torch.multinomial(torch.tensor([float(len(x)) for x in groups]), 1, generator=g))]
    if len(group) >= config.batch_size:
        picks = torch.randperm(len(group), generator=g)[:config.batch_size]
    else:
        picks = torch.randint(len(group), (config.batch_size,), generator=g)
    return [group[int(i)] for i in picks]


def sample_draws(config: TrainConfig, draw: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(time [1], noise [1, *shape], caption dropped) of the ``draw``-th sample of the run."""
    g = torch.Generator().manual_seed(_seed(config.seed, "sample", draw))
    t = sample_training_times(1, g, config.shift, first=draw)
    noise = torch.randn((1, *shape), generator=g)
    dropped = bool(torch.rand(1, generator=g) < config.caption_dropout) if config.method == "sft" else False
    return t, noise, dropped


def checkpointed_blocks(dit) -> dict:
    """``transformer_options`` that run every block under activation checkpointing (``dit.run_blocks``' per-block
    replacement): a block's activations are recomputed in the backward pass instead of kept."""
    def patch(args, extra):
        return checkpoint(extra["original_block"], args, use_reentrant=False)

    return {"patches_replace": {"dit": {("double_block", i): patch for i in range(len(dit.transformer_blocks))}}}


@dataclass
class TrainResult:
    lora: LoraSet
    history: list[dict] = field(default_factory=list)
    paths: dict[str, Path] = field(default_factory=dict)
    resumed_from: int = 0


class _Group:
    """This process's share of the batch and the all-reduce of the adapters' gradients (one process: no-ops)."""

    def __init__(self, group):
        self.rank = group.rank if group is not None else 0
        self.world = group.world_size if group is not None else 1

    def mine(self, positions: int) -> list[int]:
        return list(range(self.rank, positions, self.world))

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        if self.world > 1:
            for t in tensors:
                dist.all_reduce(t)


def save_checkpoint(path: Path, lora: LoraSet, opt: torch.optim.Optimizer, step: int, fingerprint: dict) -> None:
    """Adapters, optimizer moments and the step in one safetensors file, written whole or not at all."""
    tensors = {}
    for name, pair in lora.pairs.items():
        tensors[f"lora.{name}.up"] = pair.up.detach().contiguous()
        tensors[f"lora.{name}.down"] = pair.down.detach().contiguous()
    params = opt.param_groups[0]["params"]
    for i, p in enumerate(params):
        for key, value in opt.state.get(p, {}).items():
            tensors[f"optimizer.{i}.{key}"] = value.detach().reshape(value.shape).contiguous()
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"step": str(step), "fingerprint": json.dumps(fingerprint, sort_keys=True)})
    os.replace(tmp, path)


def load_checkpoint(path: Path, lora: LoraSet, opt: torch.optim.Optimizer, fingerprint: dict) -> int:
    """Restore a checkpoint into ``lora`` and ``opt``; the step it was taken after. A ``ValueError`` names every
    setting that differs from the run it continues."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        saved = json.loads(meta.get("fingerprint", "{}"))
        differ = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in sorted(fingerprint.items()) if saved.get(k) != v]
        if differ:
            raise ValueError(f"checkpoint {path} was taken with other settings ({'; '.join(differ)}); resume with "
                             "the same settings (only --steps may change), or delete it to start over")
        with torch.no_grad():
            for name, pair in lora.pairs.items():
                pair.up.copy_(f.get_tensor(f"lora.{name}.up"))
                pair.down.copy_(f.get_tensor(f"lora.{name}.down"))
        keys = set(f.keys())
        for i, p in enumerate(opt.param_groups[0]["params"]):
            state = {k.rsplit(".", 1)[1]: f.get_tensor(k) for k in keys if k.startswith(f"optimizer.{i}.")}
            if state:
                opt.state[p] = state
        return int(meta["step"])


def write_csv(path: Path, history: list[dict]) -> None:
    if not history:
        return
    columns = list(history[0])
    lines = [",".join(columns)] + [",".join(str(row[c]) for c in columns) for row in history]
    path.write_text("\n".join(lines) + "\n")


def read_csv(path: Path, up_to_step: int) -> list[dict]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    columns = lines[0].split(",")
    rows = [dict(zip(columns, (float(v) if "." in v or "e" in v else int(v) for v in line.split(","))))
            for line in lines[1:] if line]
    return [r for r in rows if r["step"] <= up_to_step]


def plot_loss(path: Path, history: list[dict], width: int = 640, height: int = 320) -> None:
    """The loss per step (grey) and its running mean (blue) as a PNG, y from the lowest to the highest loss
    (the CSV beside it has the numbers)."""
    if len(history) < 2:
        return
    loss = np.array([r["loss"] for r in history], np.float64)
    smooth = np.empty_like(loss)
    acc = loss[0]
    for i, v in enumerate(loss):
        acc = 0.9 * acc + 0.1 * v if i else v
        smooth[i] = acc
    img = np.full((height, width, 3), 255, np.uint8)
    pad = 16
    lo, hi = float(loss.min()), float(loss.max())
    span = hi - lo or 1.0
    for k in range(1, 4):  # light grid at quarters
        img[pad + k * (height - 2 * pad) // 4, pad:width - pad] = 230
    img[height - pad, pad:width - pad] = 0
    img[pad:height - pad, pad] = 0

    def draw(values, colour, thick):
        xs = pad + np.arange(len(values)) * (width - 2 * pad - 1) / (len(values) - 1)
        ys = height - pad - (values - lo) / span * (height - 2 * pad - 1)
        dense = np.linspace(0, len(values) - 1, 4 * width)
        px, py = np.interp(dense, np.arange(len(values)), xs), np.interp(dense, np.arange(len(values)), ys)
        for d in range(-thick, thick + 1):
            img[np.clip(py.round().astype(int) + d, 0, height - 1), np.clip(px.round().astype(int), 0, width - 1)] = colour

    draw(loss, (170, 170, 170), 0)
    draw(smooth, (30, 90, 200), 1)
    save_png(img, path)


def _forward_backward(model, adapters, data: TrainingSet, config: TrainConfig, step: int, indices: list[int],
                      positions: list[int], device, ti2v: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss of the samples at ``positions`` of the step's batch, scaled to their share of the whole batch, and
    its gradients accumulated into the adapters; returns (that loss, pairs ranked right / batch size). ``ti2v``:
    the DiT takes an image condition, which is the clip's own first latent frame (the VAE is causal, so that frame
    is the first video frame encoded alone, as a start image is at inference) and zeros after it."""
    latents, losers, texts, times, noises = [], [], [], [], []
    for j in positions:
        sample_latents, text, loser = data.samples[indices[j]].load()
        t, noise, dropped = sample_draws(config, step * config.batch_size + j, tuple(sample_latents.shape))
        latents.append(sample_latents)
        losers.append(loser)
        texts.append(data.negative if dropped else text)
        times.append(t)
        noises.append(noise)
    x = torch.stack(latents).to(device)
    cond = TextConditioning.cat(texts).to(device=device).dit_kwargs()
    t, noise = torch.cat(times).to(device), torch.cat(noises).to(device)
    if ti2v:
        condition = torch.zeros_like(x)
        condition[:, :1] = x[:, :1]
        cond = {**cond, "condition_hidden_states": condition,
                "motion_score": torch.full((len(x),), float(config.motion_score), device=device)}
    right = torch.zeros(())
    if config.method == "sft":
        loss = flow_matching_loss(model, x, cond, t, noise, reduce=False).sum() / config.batch_size
    else:
        w, rw, lw, rl = preference_errors(model, adapters, x, torch.stack(losers).to(device), cond, t, noise)
        losses, ranked = dpo_loss(w, rw, lw, rl, config.beta, reduce=False)
        loss = losses.sum() / config.batch_size
        right = ranked.detach().sum().cpu() / config.batch_size
    loss.backward()
    return loss.detach().float().cpu(), right


def train(dit, data: TrainingSet, config: TrainConfig, out: str | Path, *, resume: bool = False,
          metadata: dict[str, str] | None = None, group=None, device: torch.device | str = "cpu",
          progress: bool = True, on_step: Callable[[int, int, float], None] | None = None,
          log: Callable[[str], None] = print) -> TrainResult:
    """Train a LoRA on ``dit`` (frozen here) with ``config`` and save it to ``out`` with ``metadata`` (plus the
    training settings). ``group``: the torchrun process group (``parallel.init_from_environment``), or None.
    ``on_step(done, total, loss)`` runs after every step and may raise to stop: the run then checkpoints the steps
    done and re-raises, as on Ctrl+C."""
    from tqdm.auto import tqdm

    paths = output_paths(out)
    procs = _Group(group)
    if config.batch_size % procs.world:
        raise ValueError(f"batch size {config.batch_size} must be a multiple of the {procs.world} processes")
    if config.method == "dpo" and not data.is_pairs:
        raise ValueError("DPO trains on preference pairs; give --pairs FILE.jsonl")
    ti2v = bool(getattr(dit.config, "use_additional_conditions", False))
    if ti2v and config.method == "dpo":
        raise ValueError("Video-DPO on a TI2V DiT is not supported yet (each clip of a pair would need its own start "
                         "image); train DPO on the T2V DiT, or SFT on the TI2V one")
    dit.requires_grad_(False)
    lora = new_trainable_lora(dit, config.rank, config.targets, config.alpha, seed=config.seed)
    params = [t for pair in lora.pairs.values() for t in (pair.up, pair.down)]
    for p in params:
        p.data = p.data.to(device)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    fingerprint = {**config.fingerprint(), "data": len(data.samples)}
    start, history = 0, []
    if paths["checkpoint"].exists():
        if not resume:
            raise ValueError(f"{paths['checkpoint']} holds a checkpoint of an earlier run; resume it (--resume) or "
                             "delete it to start over")
        start = load_checkpoint(paths["checkpoint"], lora, opt, fingerprint)
        history = read_csv(paths["csv"], start)
        log(f"resuming from step {start} ({paths['checkpoint']})")
    elif resume:
        log(f"no checkpoint at {paths['checkpoint']}: starting from step 0")
    if start >= config.steps:
        log(f"the checkpoint is at step {start}, at or past --steps {config.steps}: saving it as the LoRA")
    adapters = attach(dit, lora, 1.0)
    options = checkpointed_blocks(dit) if config.gradient_checkpointing else None
    model = partial(dit, transformer_options=options)
    began, done = time.time(), start
    bar = tqdm(total=config.steps, initial=start, desc=f"LoRA {config.method}", unit="step",
               disable=not progress or procs.rank != 0, dynamic_ncols=True)
    try:
        for step in range(start, config.steps):
            indices = step_indices(data, config, step)
            rows = {"loss": torch.zeros(()), "ranked_right": torch.zeros(())}
            mine = procs.mine(len(indices))
            chunk = config.micro_batch or len(mine)
            opt.zero_grad(set_to_none=True)
            for first in range(0, len(mine), chunk):
                loss, right = _forward_backward(model, adapters, data, config, step, indices,
                                                mine[first:first + chunk], device, ti2v)
                rows["loss"] += loss
                rows["ranked_right"] += right
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            procs.sum_(grads + [rows["loss"], rows["ranked_right"]])
            for p, g in zip(params, grads):
                p.grad = g
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            done = step + 1
            row = {"step": done, "loss": round(float(rows["loss"]), 6)}
            if config.method == "dpo":
                row["ranked_right"] = round(float(rows["ranked_right"]), 4)
            row["seconds"] = round(time.time() - began, 2)
            history.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            if done % config.checkpoint_every == 0 or done == config.steps:
                if procs.rank == 0:
                    save_checkpoint(paths["checkpoint"], lora, opt, done, fingerprint)
                    write_csv(paths["csv"], history)
            if on_step is not None:
                on_step(done, config.steps, row["loss"])
    except BaseException:
        if procs.rank == 0 and procs.world == 1 and done > start and done % config.checkpoint_every:
            save_checkpoint(paths["checkpoint"], lora, opt, done, fingerprint)
            write_csv(paths["csv"], history)
            log(f"stopped after step {done}: checkpoint saved; rerun with --resume to go on")
        raise
    finally:
        bar.close()
        adapters.detach()
    meta = {**(metadata or {}), "method": config.method, "rank": str(config.rank),
            "alpha": str(config.alpha or config.rank), "steps": str(config.steps), "data_size": str(len(data.samples)),
            "lr": str(config.lr), "batch_size": str(config.batch_size), "seed": str(config.seed),
            "targets": ",".join(config.targets), "shift": str(config.shift), "trainer": "stepvideo_core.train_lora"}
    meta.update({"caption_dropout": str(config.caption_dropout)} if config.method == "sft" else
                {"beta": str(config.beta), "beta_convention": "-logsigmoid(-beta * margin), margin of per-element "
                                                              "mean velocity errors"})
    if procs.rank == 0:
        paths["lora"].parent.mkdir(parents=True, exist_ok=True)
        save_lora(lora, paths["lora"], metadata=meta)
        write_csv(paths["csv"], history)
        plot_loss(paths["plot"], history)
    return TrainResult(lora, history, paths, start)
