"""Step cache for the Step-Video DiT: skip the transformer blocks on steps where their work is predictable.

Between neighbouring sampling steps the blocks' total residual ``R = blocks(x) - x`` (token space, before the final
modulated norm) changes slowly. On a skipped step the blocks are not run; the output tokens are ``x + R_hat``
where ``R_hat`` extrapolates the last two computed residuals linearly in the noise level. The final norm,
projection and unpatchify still run with the current timestep, so a skipped step costs no block at all.

When to skip (the criterion of EasyCache, applied to the blocks' input tokens): over the last two computed steps
the cache measures the transformation rate ``k = |dR| / |dx|`` (mean absolute changes). On a later step it
predicts the relative change of the residual as ``k * |x - x_last| / |R_last|`` and adds it to a running sum;
while the sum stays below ``threshold`` the step is skipped, otherwise the blocks run and the sum restarts.
Chosen by measurement (README, "Faster sampling on one GPU"): at equal block savings this kept the decoded video
closer to the uncached one than reusing the last residual unchanged, and unlike a TeaCache-style criterion (the
relative change of the first block's modulated input) its error grows steadily with the threshold. The comparison
with core EasyCache is ``bench/bench_step_cache.py``.

Only the first ``start`` and after the ``end`` fraction of the steps always compute (the layout is settled early).

It plugs into the DiT through the per-block replacement hook (``StepVideoDiT.run_blocks``), so one mechanism
serves ComfyUI (``nodes/cache_nodes.py``) and the core pipeline::

    cache = StepCache(StepCacheSettings(threshold=0.2))
    latents = sample_latents(dit, pos, neg, settings, transformer_options=cache.transformer_options(dit))
    print(cache.stats.summary())

It reads the keys ComfyUI sets on every model call, which ``pipeline.sample_latents`` sets the same way:
``"sigmas"`` (the current noise level per sample, 1 = noise) and ``"sample_sigmas"`` (the whole schedule), and,
when ComfyUI splits a guided batch into several calls, ``"cond_or_uncond"``: each kind of call keeps its own state.
A run starts afresh when the first step of the schedule comes round again (or after ``reset()``), so a cancelled
run leaves nothing behind. Memory: two residuals and a strided sample of the input per call kind, i.e. about twice
the size of the blocks' activations ``[b, tokens, D]``, kept on the compute device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

OPTIONS_KEY = "stepvideo_step_cache"  # where the cache sits in transformer_options
BLOCK_KEY = "double_block"  # the per-block replacement key of the DiT's blocks (see StepVideoDiT.run_blocks)
SAMPLE_STRIDE = 8  # the skip criterion reads every 8th token (as EasyCache subsamples), which is enough for a mean
# Set by the distributed package when the tokens are sharded over ranks: averages a statistic over the ranks that share the
# tokens, so that all of them take the same skip decision (a rank that skipped while another ran the blocks would
# leave the other waiting in the blocks' all-to-alls).
GROUP_MEAN_KEY = "stepvideo_group_mean"


def _mean_abs(t: torch.Tensor, options: dict) -> torch.Tensor:
    mean = t.abs().mean()
    group_mean = options.get(GROUP_MEAN_KEY)
    return mean if group_mean is None else group_mean(mean)


@dataclass(frozen=True)
class StepCacheSettings:
    # Skip while the predicted relative change of the blocks' residual stays below this. 0.2, not the 0.3 first
    # chosen: on the tiny model once it had learnt motion, 0.3 kept 23 dB of the uncached video and lost half its
    # motion, where 0.2 kept 38 dB and every oracle check (docs/speed-and-caching.md); on the tiny DiT of phase 13
    # it keeps 28 dB and every check, and 0.15 keeps 41 dB at 2.27x instead of 2.63x fewer block evaluations.
    threshold: float = 0.2
    start: float = 0.1  # fraction of the steps that always compute first
    end: float = 1.0  # fraction of the steps after which every step computes

    def __post_init__(self):
        if self.threshold < 0:
            raise ValueError(f"step cache threshold must be >= 0 (0 turns caching off), got {self.threshold}")
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"step cache start/end must satisfy 0 <= start <= end <= 1, got {self.start}, {self.end}")


@dataclass
class StepCacheStats:
    forward_passes: int = 0  # DiT calls seen
    computed: int = 0  # calls whose blocks ran
    block_evaluations: int = 0
    blocks_per_pass: int = 0

    @property
    def skipped(self) -> int:
        return self.forward_passes - self.computed

    def summary(self) -> str:
        total = self.forward_passes * self.blocks_per_pass
        ratio = total / self.block_evaluations if self.block_evaluations else 1.0
        return (f"step cache: {self.computed} of {self.forward_passes} DiT forward passes ran their blocks "
                f"({self.skipped} reused), {self.block_evaluations}/{total} block evaluations ({ratio:.2f}x fewer)")


@dataclass
class _CallState:
    """What one kind of call (a batch shape, cond/uncond split) remembers between steps."""

    x_sample: torch.Tensor | None = None  # strided block input at the last computed step
    dx: torch.Tensor | None = None  # mean |x change| between the last two computed steps
    residuals: list[tuple[float, torch.Tensor]] = field(default_factory=list)  # (sigma, R) of the last two computed
    rate: float | None = None  # k = |dR| / |dx| between the last two computed steps
    accumulated: float = 0.0
    skip: bool = False  # this call's decision, read by the blocks after the first
    sigma: float = 0.0
    x_in: torch.Tensor | None = None  # this call's block input, kept to form R when the blocks run


class StepCache:
    """One sampling run's cache state; see the module docstring. Not shared between concurrent runs."""

    def __init__(self, settings: StepCacheSettings | None = None):
        self.settings = settings or StepCacheSettings()
        self.stats = StepCacheStats()
        self._calls: dict[tuple, _CallState] = {}

    def reset(self) -> None:
        self._calls.clear()

    def transformer_options(self, dit_or_blocks, base: dict | None = None) -> dict:
        """``base`` (default empty) plus this cache and a replacement for every block of the DiT (or block count)."""
        blocks = dit_or_blocks if isinstance(dit_or_blocks, int) else dit_or_blocks.config.num_layers
        options = dict(base or {})
        patches = dict(options.get("patches_replace", {}))
        dit_patches = dict(patches.get("dit", {}))
        for i in range(blocks):
            if (BLOCK_KEY, i) in dit_patches:
                raise ValueError(f"block {i} already has a replacement patch; the step cache needs every block")
            dit_patches[(BLOCK_KEY, i)] = step_cache_block
        patches["dit"] = dit_patches
        options["patches_replace"] = patches
        options[OPTIONS_KEY] = self
        self.stats.blocks_per_pass = blocks
        return options

    # -- called by step_cache_block -------------------------------------------------------------------------------

    def _begin(self, x: torch.Tensor, options: dict) -> bool:
        """At block 0: decide whether this call skips its blocks."""
        sigma = float(options["sigmas"].reshape(-1)[0])
        schedule = options.get("sample_sigmas")
        if schedule is None:
            raise ValueError("the step cache needs transformer_options['sample_sigmas'] (the sampling schedule); "
                             "ComfyUI's samplers and stepvideo_core.pipeline.sample_latents set it")
        index = int((schedule.to(torch.float32).cpu() - sigma).abs().argmin())
        progress = index / max(len(schedule) - 1, 1)
        key = (tuple(options.get("cond_or_uncond", ())), tuple(x.shape))
        if index == 0:
            self._calls.pop(key, None)  # a new run
        state = self._calls.setdefault(key, _CallState())
        self.stats.forward_passes += 1
        state.sigma, state.x_in = sigma, x
        sample = x[:, ::SAMPLE_STRIDE].float()
        s = self.settings
        state.skip = False
        if s.threshold > 0 and s.start <= progress < s.end and state.rate is not None:
            change = _mean_abs(sample - state.x_sample, options)
            state.accumulated += float(state.rate * change / _mean_abs(state.residuals[-1][1], options).float())
            state.skip = state.accumulated < s.threshold
        if state.skip:
            state.x_in = None
            return True
        state.accumulated = 0.0
        if state.x_sample is not None:
            state.dx = _mean_abs(sample - state.x_sample, options)
        state.x_sample = sample
        self.stats.computed += 1
        return False

    def _state(self, x: torch.Tensor, options: dict) -> _CallState:
        return self._calls[(tuple(options.get("cond_or_uncond", ())), tuple(x.shape))]

    def _reused(self, x: torch.Tensor, state: _CallState) -> torch.Tensor:
        (s2, r2), (s1, r1) = state.residuals if len(state.residuals) == 2 else (state.residuals * 2)
        if s1 == s2:
            return x + r1
        return x + r1 + (state.sigma - s1) / (s1 - s2) * (r1 - r2)

    def _computed(self, out: torch.Tensor, state: _CallState, options: dict) -> None:
        residual = out - state.x_in
        if state.residuals and state.dx is not None and state.dx > 0:
            state.rate = float(_mean_abs(residual - state.residuals[-1][1], options).float() / state.dx)
        state.residuals = [*state.residuals[-1:], (state.sigma, residual)]
        state.x_in = None


def step_cache_block(args: dict, extra: dict) -> dict:
    """The replacement installed on every block: block 0 decides, skipped calls pass tokens through until the last
    block adds the extrapolated residual; computed calls run the block and the last one records the residual."""
    options = args["transformer_options"]
    cache: StepCache = options[OPTIONS_KEY]
    x, i = args["img"], args["block_index"]
    last = i == cache.stats.blocks_per_pass - 1
    skip = cache._begin(x, options) if i == 0 else cache._state(x, options).skip
    if skip:
        return {"img": cache._reused(x, cache._state(x, options)) if last else x}
    cache.stats.block_evaluations += 1
    out = extra["original_block"](args)
    if last:
        cache._computed(out["img"], cache._state(x, options), options)
    return out
