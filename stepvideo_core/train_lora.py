"""Train a LoRA for a Step-Video DiT (the release, Turbo, TI2V or the built-in Step-Video-Tiny) from a folder of
clips: supervised (flow matching) or Video-DPO (preference pairs).

    python -m stepvideo_core.train_lora --data clips/ --out my.safetensors --steps 200      # Step-Video-Tiny, CPU
    python -m stepvideo_core.generate "a cyan square moves down" --lora my.safetensors
    python -m stepvideo_core.train_lora --data clips/ --out my.safetensors --model models/stepvideo/stepvideo-t2v \\
        --weight-dtype fp8 --gradient-checkpointing --rank 32 --lr 1e-4 --width 544 --height 320 --frames 51
    python -m stepvideo_core.train_lora --method dpo --pairs pairs.jsonl --out dpo.safetensors --beta 2000
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 -m stepvideo_core.train_lora --data clips/ --out my.safetensors \\
        --batch-size 2

Data (see ``training/data.py``): videos or images, each with a same-name ``.txt`` caption; clips are cut and
scaled to buckets of the model's rules and the skipped files are listed with the reason. DPO pairs: JSONL lines
``{"prompt": ..., "chosen": a.mp4, "rejected": b.mp4}``, paths relative to the JSONL file. Latents and text are
cached under ``--cache-dir`` (default: ``.stepvideo_cache`` in the data folder) and the encoders are freed before
the DiT trains. Outputs beside ``--out``: a checkpoint every ``--checkpoint-every`` steps (``--resume`` goes on
from it exactly), the loss as CSV and PNG.

Under ``torchrun`` each process takes its share of every batch (the batch size must be a multiple of the process
count) and the adapters' gradients are summed; the frozen DiT is sharded over the processes (FSDP2, as
``generate --shard-weights``) unless ``--no-shard-weights``. The same seed gives the same LoRA for any count.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .distributed import ParallelContext, ParallelPlan, init_from_environment, load_dit_sharded
from .dit import load_dit
from .generate import ModelPaths, add_model_arguments
from .lora import TARGET_MODULES
from .ops import weight_dtype_named
from .pipeline import GenerationSettings, sample_latents
from .scheduler import PRESETS
from .text_encoding import encode_prompts, load_text_encoders
from .tiny import model as tiny
from .training.cache import Encoders, build_cache, identity
from .training.data import BucketSettings, read_pairs, scan_folder
from .training.trainer import METHODS, TrainConfig, train
from .vae import load_vae
from .video_io import save_mp4, to_uint8


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stepvideo_core.train_lora", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="folder of clips (videos or images) with same-name .txt captions (SFT)")
    p.add_argument("--pairs", help="DPO preference pairs, JSONL: {\"prompt\", \"chosen\", \"rejected\"} a line")
    p.add_argument("--out", required=True, help="the LoRA file to write (.safetensors)")
    p.add_argument("--method", choices=METHODS, default=None, help="sft (default) or dpo (default with --pairs)")
    p.add_argument("--cache-dir", help="where latents and text embeddings are cached (default: .stepvideo_cache "
                                       "in the data folder)")

    m = add_model_arguments(p, "storage dtype of the frozen DiT and Step-LLM; fp8 computes in bf16")
    m.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: the GPU if there is one)")
    m.add_argument("--no-shard-weights", action="store_true", help="under torchrun: keep a whole DiT per process")

    d = p.add_argument_group("buckets")
    d.add_argument("--frames", type=int, help="most frames a clip trains with, a multiple of 17 (default 17 tiny, "
                                              "51 release)")
    d.add_argument("--width", type=int, help="bucket width; with --height sets the area buckets keep (default 128 "
                                             "tiny, 544 release)")
    d.add_argument("--height", type=int, help="bucket height (default 128 tiny, 320 release)")

    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=TrainConfig.steps)
    t.add_argument("--rank", type=int, default=TrainConfig.rank)
    t.add_argument("--alpha", type=float, help="adapter scale alpha / rank (default: alpha = rank)")
    t.add_argument("--lr", type=float, help="AdamW learning rate (default 3e-3 tiny, 1e-4 otherwise)")
    t.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    t.add_argument("--micro-batch", type=int, default=TrainConfig.micro_batch,
                   help="samples per forward pass, gradients accumulated over the batch (less memory; 0 = a "
                        "process's whole share of the batch at once)")
    t.add_argument("--seed", type=int, default=TrainConfig.seed)
    t.add_argument("--resume", action="store_true", help="go on from the checkpoint beside --out")
    t.add_argument("--checkpoint-every", type=int, default=TrainConfig.checkpoint_every)
    t.add_argument("--targets", default=",".join(TARGET_MODULES),
                   help="DiT linears that get adapters, by name ending (comma separated)")
    t.add_argument("--shift", type=float, help="time shift of every other time draw (default: the model's sampler "
                                               "preset, 3 tiny, 13 release)")
    t.add_argument("--caption-dropout", type=float, default=TrainConfig.caption_dropout,
                   help="SFT: share of captions replaced by the negative prompt, so guidance keeps working")
    t.add_argument("--beta", type=float, default=TrainConfig.beta,
                   help="DPO: -logsigmoid(-beta * margin) on per-element mean errors (the official Diffusion-DPO "
                        "code's beta_dpo is twice this)")
    t.add_argument("--motion-score", type=float, default=TrainConfig.motion_score,
                   help="TI2V DiTs: the motion score the clips train with (the clip's first frame is the image "
                        "condition); 2 = stable, 5 = the release's default")
    t.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each DiT block's activations in the backward pass (far less memory, ~1/3 slower)")
    t.add_argument("--sample-every", type=int, default=0, metavar="N",
                   help="every N steps, render each --sample-prompt with the LoRA so far (seed 0, the model's "
                        "sampler preset, the first bucket's size) to NAME.samples/; 0 = never")
    t.add_argument("--sample-prompt", action="append", default=[],
                   help="a prompt for --sample-every (repeatable; default: the first clip's caption)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def sample_every(every: int, prompts: list[str], settings: GenerationSettings, encoders: Encoders, dit, device,
                 out: Path, rank: int, say):
    """An ``on_step`` for the trainer that renders ``prompts`` with the adapters so far every ``every`` steps. The
    prompts are encoded now (the text encoders loaded once more, then dropped); the VAE is loaded for each round
    of decoding and dropped after. Every process samples (a sharded DiT needs them all); rank 0 writes the MP4s."""
    text = encoders.load_text()
    with torch.no_grad():
        positive, negative = encode_prompts(text, prompts, after="release", device=device)
    del text
    folder = Path(f"{out.with_suffix('')}.samples")

    def on_step(done: int, total: int, loss: float) -> None:
        if done % every and done != total:
            return
        with torch.no_grad():
            latents = sample_latents(dit, positive, negative, settings)
            if rank == 0:
                vae = encoders.load_vae()
                for i, video in enumerate(vae.decode(latents.to(vae.compute_dtype))):
                    save_mp4(to_uint8(video.float()), folder / f"step{done:06d}_{i}.mp4")
                del vae
                say(f"samples at step {done}: {folder}")

    return on_step


def run(args: argparse.Namespace) -> dict:
    if not args.data and not args.pairs:
        raise ValueError("give --data FOLDER (clips with captions) or --pairs FILE.jsonl (DPO)")
    method = args.method or ("dpo" if args.pairs else "sft")
    if method == "dpo" and not args.pairs:
        raise ValueError("--method dpo needs --pairs FILE.jsonl")
    args.image = None
    paths = ModelPaths.from_args(args)
    if paths.missing():
        raise FileNotFoundError(f"model part(s) not found: {', '.join(paths.missing())}. Point --model at a folder in "
                                "the official layout or give each part with --dit/--step-llm/--clip/--vae.")
    is_tiny = paths.dit.resolve() in ((tiny.TINY_DIR / "transformer").resolve(), (tiny.TI2V_DIR / "transformer").resolve())
    frames = args.frames or (tiny.SETTINGS.num_frames if is_tiny else 51)
    width = args.width or (tiny.SETTINGS.width if is_tiny else 544)
    height = args.height or (tiny.SETTINGS.height if is_tiny else 320)
    buckets = BucketSettings(frames, width, height)
    config = TrainConfig(
        method=method, steps=args.steps, rank=args.rank, alpha=args.alpha, lr=args.lr or (3e-3 if is_tiny else 1e-4),
        batch_size=args.batch_size, micro_batch=args.micro_batch, seed=args.seed, targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
        shift=args.shift or PRESETS["tiny" if is_tiny else "standard"].shift, caption_dropout=args.caption_dropout,
        beta=args.beta, checkpoint_every=args.checkpoint_every, gradient_checkpointing=args.gradient_checkpointing,
        motion_score=args.motion_score)

    group = init_from_environment(device=args.device)
    rank = group.rank if group else 0
    device = group.device if group else torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    weight_dtype = weight_dtype_named(args.weight_dtype) if args.weight_dtype != "auto" else (
        torch.float32 if device.type == "cpu" else torch.bfloat16)

    def say(msg: str) -> None:
        if rank == 0:
            print(msg, file=sys.stderr, flush=True)

    if args.pairs:
        items = read_pairs(args.pairs, buckets)
        say(f"training data: {len(items)} preference pair(s) from {args.pairs}")
        source = Path(args.pairs).parent
    else:
        report = scan_folder(args.data, buckets)
        say(report.summary())
        items = report.clips
        source = Path(args.data)
    encoders = Encoders(
        text_id=identity(paths.step_llm) + identity(paths.clip) + str(weight_dtype),
        vae_id=identity(paths.vae),
        load_text=lambda: load_text_encoders(paths.step_llm, paths.clip, weight_dtype=weight_dtype, device=device),
        load_vae=lambda: load_vae(paths.vae, dtype=torch.float32 if device.type == "cpu" else torch.bfloat16,
                                  device=device))
    cache_dir = Path(args.cache_dir) if args.cache_dir else source / ".stepvideo_cache"
    if rank == 0:  # one process encodes; the others read its files
        data = build_cache(items, cache_dir, encoders, log=say, device=device)
    if group is not None:
        torch.distributed.barrier()
        if rank != 0:
            data = build_cache(items, cache_dir, encoders, log=say, device=device)

    if group is not None and not args.no_shard_weights:
        from .dit import open_dit_checkpoint

        heads = open_dit_checkpoint(paths.dit)[0].config.num_attention_heads
        ctx = ParallelContext.build(ParallelPlan.choose(group.world_size, heads, guided=False, shard_weights=True), group)
        dit = load_dit_sharded(paths.dit, ctx, weight_dtype=weight_dtype)
        say(f"DiT block weights sharded over {group.world_size} processes (FSDP2); adapters data parallel")
    else:
        dit = load_dit(paths.dit, weight_dtype=weight_dtype, device=device)
    metadata = {"base_model": tiny.NAME if is_tiny else str(paths.dit), "data": str(args.pairs or args.data),
                "frames": str(frames), "width": str(width), "height": str(height)}
    on_step = None
    if args.sample_every > 0:
        prompts = args.sample_prompt or [items[0].prompt if args.pairs else items[0].caption]
        preset = PRESETS["tiny" if is_tiny else "standard"]
        first = items[0].chosen.bucket if args.pairs else items[0].bucket
        settings = GenerationSettings(num_frames=first.frames, height=first.height, width=first.width,
                                      steps=preset.steps, cfg=preset.cfg, shift=preset.shift, seed=0)
        on_step = sample_every(args.sample_every, prompts, settings, encoders, dit, device, Path(args.out), rank, say)
    result = train(dit, data, config, args.out, resume=args.resume, metadata=metadata, group=group, device=device,
                   progress=not args.quiet, log=say, on_step=on_step)
    say(f"saved {result.paths['lora']} ({len(result.lora.pairs)} adapted layers; loss {result.paths['csv']}, "
        f"{result.paths['plot']})")
    return {"result": result, "config": config}


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:  # DataError is a ValueError: the message names the file
        parser.exit(2, f"error: {e}\n")
    except KeyboardInterrupt:
        parser.exit(130, "interrupted\n")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
