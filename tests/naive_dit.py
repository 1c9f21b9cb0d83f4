"""An independent, deliberately naive Step-Video DiT forward written from the spec, for cross-checking.

Everything is recomputed from the state dict with explicit per-head loops, explicit rotation angles and
explicit per-sample key counts, so a mistake in the model's fused-projection split, RoPE axis order or
text mask shows up as a mismatch. fp32 only; small configs only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope_angle(pos: int, k: int, chunk: int) -> float:
    return pos * 10000.0 ** (-2 * k / chunk)


def rotate(vec: torch.Tensor, positions: tuple[int, int, int]) -> torch.Tensor:
    """Rotate one head vector: channels [0, d/2) by frame, [d/2, 3d/4) by row, [3d/4, d) by column."""
    d = vec.shape[0]
    out = vec.clone()
    offset = 0
    for chunk, pos in zip((d // 2, d // 4, d // 4), positions):
        half = chunk // 2
        for k in range(half):
            a = rope_angle(pos, k, chunk)
            x1, x2 = vec[offset + k], vec[offset + half + k]
            out[offset + k] = x1 * math.cos(a) - x2 * math.sin(a)
            out[offset + half + k] = x2 * math.cos(a) + x1 * math.sin(a)
        offset += chunk
    return out


def attend(q, k, v):
    return torch.softmax(q @ k.T / math.sqrt(q.shape[-1]), dim=-1) @ v


def sinusoid(value: float) -> torch.Tensor:
    freqs = [math.exp(-math.log(10000) * k / 128) for k in range(128)]
    return torch.tensor([math.cos(value * f) for f in freqs] + [math.sin(value * f) for f in freqs])


def mlp(sd: dict, prefix: str, v: torch.Tensor) -> torch.Tensor:
    v = F.silu(v @ sd[prefix + "linear_1.weight"].T + sd[prefix + "linear_1.bias"])
    return v @ sd[prefix + "linear_2.weight"].T + sd[prefix + "linear_2.bias"]


def naive_forward(sd: dict, heads: int, x, t, llm, mask, clip, norm_eps=1e-6, condition=None, motion_score=None):
    """The DiT's output for ``x`` [b, F, C, H, W] from the state dict alone (any patch size). TI2V: ``condition``
    latents are read with ``x`` as extra input channels; the embedded ``motion_score`` (one float per sample, no
    x1000) is added to the embedded timestep."""
    b, frames, c, h, w = x.shape
    inputs = x if condition is None else torch.cat([x, condition], dim=2)
    dim = sd["pos_embed.proj.bias"].shape[0]
    d = dim // heads
    patch = sd["pos_embed.proj.weight"].shape[-1]
    c_out = sd["proj_out.bias"].shape[0] // patch**2
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    out = torch.zeros(b, frames, c_out, h, w)
    positions = [(f, y, xx) for f in range(frames) for y in range(h // patch) for xx in range(w // patch)]
    for i in range(b):
        # one token per patch x patch square, in frame-major, row, column order: a linear map of its
        # [C, patch, patch] values with the conv weight [dim, C, patch, patch]
        patches = [inputs[i, f, :, y * patch:(y + 1) * patch, xx * patch:(xx + 1) * patch].reshape(-1)
                   for f, y, xx in positions]
        tok = torch.stack(patches) @ sd["pos_embed.proj.weight"].reshape(dim, -1).T
        tok = tok + sd["pos_embed.proj.bias"]
        e = mlp(sd, "adaln_single.emb.timestep_embedder.", sinusoid(t[i].item() * 1000))
        if motion_score is not None:
            e = e + mlp(sd, "adaln_single.emb.motion_score_embedder.", sinusoid(float(motion_score[i])))
        m = (F.silu(e) @ sd["adaln_single.linear.weight"].T + sd["adaln_single.linear.bias"]).view(6, dim)

        cap = F.layer_norm(llm[i], (llm.shape[-1],), eps=norm_eps)
        cap = F.gelu(cap @ sd["caption_projection.linear_1.weight"].T + sd["caption_projection.linear_1.bias"], approximate="tanh")
        cap = cap @ sd["caption_projection.linear_2.weight"].T + sd["caption_projection.linear_2.bias"]
        cl = clip[i] @ sd["clip_projection.weight"].T + sd["clip_projection.bias"]
        text = torch.cat([cl, cap])[: int(mask[i].sum())]

        for n in range(layers):
            p = f"transformer_blocks.{n}."
            shift1, scale1, gate1, shift2, scale2, gate2 = sd[p + "scale_shift_table"] + m
            hdn = F.layer_norm(tok, (dim,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-5) * (1 + scale1) + shift1
            wqkv = sd[p + "attn1.wqkv.weight"]
            head_out = []
            for hh in range(heads):
                rows = wqkv[3 * d * hh: 3 * d * (hh + 1)]
                q = rms(hdn @ rows[:d].T, sd[p + "attn1.q_norm.weight"])
                k = rms(hdn @ rows[d: 2 * d].T, sd[p + "attn1.k_norm.weight"])
                v = hdn @ rows[2 * d:].T
                q = torch.stack([rotate(q[j], positions[j]) for j in range(len(positions))])
                k = torch.stack([rotate(k[j], positions[j]) for j in range(len(positions))])
                head_out.append(attend(q, k, v))
            tok = tok + gate1 * (torch.cat(head_out, dim=-1) @ sd[p + "attn1.wo.weight"].T)

            wkv = sd[p + "attn2.wkv.weight"]
            head_out = []
            for hh in range(heads):
                q = rms(tok @ sd[p + "attn2.wq.weight"][d * hh: d * (hh + 1)].T, sd[p + "attn2.q_norm.weight"])
                rows = wkv[2 * d * hh: 2 * d * (hh + 1)]
                k = rms(text @ rows[:d].T, sd[p + "attn2.k_norm.weight"])
                v = text @ rows[d:].T
                head_out.append(attend(q, k, v))
            tok = tok + torch.cat(head_out, dim=-1) @ sd[p + "attn2.wo.weight"].T

            hdn = F.layer_norm(tok, (dim,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-5) * (1 + scale2) + shift2
            ff = F.gelu(hdn @ sd[p + "ff.net.0.proj.weight"].T, approximate="tanh") @ sd[p + "ff.net.2.weight"].T
            tok = tok + gate2 * ff

        shift, scale = sd["scale_shift_table"] + e
        y = (F.layer_norm(tok, (dim,), eps=norm_eps) * (1 + scale) + shift) @ sd["proj_out.weight"].T + sd["proj_out.bias"]
        for j, (f, yy, xx) in enumerate(positions):
            # each token's patch^2 * C_out outputs are its square, ordered (row in patch, column in patch, channel)
            out[i, f, :, yy * patch:(yy + 1) * patch, xx * patch:(xx + 1) * patch] = (
                y[j].view(patch, patch, c_out).permute(2, 0, 1))
    return out
