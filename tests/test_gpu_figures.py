"""bench/gpu_figures.py on the CPU at small sizes, run as a process (tests never import bench/): every section
runs and records what it promises, a failing section fails alone, and its FLOP count and weight builder are right."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_figures.py"
# The optional attention back-ends and the module each needs (stepvideo_core/attention.py).
OPTIONAL_BACKENDS = {"sageattention": "sageattention", "flash-attn": "flash_attn"}


def run_python(code: str) -> str:
    """``code`` in a fresh interpreter at the repository root (where ``bench`` is importable); its stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def run_script(*argv: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("figures") / "figures.json"
    run_script("--dry-run", "--out", str(out))
    return json.loads(out.read_text())


def rows(data, section):
    return [r for r in data["sections"] if r["section"] == section]


@pytest.mark.slow
def test_dry_run_measures_every_section(dry_run):
    assert dry_run["dry_run"]
    installed = {b for b, module in OPTIONAL_BACKENDS.items() if importlib.util.find_spec(module) is not None}
    # The only rows allowed to hold no measurement: an optional back-end that really is not installed here.
    unmeasured = [r for r in dry_run["sections"] if "error" in r or "skipped" in r]
    assert all(r.get("skipped") == "not installed" and r.get("attention") in set(OPTIONAL_BACKENDS) - installed
               for r in unmeasured), unmeasured
    for backend in OPTIONAL_BACKENDS:
        listed = [r for r in rows(dry_run, "dit_step") if r.get("attention") == backend]
        assert listed, f"{backend} has no row"
        assert all(("skipped" in r) == (backend not in installed) for r in listed), listed
    steps = [r for r in rows(dry_run, "dit_step") if r.get("attention") == "sdpa" and r["weights"] in ("bf16", "fp8")]
    assert {(r["weights"], r["frames"]) for r in steps} == {(w, f) for w in ("bf16", "fp8") for f in (17, 34)}
    for r in steps:
        assert r["seconds"] > 0 and r["peak_bytes"] > 0 and r["predicted_bytes"] > 0
        assert r["steps50_s"] == pytest.approx(50 * r["seconds"], abs=0.1)
        assert r["flops_per_s"] == pytest.approx(r["flops"] / r["seconds"], rel=0.01)
    bf16, fp8 = (r["weight_bytes"] for r in rows(dry_run, "dit_build")[:2])
    assert fp8 < 0.6 * bf16  # the fp8 model really stores its Linear weights in one byte
    (vae,) = rows(dry_run, "vae_decode")
    (llm,) = rows(dry_run, "step_llm_encode")
    assert vae["seconds"] > 0 and llm["seconds"] > 0 and llm["peak_bytes"] > 0


@pytest.mark.slow
def test_a_failing_section_is_recorded_and_the_rest_still_runs(tmp_path):
    out = tmp_path / "f.json"
    printed = run_python(f"""
        import json
        from bench import gpu_figures

        def broken(*a, **k):
            raise RuntimeError("out of memory (simulated)")

        gpu_figures.build_dit = broken
        gpu_figures.build_gguf_dit = broken
        gpu_figures.VideoVAE = broken
        print(json.dumps(gpu_figures.main(["--dry-run", "--out", {str(out)!r}])))
    """)
    data = json.loads(printed.strip().splitlines()[-1])
    assert rows(data, "dit_build") and rows(data, "vae_decode")
    assert all("simulated" in r["error"] for r in rows(data, "dit_build") + rows(data, "vae_decode"))
    assert not [r for r in rows(data, "dit_step") if "seconds" in r], "a step was measured without a model"
    (llm,) = rows(data, "step_llm_encode")
    assert "error" not in llm and "skipped" not in llm and llm["seconds"] > 0
    assert json.loads(out.read_text()) == data


@pytest.mark.slow  # a fresh interpreter importing torch: seconds
def test_a_spent_budget_skips_the_rest(tmp_path):
    out = tmp_path / "f.json"
    run_script("--dry-run", "--budget", "0", "--out", str(out))
    data = json.loads(out.read_text())
    assert data["sections"] and all("skipped" in r and "seconds" not in r for r in data["sections"])


@pytest.mark.slow  # a fresh interpreter importing torch: seconds
def test_step_flops_and_materialised_weights():
    """544x992x204 is 75,888 tokens, and 50 guided steps of the 48-block model are about 1.07e18 FLOP; weights are
    made on the device in their storage dtype, with the initialisation's spread."""
    printed = run_python("""
        import json
        import torch
        from bench import gpu_figures
        from stepvideo_core.dit import DiTConfig, StepVideoDiT

        flops = 50 * 2 * gpu_figures.dit_step_flops(DiTConfig(), 1, 36 * 34 * 62)
        with torch.device("meta"):
            model = StepVideoDiT(DiTConfig(num_attention_heads=1, attention_head_dim=32, num_layers=1,
                                           caption_channels=(16, 8), in_channels=4, out_channels=4),
                                 dtype=torch.bfloat16)
        gpu_figures.materialise(model, torch.device("cpu"), torch.bfloat16, torch.float8_e4m3fn)
        block = model.transformer_blocks[0]
        print(json.dumps({"flops": flops, "wqkv": str(block.attn1.wqkv.weight.dtype),
                          "table": str(block.scale_shift_table.dtype),
                          "meta": any(p.is_meta for p in model.parameters()),
                          "std": block.ff.net[0].proj.weight.float().std().item()}))
    """)
    got = json.loads(printed.strip().splitlines()[-1])
    assert got["flops"] == pytest.approx(1.07e18, rel=0.01)
    assert (got["wqkv"], got["table"], got["meta"]) == ("torch.float8_e4m3fn", "torch.bfloat16", False)
    assert got["std"] == pytest.approx(0.02, rel=0.2)


@pytest.mark.slow
def test_dry_run_measures_the_gguf_dit(dry_run):
    """The GGUF section: Q8_0 and Q4_0 DiTs hold fewer bytes than bf16 and run one guided step each."""
    builds = {r["weights"]: r["weight_bytes"] for r in rows(dry_run, "dit_build") if "weight_bytes" in r}
    assert builds["Q8_0"] < 0.75 * builds["bf16"] and builds["Q4_0"] < builds["Q8_0"]
    steps = {r["weights"]: r for r in rows(dry_run, "dit_step") if r.get("weights") in ("Q8_0", "Q4_0")}
    assert set(steps) == {"Q8_0", "Q4_0"}
    for r in steps.values():
        assert "error" not in r and r["seconds"] > 0 and r["peak_bytes"] > 0 and r["frames"] == 17
