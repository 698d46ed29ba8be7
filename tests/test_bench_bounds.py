"""The bound of a step (bytedeploy/bounds.py): weight bytes per step of every family against a hand count from the
config; each row's share of the bound from a given bandwidth and launch floor, in bench's summary and plot. GPU: the
measured copy bandwidth and launch floor are plausible, and tiny native rows of every family get a share of their
bound and a step profile."""

import json

import pytest
import torch
from click.testing import CliRunner
from gpu_marks import gpu_test

from bytedeploy import bounds
from bytedeploy.bench import BenchConfig, run_bench, summary_lines, write_plot
from bytedeploy.checkpoint import save_checkpoint
from bytedeploy.cli import cli
from bytedeploy.models import bfn, bgpt, bitnet, char_gpt2
from bytedeploy.models import sigma_gpt as sg
from bytedeploy.models.bitlinear import BitLinear

cuda = gpu_test()


def gpt2_block(C: int, bias: bool = True) -> int:
    """Parameters of one layers.Block: two LayerNorms, attention (3C + C projections), the 4C MLP (with biases)."""
    return 2 * 2 * C + 4 * C * C + (4 * C if bias else 0) + 8 * C * C + 5 * C


def test_bgpt_weights_per_patch_by_hand():
    cfg = bgpt.Config(patch_size=8, n_patches=12, n_embd=32, n_layer=3, n_head=4, byte_n_layer=2, byte_n_head=4)
    P, C = 8, 32
    patch_step = 3 * gpt2_block(C) + 2 * C + P * C + C + C  # blocks, ln_f, P embedding rows, bias, a position row
    byte_step = 2 * gpt2_block(C) + 2 * C + 257 * C + C  # blocks, ln_f, the tied 257-symbol head, a position row
    weights = bounds.step_weights(bgpt.Model(cfg), "bgpt")
    assert weights["patch_decoder_step"].nbytes("float32") == 4 * patch_step
    assert weights["byte_decoder_step"].nbytes("float32") == 4 * byte_step
    assert weights["step"].nbytes("float32") == 4 * (patch_step + P * byte_step)
    assert weights["step"].nbytes("bfloat16") == 2 * (patch_step + P * byte_step)


def test_char_gpt2_and_sigma_gpt_weights_per_token_by_hand():
    C, V = 16, 30
    model = char_gpt2.Model(char_gpt2.Config(block_size=8, vocab_size=V, n_layer=2, n_head=2, n_embd=C))
    # attention without biases; ln_f; the untied head with its bias; a row of the token and of the position table
    assert bounds.step_weights(model, "char-gpt2")["step"].nbytes("float32") == 4 * (
        2 * gpt2_block(C, bias=False) + 2 * C + V * C + V + 2 * C)
    model = sg.Model(sg.Config(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=C, dropout=0.0))
    # the token table is the tied head (whole, once); two half rows of the position table
    assert bounds.step_weights(model, "sigma-gpt")["step"].nbytes("float16") == 2 * (
        2 * gpt2_block(C) + 2 * C + V * C + C)


def test_bitnet_weights_per_token_count_packed_ternary_weights():
    C, H = 32, 66  # 66 inputs of w2 take 17 packed bytes a row
    model = bitnet.Model(bitnet.Config(block_size=16, n_layer=2, n_head=2, n_embd=C, ffn_hidden=H))
    packed_per_layer = 4 * (C * (C // 4) + 4) + 2 * (H * (C // 4) + 4) + (C * 17 + 4)
    gains_per_layer = 4 * C + 2 * C + H  # each BitLinear's RMSNorm over its input
    step = bounds.step_weights(model, "bitnet")["step"]
    assert step.packed_bytes == 2 * packed_per_layer
    assert step.float_elements == 2 * gains_per_layer + C + 256 * C + C  # final norm, LM head, a token row
    exported = [m.export_int() for m in model.modules() if isinstance(m, BitLinear)]
    assert step.packed_bytes == sum(w.packed.numel() * w.packed.element_size() + 4 for w in exported)


def test_bfn_weights_per_denoising_step_by_hand():
    C, V, T = 16, 24, 8
    model = bfn.Model(bfn.Config(vocab_size=V, seq_len=10, n_layer=2, n_head=2, n_embd=C, time_dim=T, dropout=0.0))
    block = 4 * C * C + 4 * C + 8 * C * C + 5 * C + T * 4 * C + 4 * C  # attention, MLP, FiLM (no LayerNorm gains)
    time_embedding = T // 2 + (T + 1) * T + T + T * T + T
    assert bounds.step_weights(model, "bfn")["step"].nbytes("float32") == 4 * (
        2 * block + time_embedding + V * C + 2 * C + C * V + V)


def test_steps_per_call():
    cfg = bgpt.Config(patch_size=8)
    assert bounds.steps_per_call("bgpt", cfg, 2, 64, 0) == 4  # 32 new bytes a row: 4 patches' worth
    assert bounds.steps_per_call("char-gpt2", None, 4, 40, 0) == 10
    assert bounds.steps_per_call("sigma-gpt", None, 2, 40, 14) == 7  # burst: 7 batched passes
    assert bounds.steps_per_call("bfn", None, 8, 96, 101) == 101


@pytest.fixture
def tiny_char_gpt2(tmp_path):
    from bytedeploy.tokenizers import CharTokenizer

    tok = CharTokenizer.from_text("hello world, import os\n")
    cfg = char_gpt2.Config(block_size=16, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16)
    return save_checkpoint(tmp_path / "ckpt", char_gpt2.Model(cfg), "char-gpt2", cfg,
                           assets={char_gpt2.TOKENIZER_FILE: tok.to_json()})


def test_share_of_the_bound_from_bandwidth_and_launch_floor(tiny_char_gpt2, tmp_path):
    """A CPU run has no machine figures; given them (as a GPU run measures them), each row's share is the bound over
    its time per step, the larger of the weight time and the launch floor, in the summary and the plot."""
    from bytedeploy.checkpoint import load_model

    out = tmp_path / "bench.json"
    args = ["bench", str(tiny_char_gpt2), "--backends", "eager,native", "--batch-sizes", "1,2", "--max-new", "6",
            "--repeats", "1", "--device", "cpu", "--profile", "--out", str(out)]
    ran = CliRunner().invoke(cli, args)
    assert ran.exit_code == 0, ran.output
    result = json.loads(out.read_text())
    assert [r["status"] for r in result["rows"]] == ["ok", "skipped", "ok", "skipped"]  # native: no GPU, no profile
    result["rows"] = [r for r in result["rows"] if r["status"] == "ok"]
    assert result["bound"]["launch_floor_us"] is None and result["bound"]["bound_ms_per_step"] is None
    weight_bytes = result["bound"]["weight_bytes_per_step"]
    assert weight_bytes > 0
    for row in result["rows"]:
        assert row["ms_per_step"] == pytest.approx(row["latency_ms_per_token"]) and "share_of_bound" not in row

    model, cfg, _ = load_model(tiny_char_gpt2, torch.device("cpu"))
    for floor_us, bound_by in ((1e6, "launch"), (1e-6, "weights")):
        machine = {"copy_bandwidth_bytes_per_s": 1e9, "launch_floor_us": floor_us}
        bounds.add_bound(result, model, cfg, machine)
        bound_ms = max(1e3 * weight_bytes / 1e9, floor_us * 1e-3)
        assert result["bound"]["bound_ms_per_step"] == pytest.approx(bound_ms)
        assert result["bound"]["bound_by"] == bound_by
        for row in result["rows"]:
            assert row["share_of_bound"] == pytest.approx(bound_ms / row["ms_per_step"])
    fp16 = dict(result["rows"][0], backend="ort-cuda")  # a bundle row of an fp16 bundle
    result["rows"].append(fp16)
    bounds.add_bound(result, model, cfg, {"copy_bandwidth_bytes_per_s": 1e9, "launch_floor_us": 1e-6}, "fp16")
    assert fp16["bound_ms_per_step"] == pytest.approx(result["bound"]["bound_ms_per_step"] / 2)  # half the bytes
    lines = "\n".join(summary_lines(result))
    assert "% of the bound" in lines and "by weights" in lines
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert write_plot(result, tmp_path / "plot.png") == f"wrote {tmp_path / 'plot.png'}"


def test_busy_time_is_the_union_of_kernel_spans():
    # two overlapping kernels (a programmatic dependent launch starts before the one before it ends), a gap, one
    # inside another, and one alone
    spans = {(0.0, 10.0, "a"), (8.0, 15.0, "b"), (20.0, 30.0, "c"), (22.0, 25.0, "d"), (40.0, 41.0, "e")}
    assert bounds.busy_us(spans) == 15.0 + 10.0 + 1.0
    assert bounds.busy_us(set()) == 0.0


def test_profile_call_counts_per_step(tiny_char_gpt2):
    """On the CPU the profile has no kernels and no waits for a device: the host's time is the wall time, over the
    call's steps (one per token)."""
    from bytedeploy.checkpoint import load_model
    from bytedeploy.generation import GenerateRequest
    from bytedeploy.runner import CheckpointModel

    model, cfg, ckpt = load_model(tiny_char_gpt2, torch.device("cpu"))
    runner = CheckpointModel(model, cfg, ckpt, "eager")
    request = GenerateRequest(b"hello", 5, 1, options={"assets": str(ckpt.assets)})
    profile = bounds.profile_call(lambda: runner.generate(request), "char-gpt2", cfg, 1)
    assert profile["steps"] == 5 and profile["kernels_per_step"] == 0 and profile["top_kernels"] == []
    assert 0 < profile["host_ms_per_step"] <= profile["wall_ms_per_step"]
    if not torch.cuda.is_available():  # with a GPU, the profiler also sees CUDA runtime calls of the process
        assert profile["host_ms_per_step"] == profile["wall_ms_per_step"]


# ----------------------------------------------------------------------------------------------- GPU


@cuda
def test_copy_bandwidth_and_launch_floor_are_plausible():
    device = torch.device("cuda")
    bandwidth = bounds.copy_bandwidth(device)
    assert 0 < bandwidth < 10e12
    assert 0.5 <= bounds.launch_floor_us(device) <= 50


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    from test_serve import make_checkpoints

    return make_checkpoints(tmp_path_factory.mktemp("bounds"))


@cuda
@pytest.mark.parametrize("family", ["bgpt", "char-gpt2", "sigma-gpt", "bitnet", "bfn"])
def test_tiny_native_row_gets_a_share_of_its_bound_and_a_profile(tiny_checkpoints, family):
    bc = BenchConfig(["native"], [1], max_new=None, repeats=3, device="cuda", profile=True)
    result = run_bench(str(tiny_checkpoints[family]), bc, echo=lambda line: None)
    bound = result["bound"]
    assert 0 < bound["copy_bandwidth_bytes_per_s"] < 10e12 and 0.5 <= bound["launch_floor_us"] <= 50
    row = result["rows"][0]
    assert row["status"] == "ok", row
    assert 0 < row["share_of_bound"] <= 1.5
    profile = row["profile"]
    assert "error" not in profile, profile
    assert profile["kernels_per_step"] >= 1 and profile["top_kernels"]
    assert 0 < profile["host_ms_per_step"] <= profile["wall_ms_per_step"]
    assert 0 < profile["busy_ms_per_step"] <= min(profile["kernel_ms_per_step"], profile["wall_ms_per_step"])
