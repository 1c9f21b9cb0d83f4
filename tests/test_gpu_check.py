"""The GPU check's pieces on the CPU: the report that merges the CUDA checks and the bench figures, the generation
path importing without PyAV (the GPU machine has none), and ``scripts/gpu_check.sh --dry-run`` end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "scripts" / "gpu_report.py"


def run_report(tmp_path: Path, tests: dict | None, figures: dict | None, *parts: str):
    args = [sys.executable, str(REPORT), "--out", str(tmp_path / "gpu_check.json"), "--log", str(tmp_path / "x.log")]
    for name, data in (("tests", tests), ("figures", figures)):
        path = tmp_path / f"{name}.json"
        if data is not None:
            path.write_text(json.dumps(data))
        args += [f"--{name}", str(path)]
    for part in parts:
        args += ["--part", part]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    return done, json.loads((tmp_path / "gpu_check.json").read_text())


ENV = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "cuda": "13.0", "driver": "580.159.04",
       "packages": {"gguf": "0.19.0"}}


def test_report_merges_the_checks_and_the_figures_and_names_every_problem(tmp_path):
    tests = {"environment": ENV, "finished": True, "exit_status": 1, "tests": [
        {"test": "tests/gpu/test_dit_cuda.py::test_fp8_weight_storage_against_bf16", "outcome": "passed",
         "figures": {"rel_l2": 0.061, "bound_rel_l2": 0.15}},
        {"test": "tests/gpu/test_vae_cuda.py::test_tiled", "outcome": "failed", "message": "E   assert 30.1 >= 32.0",
         "figures": {"psnr_db": 30.1}},
        {"test": "tests/gpu/test_attention.py::test_a[flash-attn]", "outcome": "skipped",
         "message": "flash-attn is not installed", "figures": {}},
    ]}
    figures = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "sections": [
        {"section": "dit_step", "weights": "bf16", "attention": "sdpa", "frames": 102, "seconds": 9.5},
        {"section": "dit_step", "weights": "bf16", "attention": "sdpa", "frames": 204, "error": "OutOfMemoryError: x"},
    ]}
    done, report = run_report(tmp_path, tests, figures, "wheels=0:3", "tests=1:150", "figures=0:200")
    assert done.returncode == 1, "a failed check makes the command fail"
    assert (report["card"], report["torch"], report["cuda"]) == ("NVIDIA H100 80GB HBM3", "2.11.0+cu130", "13.0")
    assert report["counts"] == {"passed": 1, "failed": 1, "skipped": 1}
    assert report["checks"] == tests["tests"] and report["bench"] == figures
    assert report["parts"]["tests"] == {"exit_status": 1, "seconds": 150.0} and report["seconds"] == 353.0
    assert not report["ok"]
    assert report["problems"] == ["check failed: tests/gpu/test_vae_cuda.py::test_tiled",
                                  "figure section dit_step failed: OutOfMemoryError: x"]
    # The printed summary (what the device tool returns as the log's tail) shows each check's key figure.
    assert done.stdout.startswith("card: NVIDIA H100 80GB HBM3 (driver 580.159.04)  torch 2.11.0+cu130  CUDA 13.0")
    assert "passed  test_fp8_weight_storage_against_bf16  [rel_l2 0.061]" in done.stdout
    assert "failed  test_tiled  [psnr_db 30.1]  -- E   assert 30.1 >= 32.0" in done.stdout
    assert "skipped 1 x: flash-attn is not installed" in done.stdout
    assert "OutOfMemoryError" in done.stdout and "PROBLEMS" in done.stdout


def test_report_of_a_run_cut_short_says_what_is_missing(tmp_path):
    figures = {"device": "NVIDIA H200", "torch": "2.11.0+cu130", "cuda": "13.0", "sections": []}
    done, report = run_report(tmp_path, None, figures, "tests=124:240")
    assert done.returncode == 1
    assert report["card"] == "NVIDIA H200" and report["cuda"] == "13.0"  # taken from the figures instead
    assert report["parts"]["tests"]["stopped"] == "time limit"
    assert report["problems"][0] == "tests stopped by its time limit"
    assert "tests.json was not written" in report["problems"][1]
    (tmp_path / "tests.json").write_text('{"environment": {"devi')  # killed while writing
    done, report = run_report(tmp_path, None, figures)
    assert "tests.json is not valid JSON" in report["problems"][0]


def test_report_of_checks_alone_is_ok_without_figures(tmp_path):
    tests = {"environment": ENV, "finished": True, "exit_status": 0,
             "tests": [{"test": "t.py::test_a", "outcome": "passed", "figures": {"rel_max": 1e-6}}]}
    args = [sys.executable, str(REPORT), "--tests", str(tmp_path / "t.json"), "--part", "tests=0:12",
            "--out", str(tmp_path / "r.json")]
    (tmp_path / "t.json").write_text(json.dumps(tests))
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    report = json.loads((tmp_path / "r.json").read_text())
    assert done.returncode == 0 and report["ok"] and report["bench"] == {"missing": "not run (--checks-only)"}
    assert "passed  test_a  [rel_max 1e-06]" in done.stdout and done.stdout.rstrip().endswith("OK")


def test_generation_path_imports_without_pyav():
    """The GPU machine has no PyAV: stepvideo_core imports it only where a video file is written or an image
    read, so everything the CUDA checks import works with ``av`` blocked."""
    code = ("import sys; sys.modules['av'] = None\n"
            "import stepvideo_core.generate, stepvideo_core.tiny.ti2v, stepvideo_core.tiny.evaluate\n"
            "import tests.gpu.test_generation, tests.gpu.test_dit_cuda, tests.gpu.test_vae_cuda\n"
            "import tests.gpu.test_attention, tests.gpu.test_gguf_cuda, tests.gpu.conftest\n"
            "import stepvideo_core.video_io as io\n"
            "try:\n    io.save_png(io.np.zeros((2, 2, 3), io.np.uint8), 'x.png')\n"
            "except ImportError as e:\n    print('blocked:', e)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "blocked: import of av halted" in done.stdout  # the block works: writing a file does need PyAV


CHECKS = [  # what the issue asks the CUDA suite to check, by test name
    "test_tiny_generation_in_fp32_on_cuda_matches_the_cpu[t2v]",
    "test_tiny_generation_in_fp32_on_cuda_matches_the_cpu[ti2v]",
    "test_tiny_generation_in_bf16_on_cuda_stays_near_the_cpu_fp32[t2v]",
    "test_tiny_generation_in_bf16_on_cuda_stays_near_the_cpu_fp32[ti2v]",
    *(f"test_attention_backend_error_against_a_float64_reference[{b}-{s}-bf16]"
      for b in ("sdpa", "math", "sageattention") for s in ("release-128", "tiny-32")),
    "test_fp8_weight_storage_against_bf16",
    "test_compiled_blocks_equal_eager[release-heads-bf16]",
    "test_tiled_decode_equals_untiled_within_the_seam_tolerance",
    "test_memory_plan_predicts_the_peak_of_one_dit_step[bf16]",
]


@pytest.mark.slow
def test_gpu_check_dry_run_writes_its_report(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable, "GPU_CHECK_BUDGET": "300"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] and report["ok"] and report["problems"] == []
    assert report["card"] and report["torch"] and "cuda" in report
    assert set(report["parts"]) == {"wheels", "tests", "figures"}
    assert all(p["exit_status"] == 0 for p in report["parts"].values())
    names = {c["test"].split("::", 1)[1] for c in report["checks"]}
    assert set(CHECKS) <= names
    assert any(name.startswith("test_dequantize_on_cuda_equals_the_cpu") for name in names)
    # On a CPU every check skips, and says why.
    assert report["counts"] == {"skipped": len(report["checks"])}
    assert all("CUDA" in c["message"] for c in report["checks"])
    sections = {s["section"] for s in report["bench"]["sections"]}
    assert {"dit_step", "vae_decode", "step_llm_encode"} <= sections and report["bench"]["dry_run"]
    assert not [s for s in report["bench"]["sections"] if "error" in s]
    log = (out / "gpu_check.log").read_text()
    assert "== checks" in log and "== figures" in log and log.rstrip().endswith("OK")
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_figures.json",
                                                     "gpu_tests.json"]
