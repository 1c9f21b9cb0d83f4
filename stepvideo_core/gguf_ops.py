"""Weight layers whose weight stays GGUF-quantized in memory and is dequantized in each forward.

The loader turns a layer of any ``operations`` namespace (this package's ``CastOps``, or ComfyUI's ``comfy.ops``
classes) into its quantized variant when the file stores that layer's weight in a block type: the class becomes
a subclass with :class:`QuantizedWeight` first, and ``weight`` becomes a frozen ``uint8`` parameter holding the
file's bytes (so moving the module moves the quantized bytes, and a host that sizes modules by their state dict
counts them at their real size). In the forward the bytes go to the input's device, are dequantized there in the
input's dtype (``gguf_quant.dequantize``), then every weight patch runs on the dequantized weight:

- ``weight_patches``: patches a host keeps on the layer (ComfyUI LoRAs merged at forward time: the pack's GGUF
  ModelPatcher puts them here, since merging into quantized bytes would lose them), then
- ``weight_function`` / ``bias_function``: the per-layer function lists of ComfyUI's ``comfy.ops`` protocol.

Unquantized layers are untouched, and the pack's own LoRAs (forward hooks on the layer output) work on both.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .gguf_quant import dequantize


class QuantizedWeight:
    """Mixin of a weight layer holding GGUF bytes; the loader sets ``weight_qtype`` and ``weight_shape``."""

    weight_qtype = None
    weight_shape: tuple[int, ...] = ()
    weight_patches: tuple = ()

    def dequantized_weight(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        raw = self.weight.to(device, non_blocking=True)
        weight = dequantize(raw, self.weight_qtype, self.weight_shape, dtype)
        for patch in (*self.weight_patches, *getattr(self, "weight_function", ())):
            weight = patch(weight)
        return weight

    def cast_bias(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        bias = getattr(self, "bias", None)
        if bias is None:
            return None
        bias = bias.to(device=device, dtype=dtype, non_blocking=True)
        for patch in getattr(self, "bias_function", ()):
            bias = patch(bias)
        return bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quantized={getattr(self.weight_qtype, 'name', self.weight_qtype)}"


class QuantizedLinear(QuantizedWeight):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.device, x.dtype), self.cast_bias(x.device, x.dtype))


class QuantizedConv(QuantizedWeight):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.dequantized_weight(x.device, x.dtype), self.cast_bias(x.device, x.dtype))


class QuantizedEmbedding(QuantizedWeight):
    """Rows are quantized independently, so a lookup dequantizes only the rows it reads (float32 out; callers cast
    to their compute dtype); the whole table is dequantized only when a patch must see it."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.weight_patches or getattr(self, "weight_function", ()):
            return F.embedding(ids, self.dequantized_weight(ids.device, torch.float32))
        rows = F.embedding(ids, self.weight.to(ids.device))
        return dequantize(rows, self.weight_qtype, (*ids.shape, self.weight_shape[-1]), torch.float32)


def _kind(cls: type) -> type[QuantizedWeight]:
    if issubclass(cls, nn.Linear):
        return QuantizedLinear
    if issubclass(cls, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return QuantizedConv
    if issubclass(cls, nn.Embedding):
        return QuantizedEmbedding
    raise TypeError(f"{cls.__name__} has no quantized variant")


@functools.cache
def quantized_class(cls: type) -> type:
    """``cls`` with its forward replaced by the dequantizing one (one class per layer class)."""
    return type(f"Quantized{cls.__name__}", (_kind(cls), cls), {"__module__": cls.__module__})


def can_quantize(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding))


def set_quantized_weight(module: nn.Module, raw: torch.Tensor, qtype, shape: tuple[int, ...]) -> None:
    """Make ``module`` hold the GGUF bytes ``raw`` as its weight (``shape``: the weight's logical shape)."""
    if not isinstance(module, QuantizedWeight):
        module.__class__ = quantized_class(type(module))
    module._parameters["weight"] = nn.Parameter(raw, requires_grad=False)
    module.weight_qtype = qtype
    module.weight_shape = tuple(shape)


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, QuantizedWeight) and module.weight_qtype is not None
