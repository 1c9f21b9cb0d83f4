"""Peak host RAM while loading a sharded DiT checkpoint: streamed loader vs the usual load_file + load_state_dict.

    python bench/bench_loading.py [--width 2048 --layers 8]

Writes a bf16 checkpoint in the official folder layout (shards + index) to a temporary folder, then loads it
in a fresh process per variant and reports the peak resident memory of the load against the model's size.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import PeakRSS, emit, mib, run_variant  # noqa: E402


def config(args):
    from stepvideo_core.dit import DiTConfig

    return DiTConfig(num_attention_heads=args.width // 128, attention_head_dim=128, num_layers=args.layers,
                     caption_channels=(args.width, 1024))


def write_checkpoint(args, folder: Path) -> int:
    import torch
    from safetensors.torch import save_file

    from stepvideo_core.dit import StepVideoDiT

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in StepVideoDiT(config(args)).state_dict().items()}
    keys = sorted(shapes)
    weight_map, total = {}, 0
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        tensors = {k: torch.randn(shapes[k], dtype=torch.bfloat16) for k in part}
        total += sum(t.nbytes for t in tensors.values())
        save_file(tensors, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
        del tensors
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return total


def child(args) -> None:
    import torch

    with PeakRSS() as meter:
        if args.impl == "streamed":
            from stepvideo_core.dit import load_dit

            model = load_dit(args.folder, weight_dtype=torch.bfloat16)
        else:
            from safetensors.torch import load_file

            from stepvideo_core.dit import StepVideoDiT

            model = StepVideoDiT(config(args), dtype=torch.bfloat16)
            state = {}
            for shard in sorted(Path(args.folder).glob("*.safetensors")):
                state.update(load_file(str(shard)))
            model.load_state_dict(state)
            del state
    size = sum(p.nbytes for p in model.parameters())
    emit({"peak": meter.peak_delta, "model": size})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--child", action="store_true")
    p.add_argument("--impl", default="streamed")
    p.add_argument("--folder")
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--layers", type=int, default=8)
    args = p.parse_args()
    if args.child:
        return child(args)
    with tempfile.TemporaryDirectory() as tmp:
        size = write_checkpoint(args, Path(tmp))
        print(f"Loading a {mib(size)} bf16 DiT checkpoint ({args.layers} blocks x {args.width}, 2 shards + index)")
        common = ["--folder", tmp, "--width", str(args.width), "--layers", str(args.layers)]
        results = {impl: run_variant(__file__, *common, "--impl", impl) for impl in ("streamed", "load_file+load_state_dict")}
    for name, r in results.items():
        print(f"  {name:28s} peak RAM during load {mib(r['peak'])}  = {r['peak'] / r['model']:.2f}x the model ({mib(r['model'])})")
    ratio = results["streamed"]["peak"] / results["load_file+load_state_dict"]["peak"]
    print(f"  ratio streamed/naive peak: {ratio:.2f}x")


if __name__ == "__main__":
    main()
