"""The fit plan behind ``generate --plan``: weight sizes from the released shapes, and choices that respect the
machine (more memory never gives a lower precision; what does not fit says what to change)."""

from __future__ import annotations

import pytest

from tests.gguf_support import require_gguf

require_gguf()

from stepvideo_core import fit_plan  # noqa: E402
from stepvideo_core.generate import main  # noqa: E402

DIT_PARAMS = 29_342_478_400  # the release's DiT (stepvideo-model.md: 785 tensors)
LLM_PARAMS = 19_579_600_896


@pytest.fixture(scope="module")
def models():
    return fit_plan._meta_models()


def test_weight_bytes_of_the_release(models):
    dit, llm = models
    assert fit_plan.weight_bytes(dit, "bf16") == 2 * DIT_PARAMS
    assert fit_plan.weight_bytes(llm, "bf16") == 2 * LLM_PARAMS
    # fp8: the Linear/conv weights at 1 byte; Q8_0 at 34/32 bytes with the kept families in F32/BF16
    assert 1.0 < fit_plan.weight_bytes(dit, "fp8") / DIT_PARAMS < 1.01
    assert 34 / 32 < fit_plan.weight_bytes(dit, "Q8_0") / DIT_PARAMS < 34 / 32 + 0.01
    assert 18 / 32 < fit_plan.weight_bytes(dit, "Q4_0") / DIT_PARAMS < 18 / 32 + 0.01
    # Step-LLM keeps its 0.8 GB token table in BF16
    assert fit_plan.weight_bytes(llm, "Q8_0") - LLM_PARAMS * 34 / 32 == pytest.approx(65536 * 6144 * (2 - 34 / 32),
                                                                                        rel=0.01)


def test_more_memory_never_lowers_the_precision():
    rank = {f: i for i, f in enumerate(fit_plan.DIT_FORMATS)}
    previous = None
    for gpu, ram in ((16, 32), (16, 64), (24, 64), (80, 96)):
        p = fit_plan.plan(gpu, ram, frames=102)
        assert p.fits, p.describe()
        assert p.peak_vram() <= gpu * fit_plan.GB + 1 and p.peak_ram() <= ram * fit_plan.GB
        if previous is not None:
            assert rank[p.dit.fmt] <= rank[previous.dit.fmt]
            assert p.dit.streamed_per_step() <= previous.dit.streamed_per_step() or p.dit.fmt != previous.dit.fmt
        previous = p
    assert previous.dit.fmt == "bf16" and previous.dit.offloaded == 0


def test_what_does_not_fit_says_what_to_change(capsys):
    p = fit_plan.plan(8, 16)
    assert not p.fits
    text = p.describe()
    assert "Does not fit" in text and "needs" in text and "fewer frames" in text and "smaller size" in text
    main(["--plan", "--gpu-memory", "24", "--ram", "64", "--frames", "51", "--width", "544", "--height", "320"])
    out = capsys.readouterr().out
    assert "544x320, 51 frames on a 24 GB GPU with 64 GB RAM" in out and "projected" in out and "Peak VRAM" in out
