"""Text to video from the command line: the built-in Step-Video-Tiny (default) or the official release.

    python -m stepvideo_core.generate "a blue square moves right"                  # Step-Video-Tiny on the CPU
    python -m stepvideo_core.generate "红色的圆形向左移动" --seed 7 --out outputs
    python -m stepvideo_core.generate "一只熊猫在竹林里吃竹子" --model models/stepvideo/stepvideo-t2v \\
        --weight-dtype fp8 --frames 136 --tile-size 16                           # the 30B release on one GPU
    python -m stepvideo_core.generate --image start.png "a red circle moves to the right"   # image to video:
        # Step-Video-Tiny TI2V by default, the TI2V release with --model models/stepvideo/stepvideo-ti2v
    python -m stepvideo_core.generate --prompts prompts.txt --out gallery     # one prompt a line: a video each and
        # gallery/index.html; models load once, a rerun renders only what is missing
    torchrun --standalone --nproc-per-node 4 -m stepvideo_core.generate "..." --model ... --shard-weights
    python -m stepvideo_core.generate "a red circle moves left" --dit tiny_q8.gguf --preset tiny   # a GGUF DiT
    python -m stepvideo_core.generate --plan --gpu-memory 24 --ram 64       # what fits a 24 GB GPU with 64 GB RAM

Under ``torchrun`` the same command splits one generation over the processes (see ``distributed/``): guidance
parallel when the count is even, sequence parallel over the video tokens, optionally the DiT's block weights
sharded (``--shard-weights``), and the VAE's chunks decoded on different ranks. Step-LLM and CLIP run once on
rank 0; rank 0 writes the outputs. The seed gives the same latents for any number of processes.

Encoded prompts are kept in a text cache (``--text-cache``, by default under the user's cache folder), so a prompt
encoded once never loads Step-LLM again. ``--prompts`` runs in one process.

Step-Video-Tiny knows a small world: circles, squares and triangles in red, green, blue, yellow, purple or
orange, moving left, right, up or down, growing, shrinking or standing still, on black, white or gray. Any
prompt is accepted, in English or Chinese; prompts outside that world give something from inside it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import distributed
from .attention import BACKENDS, get_attention
from .batch import INDEX_NAME, GalleryItem, gallery_html, output_stem, read_prompts, write_if_changed
from .dit import load_dit, open_dit_checkpoint, resolve_compute_dtype
from .image_condition import DEFAULT_MOTION_SCORE, image_condition
from .loading import check_device
from .ops import WEIGHT_DTYPE_ALIASES, WEIGHT_DTYPES, weight_dtype_named
from .pipeline import GenerationSettings, sample_latents
from .scheduler import DEFAULT_PRESET, DEFAULT_SEED, PRESETS, check_settings, guidance_on
from .step_cache import StepCache, StepCacheSettings
from .text_cache import CLI_MAX_BYTES, TextEmbeddingCache, default_folder, encode_prompts_cached, encoder_identity
from .text_encoding import load_text_encoders, magic_suffixes
from .tiny import model as tiny
from .vae import load_vae
from .video_io import contact_sheet, load_image, save_mp4, save_png, to_uint8
from .video_shape import check_request

RELEASE = GenerationSettings()  # the release's defaults (size, preset, seed)
DEFAULT_PROMPT = "a blue square moves right"


@dataclass(frozen=True)
class ModelPaths:
    """The four parts, as laid out in the official download (``transformer/``, ``step_llm/``, ...)."""

    dit: Path
    step_llm: Path
    clip: Path
    vae: Path

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ModelPaths:
        root = Path(args.model)
        dit = args.dit or root / "transformer"
        if args.image and args.dit is None and root.resolve() == tiny.TINY_DIR.resolve():
            dit = tiny.TI2V_DIR / "transformer"  # the built-in model's image-to-video DiT, which shares the rest
        return cls(Path(dit), Path(args.step_llm or root / "step_llm"),
                   Path(args.clip or root / "hunyuan_clip"), Path(args.vae or root / "vae" / "vae_v2.safetensors"))

    def missing(self) -> list[str]:
        return [f"{name} ({path})" for name, path in vars(self).items() if not path.exists()]



def add_model_arguments(parser: argparse.ArgumentParser, dtype_help: str):
    """The model-part options every command shares (``ModelPaths.from_args`` reads them); returns the group so a
    command can add its own."""
    m = parser.add_argument_group("model")
    m.add_argument("--model", default=str(tiny.TINY_DIR),
                   help="folder in the official layout: transformer/, step_llm/, hunyuan_clip/, vae/vae_v2.safetensors "
                        "(default: the built-in Step-Video-Tiny)")
    m.add_argument("--dit", help="DiT folder, .safetensors or .gguf file (overrides --model's transformer/)")
    m.add_argument("--step-llm", help="Step-LLM folder or .gguf file (tokenizer beside it; overrides --model's step_llm/)")
    m.add_argument("--clip", help="Hunyuan-CLIP folder (overrides --model's hunyuan_clip/)")
    m.add_argument("--vae", help="VAE file (overrides --model's vae/vae_v2.safetensors)")
    m.add_argument("--weight-dtype", choices=("auto", *WEIGHT_DTYPES, *WEIGHT_DTYPE_ALIASES), default="auto",
                   help=f"{dtype_help}; for a .gguf, the compute dtype (its weights stay quantized) (auto: fp32 on the "
                        "CPU, bf16 on a GPU)")
    return m

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stepvideo_core.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", help=f"what to render (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--prompts", metavar="FILE",
                   help="render every prompt of a text file (one a line, UTF-8; blank and '#' lines skipped) with the "
                        "models loaded once; writes an MP4 and PNG per prompt and index.html, and a rerun skips "
                        "the prompts already rendered with the same settings")
    p.add_argument("--negative", default=None, help="negative prompt (the official negative suffix is appended)")

    m = add_model_arguments(p, "DiT and Step-LLM storage dtype; fp8 (= fp8_e4m3fn) stores e4m3 and computes in bf16")
    m.add_argument("--attention", choices=BACKENDS, default="sdpa", help="attention back-end of the DiT")
    m.add_argument("--ff-chunk-size", type=int, default=0,
                   help="low-memory path: run the DiT's feed-forward over at most this many tokens at a time "
                        "(e.g. 8192; 0 = all at once)")
    m.add_argument("--lora", help="a LoRA file for the DiT (e.g. models/loras/step-video-tiny-dpo.safetensors)")
    m.add_argument("--lora-strength", type=float, default=1.0)
    m.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: the GPU if there is one; under torchrun the "
                                    "GPU numbered LOCAL_RANK)")

    s = p.add_argument_group("sampling")
    s.add_argument("--preset", choices=tuple(PRESETS),
                   help=f"steps/cfg/shift preset (default: tiny for Step-Video-Tiny, {DEFAULT_PRESET} otherwise); "
                        + ", ".join(f"{k}: {v.steps} steps, cfg {v.cfg:g}, shift {v.shift:g}" for k, v in PRESETS.items()))
    s.add_argument("--width", type=int, help=f"pixels, a multiple of 16 (default {tiny.SETTINGS.width} tiny, "
                                              f"{RELEASE.width} release)")
    s.add_argument("--height", type=int, help=f"pixels, a multiple of 16 (default {tiny.SETTINGS.height} tiny, "
                                               f"{RELEASE.height} release)")
    s.add_argument("--frames", type=int, help=f"a multiple of 17 (default {tiny.SETTINGS.num_frames} tiny, "
                                               f"{RELEASE.num_frames} release)")
    s.add_argument("--steps", type=int, help="overrides the preset's steps")
    s.add_argument("--cfg", type=float, help="overrides the preset's guidance scale")
    s.add_argument("--shift", type=float, help="overrides the preset's time shift")
    s.add_argument("--seed", type=int, default=DEFAULT_SEED)

    sp = p.add_argument_group("speed")
    sp.add_argument("--cache", type=float, metavar="THRESHOLD",
                    help="step cache: skip the DiT's blocks on steps whose change it predicts to stay below THRESHOLD "
                         "(e.g. 0.3; more skips as it grows); prints how many DiT passes ran their blocks")

    i = p.add_argument_group("image to video (Step-Video-TI2V)")
    i.add_argument("--image", help="start image (PNG, JPEG, ...): scaled to cover the video size, centre-cropped, "
                                   "and used as the first frame; needs a TI2V DiT (the built-in one by default)")
    i.add_argument("--motion-score", type=float, default=DEFAULT_MOTION_SCORE,
                   help="how much moves: 2 = stable, 5 = default, 10 = strong camera motion, 20 = intense")

    d = p.add_argument_group("decoding")
    d.add_argument("--tile-size", type=int, help="decode in spatial tiles of this many latents (16 = 256 px) to "
                                                 "bound memory; default: whole frames")
    d.add_argument("--tile-overlap", type=int, default=4, help="latents shared by neighbouring tiles")

    o = p.add_argument_group("output")
    o.add_argument("--out", default="outputs", help="folder for the MP4 and the PNG contact sheet (and, with "
                                                    "--prompts, index.html)")
    o.add_argument("--text-cache", default=str(default_folder()), metavar="DIR",
                   help="keep encoded prompts here, so a prompt encoded once never loads Step-LLM again "
                        "(default: %(default)s)")
    o.add_argument("--text-cache-size", type=float, default=CLI_MAX_BYTES / (1 << 30), metavar="GB",
                   help="at most this many GiB in the text cache, least recently used out first (default "
                        "%(default)g: 250 release prompts at 8.2 MB each in bf16)")
    o.add_argument("--no-text-cache", action="store_true", help="encode every prompt, keep nothing on disk")
    o.add_argument("--out-latents", help="also save the final latents [b, F, C, h, w] (fp32) as safetensors "
                                         "under the key 'latents'")

    fit = p.add_argument_group("what fits (no model is loaded)")
    fit.add_argument("--plan", action="store_true",
                     help="print which precision of the DiT and Step-LLM fits this machine, how much is offloaded, the "
                          "peak VRAM and RAM (projected from the model and stepvideo_core.memory) for --frames/--width/"
                          "--height (default: the release's 992x544, 204 frames), and exit")
    fit.add_argument("--gpu-memory", type=float, metavar="GB", help="GPU memory for --plan (default: this GPU's)")
    fit.add_argument("--ram", type=float, metavar="GB", help="system RAM for --plan (default: this machine's)")

    par = p.add_argument_group("several processes (under torchrun)")
    par.add_argument("--guidance-parallel", choices=("auto", "on", "off"), default="auto",
                     help="run the conditional and unconditional branches on different ranks (auto: when the "
                          "process count is even and cfg != 1)")
    par.add_argument("--ulysses", type=int, help="Ulysses degree of sequence parallel (default: the largest that "
                                                 "divides both the ranks per branch and the head count; ring "
                                                 "attention covers the rest)")
    par.add_argument("--sp-attention", choices=distributed.SP_ATTENTION, default="torch",
                     help="who computes sequence-parallel attention: torch (built in) or yunchang (xDiT's USP "
                          "kernels; pip install yunchang)")
    par.add_argument("--shard-weights", action="store_true",
                     help="shard the DiT's block weights over all ranks (FSDP2), for GPUs too small to hold it")
    return p


def resolve_settings(args: argparse.Namespace, is_tiny: bool) -> GenerationSettings:
    """Preset, then explicit values; the request is checked with the nodes' rules and messages, and the other
    numbers before anything loads."""
    preset = PRESETS[args.preset or ("tiny" if is_tiny else DEFAULT_PRESET)]
    size = tiny.SETTINGS if is_tiny else RELEASE
    width, height, frames = size.width, size.height, size.num_frames
    settings = GenerationSettings(
        num_frames=frames if args.frames is None else args.frames,
        height=height if args.height is None else args.height,
        width=width if args.width is None else args.width,
        steps=preset.steps if args.steps is None else args.steps,
        cfg=preset.cfg if args.cfg is None else args.cfg,
        shift=preset.shift if args.shift is None else args.shift,
        seed=args.seed,
    )
    check_request(settings.width, settings.height, settings.num_frames)
    check_settings(settings.steps, settings.cfg, settings.shift)  # ranges and NaN/inf, naming the value
    if args.tile_size is not None and (args.tile_size < 1 or args.tile_overlap < 0 or 2 * args.tile_overlap > args.tile_size):
        raise ValueError(f"--tile-size {args.tile_size} / --tile-overlap {args.tile_overlap}: need tiles of at least "
                         "1 latent and an overlap of at most half a tile (e.g. --tile-size 16 --tile-overlap 4)")
    if args.cache is not None:
        StepCacheSettings(threshold=args.cache)  # raises on a negative threshold, naming it
    if not args.text_cache_size > 0:
        raise ValueError(f"--text-cache-size {args.text_cache_size} must be a positive number of GiB "
                         "(or use --no-text-cache)")
    if args.ff_chunk_size < 0:
        raise ValueError(f"--ff-chunk-size {args.ff_chunk_size} must be 0 (all tokens at once) or a token count")
    return settings


def pick_device(args: argparse.Namespace, group: distributed.DistributedGroup | None) -> torch.device:
    if group is not None:
        return group.device
    if args.device:
        return check_device(args.device)  # names the devices this machine has
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def step_progress(enabled: bool, total: int, desc: str):
    """A tqdm bar (steps, time per step, ETA) fed by a ``callback(done, total, ...)``; silent when disabled."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True)

    def callback(done, _total, *_):
        bar.update(done - bar.n)

    return bar, callback


@dataclass(frozen=True)
class PromptJob:
    """One prompt's video: its files are named by everything that changes it (``batch.output_stem``)."""

    prompt: str
    mp4: Path
    png: Path

    def done(self) -> bool:
        return self.mp4.is_file() and self.png.is_file()  # both are written whole (renamed into place), PNG last


def output_settings(args: argparse.Namespace, paths: ModelPaths, settings: GenerationSettings,
                    weight_dtype: torch.dtype) -> dict:
    """Every setting besides the prompt that changes the video (file identities by path, size and mtime)."""
    return {
        "negative": args.negative, "seed": settings.seed,
        "size": [settings.width, settings.height, settings.num_frames],
        "sampler": [settings.steps, settings.cfg, settings.shift],
        "model": encoder_identity([paths.dit, paths.step_llm, paths.clip, paths.vae]),
        "weight_dtype": str(weight_dtype), "attention": args.attention,
        "lora": [encoder_identity([args.lora]), args.lora_strength] if args.lora else None,
        "image": [encoder_identity([args.image]), args.motion_score] if args.image else None,
        "step_cache": args.cache, "tiles": [args.tile_size, args.tile_overlap],
    }


def encode_all(args: argparse.Namespace, paths: ModelPaths, prompts: list[str], weight_dtype: torch.dtype,
               compute_dtype: torch.dtype, device: torch.device, magic: bool | str, negative_magic: bool | str
               ) -> dict[str, tuple]:
    """Every prompt's (positive, negative) on the CPU, through the text cache: the encoders load on the first
    prompt not in the cache (never, when all are) and are released before the DiT loads."""
    store = None if args.no_text_cache else TextEmbeddingCache(args.text_cache,
                                                               max_bytes=int(args.text_cache_size * (1 << 30)))
    identity = encoder_identity([paths.step_llm, paths.clip], llm_dtype=weight_dtype)
    loaded = []

    def encoders():
        if not loaded:
            loaded.append(load_text_encoders(paths.step_llm, paths.clip, weight_dtype=weight_dtype, device=device))
        return loaded[0]

    states, hits = {}, 0
    for prompt in prompts:
        pos, neg, hit = encode_prompts_cached(store, identity, encoders, prompt, args.negative, positive_magic=magic,
                                              negative_magic=negative_magic, device=device, dtype=compute_dtype,
                                              after="keep")
        states[prompt] = (pos.to("cpu"), neg.to("cpu"))
        hits += hit
    if loaded:
        loaded.pop().release()
    if store is not None and len(prompts) > 1:
        print(f"text: {hits} of {len(prompts)} prompts from the text cache ({store.folder})", file=sys.stderr)
    return states


def run(args: argparse.Namespace) -> dict:
    """Generate the one prompt ``args`` give; returns what was written (on rank 0) and the latents."""
    return render(args, [args.prompt or DEFAULT_PROMPT], skip_existing=False)["videos"][0]


def run_batch(args: argparse.Namespace) -> dict:
    """Every prompt of ``args.prompts`` (models loaded once); the prompts whose outputs exist are skipped. Returns
    ``videos`` (what was rendered), ``skipped`` (the jobs found done) and ``index`` (the gallery page)."""
    if args.prompt is not None:
        raise ValueError("give either a prompt or --prompts FILE, not both")
    if args.out_latents:
        raise ValueError("--out-latents saves one prompt's latents: leave it out with --prompts")
    prompts = read_prompts(args.prompts)
    done = render(args, prompts, skip_existing=True)
    title = f"Step-Video: {len(done['jobs'])} prompts from {Path(args.prompts).name}"
    page = gallery_html(title, [GalleryItem(j.prompt, j.mp4, j.png) for j in done["jobs"] if j.done()],
                        Path(args.out), done["settings_line"])
    done["index"] = Path(args.out) / INDEX_NAME
    if write_if_changed(done["index"], page):
        print(f"gallery: {done['index']}")
    return done


def render(args: argparse.Namespace, prompts: list[str], skip_existing: bool) -> dict:
    """Load the models once and render every prompt (rank 0 writes the files): all prompts are encoded first and
    the text encoders released, then the DiT (and the VAE) load and each video is sampled, decoded and written."""
    start = time.perf_counter()
    paths = ModelPaths.from_args(args)
    if paths.missing():
        raise FileNotFoundError(f"model part(s) not found: {', '.join(paths.missing())}. Point --model at a folder in the "
                                "official layout (transformer/, step_llm/, hunyuan_clip/, vae/vae_v2.safetensors) or "
                                "give each part with --dit/--step-llm/--clip/--vae.")
    is_tiny = paths.dit.resolve() in ((tiny.TINY_DIR / "transformer").resolve(), (tiny.TI2V_DIR / "transformer").resolve())
    settings = resolve_settings(args, is_tiny)
    group = distributed.init_from_environment(device=args.device)
    if group is not None and len(prompts) > 1:
        raise ValueError("--prompts runs in one process: launch it without torchrun")
    device = pick_device(args, group)
    rank = group.rank if group else 0
    weight_dtype = weight_dtype_named(args.weight_dtype) if args.weight_dtype != "auto" else (
        torch.float32 if device.type == "cpu" else torch.bfloat16)
    compute_dtype = resolve_compute_dtype(weight_dtype, None)

    out = Path(args.out)
    key = output_settings(args, paths, settings, weight_dtype)
    tag = "tiny" if is_tiny else "stepvideo"
    jobs = []
    for prompt in dict.fromkeys(prompts):  # a prompt given twice is rendered once
        stem = output_stem(tag, prompt, key)
        jobs.append(PromptJob(prompt, out / f"{stem}.mp4", out / f"{stem}.png"))
    todo = [j for j in jobs if not (skip_existing and j.done())]
    result = {"videos": [], "jobs": jobs, "skipped": [j for j in jobs if j not in todo],
              "settings_line": f"{settings.width}x{settings.height}, {settings.num_frames} frames, {settings.steps} "
                               f"steps, cfg {settings.cfg:g}, shift {settings.shift:g}, seed {settings.seed}; model "
                               f"{args.model}" + (f"; LoRA {args.lora} x {args.lora_strength:g}" if args.lora else "")}
    if result["skipped"] and rank == 0:
        print(f"{len(result['skipped'])} of {len(jobs)} prompts already rendered with these settings in {out}: "
              "skipped", file=sys.stderr)
    if not todo:
        return result

    ctx = None
    if group is not None:
        heads = open_dit_checkpoint(paths.dit)[0].config.num_attention_heads  # shapes only, nothing loaded
        plan = distributed.ParallelPlan.choose(
            group.world_size, heads, guided=guidance_on(settings.cfg),
            guidance_parallel={"auto": None, "on": True, "off": False}[args.guidance_parallel],
            ulysses=args.ulysses, shard_weights=args.shard_weights, attention=args.sp_attention)
        ctx = distributed.ParallelContext.build(plan, group)
        if rank == 0:
            print(f"parallel: {plan.describe()}", file=sys.stderr)
    elif args.shard_weights:
        print("--shard-weights has no effect in one process; launch with torchrun to shard over several", file=sys.stderr)

    # Text: every prompt encoded (on rank 0) and the encoders released before the DiT loads; the other ranks load
    # their DiT meanwhile and receive the conditioning after.
    states = {}
    if rank == 0:
        # The release's TI2V run appends its own magic pair; Step-Video-Tiny TI2V keeps the T2V pair it learnt.
        magic = magic_suffixes("ti2v" if args.image and not is_tiny else "t2v")
        states = encode_all(args, paths, [j.prompt for j in todo], weight_dtype, compute_dtype, device, *magic)

    if ctx is not None and ctx.plan.shard_weights:
        dit = distributed.load_dit_sharded(paths.dit, ctx, weight_dtype=weight_dtype, ff_chunk_size=args.ff_chunk_size)
    else:
        dit = load_dit(paths.dit, weight_dtype=weight_dtype, device=device, ff_chunk_size=args.ff_chunk_size)
    dit.set_attention(get_attention(args.attention))
    if args.lora:
        from .lora import attach, load_lora

        lora = load_lora(args.lora, dit)
        attach(dit, lora, args.lora_strength)
        if rank == 0:
            print(f"{lora.summary()} ({args.lora}, strength {args.lora_strength})", file=sys.stderr)

    vae_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    vae = None
    condition = None
    if args.image:
        vae = load_vae(paths.vae, dtype=vae_dtype, device=device)
        if rank == 0:  # encoded once; under torchrun the other ranks receive it
            condition = image_condition(vae, load_image(args.image), settings.num_frames, settings.height,
                                        settings.width, motion_score=args.motion_score,
                                        generator=torch.Generator(device=device).manual_seed(args.seed))
        if ctx is not None:
            condition = distributed.broadcast_image_condition(condition, ctx)

    for number, job in enumerate(todo, 1):
        positive, negative = states.get(job.prompt, (None, None))
        if ctx is not None:
            positive, negative = distributed.broadcast_conditioning(positive, negative, ctx)
        cache = StepCache(StepCacheSettings(threshold=args.cache)) if args.cache is not None else None
        options = cache.transformer_options(dit) if cache is not None else None
        where = f"[{number}/{len(todo)}] sampling" if len(todo) > 1 else "sampling"
        bar, callback = step_progress(rank == 0, settings.steps, where)
        with torch.no_grad(), bar:
            if ctx is None:
                latents = sample_latents(dit, positive, negative, settings, callback=callback,
                                         transformer_options=options, image=condition)
            else:
                latents = distributed.sample_latents(dit, ctx, positive, negative, settings, callback=callback,
                                                     transformer_options=options, image=condition)
        if job is todo[-1]:
            del dit  # the last video: free the DiT before the VAE decodes
        if cache is not None and rank == 0:
            print(cache.stats.summary(), file=sys.stderr)

        written = {"latents": latents}
        if rank == 0 and args.out_latents:
            from safetensors.torch import save_file

            Path(args.out_latents).parent.mkdir(parents=True, exist_ok=True)
            save_file({"latents": latents.float().cpu().contiguous()}, args.out_latents)
            written["out_latents"] = Path(args.out_latents)

        if vae is None:
            vae = load_vae(paths.vae, dtype=vae_dtype, device=device)
        decode_kwargs = {"tile_size": args.tile_size, "tile_overlap": args.tile_overlap}
        with torch.no_grad():
            z = latents.to(vae.compute_dtype)
            video = vae.decode(z, **decode_kwargs) if ctx is None else distributed.decode(vae, z, ctx, **decode_kwargs)
        if rank == 0:
            frames = to_uint8(video[0].float())
            written["mp4"] = write_whole(job.mp4, save_mp4, frames)
            written["png"] = write_whole(job.png, save_png, contact_sheet(frames))
            print(f"{job.prompt!r}: {len(frames)} frames {settings.width}x{settings.height} in "
                  f"{time.perf_counter() - start:.1f} s -> {written['mp4']}, {written['png']}"
                  + (f", latents {written['out_latents']}" if "out_latents" in written else ""))
        result["videos"].append(written)
    return result


def write_whole(path: Path, save, pixels) -> Path:
    """``save(pixels, temporary path)`` then rename it to ``path``, so an interrupted run leaves no partial file
    that a rerun would take for done."""
    tmp = path.with_name(f".partial_{path.name}")
    save(pixels, tmp)
    os.replace(tmp, path)
    return path


def print_plan(args: argparse.Namespace) -> None:
    """``--plan``: the fit plan for the given (or this machine's) GPU memory and RAM."""
    from .fit_plan import plan

    gpu = args.gpu_memory
    if gpu is None:
        if not torch.cuda.is_available():
            raise ValueError("--plan: no GPU is visible here; give the GPU's memory with --gpu-memory GB")
        gpu = torch.cuda.get_device_properties(0).total_memory / 1e9
    ram = args.ram if args.ram is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    if gpu <= 0 or ram <= 0:
        raise ValueError(f"--plan: --gpu-memory {gpu} and --ram {ram} must be positive sizes in GB")
    release = GenerationSettings()
    print(plan(gpu, ram, width=args.width or release.width, height=args.height or release.height,
               frames=args.frames or release.num_frames).describe())


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.plan:
            print_plan(args)
            return
        run_batch(args) if args.prompts else run(args)
    except (ValueError, FileNotFoundError) as e:  # bad values and missing files: the message, without a traceback
        parser.exit(2, f"error: {e}\n")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
