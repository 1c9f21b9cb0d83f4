"""torch.compile of the DiT blocks (``stepvideo_core/compile.py``): compiled equals eager, and a compiler failure
falls back to eager with a message instead of stopping the run."""

import logging

import pytest
import torch

from stepvideo_core.compile import CompiledBlocks, CompileSettings
from tests.builders import small_dit, text_inputs


def call(dit):
    x = torch.randn(2, 2, 4, 2, 3, generator=torch.Generator().manual_seed(0))
    llm, mask, clip = text_inputs(2, 6, (24, 12), (2, 6))
    with torch.no_grad():
        return dit(x, torch.tensor([0.2, 0.6]), llm, mask, clip)


@pytest.mark.slow
def test_compiler_failure_falls_back_to_eager_with_a_message(caplog):
    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("no C++ compiler in this test")

    dit = small_dit(layers=2)
    eager = call(dit)
    compiled = CompiledBlocks(dit, CompileSettings(backend=broken_backend))
    with caplog.at_level(logging.WARNING, logger="stepvideo"):
        out = compiled.run(lambda: call(dit))
    assert torch.equal(out, eager)
    assert "no C++ compiler in this test" in compiled.failed
    assert "torch.compile of the DiT blocks failed" in caplog.text and "running them without compiling" in caplog.text
    assert torch.equal(compiled.run(lambda: call(dit)), eager)  # later calls go straight to eager
    assert all(type(b).__name__ == "TransformerBlock" for b in dit.transformer_blocks)  # eager blocks back in place


def test_cancel_is_not_taken_for_a_compiler_failure():
    class Cancelled(Exception):
        pass

    def cancelled():
        raise Cancelled

    compiled = CompiledBlocks(small_dit(layers=1), CompileSettings(backend="eager"))
    with pytest.raises(Cancelled):
        compiled.run(cancelled, is_cancel=lambda e: isinstance(e, Cancelled))
    assert compiled.failed is None


@pytest.mark.slow
def test_inductor_compiled_blocks_match_eager():
    """fp32 on the CPU: inductor reorders reductions; bench/bench_compile.py measured a max difference of 3.0e-7 of
    the output's magnitude (512 wide, 4 blocks, 768 tokens), so 1e-5 is allowed."""
    from torch._dynamo.utils import counters
    from torch._inductor.compile_fx import compile_fx

    graphs, runs = [], []

    def inductor(graph_module, example_inputs):  # inductor itself, counting what it compiles and each run of it
        graphs.append(graph_module)
        compiled_fn = compile_fx(graph_module, example_inputs)

        def run(*args):
            runs.append(1)
            return compiled_fn(*args)

        return run

    torch._dynamo.reset()
    counters.clear()
    dit = small_dit(layers=3)
    eager = call(dit)
    compiled = CompiledBlocks(dit, CompileSettings(backend=inductor))
    out = compiled.run(lambda: call(dit))
    assert compiled.failed is None
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    # compile.py's promise: one graph, compiled once, serves every block (parameters are graph inputs) ...
    assert len(graphs) == 1 and counters["stats"]["unique_graphs"] == 1
    # ... and each of the 3 blocks ran through it, twice over for a second call without compiling again
    assert len(runs) == 3
    compiled.run(lambda: call(dit))
    assert len(runs) == 6 and len(graphs) == 1
