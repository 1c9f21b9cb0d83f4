"""Convert a Step-Video DiT or Step-LLM checkpoint (safetensors) to GGUF, one tensor at a time.

    python -m stepvideo_core.quantize models/stepvideo/stepvideo-t2v/transformer --type Q8_0 --out stepvideo-t2v-Q8_0.gguf
    python -m stepvideo_core.quantize models/stepvideo/stepvideo-t2v/step_llm --type Q4_0 \\
        --out models/stepvideo/stepvideo-t2v/step_llm/step_llm-Q4_0.gguf

SRC is an official ``transformer/`` or ``step_llm/`` folder (shards + index) or a single-file DiT. Tensors keep
their official names, so ``gguf.GGUFReader`` and this pack's loaders read them by the same keys as the
safetensors. The file records ``general.architecture`` (``stepvideo-dit`` or ``stepvideo-llm``) and the source's
``config.json``.

Memory: every tensor's info is declared first (its quantized byte size is known from its shape), then the header
is written, then each tensor is read, quantized in slices of rows and written before the next is read, so the
peak is about one output tensor plus one slice (``bench/bench_gguf.py`` measures it). The output is written to a
temporary file and renamed at the end: an interrupted run leaves no truncated ``.gguf``.

Which tensors stay unquantized is decided per tensor family by ``KEEP_RULES`` (first match wins), as ComfyUI-GGUF's
converter and llama.cpp do for theirs; a tensor whose rows do not split into whole blocks stays a float too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from . import gguf_quant
from .dit import DIT_ANCHORS
from .gguf_loading import ARCH_DIT, ARCH_LLM, CONFIG_KEY, SOURCE_DTYPE_KEY
from .loading import Checkpoint, CheckpointError, identify_foreign, strip_known_prefix
from .step_llm import EMBED_KEY

Q = gguf.GGMLQuantizationType
FLOAT = "float"  # F16, or BF16 when the source tensor is bf16 (then the copy is exact)
SLICE_ELEMENTS = 1 << 22  # rows quantized at a time: at most this many weights (16 MiB of float32)


@dataclass(frozen=True)
class KeepRule:
    family: str
    matches: Callable[[str, tuple[int, ...]], bool]
    keep: Q | str
    why: str


KEEP_RULES: tuple[KeepRule, ...] = (
    KeepRule("1-D tensors: LayerNorm/RMSNorm weights (q_norm, k_norm, norm1, norm2, Step-LLM norms) and biases",
             lambda n, s: len(s) == 1, Q.F32, "a few KB each; a norm weight scales every channel of every token"),
    KeepRule("scale_shift_table (the per-block and final AdaLN tables)", lambda n, s: n.endswith("scale_shift_table"),
             Q.F32, "bare parameters added to the modulation (not a layer's weight); 74 KB each"),
    KeepRule("pos_embed.proj (patch embedding, [6144, 64, 1, 1])", lambda n, s: n.startswith("pos_embed."), FLOAT,
             "the first layer (every token passes it) and a convolution; 0.8 MB"),
    KeepRule("adaln_single.emb.* (timestep and TI2V motion-score embedders)",
             lambda n, s: n.startswith("adaln_single.emb."), FLOAT,
             "the timestep's embedding sets every block's modulation; 80 MB in all"),
    KeepRule("proj_out (final projection to the latent channels)", lambda n, s: n.startswith("proj_out."), FLOAT,
             "its error lands directly in the predicted velocity; 0.8 MB"),
    KeepRule("tok_embeddings (Step-LLM's token table)", lambda n, s: n.startswith("tok_embeddings."), FLOAT,
             "an embedding table (only looked-up rows are used); kept as llama.cpp keeps small-model tables"),
    KeepRule("any tensor of at most 1024 elements", lambda n, s: int(np.prod(s)) <= 1024, Q.F32,
             "nothing to save"),
)


def _float_type(source: torch.dtype) -> Q:
    return Q.BF16 if source == torch.bfloat16 else Q.F16


def choose_type(name: str, shape: tuple[int, ...], target: Q, source: torch.dtype) -> tuple[Q, str]:
    """(type written for this tensor, the family that kept it unquantized or '' when quantized)."""
    for rule in KEEP_RULES:
        if rule.matches(name, shape):
            return (_float_type(source) if rule.keep == FLOAT else rule.keep), rule.family
    block, _ = gguf_quant.block_sizes(target)
    if shape[-1] % block:
        return _float_type(source), f"rows of {shape[-1]} do not split into blocks of {block}"
    return target, ""


def detect_architecture(ckpt: Checkpoint) -> tuple[str, Callable[[str], str]]:
    """(GGUF architecture, key map to the official names) of a DiT or Step-LLM checkpoint; else a CheckpointError."""
    for arch, anchor in ((ARCH_DIT, DIT_ANCHORS[0]), (ARCH_LLM, EMBED_KEY)):
        key_map = strip_known_prefix(ckpt.keys(), {anchor})
        if any(key_map(k) == anchor for k in ckpt.keys()):
            return arch, key_map
    foreign = identify_foreign(ckpt.keys())
    what = f"looks like {foreign}: it is" if foreign else "is"
    raise CheckpointError(f"{ckpt.path} {what} neither a Step-Video DiT nor a Step-LLM checkpoint; convert the "
                          "official transformer/ or step_llm/ folder.")


def _config_json(ckpt: Checkpoint) -> str | None:
    file = (ckpt.path if ckpt.path.is_dir() else ckpt.path.parent) / "config.json"
    if not file.is_file():
        return None
    try:
        return json.dumps(json.loads(file.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _quantize_rows(tensor: torch.Tensor, qtype: Q) -> np.ndarray:
    """``tensor`` as ``qtype`` bytes, slice by slice of rows, into one preallocated output."""
    shape = tuple(tensor.shape)
    if qtype in (Q.F32, Q.F16):
        return tensor.to(torch.float32 if qtype == Q.F32 else torch.float16).numpy()
    rows = tensor.reshape(-1, shape[-1])
    out = np.empty(gguf.quants.quant_shape_to_byte_shape((rows.shape[0], shape[-1]), qtype), dtype=np.uint8)
    step = max(1, SLICE_ELEMENTS // shape[-1])
    for start in range(0, rows.shape[0], step):
        out[start:start + step] = gguf_quant.quantize(rows[start:start + step], qtype)
    return out.reshape(*shape[:-1], out.shape[-1])


@dataclass
class ConversionReport:
    out: Path
    architecture: str
    types: Counter
    kept: Counter
    source_bytes: int
    bytes: int
    seconds: float

    def summary(self) -> str:
        types = ", ".join(f"{n} {t}" for t, n in self.types.most_common())
        kept = "; ".join(f"{n} x {family}" for family, n in self.kept.most_common())
        return (f"{self.out}: {self.architecture}, {sum(self.types.values())} tensors ({types}); "
                f"{self.source_bytes / 2**20:.1f} MiB -> {self.bytes / 2**20:.1f} MiB in {self.seconds:.1f} s. "
                f"Kept unquantized: {kept or 'none'}.")


def convert(src: str | os.PathLike, qtype: Q | str, out: str | os.PathLike, progress: bool = False) -> ConversionReport:
    """Write ``src`` as a GGUF of ``qtype`` at ``out`` (see the module docstring)."""
    start = time.perf_counter()
    qtype = Q[qtype] if isinstance(qtype, str) else Q(qtype)
    if qtype not in gguf_quant.WRITABLE_TYPES:
        raise ValueError(f"--type {qtype.name}: the converter writes {', '.join(t.name for t in gguf_quant.WRITABLE_TYPES)} "
                         "(gguf has no quantizer for K-quants; llama.cpp's llama-quantize makes those from a Q8_0/F16 "
                         "file of ours only with a Step-Video architecture patch).")
    ckpt = Checkpoint(src)
    arch, key_map = detect_architecture(ckpt)
    out = Path(out)
    if out.suffix != ".gguf":
        raise ValueError(f"--out {out}: give the output a .gguf name")
    out.parent.mkdir(parents=True, exist_ok=True)

    plan = []
    for key in ckpt.keys():
        name, shape = key_map(key), tuple(ckpt.shape(key))
        source = ckpt.files[ckpt.key_to_file[key]]
        dtype = _safetensors_dtype(source.path, key)
        chosen, kept = choose_type(name, shape, qtype, dtype)
        plan.append((key, name, shape, chosen, kept))

    tmp = out.with_name(out.name + ".part")
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(int(gguf.LlamaFileType[f"MOSTLY_{qtype.name}"]))
    writer.add_string(SOURCE_DTYPE_KEY, str(_safetensors_dtype(*_first(ckpt))).removeprefix("torch."))
    config = _config_json(ckpt)
    if config is not None:
        writer.add_string(CONFIG_KEY, config)
    for _, name, shape, chosen, _ in plan:
        if chosen in (Q.F32, Q.F16):
            writer.add_tensor_info(name, shape, np.dtype(np.float32 if chosen == Q.F32 else np.float16),
                                   gguf_quant.stored_bytes(shape, chosen))
        else:
            byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, chosen)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=chosen)
    types, kept_families, source_bytes = Counter(), Counter(), 0
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, (key, name, _shape, chosen, kept) in enumerate(plan):
            tensor = ckpt.read(key)
            source_bytes += tensor.numel() * tensor.element_size()
            data = _quantize_rows(tensor, chosen)
            del tensor
            writer.write_tensor_data(data)
            del data
            types[chosen.name] += 1
            if kept:
                kept_families[kept] += 1
            if progress:
                print(f"\r[{i + 1}/{len(plan)}] {name} -> {chosen.name}".ljust(80), end="", file=sys.stderr, flush=True)
        writer.close()
        os.replace(tmp, out)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    if progress:
        print(file=sys.stderr)
    return ConversionReport(out, arch, types, kept_families, source_bytes, out.stat().st_size,
                            time.perf_counter() - start)


def _first(ckpt: Checkpoint) -> tuple[Path, str]:
    key = ckpt.keys()[0]
    return ckpt.key_to_file[key], key


def _safetensors_dtype(file: Path, key: str) -> torch.dtype:
    """A tensor's stored dtype from the header, without reading it."""
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        name = f.get_slice(key).get_dtype()
    return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}.get(name, torch.float32)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stepvideo_core.quantize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="an official transformer/ or step_llm/ folder, or a single-file DiT (.safetensors)")
    p.add_argument("--type", required=True, choices=[t.name for t in gguf_quant.WRITABLE_TYPES],
                   help="Q8_0 is near-lossless at about half of bf16; Q4_0 about a quarter")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    return p


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        report = convert(args.src, args.type, args.out, progress=sys.stderr.isatty())
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"error: {e}\n")
    print(report.summary())


if __name__ == "__main__":
    main()
