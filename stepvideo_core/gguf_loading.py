"""Reading GGUF checkpoints of the DiT and Step-LLM (official tensor names) with the ``gguf`` package's reader.

``GGUFReader`` memory-maps the file; :class:`GGUFCheckpoint` gives the same view of it as ``loading.Checkpoint``
gives of safetensors (keys, logical shapes, metadata), so the loaders infer the config from the shapes and check
the keys exactly as they do for safetensors. :func:`load_gguf_streaming` then fills the meta-device model one
tensor at a time: a weight of a Linear, convolution or embedding stored in a block type (Q8_0, Q4_K, ...) is
copied as its raw bytes and the layer becomes its quantized variant (``gguf_ops``); every other tensor (norms,
biases, tables, and weights stored as F32/F16/BF16) is dequantized once and stored in the compute dtype. A
tensor's copy leaves the file mapping before the next is read, as for safetensors.

Metadata written by the converter (``quantize.py``) and read here: ``general.architecture`` (``ARCH_DIT`` or
``ARCH_LLM``), ``stepvideo.config`` (the source folder's ``config.json``), ``stepvideo.source_dtype``. Files
from other tools that keep the official tensor names load too; ComfyUI-GGUF's ``comfy.gguf.orig_shape.<name>``
fields are honoured.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from . import gguf_quant
from .gguf_ops import can_quantize, set_quantized_weight
from .loading import CheckpointError, check_keys

ARCH_DIT = "stepvideo-dit"
ARCH_LLM = "stepvideo-llm"
ARCHITECTURES = {ARCH_DIT: "the Step-Video DiT", ARCH_LLM: "the Step-LLM text encoder"}
CONFIG_KEY = "stepvideo.config"
SOURCE_DTYPE_KEY = "stepvideo.source_dtype"
ORIG_SHAPE_PREFIX = "comfy.gguf.orig_shape."


def _field_value(field):
    try:
        value = field.contents()
    except (ValueError, IndexError, TypeError):
        return None
    return value


class GGUFCheckpoint:
    """One ``.gguf`` file (or a folder holding exactly one, e.g. ``step_llm/`` with its tokenizer)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.file = self._file()
        try:
            self.reader = gguf.GGUFReader(self.file, "r")
        except ValueError as e:
            raise self._read_error(str(e)) from None
        except (IndexError, KeyError, OverflowError, TypeError, OSError) as e:
            raise self._read_error(f"{type(e).__name__}: {e}") from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.architecture = self.string(gguf.Keys.General.ARCHITECTURE)
        self._shapes = {name: self._logical_shape(t) for name, t in self.tensors.items()}
        unsupported = {name: t.tensor_type for name, t in self.tensors.items()
                       if t.tensor_type not in gguf_quant.SUPPORTED_TYPES}
        if unsupported:
            name, qtype = next(iter(unsupported.items()))
            raise CheckpointError(
                f"{self.file}: {len(unsupported)} tensor(s) use GGUF type(s) "
                f"{', '.join(sorted({t.name for t in unsupported.values()}))} (e.g. {name}), which this pack does "
                f"not dequantize. Use a file in one of {', '.join(t.name for t in gguf_quant.SUPPORTED_TYPES)}, or "
                f"convert the official weights with python -m stepvideo_core.quantize.")

    def _file(self) -> Path:
        if not self.path.exists():
            raise CheckpointError(f"Checkpoint not found: {self.path} (no such file or folder).")
        if self.path.is_file():
            return self.path
        files = sorted(self.path.glob("*.gguf"))
        if len(files) != 1:
            raise CheckpointError(f"{self.path} holds {len(files)} .gguf files ({', '.join(f.name for f in files)}); "
                                  "pick the file itself.")
        return files[0]

    def _read_error(self, detail: str) -> CheckpointError:
        size = self.file.stat().st_size
        if "GGUFQuantizationType" in detail or "GGMLQuantizationType" in detail:
            return CheckpointError(
                f"{self.file} holds a tensor of a GGUF type that the installed gguf package does not know ({detail}). "
                f"Convert the weights to one of {', '.join(t.name for t in gguf_quant.SUPPORTED_TYPES)} "
                "(python -m stepvideo_core.quantize), or update gguf (pip install -U gguf).")
        if "magic" in detail:
            return CheckpointError(f"{self.file} is not a GGUF file (its first bytes are not 'GGUF'); use a .gguf "
                                   "made by python -m stepvideo_core.quantize or another GGUF converter.")
        return CheckpointError(f"{self.file} is truncated or corrupt ({size} bytes; the reader says: {detail}). The "
                               "download or conversion was probably interrupted; download or convert it again.")

    def string(self, key: str) -> str | None:
        field = self.reader.get_field(key)
        value = _field_value(field) if field is not None else None
        return value if isinstance(value, str) else None

    def _logical_shape(self, tensor) -> tuple[int, ...]:
        field = self.reader.get_field(ORIG_SHAPE_PREFIX + tensor.name)
        if field is not None:
            return tuple(int(v) for v in _field_value(field))
        return tuple(int(v) for v in reversed(tensor.shape.tolist()))

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def qtype(self, key: str) -> gguf.GGMLQuantizationType:
        return self.tensors[key].tensor_type

    def metadata(self) -> dict[str, str]:
        """The string-valued fields (architecture, config, ...)."""
        out = {}
        for name in self.reader.fields:
            value = self.string(name)
            if value is not None:
                out[name] = value
        return out

    def config(self) -> dict:
        """The source's ``config.json`` as the converter recorded it (empty when absent)."""
        text = self.string(CONFIG_KEY)
        try:
            values = json.loads(text) if text else {}
        except json.JSONDecodeError:
            return {}
        return values if isinstance(values, dict) else {}

    def raw(self, key: str, rows: slice | None = None) -> torch.Tensor:
        """The tensor's bytes as a uint8 tensor of its own (no longer tied to the file mapping); ``rows``: only
        those rows of ``raw_shape`` (a shard: the rest of the tensor is never read)."""
        t = self.tensors[key]
        if t.data.nbytes != t.n_bytes:
            raise CheckpointError(f"{self.file}: tensor {key} has {t.data.nbytes} of its {t.n_bytes} bytes; the file "
                                  "is truncated. Download or convert it again.")
        data = np.ascontiguousarray(t.data if rows is None else t.data[rows]).reshape(-1).view(np.uint8)
        out = torch.empty(data.size, dtype=torch.uint8)
        out.numpy()[:] = data
        return out

    def raw_shape(self, key: str) -> tuple[int, ...]:
        """The shape of the tensor's bytes as the file lays them out: rows of whole blocks (the last dimension in
        bytes), so splitting dim 0 splits whole rows, as FSDP2's sharding does."""
        return tuple(self.tensors[key].data.shape)

    def read(self, key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor dequantized to ``dtype`` with its logical shape."""
        return gguf_quant.dequantize(self.raw(key), self.qtype(key), self.shape(key), dtype)

    def type_counts(self) -> dict[str, int]:
        return dict(Counter(t.tensor_type.name for t in self.tensors.values()))

    def dominant_type(self) -> gguf.GGMLQuantizationType:
        """The type holding the most bytes (the big weights' type)."""
        by_bytes = Counter()
        for t in self.tensors.values():
            by_bytes[t.tensor_type] += int(t.n_bytes)
        return by_bytes.most_common(1)[0][0]

    def check_architecture(self, model_name: str, hint: str = "") -> None:
        """When the file says it is another model than the one being loaded, say so (before the key check)."""
        wanted = {"Step-Video DiT": ARCH_DIT, "Step-LLM text encoder": ARCH_LLM}.get(model_name)
        if self.architecture in ARCHITECTURES and self.architecture != wanted:
            raise CheckpointError(f"{self.file} is a GGUF of {ARCHITECTURES[self.architecture]} (general.architecture "
                                  f"{self.architecture!r}), not a {model_name}.{' ' + hint if hint else ''}")

    def describe_architecture(self) -> str:
        return f"GGUF architecture {self.architecture!r}" if self.architecture else "a GGUF without an architecture"


def stays_quantized(owner: nn.Module, attr: str, qtype: gguf.GGMLQuantizationType) -> bool:
    """Whether a tensor is held as its GGUF bytes: the weight of a Linear, convolution or embedding stored in a block
    type. Everything else (norms, biases, tables, float-typed weights) is dequantized once to the compute dtype."""
    return attr == "weight" and can_quantize(owner) and qtype not in gguf_quant.FLOAT_TYPES


def load_gguf_streaming(
    model: nn.Module,
    ckpt: GGUFCheckpoint,
    *,
    model_name: str,
    compute_dtype: torch.dtype,
    device: torch.device | str = "cpu",
    key_map: Callable[[str], str] | None = None,
) -> nn.Module:
    """Fill a meta-device model from a GGUF file, one tensor at a time (see the module docstring)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapping = check_keys(ckpt, expected, model_name, key_map or (lambda k: k))
    for name in expected:
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        key = mapping[name]
        qtype = ckpt.qtype(key)
        if stays_quantized(owner, attr, qtype):
            set_quantized_weight(owner, ckpt.raw(key).view(ckpt.raw_shape(key)).to(device), qtype, expected[name])
            continue
        tensor = ckpt.read(key, compute_dtype).to(device)
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[attr] = tensor
    model.weight_format = ckpt.dominant_type()
    model.gguf_file = ckpt.file
    return model
