"""Writing state dicts in the official sharded layout (shards + ``*.safetensors.index.json``) for tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_sharded(folder: Path, state: dict[str, torch.Tensor], stem: str, shards: int = 2) -> Path:
    """Save ``state`` as ``{stem}-0000i-of-0000n.safetensors`` plus ``{stem}.safetensors.index.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(state)
    per = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[i * per:(i + 1) * per]}
        save_file(part, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder
