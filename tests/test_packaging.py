"""The wheel: built from this checkout, installed into a fresh virtual environment, it trains and
evaluates from anywhere (configs, the C++ kernels' source and the Ray job entrypoints inside)."""

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def run(*args, cwd, env=None) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    assert result.returncode == 0, f"{args}: {result.stderr[-2000:]}"
    return result


def test_the_wheel_installs_into_a_fresh_venv_and_trains(tmp_path):
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", dist, REPO, cwd=tmp_path)
    (wheel,) = dist.glob("memray_layers-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    for needed in ("memray/configs/tiny.yaml", "memray/configs/demo.yaml", "memray/kernels/cpu_bag.cpp"):
        assert needed in names, needed
    assert "memray/jobs/train.py" in names and any(n.endswith("licenses/LICENSE") for n in names)
    assert "License: Apache-2.0" in metadata and "Apache Software License" in metadata

    # a fresh venv; memray's dependencies (torch and the rest, already installed for this
    # interpreter) come from this environment's site-packages through a .pth path entry, which
    # does not run that environment's own .pth hooks (its editable install of this checkout)
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    site = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel, cwd=tmp_path)
    where = run(python, "-c", "import memray, memray.kernels; print(memray.__file__)", cwd=tmp_path).stdout
    assert where.startswith(site), where

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    memray = venv / "bin" / "memray"
    run(memray, "train", "tiny", "--workers", "0", "--run-dir", "run", "--no-progress", cwd=tmp_path, env=env)
    result = run(
        memray, "eval", "run", "--facts", "run/data/facts.jsonl", "--limit", "20", "--json", cwd=tmp_path, env=env
    )
    assert 0.0 <= json.loads(result.stdout)["recall"] <= 1.0


@pytest.mark.parametrize("missing", ["zarr==3.1.6", "deepspeed==0.19.8", "pydantic-core==2.50.5"])
def test_the_gpu_script_names_a_missing_wheel_before_installing_anything(missing, tmp_path):
    """benchmarks/gpu.sh installs the GPU host's missing packages from the wheels that travel
    with the checkout (benchmarks/gpu-wheels.txt); without one of them it stops at once, in one
    line naming it, and installs nothing."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for line in (REPO / "benchmarks" / "gpu-wheels.txt").read_text().splitlines():
        if line and not line.startswith("#") and line != missing:
            name, version = line.split("==")
            (wheels / f"{name.lower().replace('-', '_')}-{version}-py3-none-any.whl").touch()
    env = {**os.environ, "DEVICE": "cpu", "INSTALL": "1", "WHEELS": str(wheels), "SITE": str(tmp_path / "site")}
    result = subprocess.run(["bash", REPO / "benchmarks" / "gpu.sh"], capture_output=True, text=True, env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and missing in result.stderr
    assert not (tmp_path / "site").exists()
