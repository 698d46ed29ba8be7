"""The native GPU runtime (runtimes/native*.py) and the fused bGPT patch decode (plugins/patch_decode.py).

GPU tests: greedy native output equals the eager backend's, family by family (float32; the models have weights
large enough that logits are far from ties, so rounding-level differences between the masked full-cache attention
and eager's prefix attention cannot flip an argmax); the fused patch decode equals bgpt.generate_patch; seeded
sampling is reproducible. CPU test: asking for native without CUDA is a one-line UserError."""

import numpy as np
import pytest
import torch
from gpu_marks import gpu_test

from bytedeploy.errors import UserError
from bytedeploy.generation import GenerateRequest
from bytedeploy.models import bfn, bgpt, bitnet, char_gpt2
from bytedeploy.models import sigma_gpt as sg
from bytedeploy.models.sampling import make_generator
from bytedeploy.runtimes import native
from bytedeploy.sampling import SamplingConfig
from bytedeploy.tokenizers import CharTokenizer

GREEDY = SamplingConfig(temperature=0.0)
SAMPLED = SamplingConfig(top_k=20, top_p=0.9, temperature=0.8, seed=5)
cuda = gpu_test()


def spread(model, std=0.5, seed=0):
    """Redraw every weight from N(0, std), LayerNorm gains 1: logits far from ties."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)
    return model.eval()


def bgpt_model(device="cuda"):
    cfg = bgpt.Config(patch_size=8, n_patches=12, n_embd=32, n_layer=2, n_head=4, byte_n_layer=2, byte_n_head=4)
    model = spread(bgpt.Model(cfg))
    with torch.no_grad():
        model.byte_wte.weight[bgpt.SPECIAL] *= 0.2  # the end mark rarely wins: patches run to the end
    return model.to(device), cfg


def char_assets(tmp_path, text):
    tok = CharTokenizer.from_text(text)
    (tmp_path / char_gpt2.TOKENIZER_FILE).write_bytes(tok.to_json())
    return tok, str(tmp_path)


def test_native_without_cuda_is_a_one_line_error(monkeypatch):
    model, cfg = bgpt_model("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="^the native backend needs a CUDA GPU$"):
        native.generate(model, cfg, "bgpt", GenerateRequest(b"abc", 8))
    with pytest.raises(UserError, match="no loop for family 'nope'"):
        native.generate(model, cfg, "nope", GenerateRequest(b"abc", 8))


@cuda
def test_bgpt_native_greedy_equals_eager_and_reuses_its_graph():
    model, cfg = bgpt_model()
    for prompt, max_new in ((b"abc", 60), (b"12345678", 0), (b"", 20)):  # a forced tail, whole patches, empty
        request = GenerateRequest(prompt, max_new, 3, GREEDY, {"ext": "py"})
        eager = bgpt.generate(model, cfg, request, "eager")
        first = native.generate(model, cfg, "bgpt", request)
        again = native.generate(model, cfg, "bgpt", request)
        assert first.outputs == eager.outputs and again.outputs == eager.outputs
        assert first.n_new == eager.n_new > 0
    assert again.extra["captured"] is False  # same batch and sampling: the captured graph was replayed
    runner = next(iter(model.__dict__[native.RUNNERS_ATTRIBUTE].values()))
    assert sorted(runner.prefill_graphs) == [1, 2]  # one captured prompt prefill per prompt length (BOS + whole)


def test_bgpt_last_patch_bytes_are_those_asked_for():
    from bytedeploy.runtimes.native_bgpt import last_patch_bytes

    cfg = bgpt.Config(patch_size=8, n_patches=12)
    for max_new, tail, max_patches, expected in ((60, 3, 8, 7), (61, 3, 8, 8), (2, 7, 2, 1), (20, 0, 3, 4),
                                                 (0, 3, 11, 8), (500, 0, 11, 8)):  # no limit; the context ends
        assert last_patch_bytes(cfg, GenerateRequest(b"", max_new), [0] * tail, max_patches) == expected


@cuda
@pytest.mark.parametrize("kernels", ["auto", "torch"])
def test_bgpt_native_first_and_last_patches_equal_eager(kernels):
    """A run's first patch prefills its forced bytes in one pass; its last one stops at the last byte asked for
    and skips the patch decoder's step after it. The output still equals eager's, on the fused kernels and on the
    torch path."""
    model, cfg = bgpt_model()
    saved = native.KERNELS
    native.KERNELS = kernels
    try:  # (forced bytes, bytes of the last patch): (7, 1), (3, 8), (3, 7), one patch (3, 5)
        for prompt, max_new in ((b"abcdefg", 2), (b"abc", 61), (b"abc", 60), (b"abc", 2)):
            request = GenerateRequest(prompt, max_new, 2, GREEDY)
            assert native.generate(model, cfg, "bgpt", request).outputs == bgpt.generate(model, cfg, request).outputs
        runner = next(iter(model.__dict__[native.RUNNERS_ATTRIBUTE].values()))
        assert runner.decoder.fused == (kernels == "auto")
        # (forced bytes prefilled, bytes decoded, patch decoder step after?): the first and last patches' graphs
        assert set(runner.edge_graphs) == {(0, 8, True), (7, 8, True), (0, 1, False), (3, 8, True), (0, 8, False),
                                           (0, 7, False), (3, 2 + 3, False)}
    finally:
        native.KERNELS = saved


@cuda
def test_bgpt_native_compile_equals_eager():
    """options compile: torch.compile's kernels in the graphs instead of the fused ones, first and last patches
    included (3 forced bytes, a last patch of 7)."""
    model, cfg = bgpt_model()
    request = GenerateRequest(b"abc", 20, 2, GREEDY, {"compile": True})
    result = native.generate(model, cfg, "bgpt", request)
    assert result.extra["compile"] and result.outputs == bgpt.generate(model, cfg, request, "eager").outputs
    runner = next(iter(model.__dict__[native.RUNNERS_ATTRIBUTE].values()))
    assert not runner.decoder.fused and set(runner.edge_graphs) == {(0, 8, True), (3, 8, True), (0, 7, False)}


@cuda
def test_bgpt_native_keeps_few_edge_graphs(monkeypatch):
    """Past MAX_EDGE_GRAPHS the oldest first / last patch graph is dropped (each holds a memory pool), never the
    patch graph; a dropped one is captured again when asked for."""
    from bytedeploy.runtimes import native_bgpt

    monkeypatch.setattr(native_bgpt, "MAX_EDGE_GRAPHS", 2)
    model, cfg = bgpt_model()
    for prompt, max_new in ((b"abcdefg", 2), (b"abc", 60), (b"abc", 2), (b"abcdefg", 2)):
        request = GenerateRequest(prompt, max_new, 1, GREEDY)
        assert native.generate(model, cfg, "bgpt", request).outputs == bgpt.generate(model, cfg, request).outputs
        runner = next(iter(model.__dict__[native.RUNNERS_ATTRIBUTE].values()))
        assert len(runner.edge_graphs) <= 3 and runner.edge_graphs[(0, 8, True)] is runner.graph
    assert set(runner.edge_graphs) == {(0, 8, True), (7, 8, True), (0, 1, False)}


@cuda
def test_bgpt_short_prompt_prefill_in_the_fused_kernels_equals_the_torch_pass():
    """A prompt of few patches is prefilled one patch at a time in the fused kernels; the first feature and the
    patch decoder's cache equal those of the torch forward pass (what longer prompts take)."""
    from bytedeploy.runtimes import native_bgpt

    model, cfg = bgpt_model()
    prompt = np.random.default_rng(0).integers(0, 256, (3, cfg.patch_size))
    results, saved = {}, native_bgpt.FUSED_PREFILL_MAX_PATCHES
    try:
        for limit in (0, 3):
            native_bgpt.FUSED_PREFILL_MAX_PATCHES = limit
            runner = native_bgpt.BgptRunner(model, 2, GREEDY)
            with torch.no_grad():
                runner.prefill(prompt)
            results[limit] = [runner.decoder.feature.clone()] + [t[:, :, :3].clone() for c in runner.caches
                                                                 for t in (c.k, c.v)]
    finally:
        native_bgpt.FUSED_PREFILL_MAX_PATCHES = saved
    for fused, torch_pass in zip(results[3], results[0]):
        torch.testing.assert_close(fused, torch_pass, atol=2e-5, rtol=1e-5)


@cuda
def test_bgpt_files_that_end_early_stop_like_eager():
    model, cfg = bgpt_model()
    with torch.no_grad():  # the end mark's embedding along the final LayerNorm's bias: it wins after a few bytes
        model.byte_wte.weight[bgpt.SPECIAL] = model.byte_decoder.ln_f.bias
    for prompt in (b"hello wo", b"abc", b""):
        request = GenerateRequest(prompt, 0, 2, GREEDY)
        result = native.generate(model, cfg, "bgpt", request)
        assert result.outputs == bgpt.generate(model, cfg, request).outputs
        assert len(result.outputs[0]) < cfg.max_bytes - len(prompt)


@cuda
def test_fused_patch_decode_equals_generate_patch():
    from bytedeploy.plugins.patch_decode import PatchDecoder

    model, cfg = bgpt_model()
    B = 4
    feature = torch.randn(B, cfg.n_embd, device="cuda")
    decoder = PatchDecoder(model, B, GREEDY)
    for k in (0, 3):
        forced = torch.randint(0, 256, (B, k), device="cuda")
        caches = model.byte_decoder.make_caches(B, cfg.patch_size)
        with torch.no_grad():
            eager = bgpt.generate_patch(model, feature, forced, caches, GREEDY, make_generator(0, "cuda"))
        assert torch.equal(decoder(feature, forced), eager)
    # seeded sampling: the same seed gives the same patch, another seed another one
    sampled = PatchDecoder(model, B, SAMPLED, make_generator(5, "cuda"))
    patches = []
    for seed in (5, 5, 6):
        sampled.generator.manual_seed(seed)
        patches.append(sampled(feature))
    assert torch.equal(patches[0], patches[1]) and not torch.equal(patches[0], patches[2])


@cuda
def test_bgpt_seeded_sampling_is_reproducible():
    model, cfg = bgpt_model()
    outs = [native.generate(model, cfg, "bgpt", GenerateRequest(b"ab", 40, 2, SamplingConfig(
        top_k=20, top_p=0.9, temperature=1.0, seed=seed))).outputs for seed in (1, 1, 2)]
    assert outs[0] == outs[1] and outs[0] != outs[2]
    assert outs[0][0] != outs[0][1]  # the rows of a batch draw different bytes


@cuda
def test_char_gpt2_native_equals_eager_past_the_context(tmp_path):
    tok, assets = char_assets(tmp_path, "abcdefghijk")
    cfg = char_gpt2.Config(block_size=8, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=16)
    model = spread(char_gpt2.Model(cfg)).cuda()
    for prompt, max_new in ((b"abc", 30), (b"abcdefghijkabc", 5)):  # slides 25 times; a prompt past the context
        request = GenerateRequest(prompt, max_new, 2, GREEDY, {"assets": assets})
        eager = char_gpt2.generate(model, cfg, request, "eager")
        assert native.generate(model, cfg, "char-gpt2", request).outputs == eager.outputs
    sampled = [native.generate(model, cfg, "char-gpt2", GenerateRequest(b"abc", 30, 2, SAMPLED, {"assets": assets}))
               for _ in range(2)]
    assert sampled[0].outputs == sampled[1].outputs
    assert all("\x00" not in o.decode() for o in sampled[0].outputs)


@cuda
@pytest.mark.parametrize("order", ["left-to-right", "random"])
def test_sigma_gpt_native_equals_eager(tmp_path, order):
    tok = CharTokenizer.from_text("def sample(x):\n    return x + 1\n")
    (tmp_path / sg.TOKENIZER_FILE).write_bytes(tok.to_json())
    cfg = sg.Config(vocab_size=tok.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    model = spread(sg.Model(cfg)).cuda()
    request = GenerateRequest(b"def", 12, 2, GREEDY, {"assets": str(tmp_path), "order": order})
    eager = sg.generate(model, cfg, request, "eager")
    result = native.generate(model, cfg, "sigma-gpt", request)
    assert result.outputs == eager.outputs and result.passes == eager.passes


@cuda
def test_bitnet_native_equals_eager_fp_and_integer_paths():
    cfg = bitnet.Config(block_size=16, n_layer=2, n_head=2, n_embd=32, ffn_hidden=64)
    torch.manual_seed(0)
    model = bitnet.Model(cfg)
    with torch.no_grad():
        model.tok_emb.weight.normal_(0.0, 1.0)
        model.lm_head.weight.normal_(0.0, 1.0)
    model = model.cuda().eval()
    request = GenerateRequest(b"hello", 30, 2, GREEDY, {"bitlinear": "fp"})  # 35 bytes: the window slides
    fp = native.generate(model, cfg, "bitnet", request)
    assert fp.outputs == bitnet.generate(model, cfg, request, "eager").outputs
    assert fp.extra["bitlinear"].startswith("fp")
    from bytedeploy.runtimes.native_bitnet import load_kernel

    if load_kernel()[0] is None:
        pytest.skip(load_kernel()[1])
    kernel = native.generate(model, cfg, "bitnet", GenerateRequest(b"hello", 30, 2, GREEDY, {"bitlinear": "w2a8"}))
    model.set_inference_int(True)
    try:
        assert kernel.outputs == bitnet.generate(model, cfg, request, "eager").outputs
    finally:
        model.set_inference_int(False)
    assert kernel.extra["bitlinear"].startswith("w2a8")


@cuda
def test_bfn_native_step_graph_equals_eager():
    from bytedeploy.runtimes.native_bfn import FlowRunner

    cfg = bfn.Config(vocab_size=24, seq_len=10, n_layer=2, n_head=2, n_embd=16, time_dim=8, dropout=0.0, n_steps=15)
    model = spread(bfn.Model(cfg), std=0.3).cuda()
    ids = torch.tensor([3, 9, 14] + [0] * 7, device="cuda")
    fixed = torch.arange(10, device="cuda") < 3
    with torch.no_grad():
        for sampling in (GREEDY, SamplingConfig(temperature=0.0, seed=1)):
            eager = bfn.generate_eager(model, ids, fixed, 15, sampling, 2)
            runner = FlowRunner(model, 2, 15, sampling)
            assert torch.equal(runner.run(ids, fixed, sampling.seed), eager)
        runner = FlowRunner(model, 2, 15, SAMPLED)
        a, b = runner.run(ids, fixed, 5), runner.run(ids, fixed, 5)
    assert torch.equal(a, b) and (a[:, :3] == ids[:3]).all()
    assert len(set(np.unique(a[:, 3:].cpu().numpy()).tolist())) > 2


class FakeRunner:
    pass


def test_runner_cache_follows_the_weights_and_dies_with_the_model():
    import copy
    import gc
    import weakref

    def runner(model):
        return native.cached_runner(model, ("k",), FakeRunner)

    model = torch.nn.Linear(4, 4)
    first = runner(model)
    assert runner(model) is first  # same weights: reused
    with torch.no_grad():
        model.weight.add_(1.0)  # in place: a new version
    second = runner(model)
    assert second is not first
    model.half()  # new storage and dtype, same version counters
    third = runner(model)
    assert third is not second
    model.inner = torch.nn.Sequential(torch.nn.Linear(4, 4, dtype=torch.half))
    fourth = runner(model)
    assert fourth is not third  # a submodule added
    assert runner(model) is fourth
    model.inner[0] = torch.nn.Linear(4, 4, dtype=torch.half)
    assert runner(model) is not fourth  # a nested submodule replaced
    states = native.weight_states(model, [])
    assert [s[1] for s in states] == [p.data_ptr() for p in model.parameters()]
    assert not copy.deepcopy(model).__dict__[native.RUNNERS_ATTRIBUTE]  # copies start without captured graphs
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
