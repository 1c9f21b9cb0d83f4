"""Attention back-ends behind one call signature.

Every model calls ``fn(q, k, v, mask, transformer_options)`` with ``q, k, v`` shaped ``[batch, heads, tokens,
head_dim]``, an optional boolean ``mask`` broadcastable to ``[batch, heads, q_tokens, k_tokens]`` (True = attend)
and the host's per-call options dict (ComfyUI's ``transformer_options``; the back-ends here ignore it, a host's
function may read it). The scale is always ``1/sqrt(head_dim)``. Back-ends that cannot take a mask (SageAttention,
flash-attn) fall back to SDPA for masked calls, and SageAttention also for head sizes its kernels lack; in the DiT
only cross-attention is masked, and it is short (at most 397 keys).
"""

from __future__ import annotations

import importlib.util
import math
from typing import Protocol

import torch
import torch.nn.functional as F


class AttentionFn(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                 transformer_options: dict | None = None) -> torch.Tensor: ...


BACKENDS = ("sdpa", "sageattention", "flash-attn", "math")


class AttentionBackendUnavailable(RuntimeError):
    pass


def sdpa_attention(q, k, v, mask=None, transformer_options=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def math_attention(q, k, v, mask=None, transformer_options=None):
    """Plain softmax(QK^T/sqrt(d))V in fp32: slow, obviously correct, used as the reference in tests."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), v.float()).to(q.dtype)


# Head sizes SageAttention's kernels take (sageattention 1.0.6 asserts on others; Step-Video-Tiny's heads are 32).
SAGE_HEAD_DIMS = (64, 96, 128)


def _sage_attention() -> AttentionFn:
    from sageattention import sageattn

    def sage(q, k, v, mask=None, transformer_options=None):
        if mask is not None or q.device.type != "cuda" or q.shape[-1] not in SAGE_HEAD_DIMS:
            return sdpa_attention(q, k, v, mask)
        # sageattn subtracts the keys' mean from ``k`` in place (its smooth_k); the DiT's keys are temporaries.
        return sageattn(q, k, v, tensor_layout="HND", is_causal=False)

    return sage


def _flash_attention() -> AttentionFn:
    from flash_attn import flash_attn_func

    def flash(q, k, v, mask=None, transformer_options=None):
        if mask is not None or q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
            return sdpa_attention(q, k, v, mask)
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)

    return flash


_INSTALL_HINTS = {
    "sageattention": ("sageattention", "pip install sageattention (needs a CUDA GPU and triton)"),
    "flash-attn": ("flash_attn", "pip install flash-attn --no-build-isolation (needs a CUDA GPU)"),
}


def install_hint(name: str) -> str:
    """How to install back-end ``name``'s package ("" for back-ends that need nothing)."""
    return _INSTALL_HINTS[name][1] if name in _INSTALL_HINTS else ""


def is_available(name: str) -> bool:
    if name in _INSTALL_HINTS:
        return importlib.util.find_spec(_INSTALL_HINTS[name][0]) is not None
    return name in BACKENDS


def get_attention(name: str = "sdpa") -> AttentionFn:
    """Return the attention function for ``name``; a clear error says how to install a missing back-end."""
    if name == "sdpa":
        return sdpa_attention
    if name == "math":
        return math_attention
    if name not in _INSTALL_HINTS:
        raise ValueError(f"Unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}.")
    module, hint = _INSTALL_HINTS[name]
    if importlib.util.find_spec(module) is None:
        raise AttentionBackendUnavailable(
            f"Attention backend {name!r} was chosen but the package {module!r} is not installed. "
            f"Install it with: {hint}. Or choose 'sdpa', which needs nothing extra."
        )
    return _sage_attention() if name == "sageattention" else _flash_attention()
