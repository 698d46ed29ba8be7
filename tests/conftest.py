"""Shared test setup: torch's CPU threads, and the deploy side's session fixtures: tiny_bundles (every family's tiny
checkpoint and its bundle) and deploy_venv (a fresh virtual environment with the deploy install alone: no torch)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# CI has 2 cores; intra-op threads fighting the test runner make small-tensor tests several times slower.
torch.set_num_threads(int(os.environ.get("BYTEDEPLOY_TEST_THREADS", "1")))

REPO = Path(__file__).resolve().parents[1]
DEPLOY_INSTALL = ["-m", "pip", "install", "."]  # `python -m pip install .` in the repository: the deploy host's line
SOURCES = ("pyproject.toml", "README.md", "bytedeploy", "exporters", "runtimes", "plugins", "benchmarks")


@pytest.fixture(scope="session")
def tiny_bundles(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """{name: (checkpoint, fp32 bundle)} for every family (test_serve.make_checkpoints: random weights far from
    ties), and "bitnet-plugin": BitNet's bundle with the bytedeploy::BitLinear custom op."""
    from test_serve import make_checkpoints

    from bytedeploy.exporters import export

    root = tmp_path_factory.mktemp("tiny")
    checkpoints = make_checkpoints(root)
    bundles = {family: (ckpt, export(ckpt, root / f"{family}-bundle").path) for family, ckpt in checkpoints.items()}
    bitnet = checkpoints["bitnet"]
    bundles["bitnet-plugin"] = (bitnet, export(bitnet, root / "bitnet-plugin-bundle", bitlinear="plugin").path)
    return bundles


@pytest.fixture(scope="session")
def deploy_venv(tmp_path_factory) -> Path:
    """A fresh virtual environment with the deploy install alone (DEPLOY_INSTALL, run in a copy of the repository's
    sources, so that the build writes nothing into the working tree), built once per session -> its python. pip
    fetches onnxruntime and the other runtime packages from the package index (or its cache)."""
    root = tmp_path_factory.mktemp("deploy")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "results"))
        else:
            shutil.copy2(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    python = root / "venv" / "bin" / "python"
    result = subprocess.run([str(python), *DEPLOY_INSTALL, "--quiet"], cwd=src, capture_output=True, text=True)
    if result.returncode:
        pytest.fail(f"the deploy install failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return python
