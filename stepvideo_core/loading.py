"""Streaming, validated loading of safetensors (and, through ``gguf_loading``, GGUF) checkpoints into models built
on the meta device.

Files are read with ``safetensors.safe_open``, one tensor at a time: each tensor is copied (and converted)
into its own buffer and the file mapping of that tensor is released before the next, so a load holds at
most the finished model plus one tensor in host RAM (no second copy of the weights). Every problem a user can
meet with a downloaded file (truncated, corrupt, another model's weights, a folder without its index)
becomes a ``CheckpointError`` that names the file and says what to do. :func:`load_checkpoint_model` is the
one skeleton of the model loaders (DiT, VAE, Step-LLM): open, map keys, infer the config, build on the meta
device, stream.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from .ops import FP8_DTYPES, is_weight_layer

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


# ComfyUI's scaled-fp8 files: a marker tensor (its dtype is the weights' fp8 dtype; fp32 means e4m3fn) and a
# per-tensor ``scale_weight`` (optionally ``scale_input``) beside each fp8 Linear weight.
SCALED_FP8_MARKER = "scaled_fp8"
FP8_SCALE_NAMES = ("scale_weight", "scale_input")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the fix."""


# Bytes per element of the safetensors dtype names.
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _header_problem(path: Path) -> str | None:
    """The first tensor whose header entry cannot be right (its bytes do not match its dtype and shape, or do not
    follow the previous tensor's, or run past the file), said in words; None when the entries look whole."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > path.stat().st_size:
                return None
            header = json.loads(f.read(length))
        data_bytes = path.stat().st_size - 8 - length
        entries = sorted(((name, e) for name, e in header.items() if name != "__metadata__"),
                         key=lambda item: item[1]["data_offsets"][0])
        end = 0
        for name, entry in entries:
            begin, stop = entry["data_offsets"]
            count = 1
            for n in entry["shape"]:
                count *= n
            need = count * _DTYPE_BYTES.get(entry["dtype"], 0)
            if begin != end:
                return (f"tensor {name!r} starts at byte {begin} of the data, but the tensor before it ends at {end} "
                        "(the header's data_offsets are damaged)")
            if stop - begin != need:
                return (f"tensor {name!r} has data_offsets [{begin}, {stop}] ({stop - begin} bytes) but its "
                        f"{entry['dtype']} shape {tuple(entry['shape'])} needs {need} bytes")
            if stop > data_bytes:
                return f"tensor {name!r} ends at byte {stop} of the data, past the file's {data_bytes} data bytes"
            end = stop
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None
    return None


def _safetensors_error(path: Path, error: SafetensorError) -> CheckpointError:
    """safetensors' own message, said as what happened to the file and what to do."""
    detail = str(error).removeprefix("Error while deserializing header: ")
    size = path.stat().st_size if path.is_file() else 0
    if "header too small" in detail:
        return CheckpointError(f"{path} is empty or truncated ({size} bytes); download it again.")
    if "not fully covered" in detail:
        return CheckpointError(f"{path} is truncated: the tensors its header lists do not fit its {size} bytes. "
                               "The download was probably interrupted; download it again.")
    problem = _header_problem(path) if path.is_file() else None
    if problem is not None:
        return CheckpointError(f"{path} has a corrupt header: {problem}. Download it again.")
    return CheckpointError(f"{path} is not a safetensors file, or its header is corrupt ({detail}). Download it again.")


def _safetensors_path(path: Path) -> Path:
    """``path`` when it is a ``.safetensors`` file; otherwise a ``CheckpointError`` saying what it is."""
    if not path.exists():
        raise CheckpointError(f"Checkpoint not found: {path} (no such file or folder).")
    if path.suffix not in (".safetensors", ".sft"):
        raise CheckpointError(
            f"{path} is a {path.suffix or 'extensionless'} file; only .safetensors checkpoints are loaded "
            "(pickle-based formats can run code). Use the official .safetensors files."
        )
    return path


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of one small ``.safetensors`` file (``safetensors.torch.load_file``), with the loader's errors;
    for files that are used whole (LoRAs). Models stream through :class:`Checkpoint` instead."""
    path = _safetensors_path(Path(path))
    try:
        return load_file(path)
    except SafetensorError as e:
        raise _safetensors_error(path, e) from None


class SafetensorsFile:
    """One ``.safetensors`` file: header validated on open (by ``safe_open``), tensors read one at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"Checkpoint file not found: {self.path}")
        try:
            with safe_open(self.path, framework="pt") as f:
                self.metadata: dict[str, str] = f.metadata() or {}
                self.shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except SafetensorError as e:
            raise _safetensors_error(self.path, e) from None

    def keys(self) -> list[str]:
        return list(self.shapes)

    def read(self, key: str) -> torch.Tensor:
        """The tensor as stored. It may be a view of the file's memory map: copy it before keeping it."""
        try:
            # Opened per read: the mapping goes with the tensor, not with a handle kept for the whole load.
            with safe_open(self.path, framework="pt") as f:
                return f.get_tensor(key)
        except SafetensorError as e:
            raise _safetensors_error(self.path, e) from None


class Checkpoint:
    """A single safetensors file, or a folder of shards with a ``*.safetensors.index.json``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.files: dict[Path, SafetensorsFile] = {}
        self.key_to_file: dict[str, Path] = {}
        if self.path.is_dir():
            self._open_folder()
        else:
            self._add_file(_safetensors_path(self.path))

    def _add_file(self, file: Path, keys: Iterable[str] | None = None) -> None:
        st = self.files.get(file) or SafetensorsFile(file)
        self.files[file] = st
        for key in st.keys() if keys is None else keys:
            if key not in st.shapes:
                raise CheckpointError(f"{file} does not contain {key!r}, which the index says it holds; the shard is wrong or corrupt.")
            self.key_to_file[key] = file

    def _check_unlisted(self, index: Path) -> None:
        """Tensors a shard holds but its index does not list would be skipped without a word: name them."""
        listed = set(self.key_to_file)
        unlisted = {f"{key} (in {file.name})" for file, st in self.files.items() for key in st.keys()
                    if key not in listed}
        if unlisted:
            raise CheckpointError(f"{self.path}: the shards hold {len(unlisted)} tensor(s) that {index.name} does not "
                                  f"list: {_few(unlisted)}. A shard or the index comes from another download (or the "
                                  "file was edited); download the folder again.")

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
            self._check_unlisted(indexes[0])
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
        return self.files[self.key_to_file[key]].shapes[key]

    def read(self, key: str) -> torch.Tensor:
        """The tensor as stored (possibly a view of the file's memory map: copy it before keeping it)."""
        return self.files[self.key_to_file[key]].read(key)

    def metadata(self) -> dict[str, str]:
        """The safetensors metadata of every file, merged."""
        return {k: v for f in self.files.values() for k, v in f.metadata.items()}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self.shape(k) for k in self.keys()}


GGUF_SUFFIX = ".gguf"


def is_gguf(path: str | os.PathLike) -> bool:
    """A ``.gguf`` file, or a folder that holds .gguf file(s) and no .safetensors (e.g. ``step_llm/`` with a GGUF
    in place of its shards); a folder with both loads its safetensors."""
    path = Path(path)
    if path.is_dir():
        return any(path.glob(f"*{GGUF_SUFFIX}")) and not any(path.glob("*.safetensors"))
    return path.suffix == GGUF_SUFFIX


def open_checkpoint(path: str | os.PathLike):
    """``Checkpoint`` for safetensors, ``gguf_loading.GGUFCheckpoint`` for GGUF (same keys/shape/metadata view)."""
    if not is_gguf(path):
        return Checkpoint(path)
    try:
        from .gguf_loading import GGUFCheckpoint
    except ImportError:
        raise CheckpointError(f"{path} is a GGUF file; reading it needs the gguf package: pip install gguf "
                              "(in ComfyUI's Python environment).") from None
    return GGUFCheckpoint(path)


def check_device(device: torch.device | str) -> torch.device:
    """``device`` as a ``torch.device`` when this machine has it; otherwise a ``ValueError`` saying which devices
    it has (torch's own error for a CUDA device on a CPU build is a bare assertion)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device name; use 'cpu', 'cuda' or 'cuda:N'.") from None
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        reason = "this PyTorch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"device {str(device)!r}: {reason}; use device 'cpu' (or run on a machine with an NVIDIA "
                         "GPU and a CUDA build of PyTorch).")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"device {str(device)!r}: only {count} CUDA device(s) are visible (cuda:0 to "
                         f"cuda:{count - 1}); pick one of them (CUDA_VISIBLE_DEVICES may hide the others).")
    return dev


def read_config_json(ckpt: Checkpoint) -> dict | None:
    """The ``config.json`` beside a checkpoint folder's shards (the official folders have one), else None."""
    file = ckpt.path / "config.json"
    if not ckpt.path.is_dir() or not file.is_file():
        return None
    try:
        values = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}); download it again, or delete it (the loader reads "
                              "the architecture from the tensors and only checks them against it).") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{file} holds a {type(values).__name__}, not the JSON object of a model config; "
                              "download it again or delete it.")
    return values


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
    mapping = {key_map(k): k for k in ckpt.keys() if key_map(k) != SCALED_FP8_MARKER}  # a marker, not a weight
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


def scaled_fp8_dtype(ckpt: Checkpoint) -> torch.dtype | None:
    """The weights' fp8 dtype if ``ckpt`` is a ComfyUI scaled-fp8 file (it has the marker), else None."""
    marker = next((k for k in ckpt.keys() if k.rpartition(".")[2] == SCALED_FP8_MARKER), None)
    if marker is None:
        return None
    dtype = ckpt.read(marker).dtype
    return torch.float8_e4m3fn if dtype == torch.float32 else dtype


def storage_dtype(owner: nn.Module, attr: str, weight_dtype: torch.dtype, compute_dtype: torch.dtype) -> torch.dtype:
    """Weights of weight layers (Linear, Conv, Embedding) are stored in ``weight_dtype`` (fp8 allowed); every
    other tensor (norms, tables, biases) in ``compute_dtype`` when ``weight_dtype`` is fp8, else in ``weight_dtype``;
    the per-tensor scales of scaled-fp8 layers stay in fp32, as ComfyUI keeps them."""
    if attr in FP8_SCALE_NAMES:
        return torch.float32
    if attr == "weight" and is_weight_layer(owner):
        return weight_dtype
    return compute_dtype if weight_dtype in FP8_DTYPES else weight_dtype


def load_streaming(
    model: nn.Module,
    ckpt: Checkpoint,
    *,
    model_name: str,
    weight_dtype: torch.dtype,
    compute_dtype: torch.dtype,
    device: torch.device | str = "cpu",
    key_map: Callable[[str], str] | None = None,
) -> nn.Module:
    """Fill a model built on the meta device from ``ckpt``, one tensor at a time.

    Each tensor is stored in the dtype ``storage_dtype`` gives.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapping = check_keys(ckpt, expected, model_name, key_map or strip_known_prefix(ckpt.keys(), set(expected)))
    for name in expected:
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        dtype = storage_dtype(owner, attr, weight_dtype, compute_dtype)
        stored = ckpt.read(mapping[name])
        tensor = to_storage_dtype(stored, dtype).to(device)
        if tensor.data_ptr() == stored.data_ptr():  # unchanged: still the file's mapping, so take a copy
            tensor = tensor.clone()
        del stored
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[attr] = tensor
    leftover = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if leftover:
        raise CheckpointError(f"{ckpt.path}: the model still has unloaded tensors: {_few(leftover)}.")
    return model


def open_checkpoint_model(
    path: str | os.PathLike,
    *,
    model_name: str,
    anchors: tuple[str, ...],
    build: Callable[[Checkpoint, dict[str, tuple[int, ...]]], nn.Module],
    hint: str = "",
) -> tuple[nn.Module, Checkpoint, Callable[[str], str]]:
    """(Model on the meta device, checkpoint, key map): open the checkpoint, strip a prefix other tools add,
    check that the file is this model (its ``anchors`` keys; another model is named), ``build(ckpt, shapes)``
    on the meta device (it infers the config from the tensor shapes; its ``ValueError``/``KeyError`` become a
    ``CheckpointError`` naming the file). ``hint`` ends the wrong-file message."""
    ckpt = open_checkpoint(path)
    gguf_file = getattr(ckpt, "file", None)  # GGUF: the file says which model it is
    if gguf_file is not None:
        ckpt.check_architecture(model_name, hint)
    key_map = strip_known_prefix(ckpt.keys(), set(anchors))
    shapes = {key_map(k): shape for k, shape in ckpt.shapes().items()}
    if not all(a in shapes for a in anchors):
        foreign = identify_foreign(shapes)
        what = (f"looks like {foreign}, not a {model_name} checkpoint" if foreign else
                f"is not a {model_name} checkpoint (it has no {' / '.join(map(repr, anchors))})")
        if gguf_file is not None:
            what += f"; it is {ckpt.describe_architecture()}"
        raise CheckpointError(f"{gguf_file or ckpt.path} {what}.{' ' + hint if hint else ''}")
    try:
        with torch.device("meta"):
            model = build(ckpt, shapes)
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError, ZeroDivisionError) as e:
        raise CheckpointError(f"{ckpt.path} is not a usable {model_name} checkpoint: {e}") from None
    return model, ckpt, key_map


def load_checkpoint_model(
    path: str | os.PathLike,
    *,
    model_name: str,
    anchors: tuple[str, ...],
    build: Callable[[Checkpoint, dict[str, tuple[int, ...]]], nn.Module],
    weight_dtype: torch.dtype,
    compute_dtype: torch.dtype,
    device: torch.device | str = "cpu",
    hint: str = "",
) -> nn.Module:
    """The skeleton every model loader shares: ``open_checkpoint_model``, then stream the weights in."""
    device = check_device(device)
    model, ckpt, key_map = open_checkpoint_model(path, model_name=model_name, anchors=anchors, build=build, hint=hint)
    if getattr(ckpt, "file", None) is not None:  # GGUF: block-type weights stay quantized, the rest in compute dtype
        from .gguf_loading import load_gguf_streaming

        load_gguf_streaming(model, ckpt, model_name=model_name, compute_dtype=compute_dtype, device=device,
                            key_map=key_map)
    else:
        load_streaming(model, ckpt, model_name=model_name, weight_dtype=weight_dtype, compute_dtype=compute_dtype,
                       device=device, key_map=key_map)
    return model.eval().requires_grad_(False)
