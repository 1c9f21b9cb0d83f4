"""Peak host RAM while loading a sharded DiT checkpoint: ``load_dit`` vs the usual low-memory recipe.

    python bench/bench_loading.py [--width 2048 --layers 8]

Writes a bf16 checkpoint in the official folder layout (shards + index) to a temporary folder, then loads it
in a fresh process per variant and reports the peak resident memory against the model's size. The baseline is
the fair one a user would write (not a model initialised in full first): build on the meta device, read
each shard with ``safetensors.torch.load_file`` and ``load_state_dict(assign=True)``. safetensors may hand out
tensors that map the file lazily, so each variant then reads every weight once (a sum), as the first forward
pass would: the peak counts the memory the loaded model really occupies. The goal: ``load_dit`` <= 1.1x.
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
    from safetensors.torch import load_file

    from stepvideo_core.dit import StepVideoDiT, load_dit

    with PeakRSS() as meter:
        if args.impl == "load_dit":
            model = load_dit(args.folder, weight_dtype=torch.bfloat16)
        else:
            with torch.device("meta"):
                model = StepVideoDiT(config(args), dtype=torch.bfloat16)
            for shard in sorted(Path(args.folder).glob("*.safetensors")):
                model.load_state_dict(load_file(str(shard)), strict=False, assign=True)
        with torch.no_grad():
            for p in model.parameters():  # touch every weight, as a forward pass would (a sum allocates nothing)
                p.sum()
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
        variants = ("load_dit", "meta+load_file+assign")
        results = {impl: run_variant(__file__, *common, "--impl", impl) for impl in variants}
    for name, r in results.items():
        print(f"  {name:24s} peak RAM during load {mib(r['peak'])}  = {r['peak'] / r['model']:.2f}x the model ({mib(r['model'])})")
    ratio = results["load_dit"]["peak"] / results["meta+load_file+assign"]["peak"]
    print(f"  ratio load_dit/baseline peak: {ratio:.2f}x")


if __name__ == "__main__":
    main()
