"""sigma-GPT bundles: ONNX checker, ONNX Runtime vs eager (prefill, 32 decode steps, the burst passes), greedy
ordered generation through ORT identical to eager, greedy burst sampling through ORT identical to eager burst
with the same seed, fp16.

Tolerances: fp32 graphs vs eager fp32 |d| <= 5e-5 + 1e-4 |ref| (measured ~1.5e-5 on logits of magnitude ~10);
fp16 graphs vs eager fp32 |d| <= 5e-2 + 2e-2 |ref| (measured ~3e-2)."""

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from bytedeploy.checkpoint import load_model, save_checkpoint
from bytedeploy.cli import cli
from bytedeploy.exporters import export
from bytedeploy.exporters.bundle import load_bundle
from bytedeploy.exporters.sigma_gpt import verify_cases
from bytedeploy.generation import GenerateRequest
from bytedeploy.models import sigma_gpt as sg
from bytedeploy.runtimes import generate as generate_on
from bytedeploy.runtimes.ort import OrtRunner
from bytedeploy.sampling import SamplingConfig
from bytedeploy.tokenizers import CharTokenizer

FP32 = dict(atol=5e-5, rtol=1e-4)
FP16 = dict(atol=5e-2, rtol=2e-2)
GREEDY = SamplingConfig(temperature=0.0)
TEXT = "def main():\n    return [x for x in range(10)]\n"


def make_checkpoint(path, weight_std: float | None = 0.3):
    """Tiny preset (block 64); untrained weights: GPT-2 init (weight_std None) or N(0, weight_std), which keeps
    greedy logits far from ties."""
    tokenizer = CharTokenizer.from_text(TEXT)
    torch.manual_seed(0)
    cfg = sg.Config(**sg.PRESETS["tiny"], vocab_size=tokenizer.vocab_size)
    model = sg.Model(cfg)
    if weight_std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, weight_std)
    return save_checkpoint(path, model, "sigma-gpt", cfg, assets={sg.TOKENIZER_FILE: tokenizer.to_json()})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sigma_gpt_export")
    ckpt = make_checkpoint(tmp / "ckpt")
    result = CliRunner().invoke(cli, ["export", str(ckpt), "-o", str(tmp / "fp32")])
    assert result.exit_code == 0, result.output
    export(ckpt, tmp / "fp16", precision="fp16")
    model, cfg, _ = load_model(ckpt)
    return tmp, ckpt, model.eval(), cfg


def request(prompt: bytes, max_new: int, sampling: SamplingConfig, ckpt, batch_size=2, **options):
    return GenerateRequest(prompt, max_new, batch_size, sampling, dict(options, assets=str(ckpt / "assets")))


def compare(bundle, cases, tol, feed_dtype=np.float32):
    runner = OrtRunner(bundle)
    for case in cases:
        feeds = {k: v.astype(feed_dtype) if v.dtype.kind == "f" else v for k, v in case.feeds.items()}
        out = runner.run(case.graph, feeds)
        for name, expected in case.expected.items():
            got = runner.to_numpy(out[name]).astype(np.float32)
            np.testing.assert_allclose(got, expected, **tol, err_msg=f"{case.label} {name}")


def test_bundle_graphs_pass_the_full_onnx_check(setup):
    tmp, _, _, cfg = setup
    for precision in ("fp32", "fp16"):
        bundle = load_bundle(tmp / precision)
        assert bundle.family == "sigma-gpt" and set(bundle.graphs) == {"prefill", "decode", "sample", "score",
                                                                        "burst_proposal"}
        for name in bundle.graphs:
            onnx.checker.check_model(str(bundle.graph_path(name)), full_check=True)
        decode = bundle.graphs["decode"]
        caches = [f"past_{kv}.{i}" for kv in "kv" for i in range(cfg.n_layer)]
        assert [t.name for t in decode.inputs] == ["seq", "pos", "orders", *caches]
        assert decode.inputs[3].shape == ["batch", cfg.n_head, "length", cfg.n_embd // cfg.n_head]
        assert decode.inputs[3].dtype == ("float32" if precision == "fp32" else "float16")


def test_ort_equals_eager_for_prefill_32_decode_steps_and_burst_passes(setup):
    tmp, _, model, cfg = setup
    bundle = load_bundle(tmp / "fp32")
    cases = verify_cases(model, cfg, bundle, batch_size=2, decode_steps=32, seed=0)
    assert [c.graph for c in cases] == ["prefill"] + ["decode"] * 32 + ["burst_proposal", "score"]
    assert cases[-1].feeds["tokens"].shape == (2, 4)  # the scoring pass: 4 new tokens after the cache
    assert cases[1].feeds["past_k.0"].shape == (2, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head)  # static
    compare(bundle, cases, FP32)
    # a burst proposal before anything is cached (a one-character prompt): nothing before start = 0
    runner = OrtRunner(bundle)
    caches = {f"past_{kv}.{i}": np.zeros((3, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head), np.float32)
              for kv in "kv" for i in range(cfg.n_layer)}
    tokens, here, following = np.full((3, 5), 4), np.zeros((3, 5), dtype=np.int64), np.tile(np.arange(1, 6), (3, 1))
    got = runner.run("burst_proposal", {"tokens": tokens, "here": here, "following": following,
                                        "start": np.zeros(3, dtype=np.int64), **caches})["logits"]
    passes = sg.EagerBurstPasses(model, 3, 1, 8)
    expected = passes.propose(torch.tensor(tokens[:, 0]), torch.tensor(here[:, 0]), torch.tensor(following), 0)
    np.testing.assert_allclose(runner.to_numpy(got), expected.detach().numpy(), **FP32)


def test_greedy_ordered_generation_through_ort_is_eager(setup):
    tmp, ckpt, model, cfg = setup
    bundle = load_bundle(tmp / "fp32")
    for options in ({}, {"order": "random"}):
        req = request(b"def ", 48, GREEDY, ckpt, **options)
        ort = generate_on(bundle, req, "ort")
        assert ort.outputs == sg.generate(model, cfg, req, "eager").outputs
        assert ort.outputs == sg.generate(model, cfg, req, "eager-reference").outputs
        assert ort.n_new == 96 and ort.passes == 96
    # the CLI runs a bundle on ORT and prints what the checkpoint's eager backend prints
    args = ["--prompt", "def ", "--max-new", "48", "--temperature", "0"]
    by_bundle = CliRunner().invoke(cli, ["generate", str(tmp / "fp32"), *args])
    by_ckpt = CliRunner().invoke(cli, ["generate", str(ckpt), *args])
    assert by_bundle.exit_code == 0 and by_ckpt.exit_code == 0, by_bundle.output + by_ckpt.output
    assert by_bundle.stdout == by_ckpt.stdout


def test_greedy_burst_through_ort_is_eager_burst(setup, tmp_path):
    """Greedy burst depends on the random scoring orders too (which order's run is kept): both loops draw them from
    families.sigma_gpt.burst_draws."""
    tmp, ckpt, model, cfg = setup
    bundle = load_bundle(tmp / "fp32")
    for prompt, seed, n_orders in [(b"", 3, 4), (b"def ", 0, 4), (b"x = ", 1, 1)]:
        sampling = SamplingConfig(temperature=0.0, seed=seed)
        eager = sg.generate(model, cfg, request(prompt, 40, sampling, ckpt, n_orders=n_orders), "burst")
        ort = generate_on(bundle, request(prompt, 40, sampling, ckpt, n_orders=n_orders, burst=True), "ort")
        assert ort.outputs == eager.outputs and ort.passes == eager.passes
    # seeded sampling in ORT: numpy's draws, the same run to run
    for sampling in (SamplingConfig(temperature=1.0, seed=3), SamplingConfig(top_k=5, seed=1)):
        runs = [generate_on(bundle, request(b"x = ", 40, sampling, ckpt, burst=True), "ort") for _ in range(2)]
        assert runs[0].outputs == runs[1].outputs and runs[0].passes == runs[1].passes
        assert all(len(o.decode()) == 40 for o in runs[0].outputs)
    # an untrained model (GPT-2 init) is nearly context-free, so most proposals are accepted: far fewer passes
    untrained = make_checkpoint(tmp_path / "ckpt", weight_std=None)
    small_bundle = export(untrained, tmp_path / "bundle")
    result = generate_on(small_bundle, request(b"", 60, SamplingConfig(seed=0), untrained, burst=True), "ort")
    assert result.n_new == 120 and result.passes < result.n_new / 2
    assert all(len(o.decode()) == 60 and set(o.decode()) <= set(TEXT) | {"\ufffd"} for o in result.outputs)
    # the CLI: `generate BUNDLE --backend burst` is the checkpoint's burst backend, run in ONNX Runtime
    args = ["--prompt", "def ", "--max-new", "30", "--seed", "2", "--n-orders", "2", "--backend", "burst",
            "--temperature", "0"]
    by_bundle = CliRunner().invoke(cli, ["generate", str(tmp / "fp32"), *args])
    by_ckpt = CliRunner().invoke(cli, ["generate", str(ckpt), *args])
    assert by_bundle.exit_code == 0 and by_ckpt.exit_code == 0, by_bundle.output + by_ckpt.output
    assert by_bundle.stdout == by_ckpt.stdout and "passes per char" in by_bundle.stderr


def test_fp16_bundle_is_close_to_eager_fp32(setup):
    tmp, ckpt, model, cfg = setup
    bundle = load_bundle(tmp / "fp16")
    assert bundle.graphs["decode"].inputs[3].dtype == "float16"
    compare(bundle, verify_cases(model, cfg, bundle, 2, 32, seed=0), FP16, feed_dtype=np.float16)
    for options in ({}, {"burst": True}):
        result = generate_on(bundle, request(b"def ", 40, GREEDY, ckpt, **options), "ort")
        assert all(len(o.decode()) == 40 for o in result.outputs)
