"""`bytedeploy verify CKPT BUNDLE`: the table, a pass on the checkpoint the bundle came from, a failure (non-zero
exit) against other weights of the same config, skipped rows for backends that cannot run here."""

import onnxruntime
import pytest
import torch
from click.testing import CliRunner

from bytedeploy.checkpoint import save_checkpoint
from bytedeploy.cli import cli
from bytedeploy.models import bgpt
from bytedeploy.verify import TOLERANCES, verify

NO_ORT_GPU = "CUDAExecutionProvider" not in onnxruntime.get_available_providers()


def save_bgpt(path, seed: int, **overrides):
    cfg = bgpt.Config(**dict(bgpt.PRESETS["tiny"], **overrides))
    torch.manual_seed(seed)
    return save_checkpoint(path, bgpt.Model(cfg), "bgpt", cfg)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    ckpt, other = save_bgpt(root / "ckpt", seed=0), save_bgpt(root / "other", seed=1)
    result = CliRunner().invoke(cli, ["export", str(ckpt), "-o", str(root / "bundle")])
    assert result.exit_code == 0, result.output
    return ckpt, other, root / "bundle", root


def rows(output: str, backend: str) -> list[list[str]]:
    return [line.split() for line in output.splitlines() if f"  {backend}  " in line]


def test_verify_passes_on_its_checkpoint(setup):
    ckpt, _, bundle, _ = setup
    result = CliRunner().invoke(cli, ["verify", str(ckpt), str(bundle)])
    assert result.exit_code == 0, result.output
    assert "max abs diff" in result.output and "max rel diff" in result.output
    table = rows(result.output, "ort")
    # prefill + 32 patch decode steps (the feature and 3 layers' two caches each) + 2 byte patches' logits
    assert len(table) == (1 + 2 * 3) * (1 + 32) + 2 and all(r[-1] == "pass" for r in table)
    assert max(float(r[-3]) for r in table) < TOLERANCES["fp32"][0]
    assert "ort: 233/233 outputs within tolerance" in result.output


def test_verify_fails_against_other_weights(setup):
    _, other, bundle, _ = setup
    result = CliRunner().invoke(cli, ["verify", str(other), str(bundle), "--decode-steps", "2"])
    assert result.exit_code == 1
    assert any(r[-1] == "FAIL" for r in rows(result.output, "ort")) and "FAILED" in result.output
    assert result.output.strip().splitlines()[-1].startswith("Error: outputs differ beyond the tolerances")


def test_verify_tolerance_options(setup):
    """Tolerances below the fp32 noise fail; the defaults follow the bundle's precision."""
    ckpt, _, bundle, _ = setup
    assert verify(ckpt, bundle, ["ort"], decode_steps=1, batch_size=1, seed=3)
    assert not verify(ckpt, bundle, ["ort"], decode_steps=1, batch_size=1, atol=0.0, rtol=0.0, seed=3)


def test_verify_config_mismatch_is_one_line_error(setup):
    _, _, bundle, root = setup
    smaller = save_bgpt(root / "smaller", seed=0, n_layer=2)
    result = CliRunner().invoke(cli, ["verify", str(smaller), str(bundle)])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "different model configs" in result.output


@pytest.mark.skipif(not NO_ORT_GPU, reason="onnxruntime-gpu is installed: ort-cuda runs")
def test_backend_that_cannot_run_is_a_skipped_row(setup):
    ckpt, _, bundle, _ = setup
    result = CliRunner().invoke(cli, ["verify", str(ckpt), str(bundle), "--backends", "ort,ort-cuda",
                                      "--decode-steps", "1"])
    assert result.exit_code == 0, result.output
    skipped = [line for line in result.output.splitlines() if "skipped:" in line]
    assert len(skipped) == 1 and "ort-cuda" in skipped[0] and "onnxruntime-gpu" in skipped[0]
    alone = CliRunner().invoke(cli, ["verify", str(ckpt), str(bundle), "--backends", "ort-cuda"])
    assert alone.exit_code == 1 and "none of the backends ort-cuda can run here" in alone.output
    unknown = CliRunner().invoke(cli, ["verify", str(ckpt), str(bundle), "--backends", "tensorflow"])
    assert unknown.exit_code == 1 and "unknown backend 'tensorflow'" in unknown.output
