"""``torch.compile`` of the DiT's transformer blocks, with an eager fallback.

Only the blocks are compiled (not the whole model): they hold nearly all the work, all 48 share one code path, and
the text and timestep embeddings around them see a different text length per prompt. Shapes are static
(``dynamic=False``): one video size compiles once. With ``torch._dynamo`` inlining ``nn.Module`` parameters as
graph inputs, every block reuses the first block's compiled graph.

If compilation fails (no C++ compiler or Triton, an unsupported GPU, a dynamo error), the first call logs why
and the blocks run eagerly from then on; the failed call is repeated eagerly, so a generation never stops because
of the compiler.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch

log = logging.getLogger("stepvideo")
T = TypeVar("T")


@dataclass(frozen=True)
class CompileSettings:
    backend: str = "inductor"
    mode: str | None = None  # e.g. "max-autotune-no-cudagraphs"; None = torch's default


class CompiledBlocks:
    """Compiled stand-ins for a DiT's blocks; ``run(fn)`` calls ``fn`` with them swapped in."""

    def __init__(self, dit, settings: CompileSettings | None = None):
        self.settings = settings or CompileSettings()
        self.dit = dit
        self.compiled = [torch.compile(block, backend=self.settings.backend, mode=self.settings.mode, dynamic=False)
                         for block in dit.transformer_blocks]
        self.failed: str | None = None  # why compilation failed; the blocks then stay eager

    @contextmanager
    def swapped_in(self):
        blocks = self.dit.transformer_blocks
        eager = list(blocks)
        for i, compiled in enumerate(self.compiled):
            blocks[i] = compiled
        try:
            yield
        finally:
            for i, block in enumerate(eager):
                blocks[i] = block

    def run(self, fn: Callable[[], T], is_cancel: Callable[[BaseException], bool] = lambda e: False) -> T:
        """``fn()`` with the compiled blocks; on a compile failure, log it and run ``fn()`` eagerly (now and later).
        ``is_cancel`` tells a user's cancel apart from a failure (a cancel is re-raised, never retried)."""
        if self.failed is not None:
            return fn()
        try:
            with self.swapped_in():
                return fn()
        except Exception as e:
            if is_cancel(e):
                raise
            result = fn()  # if the eager run fails too, its error is the real one and propagates
            root = e
            while (inner := getattr(root, "inner_exception", None) or root.__cause__) is not None:
                root = inner  # dynamo wraps the backend's own error
            lines = str(root).strip().splitlines()
            self.failed = f"{type(root).__name__}: {lines[0] if lines else ''}"
            log.warning("Step-Video: torch.compile of the DiT blocks failed (%s); running them without compiling. "
                        "Compiling needs a working C++ compiler on the CPU, or Triton on the GPU; set "
                        "TORCHDYNAMO_VERBOSE=1 for the full error.", self.failed)
            return result
