"""LoRA adapters for the Step-Video DiT: parsing every common key style, fusing q/k/v, applying, saving.

Step-Video's attention projections are fused and laid out per head (``wqkv`` rows are ``[q_h | k_h | v_h]``
for each head ``h``; ``wkv`` rows are ``[k_h | v_h]``). Adapters trained on separate q/k/v projections are
folded into one low-rank pair for the fused weight whose ``up`` matrix scatters each part's rows into that
interleaved layout, so ``up @ down`` is exactly the block-interleaved sum of the separate deltas.

Adapters are applied as forward hooks (``y += strength * up(down(x))``): the base weights are never
touched, so strength 0 is the base model bit for bit, swapping is instant, fp8 weights stay fp8, and the
same hook trains (see ``attach``). Files are saved as ``diffusion_model.<module>.lora_down/lora_up/alpha``,
which both this loader and ComfyUI's core LoRA loaders read.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from .loading import read_safetensors

TARGET_MODULES = ("attn1.wqkv", "attn1.wo", "attn2.wq", "attn2.wkv", "attn2.wo", "ff.net.0.proj", "ff.net.2")

# Names other trainers give to unfused or renamed projections, mapped to (fused module, part index).
# Part index selects the slot within each head: wqkv has 3 slots (q, k, v), wkv has 2 (k, v).
_ALIASES = {
    "attn1": {"to_q": ("wqkv", 0), "q": ("wqkv", 0), "wq": ("wqkv", 0), "q_proj": ("wqkv", 0),
              "to_k": ("wqkv", 1), "k": ("wqkv", 1), "wk": ("wqkv", 1), "k_proj": ("wqkv", 1),
              "to_v": ("wqkv", 2), "v": ("wqkv", 2), "wv": ("wqkv", 2), "v_proj": ("wqkv", 2),
              "to_out.0": ("wo", None), "o": ("wo", None), "out_proj": ("wo", None)},
    "attn2": {"to_q": ("wq", None), "q": ("wq", None), "q_proj": ("wq", None),
              "to_k": ("wkv", 0), "k": ("wkv", 0), "wk": ("wkv", 0), "k_proj": ("wkv", 0),
              "to_v": ("wkv", 1), "v": ("wkv", 1), "wv": ("wkv", 1), "v_proj": ("wkv", 1),
              "to_out.0": ("wo", None), "o": ("wo", None), "out_proj": ("wo", None)},
    "ff": {"fc_in": ("net.0.proj", None), "fc_out": ("net.2", None)},
}
_PREFIXES = ("base_model.model.", "diffusion_model.", "model.diffusion_model.", "transformer.", "lora_unet_", "lora_transformer_")
_UP_DOWN = (
    (".lora_up.weight", ".lora_down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora_B.default.weight", ".lora_A.default.weight"),
    (".lora.up.weight", ".lora.down.weight"),
)


class LoraError(ValueError):
    pass


class LoraPartialMatchWarning(UserWarning):
    """Some of a LoRA's tensors matched no layer of the DiT (they are ignored)."""


@dataclass
class LoraPair:
    """delta W = scale * up @ down. Loaded files have their alpha / rank folded into ``up`` (scale 1); adapters
    being trained keep it apart, so alpha sets the step size of ``up`` as in other trainers."""

    up: torch.Tensor  # [out, rank]
    down: torch.Tensor  # [rank, in]
    scale: float = 1.0


@dataclass
class LoraSet:
    pairs: dict[str, LoraPair]  # module name in the DiT -> pair
    source_keys: int = 0
    unmatched: list[str] = field(default_factory=list)

    @property
    def matched_modules(self) -> int:
        return len(self.pairs)

    def summary(self, accepted: int | None = None) -> str:
        """The one LoRA report (CLI and nodes): layers patched (``accepted`` of them, when a host such as
        ComfyUI's patcher took fewer than matched), tensors read, and the first tensors that matched no layer."""
        patched = self.matched_modules if accepted is None else f"{accepted} of {self.matched_modules}"
        msg = f"Step-Video LoRA: {patched} DiT layer(s) patched from {self.source_keys} tensor(s)"
        if self.unmatched:
            msg += f"; {len(self.unmatched)} tensor(s) matched no layer (e.g. {', '.join(self.unmatched[:3])})"
        return msg


def _canonical_modules(model: nn.Module) -> dict[str, str]:
    """Every Linear in the model by its dotted name and by kohya's underscore spelling."""
    names = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            names[name] = name
            names[name.replace(".", "_")] = name
    return names


def _strip(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    return name


def _resolve(name: str, modules: dict[str, str]) -> tuple[str, int | None] | None:
    """Map a LoRA module name to (DiT module, slot within fused per-head layout or None)."""
    name = _strip(name)
    if name in modules:
        return modules[name], None
    m = re.match(r"^transformer_blocks[._](\d+)[._](attn1|attn2|ff)[._](.+)$", name)
    if not m:
        return None
    index, group, rest = m.groups()
    for alias, (target, slot) in _ALIASES[group].items():
        if rest in (alias, alias.replace(".", "_")):
            full = f"transformer_blocks.{index}.{group}.{target}"
            return (full, slot) if full in modules else None
    return None


def parse_lora(state_dict: dict[str, torch.Tensor], model: nn.Module) -> LoraSet:
    """Turn a LoRA state dict of any supported key style into fused pairs for ``model``'s layers."""
    modules = _canonical_modules(model)
    heads = model.config.num_attention_heads
    parts: dict[str, list[tuple[int | None, torch.Tensor, torch.Tensor]]] = {}
    used, unmatched = set(), []
    for key in state_dict:
        for up_suffix, down_suffix in _UP_DOWN:
            if not key.endswith(up_suffix):
                continue
            base = key[: -len(up_suffix)]
            down_key = base + down_suffix
            if down_key not in state_dict:
                continue
            up, down = state_dict[key].float(), state_dict[down_key].float()
            if up.dim() > 2:  # conv-style 1x1 LoRA weights
                up, down = up.flatten(1), down.flatten(1)
            rank = down.shape[0]
            alpha_t = state_dict.get(base + ".alpha")
            scale = float(alpha_t) / rank if alpha_t is not None else 1.0
            used.update({key, down_key, base + ".alpha"})
            resolved = _resolve(base, modules)
            if resolved is None:
                unmatched.append(base)
                continue
            target, slot = resolved
            if up.dim() != 2 or down.dim() != 2 or up.shape[1] != rank:
                raise LoraError(f"layer {target} ({base}): up {tuple(up.shape)} and down {tuple(down.shape)} do not "
                                "form a low-rank pair (up's columns must equal down's rows, the rank); the file is "
                                "damaged or was saved wrongly.")
            if not (math.isfinite(scale) and torch.isfinite(up).all() and torch.isfinite(down).all()):
                raise LoraError(f"layer {target} ({base}): the LoRA weights or alpha hold NaN/inf; the file is "
                                "damaged (e.g. a training run that diverged). Use another checkpoint of it.")
            parts.setdefault(target, []).append((slot, up * scale, down))
    unmatched += [k for k in state_dict if k not in used and not k.endswith(".alpha")]
    if not parts:
        raise LoraError(
            f"This LoRA matches no Step-Video DiT layer ({len(state_dict)} tensors, e.g. "
            f"{', '.join(sorted(state_dict)[:4])}). It was probably trained for another model; Step-Video LoRAs "
            f"target transformer_blocks.N.{{{', '.join(TARGET_MODULES)}}}."
        )
    pairs = {}
    for target, items in parts.items():
        layer = model.get_submodule(target)
        pairs[target] = _fuse(target, items, layer.out_features, layer.in_features, heads)
    return LoraSet(pairs=pairs, source_keys=len(state_dict), unmatched=unmatched)


_OTHER_MODEL = "the LoRA was trained for another model (or another size of Step-Video); use one made for this DiT."


def _fuse(target, items, out_features, in_features, heads) -> LoraPair:
    ups, downs = [], []
    for slot, up, down in items:
        if down.shape[1] != in_features:
            raise LoraError(f"layer {target}: the LoRA's input size {down.shape[1]} does not match the layer's "
                           f"{in_features}; {_OTHER_MODEL}")
        if slot is None:
            if up.shape[0] != out_features:
                raise LoraError(f"layer {target}: the LoRA's output size {up.shape[0]} does not match the layer's "
                               f"{out_features}; {_OTHER_MODEL}")
            ups.append(up)
        else:
            slots = out_features // up.shape[0]  # 3 for wqkv, 2 for wkv
            head_dim = up.shape[0] // heads
            if up.shape[0] * slots != out_features or slots not in (2, 3) or head_dim * heads != up.shape[0]:
                raise LoraError(f"layer {target} part {slot}: the LoRA's size {up.shape[0]} does not fit the fused "
                               f"layer ({out_features}); {_OTHER_MODEL}")
            scattered = up.new_zeros(heads, slots, head_dim, up.shape[1])
            scattered[:, slot] = up.view(heads, head_dim, -1)
            ups.append(scattered.reshape(out_features, -1))
        downs.append(down)
    return LoraPair(up=torch.cat(ups, dim=1), down=torch.cat(downs, dim=0))


def load_lora(path: str | Path, model: nn.Module) -> LoraSet:
    """Read and check a LoRA file for ``model``: every matched pair must fit its layer (else a ``LoraError``
    naming the file and the layer, before anything is attached); tensors that match no layer are warned about
    with counts (``LoraPartialMatchWarning``)."""
    try:
        lora = parse_lora(read_safetensors(path), model)
    except LoraError as e:
        raise LoraError(f"LoRA {path}: {e}") from None
    if lora.unmatched:
        warnings.warn(f"LoRA {path} matches this DiT only in part ({lora.summary()}). The rest is ignored; "
                      "check that the LoRA was trained for Step-Video-T2V.", LoraPartialMatchWarning, stacklevel=2)
    return lora


def _check_strength(strength: float) -> None:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise LoraError(f"LoRA strength {strength!r} is not a finite number; use e.g. 1.0 (0 = the base model).")


class LoraHook:
    """Forward hook adding ``strength * up(down(x))`` to a Linear's output; holds its own (trainable) factors."""

    def __init__(self, pair: LoraPair, strength: float):
        self.up, self.down, self.strength = pair.up, pair.down, strength * pair.scale

    def __call__(self, module, inputs, output):
        if self.strength == 0:
            return output
        x = inputs[0]
        down = self.down.to(device=x.device, dtype=x.dtype)
        up = self.up.to(device=x.device, dtype=x.dtype)
        return output + self.strength * F.linear(F.linear(x, down), up)


@dataclass
class AttachedLoras:
    handles: list
    hooks: dict[str, LoraHook]
    pairs: list[LoraPair] = field(default_factory=list)

    def set_strength(self, strength: float) -> None:
        _check_strength(strength)
        for hook, pair in zip(self.hooks.values(), self.pairs):
            hook.strength = strength * pair.scale

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def attach(model: nn.Module, lora: LoraSet, strength: float = 1.0) -> AttachedLoras:
    """Apply ``lora`` to ``model`` without changing its weights; ``detach()`` restores the base exactly."""
    _check_strength(strength)
    handles, hooks = [], {}
    for name, pair in lora.pairs.items():
        hook = LoraHook(pair, strength)
        handles.append(model.get_submodule(name).register_forward_hook(hook))
        hooks[name] = hook
    return AttachedLoras(handles, hooks, list(lora.pairs.values()))


def new_trainable_lora(model: nn.Module, rank: int, targets: Iterable[str] = TARGET_MODULES, alpha: float | None = None,
                       seed: int = 0) -> LoraSet:
    """Fresh adapters for training: ``down`` random, ``up`` zero (so training starts at the base model), each
    adding ``alpha / rank * up @ down`` (alpha defaults to the rank)."""
    g = torch.Generator().manual_seed(seed)
    scale = (alpha or rank) / rank
    pairs = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(name.endswith(t) for t in targets):
            down = torch.randn(rank, module.in_features, generator=g) / module.in_features**0.5
            up = torch.zeros(module.out_features, rank)
            pairs[name] = LoraPair(up=nn.Parameter(up), down=nn.Parameter(down), scale=scale)
    if not pairs:
        raise LoraError(f"no layer of the model matches the targets {list(targets)}")
    return LoraSet(pairs=pairs)


def save_lora(lora: LoraSet, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Save in ComfyUI's key style (``diffusion_model.`` prefix, ``lora_up``/``lora_down``, ``alpha`` = rank)."""
    tensors = {}
    for name, pair in lora.pairs.items():
        key = f"diffusion_model.{name}"
        tensors[f"{key}.lora_up.weight"] = (pair.up.detach().float() * pair.scale).contiguous()
        tensors[f"{key}.lora_down.weight"] = pair.down.detach().float().contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(float(pair.down.shape[0]))
    save_file(tensors, str(path), metadata=metadata)
