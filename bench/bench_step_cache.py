"""Step caches side by side in a real ComfyUI: the pack's Step-Video Step Cache against core EasyCache.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/ComfyUI/python bench/bench_step_cache.py --out runs/step_cache.json
    ... bench/bench_step_cache.py --models tiny --prompts 4 --ours 0.3 --easycache 0.2   # a quick look

Every run goes through ComfyUI's own sampling (StepVideoSampler -> CFGGuider) at the standard preset (50 steps,
cfg 9, shift 13) with the same noise and conditioning; the caches are the MODEL patches users would add. Models:
Step-Video-Tiny (``models/step-video-tiny``, 17x128x128, the held-out English prompts) and a random-weight
reduced-width DiT of full depth (48 blocks, 256 wide, default PyTorch init, 16 latent channels so the tiny VAE
decodes it). For each run: DiT block evaluations (counted at the blocks), sampling wall time as a ratio to the
uncached run measured in the same process, PSNR of the decoded video against the uncached run's, and for the tiny
model the oracle's scores (``stepvideo_core.tiny.evaluate.summarise``, in points of 100).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def start_comfyui():
    """ComfyUI in this process on the CPU, with its extra nodes and this pack loaded by its own loader."""
    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout and run with its Python")
    sys.path.insert(0, comfy_path)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    if not asyncio.run(nodes.load_custom_node(str(ROOT))):
        sys.exit("the pack failed to load")
    pack = nodes.NODE_CLASS_MAPPINGS["StepVideoSampler"].__module__.rsplit(".nodes.", 1)[0]
    return nodes, sys.modules[f"{pack}.nodes.comfy_model"], sys.modules[f"{pack}.nodes.sampler_nodes"], \
        sys.modules[f"{pack}.nodes.conversions"]


def random_dit_folder(folder: Path, layers: int, width: int) -> Path:
    import torch
    from safetensors.torch import save_file

    from stepvideo_core.dit import DiTConfig, StepVideoDiT
    from stepvideo_core.tiny import model as tiny

    config = DiTConfig(num_attention_heads=width // 128, attention_head_dim=128, in_channels=16, out_channels=16,
                       num_layers=layers, caption_channels=tiny.DIT_CONFIG.caption_channels)
    torch.manual_seed(0)
    dit = StepVideoDiT(config)
    path = folder / "random_dit.safetensors"
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(path))
    return path


def psnr(a, b) -> float:
    """Of two videos in [-1, 1], on the [0, 1] scale."""
    mse = float(((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


class BlockCounter:
    def __init__(self, block_type):
        self.count, self.block_type, self.original = 0, block_type, block_type.forward
        counter = self

        def counting(block, *a, **k):
            counter.count += 1
            return counter.original(block, *a, **k)

        block_type.forward = counting

    def close(self):
        self.block_type.forward = self.original


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,random")
    p.add_argument("--prompts", type=int, default=18, help="held-out English prompts for the tiny model")
    p.add_argument("--random-prompts", type=int, default=2)
    p.add_argument("--random-layers", type=int, default=48)
    p.add_argument("--random-width", type=int, default=256)
    p.add_argument("--ours", default="0.2,0.3,0.5", help="Step-Video Step Cache thresholds")
    p.add_argument("--easycache", default="0.05,0.1,0.2", help="core EasyCache reuse thresholds")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    nodes, comfy_model, sampler_nodes, conversions = start_comfyui()
    logging.getLogger().setLevel(logging.WARNING)
    from stepvideo_core.pipeline import GenerationSettings
    from stepvideo_core.text_encoding import encode_prompts
    from stepvideo_core.tiny import evaluate, oracle
    from stepvideo_core.tiny import model as tiny
    from stepvideo_core.video_io import to_uint8

    preset = GenerationSettings.from_preset("standard")
    tiny_model = tiny.load_tiny()
    prompts = evaluate.held_out_prompts(("en",))
    easycache_node = nodes.NODE_CLASS_MAPPINGS["EasyCache"]
    step_cache_node = nodes.NODE_CLASS_MAPPINGS["StepVideoStepCache"]
    report = {"preset": {"steps": preset.steps, "cfg": preset.cfg, "shift": preset.shift}, "torch_threads": args.threads,
              "models": {}}

    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if name == "tiny":
                path, chosen = str(tiny.paths()["transformer"]), prompts[:args.prompts]
            else:
                path, chosen = str(random_dit_folder(Path(tmp), args.random_layers, args.random_width)), \
                    prompts[:args.random_prompts]
            model = comfy_model.build_model_patcher(path, torch.float32, comfy_model.comfy_attention("comfy"))
            dit = model.model.diffusion_model
            with torch.no_grad():
                pos, neg = encode_prompts(tiny_model.text, [q.text for q in chosen], after="keep")
            pos, neg = conversions.to_conditioning(pos), conversions.to_conditioning(neg)
            latent = {"samples": torch.zeros(len(chosen), 64, 3, 8, 8)}  # an empty 17x128x128 latent
            variants = [("uncached", model)]
            variants += [(f"step cache {t}", step_cache_node.execute(model, float(t), 0.1, 1.0).result[0])
                         for t in args.ours.split(",") if t]
            variants += [(f"EasyCache {t}", easycache_node.execute(model, float(t), 0.15, 0.95, False).result[0])
                         for t in args.easycache.split(",") if t]
            rows, reference = [], None
            for label, variant in variants:
                counter = BlockCounter(type(dit.transformer_blocks[0]))
                start = time.perf_counter()
                try:
                    out = sampler_nodes.sample(variant, pos, neg, latent, preset.steps, preset.cfg, preset.shift, seed=0)
                except RuntimeError as e:  # e.g. core EasyCache 0.3.64 on a batch of several prompts
                    rows.append({"variant": label, "error": f"{type(e).__name__}: {e}"})
                    print(name, json.dumps(rows[-1]), flush=True)
                    continue
                finally:
                    counter.close()
                seconds = time.perf_counter() - start
                with torch.no_grad():
                    video = tiny_model.vae.decode(conversions.to_core_latent(out["samples"]))
                if reference is None:
                    reference = (video, seconds, counter.count)
                row = {"variant": label, "block_evaluations": counter.count,
                       "fewer_blocks": reference[2] / counter.count, "seconds": round(seconds, 1),
                       "speedup": reference[1] / seconds, "psnr_db": psnr(video, reference[0])}
                if name == "tiny":
                    scores = [(q.target, oracle.score(to_uint8(v), q.target)) for q, v in zip(chosen, video)]
                    summary = evaluate.summarise(scores)
                    row["oracle_points"] = {k: round(100 * summary[k], 1)
                                            for k in ("colour", "shape", "motion", "overall")}
                rows.append(row)
                print(name, json.dumps(row), flush=True)
            report["models"][name] = {"path": path if name == "tiny" else
                                      f"random {args.random_layers} blocks x {args.random_width} wide",
                                      "prompts": len(chosen), "blocks": dit.config.num_layers, "runs": rows}
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
