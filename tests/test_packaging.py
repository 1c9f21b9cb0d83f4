"""``pip install .``: the package lists every subpackage and carries the built-in models, so
``python -m stepvideo_core.generate`` runs from an install without the checkout."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from stepvideo_core.tiny import model as tiny

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_in_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "stepvideo_core").rglob("__init__.py")}
    assert found <= set(config["packages"]), f"add to pyproject's packages: {sorted(found - set(config['packages']))}"
    assert config["package-dir"]["stepvideo_core.builtin_models"] == "models"


def test_a_checkout_uses_its_own_models_folder():
    assert tiny.builtin_models() == ROOT / "models" and tiny.TINY_DIR == ROOT / "models" / tiny.NAME


@pytest.mark.slow
def test_installed_wheel_generates_with_the_builtin_model(tmp_path):
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout: the files to package are not known")
    source = tmp_path / "source"
    for name in tracked:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "wheel")],
                   cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    packaged = set(zipfile.ZipFile(wheel).namelist())
    models = [n for n in tracked if n.startswith("models/")]
    assert models and {"stepvideo_core/builtin_models/" + n.removeprefix("models/") for n in models} <= packaged
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "-q", "--target", str(site), str(wheel)], env=env, check=True,
                   capture_output=True)
    out = tmp_path / "videos"
    done = subprocess.run([sys.executable, "-m", "stepvideo_core.generate", "--steps", "1", "--out", str(out)],
                          cwd=tmp_path, env={**env, "PYTHONPATH": str(site)}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list(out.glob("tiny_*.mp4"))) == 1 and len(list(out.glob("tiny_*.png"))) == 1
