"""Streaming, validated loading of safetensors checkpoints into models built on the meta device.

The reader parses the safetensors header itself and reads each tensor with ``readinto`` straight into its
own buffer, so a load holds at most the finished model plus one tensor in host RAM (no second copy of the
weights, no memory-mapped page cache counted against the process). Every problem a user can meet with a
downloaded file (truncated, corrupt, another model's weights, a folder without its index) becomes a
``CheckpointError`` that names the file and says what to do.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from .ops import FP8_DTYPES, is_weight_layer

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

# Prefixes other tools put in front of the official key names (ComfyUI's saved models, diffusers pipelines).
KNOWN_KEY_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "model.")

# Key fragments that identify other models' checkpoints, checked in order; first match wins.
FOREIGN_SIGNATURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("the Step-Video DiT (load it with the Step-Video DiT loader)", ("pos_embed.proj.weight", "transformer_blocks.0.attn1.wqkv.weight")),
    ("the Step-Video VAE (load it with the Step-Video VAE loader)", ("decoder.conv_in.conv.weight", "encoder.conv_in.conv.weight")),
    ("the Step-LLM text encoder (load it with the Step-Video text encoder loader)", ("tok_embeddings.word_embeddings.weight",)),
    ("a Hunyuan-CLIP/BERT text encoder", ("bert.embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight")),
    ("a Wan 2.x DiT", ("patch_embedding.weight", "blocks.0.self_attn.q.weight")),
    ("a HunyuanVideo DiT", ("double_blocks.0.img_attn.qkv.weight", "img_in.proj.weight")),
    ("a Flux DiT", ("double_blocks.0.img_attn.qkv.weight",)),
    ("a CogVideoX DiT", ("transformer_blocks.0.attn1.to_q.weight", "patch_embed.proj.weight")),
    ("an LTX-Video DiT", ("transformer_blocks.0.attn1.to_q.weight",)),
    ("a Mochi DiT", ("blocks.0.attn.qkv_x.weight",)),
    ("a Stable Diffusion UNet", ("input_blocks.0.0.weight",)),
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the fix."""


class SafetensorsFile:
    """One ``.safetensors`` file: header validated on open, tensors read one at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"Checkpoint file not found: {self.path}")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path} is empty or truncated ({size} bytes); download it again.")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(size - 8, 100 * 2**20):
                raise CheckpointError(
                    f"{self.path} is not a safetensors file, or its header is corrupt "
                    f"(header length {header_len} in a {size}-byte file). Download it again."
                )
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{self.path} has a corrupt safetensors header ({e}); download it again.") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + header_len
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        end_max = 0
        for key, info in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[info["dtype"]]
                start, end = info["data_offsets"]
                shape = tuple(info["shape"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: entry {key!r} of the header is malformed; the file is corrupt.") from None
            self.entries[key] = (dtype, shape, start, end)
            end_max = max(end_max, end)
        if self.data_start + end_max > size:
            raise CheckpointError(
                f"{self.path} is truncated: its header describes {self.data_start + end_max} bytes but the file "
                f"has {size}. The download was probably interrupted; download it again."
            )

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][1]

    def dtype(self, key: str) -> torch.dtype:
        return self.entries[key][0]

    def read(self, key: str) -> torch.Tensor:
        dtype, shape, start, end = self.entries[key]
        buf = torch.empty(end - start, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + start)
            if end > start and f.readinto(memoryview(buf.numpy())) != end - start:
                raise CheckpointError(f"{self.path}: could not read tensor {key!r}; the file is truncated.")
        return buf.view(dtype).reshape(shape)


class Checkpoint:
    """A single safetensors file, or a folder of shards with a ``*.safetensors.index.json``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.files: dict[Path, SafetensorsFile] = {}
        self.key_to_file: dict[str, Path] = {}
        if self.path.is_dir():
            self._open_folder()
        elif self.path.is_file():
            if self.path.suffix not in (".safetensors", ".sft"):
                raise CheckpointError(
                    f"{self.path} is a {self.path.suffix or 'extensionless'} file; only .safetensors checkpoints "
                    "are loaded (pickle-based formats can run code). Use the official .safetensors files."
                )
            self._add_file(self.path)
        else:
            raise CheckpointError(f"Checkpoint not found: {self.path} (no such file or folder).")

    def _add_file(self, file: Path, keys: Iterable[str] | None = None) -> None:
        st = self.files.get(file) or SafetensorsFile(file)
        self.files[file] = st
        for key in st.keys() if keys is None else keys:
            if key not in st.entries:
                raise CheckpointError(f"{file} does not contain {key!r}, which the index says it holds; the shard is wrong or corrupt.")
            self.key_to_file[key] = file

    def _open_folder(self) -> None:
        indexes = sorted(self.path.glob("*.safetensors.index.json"))
        if len(indexes) > 1:
            raise CheckpointError(f"{self.path} holds several index files ({', '.join(i.name for i in indexes)}); keep one.")
        if indexes:
            try:
                weight_map = json.loads(indexes[0].read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{indexes[0]} is not a valid safetensors index ({e}).") from None
            by_file: dict[str, list[str]] = {}
            for key, name in weight_map.items():
                by_file.setdefault(name, []).append(key)
            missing = [n for n in by_file if not (self.path / n).is_file()]
            if missing:
                raise CheckpointError(
                    f"{self.path}: the index lists shard(s) that were not found: {', '.join(sorted(missing)[:4])}. "
                    "Download every shard of the folder."
                )
            for name, keys in by_file.items():
                self._add_file(self.path / name, keys)
            return
        shards = sorted(self.path.glob("*.safetensors"))
        if len(shards) == 1:
            self._add_file(shards[0])
        elif not shards:
            raise CheckpointError(f"No .safetensors file was found in {self.path}.")
        else:
            raise CheckpointError(
                f"{self.path} holds {len(shards)} .safetensors shards but no *.safetensors.index.json; "
                "download the index file that comes with them."
            )

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.files[self.key_to_file[key]].shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self.files[self.key_to_file[key]].dtype(key)

    def read(self, key: str) -> torch.Tensor:
        return self.files[self.key_to_file[key]].read(key)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self.shape(k) for k in self.keys()}


def strip_known_prefix(keys: Iterable[str], expected: set[str]) -> Callable[[str], str]:
    """Return a key mapper that removes a prefix tools add (e.g. ComfyUI's ``model.diffusion_model.``)."""
    keys = list(keys)
    if any(k in expected for k in keys):
        return lambda k: k
    for prefix in KNOWN_KEY_PREFIXES:
        if keys and all(k.startswith(prefix) for k in keys):
            return lambda k, p=prefix: k[len(p):]
    return lambda k: k


def identify_foreign(keys: Iterable[str]) -> str | None:
    keys = set(keys)
    for name, signature in FOREIGN_SIGNATURES:
        if all(any(k.endswith(s) for k in keys) for s in signature):
            return name
    return None


def _few(items: Iterable[str], n: int = 5) -> str:
    items = sorted(items)
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def check_keys(ckpt: Checkpoint, expected: dict[str, tuple[int, ...]], model_name: str, key_map: Callable[[str], str]) -> dict[str, str]:
    """Compare a checkpoint with a model's expected keys and shapes; return {model key: checkpoint key}."""
    mapping = {key_map(k): k for k in ckpt.keys()}
    missing = set(expected) - set(mapping)
    unexpected = set(mapping) - set(expected)
    if missing or unexpected:
        foreign = identify_foreign(mapping)
        if foreign and len(missing) > len(expected) // 2:
            raise CheckpointError(f"{ckpt.path} looks like {foreign}, not a {model_name} checkpoint.")
        parts = [f"{ckpt.path} does not match the {model_name} architecture."]
        if missing:
            parts.append(f"Missing {len(missing)} key(s): {_few(missing)}.")
        if unexpected:
            parts.append(f"Unexpected {len(unexpected)} key(s): {_few(unexpected)}.")
        parts.append("Check that this is the right file and that it downloaded completely.")
        raise CheckpointError(" ".join(parts))
    bad = [f"{k}: file {tuple(ckpt.shape(mapping[k]))} vs model {tuple(s)}" for k, s in expected.items() if tuple(ckpt.shape(mapping[k])) != tuple(s)]
    if bad:
        raise CheckpointError(f"{ckpt.path}: {len(bad)} tensor shape(s) differ from the {model_name} model: {'; '.join(bad[:4])}.")
    return mapping


def to_storage_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if t.dtype == dtype:
        return t
    if dtype in FP8_DTYPES:
        limit = torch.finfo(dtype).max
        return t.clamp(-limit, limit).to(dtype)
    return t.to(dtype)


def load_streaming(
    model: nn.Module,
    ckpt: Checkpoint,
    *,
    model_name: str,
    weight_dtype: torch.dtype,
    compute_dtype: torch.dtype,
    device: torch.device | str = "cpu",
    key_map: Callable[[str], str] | None = None,
    keep_dtype: Callable[[str], torch.dtype | None] | None = None,
) -> nn.Module:
    """Fill a model built on the meta device from ``ckpt``, one tensor at a time.

    Weights of weight layers (Linear, Conv, Embedding) are stored in ``weight_dtype`` (fp8 allowed); every other
    tensor (norms, tables, biases) in ``compute_dtype`` when ``weight_dtype`` is fp8, else in ``weight_dtype``.
    ``keep_dtype(name)`` may pin a tensor to a dtype (e.g. fp32 norms).
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapping = check_keys(ckpt, expected, model_name, key_map or strip_known_prefix(ckpt.keys(), set(expected)))
    other_dtype = compute_dtype if weight_dtype in FP8_DTYPES else weight_dtype
    for name in expected:
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        dtype = (keep_dtype(name) if keep_dtype else None) or (
            weight_dtype if attr == "weight" and is_weight_layer(owner) else other_dtype
        )
        tensor = to_storage_dtype(ckpt.read(mapping[name]), dtype).to(device)
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[attr] = tensor
    leftover = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if leftover:
        raise CheckpointError(f"{ckpt.path}: the model still has unloaded tensors: {_few(leftover)}.")
    return model
