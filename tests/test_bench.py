"""`bytedeploy bench` on the CPU with a tiny checkpoint: JSON rows, skipped rows with reasons, speed-ups, plot."""

import json

import pytest
import torch
from click.testing import CliRunner

from bytedeploy.bench import BenchConfig, parse_value
from bytedeploy.checkpoint import save_checkpoint
from bytedeploy.cli import cli
from bytedeploy.errors import UserError
from bytedeploy.models import bgpt


@pytest.fixture
def tiny_bgpt(tmp_path):
    cfg = bgpt.Config(patch_size=8, n_patches=12, n_embd=32, n_layer=2, n_head=4, byte_n_layer=2, byte_n_head=4)
    torch.manual_seed(0)
    model = bgpt.Model(cfg)
    with torch.no_grad():  # logits far from ties: greedy eager and eager-reference agree exactly
        for p in model.parameters():
            p.normal_(0.0, 0.5)
        model.byte_wte.weight[bgpt.SPECIAL] *= 0.2
    return save_checkpoint(tmp_path / "ckpt", model, "bgpt", cfg)


def test_bench_cpu_writes_json_rows_and_plot(tiny_bgpt, tmp_path):
    out, plot = tmp_path / "res" / "bench.json", tmp_path / "res" / "bench.png"
    args = ["bench", str(tiny_bgpt), "--backends", "eager-reference,eager,native,ort", "--batch-sizes", "1,2",
            "--max-new", "12", "--repeats", "1", "--reference-max-batch", "1", "--device", "cpu",
            "--out", str(out), "--plot", str(plot)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["family"] == "bgpt" and data["machine"] and data["device"] == "cpu"
    assert len(data["host_op_us"]) == 2 and all(0 < us < 1e4 for us in data["host_op_us"])  # before and after
    rows = {(r["backend"], r["batch_size"]): r for r in data["rows"]}
    assert len(rows) == 8
    for key in (("eager-reference", 1), ("eager", 1), ("eager", 2)):
        row = rows[key]
        assert row["status"] == "ok" and row["new"] == 12 * key[1] and row["tokens_per_s"] > 0
        assert row["latency_ms_per_token"] > 0 and row["patches"] == 2
        assert row["latency_ms_per_patch"] == pytest.approx(1e3 * row["seconds"] * 8 / 12)  # per 8 new bytes
        assert row["speedup_vs_eager_reference"] > 0 and row["peak_gpu_memory_mb"] is None
    assert rows[("eager-reference", 1)]["speedup_vs_eager_reference"] == 1.0
    assert rows[("eager", 1)]["matches_eager_reference"] is True
    assert rows[("eager", 2)]["speedup_basis"] == "eager-reference at batch 1"
    assert rows[("eager-reference", 2)]["status"] == "skipped" and "reference-max-batch" in rows[
        ("eager-reference", 2)]["reason"]
    assert rows[("native", 1)]["reason"] == "the native backend needs a CUDA GPU"
    assert "--bundle" in rows[("ort", 1)]["reason"]
    assert data["bound"]["weight_bytes_per_step"] > 0 and data["bound"]["copy_bandwidth_bytes_per_s"] is None
    assert rows[("eager", 1)]["ms_per_step"] == pytest.approx(rows[("eager", 1)]["latency_ms_per_patch"])
    assert all("share_of_bound" not in r for r in data["rows"])  # on the CPU: no bandwidth, no launch floor
    assert "eager-reference" in result.output and "skipped" in result.output
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in result.output
    else:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_bad_bundle_and_options_are_one_line_errors(tiny_bgpt, tmp_path):
    missing = CliRunner().invoke(cli, ["bench", str(tiny_bgpt), "--backends", "eager,ort", "--device", "cpu",
                                       "--bundle", str(tmp_path / "missing")])
    assert missing.exit_code == 1 and missing.output.strip().splitlines() == [
        f"Error: bundle not found: {tmp_path / 'missing'}"]
    bad = CliRunner().invoke(cli, ["bench", str(tiny_bgpt), "--backends", "warp-drive", "--device", "cpu"])
    assert bad.exit_code == 1 and "unknown backend warp-drive" in bad.output
    with pytest.raises(UserError):
        BenchConfig(batch_sizes=[0])
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5 and parse_value("true") is True
    assert parse_value("py") == "py"


def test_bundle_rows_make_their_sessions_once_in_the_warm_up(tiny_bgpt, tmp_path, monkeypatch):
    """The timed calls of an ort row reuse the runner of the untimed warm-up: no session creation is timed."""
    import onnxruntime

    from bytedeploy.exporters import export

    export(tiny_bgpt, tmp_path / "bundle")
    made = []
    real = onnxruntime.InferenceSession
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda *a, **k: made.append(a[0]) or real(*a, **k))
    out = tmp_path / "bench.json"
    args = ["bench", str(tiny_bgpt), "--backends", "eager,ort", "--bundle", str(tmp_path / "bundle"),
            "--batch-sizes", "1,2", "--max-new", "8", "--repeats", "2", "--device", "cpu", "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    rows = [r for r in json.loads(out.read_text())["rows"] if r["backend"] == "ort"]
    assert [r["status"] for r in rows] == ["ok", "ok"] and all(r["matches_eager"] for r in rows)
    assert len(made) == 3  # patch_prefill, patch_decode, byte_patch_greedy: once for the whole run
