"""Layer classes that every model in this package is built from.

Each model takes an ``operations`` namespace with ``Linear``, ``Conv2d``, ``Conv3d``, ``LayerNorm``,
``GroupNorm`` and ``Embedding`` (the convention of ComfyUI's native models, whose ``comfy.ops`` classes can
be passed straight in). The default namespace here casts a layer's weights to the input's dtype and device
at call time. That single rule gives three things: fp8-stored weights compute in bf16/fp16 one layer at a
time, weights left on the CPU can be streamed to the GPU layer by layer, and fp32 tests run unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# The weight dtypes by the names the nodes' combos and the CLI's --weight-dtype show; "fp8" is the CLI's short name
# for e4m3 (the format of the official fp8 checkpoints and ComfyUI's default fp8).
WEIGHT_DTYPES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
WEIGHT_DTYPE_ALIASES = {"fp8": "fp8_e4m3fn"}


def weight_dtype_named(name: str) -> torch.dtype:
    """The torch dtype of a name in ``WEIGHT_DTYPES`` (or an alias); an unknown name raises ``ValueError``."""
    try:
        return WEIGHT_DTYPES[WEIGHT_DTYPE_ALIASES.get(name, name)]
    except (KeyError, TypeError):
        names = ", ".join([*WEIGHT_DTYPES, *WEIGHT_DTYPE_ALIASES])
        raise ValueError(f"unknown weight dtype {name!r}; choose one of {names}") from None


def cast_to(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    if t is None or (t.dtype == like.dtype and t.device == like.device):
        return t
    return t.to(device=like.device, dtype=like.dtype, non_blocking=True)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, cast_to(self.weight, x), cast_to(self.bias, x))


class Conv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, cast_to(self.weight, x), cast_to(self.bias, x))


class Conv3d(nn.Conv3d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, cast_to(self.weight, x), cast_to(self.bias, x))


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, cast_to(self.weight, x), cast_to(self.bias, x), self.eps)


class GroupNorm(nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, cast_to(self.weight, x), cast_to(self.bias, x), self.eps)


class Embedding(nn.Embedding):
    """Looks rows up in the stored dtype; rows of an fp8 table come out in bf16 (callers cast to their compute
    dtype), so only the looked-up rows are ever upcast."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = F.embedding(ids, self.weight.to(ids.device))
        return out.to(torch.bfloat16) if out.dtype in FP8_DTYPES else out


class RMSNorm(nn.Module):
    """Normalises in fp32, casts back, then scales: the reference's order (kept local so it stays exact)."""

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        return normed * self.weight.to(device=x.device, dtype=x.dtype)


class CastOps:
    """The default ``operations`` namespace."""

    Linear = Linear
    Conv2d = Conv2d
    Conv3d = Conv3d
    LayerNorm = LayerNorm
    GroupNorm = GroupNorm
    Embedding = Embedding


default_ops = CastOps


def is_weight_layer(module: nn.Module) -> bool:
    """Layers whose ``weight`` may be stored in a narrower dtype (fp8) than the compute dtype."""
    return isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d, nn.Embedding))
