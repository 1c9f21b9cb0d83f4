"""bench/gpu_figures.py on the CPU at small sizes: every section runs, records what it promises, and fails alone."""

import json

import pytest
import torch

from bench import gpu_figures
from stepvideo_core.dit import DiTConfig


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("figures") / "figures.json"
    gpu_figures.main(["--dry-run", "--out", str(out)])
    return json.loads(out.read_text())


def rows(data, section):
    return [r for r in data["sections"] if r["section"] == section]


@pytest.mark.slow
def test_dry_run_measures_every_section(dry_run):
    assert dry_run["dry_run"] and not [r for r in dry_run["sections"] if "error" in r]
    steps = [r for r in rows(dry_run, "dit_step") if r.get("attention") == "sdpa" and r["weights"] in ("bf16", "fp8")]
    assert {(r["weights"], r["frames"]) for r in steps} == {(w, f) for w in ("bf16", "fp8") for f in (17, 34)}
    for r in steps:
        assert r["seconds"] > 0 and r["peak_bytes"] > 0 and r["predicted_bytes"] > 0
        assert r["steps50_s"] == pytest.approx(50 * r["seconds"], abs=0.1)
        assert r["flops_per_s"] == pytest.approx(r["flops"] / r["seconds"], rel=0.01)
    fp8, bf16 = (rows(dry_run, "dit_build")[i]["weight_bytes"] for i in (1, 0))
    assert fp8 < 0.6 * bf16  # the fp8 model really stores its Linear weights in one byte
    (vae,) = rows(dry_run, "vae_decode")
    (llm,) = rows(dry_run, "step_llm_encode")
    assert vae["seconds"] > 0 and llm["seconds"] > 0 and llm["peak_bytes"] > 0
    for backend in ("sageattention", "flash-attn"):
        assert any(r.get("attention") == backend for r in rows(dry_run, "dit_step"))


def test_a_failing_section_is_recorded_and_the_rest_still_runs(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(gpu_figures, "build_dit", broken)
    monkeypatch.setattr(gpu_figures, "build_gguf_dit", broken)
    monkeypatch.setattr(gpu_figures, "VideoVAE", broken)
    data = gpu_figures.main(["--dry-run", "--out", str(tmp_path / "f.json")])
    assert all("simulated" in r["error"] for r in rows(data, "dit_build") + rows(data, "vae_decode"))
    assert not rows(data, "dit_step") or all("skipped" in r for r in rows(data, "dit_step"))
    (llm,) = rows(data, "step_llm_encode")
    assert "error" not in llm and llm["seconds"] > 0
    assert json.loads((tmp_path / "f.json").read_text()) == data


def test_a_spent_budget_skips_the_rest(tmp_path):
    data = gpu_figures.main(["--dry-run", "--budget", "0", "--out", str(tmp_path / "f.json")])
    assert data["sections"] and all("skipped" in r for r in data["sections"])


def test_step_flops_match_the_issue_figure():
    """544x992x204 is 75,888 tokens; 50 guided steps of the 48-block model are about 1.07e18 FLOP."""
    assert 50 * 2 * gpu_figures.dit_step_flops(DiTConfig(), 1, 36 * 34 * 62) == pytest.approx(1.07e18, rel=0.01)


def test_materialise_makes_weights_on_the_device_in_the_storage_dtype():
    from stepvideo_core.dit import StepVideoDiT

    with torch.device("meta"):
        model = StepVideoDiT(DiTConfig(num_attention_heads=1, attention_head_dim=32, num_layers=1,
                                       caption_channels=(16, 8), in_channels=4, out_channels=4), dtype=torch.bfloat16)
    gpu_figures.materialise(model, torch.device("cpu"), torch.bfloat16, torch.float8_e4m3fn)
    assert model.transformer_blocks[0].attn1.wqkv.weight.dtype == torch.float8_e4m3fn
    assert model.transformer_blocks[0].scale_shift_table.dtype == torch.bfloat16
    assert not any(p.is_meta for p in model.parameters())
    assert model.transformer_blocks[0].ff.net[0].proj.weight.float().std() == pytest.approx(0.02, rel=0.2)


@pytest.mark.slow
def test_dry_run_measures_the_gguf_dit(dry_run):
    """The GGUF section: Q8_0 and Q4_0 DiTs hold fewer bytes than bf16 and run one guided step each."""
    builds = {r["weights"]: r["weight_bytes"] for r in rows(dry_run, "dit_build") if "weight_bytes" in r}
    assert builds["Q8_0"] < 0.75 * builds["bf16"] and builds["Q4_0"] < builds["Q8_0"]
    steps = {r["weights"]: r for r in rows(dry_run, "dit_step") if r.get("weights") in ("Q8_0", "Q4_0")}
    assert set(steps) == {"Q8_0", "Q4_0"}
    for r in steps.values():
        assert "error" not in r and r["seconds"] > 0 and r["peak_bytes"] > 0 and r["frames"] == 17
