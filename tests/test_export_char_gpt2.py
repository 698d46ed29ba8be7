"""Char GPT-2 bundles: ONNX checker, ONNX Runtime vs eager (prefill + 32 decode steps), greedy generation through
ORT identical to eager past the context length, the unknown symbol, fp16.

Tolerances: fp32 graphs vs eager fp32 |d| <= 5e-5 + 1e-4 |ref| (measured ~6e-6 on logits of magnitude ~9);
fp16 graphs vs eager fp32 |d| <= 5e-2 + 2e-2 |ref| (measured ~1e-2)."""

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from bytedeploy.checkpoint import load_model, save_checkpoint
from bytedeploy.cli import cli
from bytedeploy.exporters import export
from bytedeploy.exporters.bundle import load_bundle
from bytedeploy.exporters.char_gpt2 import verify_cases
from bytedeploy.generation import GenerateRequest
from bytedeploy.models import char_gpt2
from bytedeploy.runtimes import generate as generate_on
from bytedeploy.runtimes.ort import OrtRunner
from bytedeploy.sampling import SamplingConfig
from bytedeploy.tokenizers import CharTokenizer

FP32 = dict(atol=5e-5, rtol=1e-4)
FP16 = dict(atol=5e-2, rtol=2e-2)
GREEDY = SamplingConfig(temperature=0.0)
TEXT = "def main():\n    return [x for x in range(10)]\n"


def make_checkpoint(path, unknown_bias: float = 0.0):
    """Tiny preset (context 64), untrained random weights large enough that greedy logits are far from ties."""
    tokenizer = CharTokenizer.from_text(TEXT)
    torch.manual_seed(0)
    cfg = char_gpt2.Config(**char_gpt2.PRESETS["tiny"], vocab_size=tokenizer.vocab_size)
    model = char_gpt2.Model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
        model.lm_head.bias[tokenizer.unknown_id] += unknown_bias
    return save_checkpoint(path, model, "char-gpt2", cfg, assets={char_gpt2.TOKENIZER_FILE: tokenizer.to_json()})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("char_gpt2_export")
    ckpt = make_checkpoint(tmp / "ckpt")
    result = CliRunner().invoke(cli, ["export", str(ckpt), "-o", str(tmp / "fp32")])
    assert result.exit_code == 0, result.output
    export(ckpt, tmp / "fp16", precision="fp16")
    model, cfg, _ = load_model(ckpt)
    return tmp, ckpt, model.eval(), cfg


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
        assert bundle.family == "char-gpt2" and bundle.precision == precision and set(bundle.graphs) == {
            "prefill", "decode", "sample"}
        for name in bundle.graphs:
            onnx.checker.check_model(str(bundle.graph_path(name)), full_check=True)
        decode = bundle.graphs["decode"]
        caches = [f"past_{kv}.{i}" for kv in "kv" for i in range(cfg.n_layer)]
        assert [t.name for t in decode.inputs] == ["seq", "pos", *caches]
        assert [t.name for t in decode.outputs] == ["logits", "seq_out", "pos_out",
                                                    *(c.replace("past", "present") for c in caches)]
        assert decode.inputs[2].shape == ["batch", cfg.n_head, "length", cfg.n_embd // cfg.n_head]


def test_ort_equals_eager_for_prefill_and_32_decode_steps(setup):
    tmp, _, model, cfg = setup
    bundle = load_bundle(tmp / "fp32")
    cases = verify_cases(model, cfg, bundle, batch_size=2, decode_steps=32, seed=0)
    assert [c.graph for c in cases] == ["prefill"] + ["decode"] * 32
    compare(bundle, cases, FP32)
    # the prefill's sequence and batch axes are dynamic (one character, a full context at batch 3) and it writes
    # only the cache rows it is given: row 2 of 3 here, the other rows as they were
    runner = OrtRunner(bundle)
    for idx in (np.array([[5]]), np.random.default_rng(1).integers(1, cfg.vocab_size, (2, cfg.block_size))):
        caches = {f"past_{kv}.{i}": np.full((3, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head), 7.0,
                                            np.float32) for kv in "kv" for i in range(cfg.n_layer)}
        rows = np.array([2, 0][:len(idx)])
        out = runner.run("prefill", {"tokens": idx, "rows": rows, **caches})
        kv = model.transformer.make_caches(len(idx), cfg.block_size)
        expected = model.logits(torch.from_numpy(idx), kv, 0)[:, -1].detach().numpy()
        np.testing.assert_allclose(runner.to_numpy(out["logits"]), expected, **FP32)
        present = runner.to_numpy(out["present_k.1"])
        np.testing.assert_allclose(present[rows, :, :idx.shape[1]], kv[1].k[:, :, :idx.shape[1]].detach().numpy(),
                                   **FP32)
        untouched = np.setdiff1d(np.arange(3), rows)
        assert (present[untouched] == 7).all() and (present[rows, :, idx.shape[1]:] == 7).all()


@torch.no_grad()
def test_decode_writes_its_caches_and_tokens_in_place(setup):
    """A bound decode call whose present caches and seq_out are its pasts' and seq's values: after each step the
    same values hold the new entries (nothing is copied back), and the greedy tokens are eager's."""
    tmp, ckpt, model, cfg = setup
    runner = OrtRunner(load_bundle(tmp / "fp32"))
    B, n0, steps = 2, 5, 6
    ids = np.random.default_rng(3).integers(1, cfg.vocab_size, (B, n0))
    caches = {f"past_{kv}.{i}": runner.zeros((B, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head), np.float32)
              for kv in "kv" for i in range(cfg.n_layer)}
    present = {name.replace("past", "present"): value for name, value in caches.items()}
    seq = runner.zeros((B, n0 + steps + 1), np.int64)
    seq_host = np.zeros((B, n0 + steps + 1), dtype=np.int64)
    seq_host[:, :n0] = ids
    runner.write(seq, seq_host)
    runner.run("prefill", {"tokens": ids[:, :n0 - 1], "rows": np.arange(B), **caches}, present)
    pos = [runner.value(np.full(B, n0 - 1)), runner.zeros((B,), np.int64)]
    logits = runner.zeros((B, cfg.vocab_size), np.float32)
    steps_bound = [runner.bind("decode", {"seq": seq, "pos": pos[p], **caches},
                               {"logits": logits, "seq_out": seq, "pos_out": pos[1 - p], **present}) for p in (0, 1)]
    addresses = [v.data_ptr() for v in caches.values()]
    for i in range(steps):
        steps_bound[i % 2]()
    assert [v.data_ptr() for v in caches.values()] == addresses
    kv = model.transformer.make_caches(B, cfg.block_size)
    tokens = torch.from_numpy(ids)
    logits_eager = model.logits(tokens, kv, 0)[:, -1]
    for _ in range(steps):
        nxt = char_gpt2.mask_unknown(logits_eager, 0).argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], 1)
        logits_eager = model.logits(nxt, kv, tokens.size(1) - 1)[:, -1]
    got = runner.to_numpy(seq)
    np.testing.assert_array_equal(got[:, :n0 + steps], tokens.numpy()[:, :n0 + steps])
    np.testing.assert_array_equal(runner.to_numpy(pos[steps % 2]), np.full(B, n0 - 1 + steps))
    n = n0 - 1 + steps  # slots written: the prompt's n0 - 1, then one per step
    np.testing.assert_allclose(runner.to_numpy(caches["past_k.0"])[:, :, :n], kv[0].k[:, :, :n].numpy(), **FP32)


def test_greedy_generation_through_ort_is_eager_past_the_context(setup):
    tmp, ckpt, model, cfg = setup
    bundle = load_bundle(tmp / "fp32")
    request = GenerateRequest(b"def ", 100, 2, GREEDY, {"assets": str(ckpt / "assets")})  # 104 > context 64
    ort = generate_on(bundle, request, "ort")
    assert ort.outputs == char_gpt2.generate(model, cfg, request, "eager").outputs
    assert ort.outputs == char_gpt2.generate(model, cfg, request, "eager-reference").outputs
    assert ort.n_new == 200 and all(len(o.decode()) == 100 for o in ort.outputs)
    # the same through the CLI: a bundle path runs on ORT
    args = ["generate", "--prompt", "def ", "--max-new", "100", "--temperature", "0"]
    by_bundle = CliRunner().invoke(cli, [*args[:1], str(tmp / "fp32"), *args[1:]])
    by_ckpt = CliRunner().invoke(cli, [*args[:1], str(ckpt), *args[1:]])
    assert by_bundle.exit_code == 0 and by_ckpt.exit_code == 0, by_bundle.output + by_ckpt.output
    assert by_bundle.stdout == by_ckpt.stdout == ort.outputs[0].decode() + "\n"


def test_unknown_symbol_is_never_sampled_through_ort(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", unknown_bias=30.0)  # the unknown symbol's logit is the highest
    bundle = export(ckpt, tmp_path / "bundle")
    for sampling in (GREEDY, SamplingConfig(temperature=1.0, seed=3)):
        result = generate_on(bundle, GenerateRequest(b"x", 80, 2, sampling, {}), "ort")
        assert all(len(o.decode()) == 80 and set(o.decode()) <= set(TEXT) for o in result.outputs)


def test_fp16_bundle_is_close_to_eager_fp32(setup):
    tmp, ckpt, model, cfg = setup
    bundle = load_bundle(tmp / "fp16")
    assert bundle.graphs["decode"].inputs[2].dtype == "float16"
    assert bundle.graphs["sample"].inputs[0].dtype == "float16"
    compare(bundle, verify_cases(model, cfg, bundle, 2, 32, seed=0), FP16, feed_dtype=np.float16)
    result = generate_on(bundle, GenerateRequest(b"def ", 80, 2, GREEDY, {}), "ort")
    assert all(len(o.decode()) == 80 and set(o.decode()) <= set(TEXT) for o in result.outputs)
