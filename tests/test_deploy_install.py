"""The deploy install (`python -m pip install .`: the core dependencies, no torch) in a fresh virtual environment
(conftest.deploy_venv): torch is not there, every family's tiny bundle generates the full install's greedy output
through the installed `bytedeploy` command, `bench` runs on a bundle, and the commands that need PyTorch say so in
one line."""

from __future__ import annotations

import json
import subprocess

import pytest
from test_deploy_runtime import eager_outputs, generate_args

pytestmark = pytest.mark.slow


def run(command: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout)


def test_deploy_install_has_no_torch_and_runs_every_familys_bundle(deploy_venv, tiny_bundles, tmp_path):
    missing = run([deploy_venv, "-c", "import torch"])
    assert missing.returncode == 1 and "No module named 'torch'" in missing.stderr
    bytedeploy = deploy_venv.parent / "bytedeploy"  # the installed console script
    for name, expected in eager_outputs(tiny_bundles).items():
        result = run([bytedeploy, *generate_args(name, tiny_bundles[name.split()[0]][1])])
        assert result.returncode == 0, result.stderr
        assert result.stdout == expected, name
    out = tmp_path / "bench.json"
    bench = run([bytedeploy, "bench", tiny_bundles["bitnet-plugin"][1], "--batch-sizes", "1", "--max-new", "8",
                 "--repeats", "1", "--out", out])
    assert bench.returncode == 0, bench.stderr
    assert [r["status"] for r in json.loads(out.read_text())["rows"]] == ["ok"]


@pytest.mark.parametrize("args", [["train", "bgpt", "--steps", "1"], ["generate", "{checkpoint}"],
                                  ["export", "{checkpoint}", "-o", "{tmp}/b"], ["bench", "{checkpoint}"]],
                         ids=lambda a: a[0])
def test_commands_that_need_torch_say_so_in_one_line(deploy_venv, tiny_bundles, tmp_path, args):
    args = [a.format(checkpoint=tiny_bundles["bgpt"][0], tmp=tmp_path) for a in args]
    result = run([deploy_venv.parent / "bytedeploy", *args])
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f'Error: bytedeploy {args[0]} needs PyTorch: pip install "bytedeploy[train]"']
